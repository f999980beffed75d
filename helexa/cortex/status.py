"""``helexa status``: the fleet table of a running gateway, from ``GET /admin/fleet``;
``helexa list`` and ``helexa rm``: the models on this host's disk beside what that
gateway has loaded (``ollama list`` and ``ollama ps`` in one), and deleting a download.

The gateway serves :meth:`Fleet.snapshot` there; this prints it as two aligned tables
(nodes with their devices, then models). :func:`format_fleet_table` is pure so the layout
is tested without a gateway; anything that goes wrong talking to the gateway is one line
on stderr and exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from helexa.config import Settings, listen_url
from helexa.units import mib_text, size_text, used_of_total


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, no trailing spaces."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]
    return "\n".join(lines)


def _device_cell(d: Mapping[str, Any]) -> str:
    used, total = d.get("vram_used_mb"), d.get("vram_total_mb")
    memory = used_of_total(used, total)
    if d.get("kind") == "cpu":  # its "VRAM" is the host's RAM: say so
        text = f"no GPU: running on CPU ({d.get('name') or '?'}), RAM {memory}"
    else:
        text = f"{d.get('index', 0)}: {d.get('name') or '?'} {memory}"
    if d.get("utilization_pct") is not None:
        text += f" {d['utilization_pct']:.0f}%"
    if d.get("temp_c") is not None:
        text += f" {d['temp_c']:.0f}°C"
    return text


def format_fleet_table(snapshot: Mapping[str, Any]) -> str:
    """Nodes (one line per device) and models, as ``helexa status`` prints them."""
    node_rows = []
    for node in snapshot.get("nodes") or ():
        name, host = node.get("name", ""), node.get("hostname") or ""
        if not node.get("up"):  # its last devices are stale; why it is down is what matters
            node_rows.append([name, "down", host, node.get("error") or "no answer"])
            continue
        for i, d in enumerate(node.get("devices") or [{}]):
            cells = [name, "up", host] if i == 0 else ["", "", ""]
            node_rows.append([*cells, _device_cell(d) if d else "-"])
    model_rows = []
    for m in sorted(
        snapshot.get("models") or (), key=lambda m: (m.get("id", ""), m.get("node", ""))
    ):
        idle = m.get("idle_s")
        model_rows.append(
            [
                m.get("id", ""),
                m.get("node", ""),
                m.get("status", ""),
                mib_text(m["vram_used_mb"]) if m.get("vram_used_mb") else "-",
                "yes" if m.get("pinned") else "",
                str(m.get("in_flight") or 0),
                "-" if idle is None else f"{idle:.0f}s",
            ]
        )
    parts = [
        table(["NODE", "STATUS", "HOST", "DEVICES (VRAM used/total)"], node_rows)
        if node_rows
        else "no nodes",
        table(["MODEL", "NODE", "STATUS", "VRAM", "PINNED", "IN-FLIGHT", "IDLE"], model_rows)
        if model_rows
        else "no models",
    ]
    return "\n\n".join(parts)


def gateway_url(settings: Settings) -> str:
    """Where the configured gateway listens, as a client reaches it (wildcards -> loopback)."""
    return listen_url(settings.gateway.listen)


class GatewayRefused(Exception):
    """The gateway answered, but not with a fleet table."""


def _not_helexa(response: aiohttp.ClientResponse) -> GatewayRefused:
    kind = response.content_type or "no content type"
    return GatewayRefused(
        f"HTTP {response.status} ({kind}) is not a helexa gateway's answer: "
        "is this the gateway's address (helexa --serve prints it)?"
    )


async def fetch_snapshot(url: str, admin_key: str | None, timeout_s: float = 10.0) -> Any:
    """The fleet table; anything else the server says is one line, never its page: a
    server that is not a helexa gateway is named as such, by what it answered."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with (
        aiohttp.ClientSession(timeout=timeout, headers=headers) as session,
        session.get(f"{url.rstrip('/')}/admin/fleet") as response,
    ):
        try:
            body = await response.json(content_type=None)
        except ValueError:
            raise _not_helexa(response) from None
        if response.status >= 400:
            try:
                message = body["error"]["message"]
            except (KeyError, TypeError):
                raise _not_helexa(response) from None
            raise GatewayRefused(f"HTTP {response.status}: {message}")
        if not isinstance(body, dict) or "nodes" not in body:
            raise _not_helexa(response)
        return body


def run_status(
    settings: Settings,
    url: str | None = None,
    admin_key: str | None = None,
    *,
    as_json: bool = False,
    watch_s: float | None = None,
    clear: Callable[[], None] | None = None,
    rounds: int | None = None,
) -> int:
    """Print the fleet table (or the snapshot as JSON) once, or every ``watch_s`` seconds
    until interrupted (``rounds`` bounds it, for a test). A failure is one line; while
    watching, the next round tries again, as ``watch`` would."""
    url, key = gateway_target(settings, url, admin_key)
    clear = clear or (lambda: print("\x1b[H\x1b[2J", end=""))
    done = 0
    status = 0
    while True:
        status = _status_once(url, key, as_json, (clear, watch_s) if watch_s else None)
        done += 1
        if watch_s is None or (rounds is not None and done >= rounds):
            return status
        time.sleep(watch_s)


def _status_once(
    url: str, key: str | None, as_json: bool, watch: tuple[Callable[[], None], float] | None
) -> int:
    try:
        snapshot = asyncio.run(fetch_snapshot(url, key))
        text = json.dumps(snapshot, indent=2) if as_json else format_fleet_table(snapshot)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        text, failed = f"helexa status: cannot reach the gateway at {url}: {reason}", True
    except GatewayRefused as exc:
        text, failed = f"helexa status: {url}: {exc}", True
    else:
        failed = False
    if watch is not None:
        clear, every_s = watch
        clear()
        stamp = time.strftime("%H:%M:%S")
        print(f"helexa status {url}  {stamp}  (every {every_s:g} s; Ctrl-C to stop)\n")
    print(text, file=sys.stderr if failed else sys.stdout, flush=True)
    return 1 if failed else 0


# -- helexa list / helexa rm -------------------------------------------------------------------


def gateway_target(
    settings: Settings, url: str | None, admin_key: str | None
) -> tuple[str, str | None]:
    """Where the CLI finds the running gateway and the key it shows: the flags, else the
    config's listen address and its admin key (or first API key)."""
    key = admin_key or settings.gateway.admin_key or next(iter(settings.gateway.api_keys), None)
    return url or gateway_url(settings), key


def _loaded_where(snapshot: Mapping[str, Any] | None) -> dict[str, list[str]]:
    where: dict[str, list[str]] = {}
    for m in (snapshot or {}).get("models") or ():
        if m.get("status") in ("loaded", "loading"):
            label = m.get("node", "") + ("" if m["status"] == "loaded" else " (loading)")
            where.setdefault(str(m.get("id")), []).append(label)
    return where


def format_model_list(
    disk: Sequence[Any],
    paths: Sequence[tuple[str, str, int | None, float | None]],
    snapshot: Mapping[str, Any] | None,
) -> str:
    """What ``helexa list`` prints: the models on this host's disk (downloads, then the
    catalogue's own files) with size, date and where each is loaded; then what the
    gateway has loaded, wherever it is (``ollama ps``)."""
    where = _loaded_where(snapshot)
    rows = [
        [m.id, size_text(m.size_bytes), _date(m.modified), ", ".join(where.get(m.id, [])) or "-"]
        for m in sorted(disk, key=lambda m: m.id)
    ]
    for model_id, path, size, modified in paths:
        shown = size_text(size) if size is not None else "missing"
        rows.append(
            [
                f"{model_id} ({path})",
                shown,
                _date(modified),
                ", ".join(where.get(model_id, [])) or "-",
            ]
        )
    parts = [
        table(["NAME", "SIZE", "MODIFIED", "LOADED ON"], rows) if rows else "no models on disk"
    ]
    if snapshot is not None:
        loaded = [
            [
                str(m.get("id")),
                str(m.get("node")),
                str(m.get("status")),
                mib_text(m["vram_used_mb"]) if m.get("vram_used_mb") else "-",
                "-" if m.get("idle_s") is None else f"{m['idle_s']:.0f}s",
            ]
            for m in snapshot.get("models") or ()
            if m.get("status") in ("loaded", "loading")
        ]
        parts.append(
            table(["LOADED", "NODE", "STATUS", "VRAM", "IDLE"], loaded)
            if loaded
            else "nothing loaded"
        )
    return "\n\n".join(parts)


def _date(mtime: float | None) -> str:
    return "-" if not mtime else time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime))


def _try_snapshot(url: str, key: str | None) -> tuple[Any, str | None]:
    """The gateway's fleet table, or why there is none (``list`` works without one)."""
    try:
        return asyncio.run(fetch_snapshot(url, key, timeout_s=3.0)), None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return None, f"no gateway at {url} ({str(exc) or type(exc).__name__})"
    except GatewayRefused as exc:
        return None, f"{url}: {exc}"


def _catalogue_files(settings: Settings) -> list[tuple[str, str, int | None, float | None]]:
    out = []
    for profile in settings.models:
        if not profile.path:
            continue
        path = Path(profile.path).expanduser()
        try:
            st = path.stat()
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            size: int | None = sum(f.stat().st_size for f in files)
            out.append((profile.id, str(path), size, st.st_mtime))
        except OSError:
            size = None
            out.append((profile.id, str(path), size, None))
    return out


def run_list(settings: Settings, url: str | None = None, admin_key: str | None = None) -> int:
    """``helexa list``: models on disk, and what a running gateway has loaded where."""
    from helexa.neuron.sources import on_disk

    url, key = gateway_target(settings, url, admin_key)
    snapshot, why = _try_snapshot(url, key)
    print(format_model_list(on_disk(settings), _catalogue_files(settings), snapshot))
    if why is not None:
        print(f"helexa list: what is loaded is not shown: {why}", file=sys.stderr)
    return 0


def run_rm(
    settings: Settings, model_id: str, url: str | None = None, admin_key: str | None = None
) -> int:
    """``helexa rm MODEL``: delete a download; refused while the running gateway's local
    node has it loaded (unload it first), and for a file the catalogue names by path."""
    from helexa.neuron.sources import ref_for, remove, resolve_local

    try:
        ref_for(model_id, settings)  # a catalogue id, or a model id that parses
    except ValueError as exc:
        print(f"helexa rm: {exc}", file=sys.stderr)
        return 2
    url, key = gateway_target(settings, url, admin_key)
    try:
        snapshot = asyncio.run(fetch_snapshot(url, key, timeout_s=3.0))
    except (aiohttp.ClientError, OSError, TimeoutError):
        snapshot = None  # no gateway runs here: nothing of it has the model loaded
    except GatewayRefused as exc:
        print(
            f"helexa rm: {model_id}: the gateway at {url} does not say what it has loaded"
            f" ({exc}): give --admin-key (or --url), or stop it first",
            file=sys.stderr,
        )
        return 1
    # Loaded under any name that means the same files (an alias, another spelling).
    target = resolve_local(model_id, settings)
    local = settings.local.name
    for loaded_id, where in _loaded_where(snapshot).items():
        here = any(n.split()[0] == local for n in where)
        if here and target is not None and resolve_local(loaded_id, settings) == target:
            print(
                f"helexa rm: {model_id}: loaded on {local} as {loaded_id} by the gateway at"
                f" {url}: unload it first (u in the dashboard, or POST /admin/models/unload)",
                file=sys.stderr,
            )
            return 1
    try:
        gone = remove(model_id, settings)
    except (OSError, ValueError) as exc:
        print(f"helexa rm: {model_id}: {exc}", file=sys.stderr)
        return 1
    print(f"deleted {gone.id} ({size_text(gone.size_bytes)}, {len(gone.files)} file(s))")
    return 0
