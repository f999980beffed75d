"""The ``helexa`` command.

``helexa`` opens the TUI; ``helexa --serve`` runs the same process headless. Both embed
the gateway and the local neuron in one asyncio loop (``helexa.cortex.service``).
Subcommands import their modules lazily so ``helexa --help`` stays instant and a host
that only runs ``helexa neuron`` never imports Textual.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from helexa import __version__
from helexa.config import (
    ConfigError,
    Settings,
    check_local_paths,
    config_dir,
    load_settings,
    split_listen,
)
from helexa.demo import with_demo
from helexa.origins import is_loopback_host

_Listener = TypeVar("_Listener", bound=BaseModel)

EPILOG = """\
examples:
  helexa                      dashboard (TUI) with the gateway and local neuron inside
  helexa --serve              the same, headless (systemd, containers, CI)
  helexa neuron               serve this host's GPUs to a remote gateway
  helexa status               fleet table from a running gateway
  helexa pull Qwen/Qwen3-0.6B-GGUF:Q8_0
  helexa list                 models on disk, and what is loaded where
  helexa rm Qwen/Qwen3-0.6B-GGUF:Q8_0
  helexa acp                  Agent Client Protocol agent for editors (Zed)

configuration: helexa.toml and models.toml in the user config dir, or --config/--models;
any key can be overridden with HELEXA_<SECTION>__<KEY> (e.g. HELEXA_GATEWAY__LISTEN).
"""


def _common(p: argparse.ArgumentParser, *, sub: bool = True) -> None:
    """--config/--models, accepted before or after a subcommand. A subcommand's copies
    default to SUPPRESS so they never overwrite a value given before the subcommand."""
    default = argparse.SUPPRESS if sub else None
    p.add_argument(
        "--config", metavar="PATH", default=default, help="helexa.toml (default: user config dir)"
    )
    p.add_argument("--models", metavar="PATH", default=default, help="models.toml catalogue")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="helexa",
        description="Self-hosted LLM serving: OpenAI + Anthropic APIs over GPUs you own.",
        epilog=f"{EPILOG}config dir here: {config_dir()}\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"helexa {__version__}")
    parser.add_argument("--serve", action="store_true", help="run headless (no TUI)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="gateway address (127.0.0.1:31313)")
    parser.add_argument("--no-local", action="store_true", help="do not run the local neuron")
    _common(parser, sub=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    neuron = sub.add_parser("neuron", help="serve this host's devices over the neuron HTTP API")
    neuron.add_argument(
        "--listen", dest="neuron_listen", metavar="HOST:PORT", help="bind address (127.0.0.1:13131)"
    )
    neuron.add_argument(
        "--token", help="bearer token required by the API (env HELEXA_NEURON__TOKEN)"
    )
    _common(neuron)

    status = sub.add_parser("status", help="print the fleet table of a running gateway")
    status.add_argument("--url", help="gateway URL (default: from config)")
    status.add_argument("--admin-key", help="admin key, if the gateway requires one")
    status.add_argument("--json", action="store_true", help="the fleet snapshot as JSON")
    status.add_argument(
        "--watch",
        metavar="SECONDS",
        nargs="?",
        type=_positive_seconds,
        const=2.0,
        help="redraw every SECONDS (default 2) until Ctrl-C",
    )
    _common(status)

    pull = sub.add_parser("pull", help="download a model into its source's cache")
    pull.add_argument("model", help="scheme:org/name[:quant], e.g. Qwen/Qwen3-0.6B-GGUF:Q8_0")
    _common(pull)

    listing = sub.add_parser("list", help="models on disk, and what the gateway has loaded")
    listing.add_argument("--url", help="gateway URL (default: from config)")
    listing.add_argument("--admin-key", help="admin key, if the gateway requires one")
    _common(listing)

    rm = sub.add_parser("rm", help="delete a downloaded model from its source's cache")
    rm.add_argument("model", help="a model id as helexa list shows it")
    rm.add_argument("--url", help="gateway URL, to refuse a model it has loaded")
    rm.add_argument("--admin-key", help="admin key, if the gateway requires one")
    _common(rm)

    acp = sub.add_parser("acp", help="Agent Client Protocol agent over stdio (for Zed etc.)")
    acp.add_argument("--acp-config", metavar="PATH", help="acp.toml (default: user config dir)")
    _common(acp)
    return parser


def _with_listen(target: _Listener, listen: str) -> _Listener:
    try:
        return type(target).model_validate({**target.model_dump(), "listen": listen})
    except ValidationError as exc:
        raise ConfigError("--listen", "", exc.errors()[0]["msg"]) from None


def _positive_seconds(text: str) -> float:
    """An interval in seconds: a number above 0 (argparse turns the error into a usage line)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: the interval must be above 0 seconds")
    return value


def settings_for(args: argparse.Namespace) -> Settings:
    settings = with_demo(load_settings(args.config, args.models))
    if args.command == "neuron" and args.neuron_listen:
        settings.neuron = _with_listen(settings.neuron, args.neuron_listen)
    elif args.command != "neuron" and args.listen:
        metrics_set = "metrics_listen" in settings.gateway.model_fields_set
        settings.gateway = _with_listen(settings.gateway, args.listen)
        if not metrics_set:
            # The default pair moves together: metrics on the next port, on the same
            # host if that is loopback, else on the metrics' own (loopback) one: they
            # carry no key check, so `--listen 0.0.0.0:8080` must not publish them too.
            host, port = split_listen(settings.gateway.listen)
            if not is_loopback_host(host):
                host, _ = split_listen(settings.gateway.metrics_listen)
            metrics = f"[{host}]" if ":" in host else host
            next_port = port + 1 if port and port < 65535 else 0
            settings.gateway.metrics_listen = f"{metrics}:{next_port}"
    if getattr(args, "no_local", False):
        settings.local.enabled = False
    if settings.local.enabled and args.command in (None, "neuron"):
        check_local_paths(settings)  # this process serves them
    if args.command == "neuron" and args.token:
        settings.neuron.token = args.token
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "acp":
            from helexa.acp.agent import main as acp_main

            return acp_main(args.acp_config)
        settings = settings_for(args)
        if args.command == "neuron":
            from helexa.neuron.server import run_neuron

            return run_neuron(settings)
        if args.command == "status":
            from helexa.cortex.status import run_status

            return run_status(
                settings,
                url=args.url,
                admin_key=args.admin_key,
                as_json=args.json,
                watch_s=args.watch,
            )
        if args.command == "list":
            from helexa.cortex.status import run_list

            return run_list(settings, url=args.url, admin_key=args.admin_key)
        if args.command == "rm":
            from helexa.cortex.status import run_rm

            return run_rm(settings, args.model, url=args.url, admin_key=args.admin_key)
        if args.command == "pull":
            from helexa.neuron.sources import run_pull

            return run_pull(settings, args.model)
        if args.serve:
            from helexa.cortex.service import run_headless

            return run_headless(settings)
        from tui.app import run_tui

        return run_tui(settings)
    except ConfigError as exc:
        print(f"helexa: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
