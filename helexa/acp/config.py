"""``acp.toml``: which model endpoints the agent may talk to, and over which wire API.

```toml
default_endpoint = "home"

[[endpoints]]
name = "home"                       # selectors read "home:<model>"
base_url = "http://127.0.0.1:31313" # with or without /v1
wire_api = "openai-chat"            # openai-chat | openai-responses | anthropic-messages
default_model = "Qwen/Qwen3-8B-GGUF:Q4_K_M"
api_key_env = "HELEXA_KEY"          # or api_key = "..."
context_window = 32768              # compaction starts near this many tokens (default:
                                    # the model's context_length from GET /v1/models)
max_tokens = 2048                   # answer limit (default: context_window/4, <= 8192)
```

Without a file the agent runs on one endpoint described by ``HELEXA_ACP_BASE_URL``,
``HELEXA_ACP_MODEL``, ``HELEXA_ACP_WIRE_API`` and ``HELEXA_ACP_API_KEY``, defaulting to the
local helexa gateway: wherever helexa.toml's ``[gateway] listen`` puts it, with the first of
its ``api_keys`` unless HELEXA_ACP_API_KEY gives one. Every mistake in acp.toml or
HELEXA_ACP_* is one :class:`~helexa.config.ConfigError` line at start-up, before the editor
has even sent ``initialize``; a broken helexa.toml is only a warning (see
:func:`local_gateway`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from helexa.config import (
    DEFAULT_GATEWAY_PORT,
    ConfigError,
    check_http_url,
    check_listen,
    config_dir,
    env_overrides,
    first_error,
    listen_url,
    read_toml,
    split_listen,
)

log = logging.getLogger("helexa.acp.config")

WireApi = Literal["openai-chat", "openai-responses", "anthropic-messages"]
DEFAULT_BASE_URL = f"http://127.0.0.1:{DEFAULT_GATEWAY_PORT}"
DEFAULT_ENDPOINT = "default"
DEFAULT_CONTEXT_WINDOW = 32768
MAX_ANSWER_RESERVE = 8192
ENV_SOURCE = "environment (HELEXA_ACP_*)"


class EndpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    base_url: str
    wire_api: WireApi = "openai-chat"
    default_model: str | None = None  # None: the first model the endpoint lists
    api_key: str | None = None
    api_key_env: str | None = None
    context_window: int | None = Field(default=None, ge=1024)  # None: learned, else 32768
    max_tokens: int | None = Field(default=None, ge=1)

    @field_validator("name")
    @classmethod
    def _no_colon(cls, value: str) -> str:
        if ":" in value:
            raise ValueError("must not contain ':' (selectors read endpoint:model)")
        return value

    _base_url = field_validator("base_url")(check_http_url)


class AcpFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoints: list[EndpointConfig] = Field(min_length=1)
    default_endpoint: str | None = None
    system_prompt: str | None = None
    max_iterations: int = Field(default=50, ge=1)


def answer_reserve(context_window: int, max_tokens: int | None) -> int:
    """Tokens kept free for the model's answer: ``max_tokens`` when configured, else a
    quarter of the window, at most 8192.

    One number serves both sides of a request: compaction fits the conversation into the
    window less this, and APIs that require ``max_tokens`` (Anthropic) ask for exactly
    this, so prompt plus answer stay within a small-context model's limit.
    """
    return max_tokens or min(MAX_ANSWER_RESERVE, context_window // 4)


@dataclass(frozen=True)
class Endpoint:
    """An endpoint with its API key resolved, ready to build a provider from.

    ``context_window`` is the configured window; None means the model's own, as the
    endpoint lists it (see :meth:`sized`), else :data:`DEFAULT_CONTEXT_WINDOW`.
    """

    name: str
    base_url: str
    wire_api: WireApi
    default_model: str | None
    api_key: str | None
    context_window: int | None
    max_tokens: int | None

    @property
    def window(self) -> int:
        return self.context_window or DEFAULT_CONTEXT_WINDOW

    @property
    def answer_reserve(self) -> int:
        return answer_reserve(self.window, self.max_tokens)

    def sized(self, learned: int | None) -> Endpoint:
        """This endpoint with the window its server reported for the model (``learned``),
        unless one is configured: the configured window always wins."""
        if self.context_window is not None or learned is None:
            return self
        return replace(self, context_window=learned)


@dataclass(frozen=True)
class AcpSettings:
    endpoints: dict[str, Endpoint]
    default_endpoint: str
    system_prompt: str | None = None
    max_iterations: int = 50
    source: str = ENV_SOURCE


@dataclass(frozen=True)
class Selection:
    """Where a session's prompts go; ``model`` None means "ask the endpoint"."""

    endpoint: Endpoint
    model: str | None

    @property
    def selector(self) -> str:
        return f"{self.endpoint.name}:{self.model}" if self.model else self.endpoint.name


class SelectorError(ValueError):
    pass


def resolve_selector(settings: AcpSettings, selector: str) -> Selection:
    """``endpoint:model``, ``endpoint`` or a bare model id on the default endpoint.

    Model ids may themselves contain ':' (``huggingface:Qwen/Qwen3-8B-GGUF:Q4_K_M``), so the
    prefix only names an endpoint when one by that name exists.
    """
    selector = selector.strip()
    if not selector:
        raise SelectorError("empty model selector; expected endpoint:model")
    name, _, model = selector.partition(":")
    if name in settings.endpoints:
        endpoint = settings.endpoints[name]
        return Selection(endpoint, model.strip() or endpoint.default_model)
    return Selection(settings.endpoints[settings.default_endpoint], selector)


def default_selection(settings: AcpSettings) -> Selection:
    endpoint = settings.endpoints[settings.default_endpoint]
    return Selection(endpoint, endpoint.default_model)


def acp_config_path() -> Path:
    return config_dir() / "acp.toml"


def load_acp_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> AcpSettings:
    """Read acp.toml (``path`` or the user config dir), else the HELEXA_ACP_* environment."""
    environ = os.environ if environ is None else environ
    file = Path(path) if path else acp_config_path()
    if path or file.exists():
        return _from_file(file, environ)
    return _from_env(environ)


def _from_file(file: Path, environ: Mapping[str, str]) -> AcpSettings:
    where = str(file)
    data = read_toml(file)
    try:
        parsed = AcpFile.model_validate(data)
    except ValidationError as exc:
        raise first_error(where, exc, data, AcpFile) from None
    endpoints: dict[str, Endpoint] = {}
    for i, ep in enumerate(parsed.endpoints):
        if ep.name in endpoints:
            raise ConfigError(where, f"endpoints.{i}.name", f"{ep.name!r} is not unique")
        endpoints[ep.name] = _resolve(ep, environ, where, f"endpoints.{i}")
    default = parsed.default_endpoint or parsed.endpoints[0].name
    if default not in endpoints:
        known = ", ".join(endpoints)
        raise ConfigError(where, "default_endpoint", f"{default!r} is not an endpoint ({known})")
    return AcpSettings(endpoints, default, parsed.system_prompt, parsed.max_iterations, where)


# -- where the local gateway is ------------------------------------------------------------


class GatewayTable(BaseModel):
    """The keys of helexa.toml's ``[gateway]`` the agent reads; the rest is the gateway's
    business, so unknown keys are ignored rather than rejected."""

    model_config = ConfigDict(extra="ignore")

    listen: str | None = None
    api_keys: list[str] = Field(default_factory=list)

    @field_validator("listen")
    @classmethod
    def _connectable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        check_listen(value)
        if split_listen(value)[1] == 0:
            raise ValueError("port 0 is a random port; there is nothing to connect to")
        return value


class _HelexaToml(BaseModel):
    model_config = ConfigDict(extra="ignore")

    gateway: GatewayTable = Field(default_factory=GatewayTable)


_GATEWAY_VARS = {"listen": "HELEXA_GATEWAY__LISTEN", "api_keys": "HELEXA_GATEWAY__API_KEYS"}


def _gateway_table(
    environ: Mapping[str, str], keys: tuple[str, ...]
) -> tuple[GatewayTable, dict[str, str]]:
    """``[gateway]``'s ``keys`` (of listen, api_keys) as ``helexa --serve`` would read them,
    and where each came from: HELEXA_GATEWAY__<KEY> over HELEXA_CONFIG's file (or
    helexa.toml in the config dir). The file is read only for keys the environment leaves
    unset, and only those keys of it are checked."""
    explicit = environ.get("HELEXA_CONFIG")
    file = Path(explicit) if explicit else config_dir() / "helexa.toml"
    from_env = {key: _GATEWAY_VARS[key] for key in keys if environ.get(_GATEWAY_VARS[key])}
    raw: dict[str, Any] = {}
    if set(keys) - set(from_env) and (explicit or file.exists()):
        raw = read_toml(file)
    section: Any = raw.get("gateway", {})
    if isinstance(section, dict):  # anything else is the file's mistake, reported below
        section = {k: v for k, v in section.items() if k in keys and k not in from_env}
        overrides = env_overrides({var: environ[var] for var in from_env.values()})
        section.update(overrides.get("gateway", {}))
    try:
        table = _HelexaToml.model_validate({"gateway": section}).gateway
    except ValidationError as exc:
        loc = exc.errors()[0]["loc"]
        key = str(loc[1]) if len(loc) > 1 else ""
        raise first_error(from_env.get(key, str(file)), exc) from None
    return table, {key: from_env.get(key, str(file)) for key in keys}


@dataclass(frozen=True)
class LocalGateway:
    url: str = DEFAULT_BASE_URL
    api_key: str | None = None  # the first of [gateway] api_keys


def local_gateway(environ: Mapping[str, str], *, want_key: bool = True) -> LocalGateway:
    """The local gateway's URL, following helexa.toml (the built-in default otherwise), and,
    when ``want_key``, the first of its ``api_keys``, so a keyed gateway needs no ACP config.

    A broken helexa.toml is the gateway's mistake to report (``helexa --serve`` exits on
    it with the same line), so here it is a warning on stderr, which Zed shows in its
    agent log, and the agent falls back to the default address (and no key) rather than
    refusing to start over a file it only reads two keys of.
    """
    try:
        table, sources = _gateway_table(
            environ, ("listen", "api_keys") if want_key else ("listen",)
        )
    except ConfigError as exc:
        log.warning("%s; using the default gateway address %s", exc, DEFAULT_BASE_URL)
        return LocalGateway()
    url = DEFAULT_BASE_URL
    if table.listen is not None:
        url = listen_url(table.listen)
        log.info("gateway address %s from %s", url, sources["listen"])
    api_key = next((key for key in table.api_keys if key), None)
    if api_key:
        log.info("gateway API key from %s (the first of its api_keys)", sources["api_keys"])
    return LocalGateway(url, api_key)


def _from_env(environ: Mapping[str, str]) -> AcpSettings:
    fields = {
        "base_url": "HELEXA_ACP_BASE_URL",
        "default_model": "HELEXA_ACP_MODEL",
        "wire_api": "HELEXA_ACP_WIRE_API",
        "api_key": "HELEXA_ACP_API_KEY",
    }
    raw = {key: environ[var] for key, var in fields.items() if environ.get(var)}
    raw["name"] = DEFAULT_ENDPOINT
    if "base_url" not in raw:  # only then is helexa.toml any of our business
        gateway = local_gateway(environ, want_key="api_key" not in raw)
        raw["base_url"] = gateway.url
        if gateway.api_key:
            raw["api_key"] = gateway.api_key
    try:
        ep = EndpointConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        var = fields.get(str(err["loc"][0]), str(err["loc"][0])) if err["loc"] else ""
        raise ConfigError(ENV_SOURCE, var, err["msg"]) from None
    endpoint = _resolve(ep, environ, ENV_SOURCE, "")
    return AcpSettings({endpoint.name: endpoint}, endpoint.name)


def _resolve(ep: EndpointConfig, environ: Mapping[str, str], where: str, key: str) -> Endpoint:
    api_key = ep.api_key
    if ep.api_key_env:
        if ep.api_key:
            raise ConfigError(where, f"{key}.api_key_env", "set api_key or api_key_env, not both")
        api_key = environ.get(ep.api_key_env)
        if not api_key:
            raise ConfigError(
                where, f"{key}.api_key_env", f"environment variable {ep.api_key_env} is not set"
            )
    return Endpoint(
        name=ep.name,
        base_url=ep.base_url,
        wire_api=ep.wire_api,
        default_model=ep.default_model,
        api_key=api_key,
        context_window=ep.context_window,
        max_tokens=ep.max_tokens,
    )
