"""Settings: ``helexa.toml`` (gateway, eviction, neurons, local node) + ``models.toml``
(the catalogue) + ``HELEXA_*`` environment overrides.

Files are looked up in the platformdirs config dir unless a path is given. A mistake in
any of them becomes one :class:`ConfigError` naming the file, the key and the problem;
the CLI prints that line and exits 2, so an operator never reads a pydantic traceback.

Environment overrides use ``HELEXA_<SECTION>__<KEY>`` (``HELEXA_GATEWAY__LISTEN=...``);
values are parsed as TOML literals when they parse (``true``, ``5``, ``["a"]``), else
taken as strings. ``HELEXA_CONFIG`` and ``HELEXA_MODELS`` point at the two files.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

APP = "helexa"
# A GPU step that produces nothing this long is taken to hang (see LocalSettings).
GPU_STEP_TIMEOUT_S = 600.0
DEFAULT_GATEWAY_PORT = 31313
DEFAULT_METRICS_PORT = 31314
DEFAULT_NEURON_PORT = 13131


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP))


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP))


def data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


class ConfigError(Exception):
    """One line an operator can act on: which file, which key, what is wrong."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file, self.key, self.problem = file, key, problem
        super().__init__(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_listen(value: str) -> str:
    """``value`` unchanged when it reads ``HOST:PORT`` (port 0-65535); ValueError otherwise,
    so it serves as a pydantic field validator."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


def check_http_url(value: str) -> str:
    """``value`` without a trailing slash when it is an ``http(s)://`` URL; ValueError
    otherwise, so it serves as a pydantic field validator."""
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"expected an http(s):// URL, got {value!r}")
    return value.rstrip("/")


def split_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def http_url(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 literal in its brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


_ANY_V4 = frozenset({"", "0.0.0.0", "*"})
_ANY_V6 = frozenset({"::", "0:0:0:0:0:0:0:0"})


def listen_url(listen: str) -> str:
    """The URL that reaches a server bound to ``listen`` from this host.

    A wildcard bind (``0.0.0.0``, ``::``) accepts on every interface but is no address to
    dial, so it becomes the matching loopback.
    """
    host, port = split_listen(listen)
    if host in _ANY_V4:
        host = "127.0.0.1"
    elif host in _ANY_V6:
        host = "::1"
    return http_url(host, port)


class GatewaySettings(_Strict):
    listen: str = f"127.0.0.1:{DEFAULT_GATEWAY_PORT}"
    metrics_listen: str = f"127.0.0.1:{DEFAULT_METRICS_PORT}"
    api_keys: list[str] = Field(default_factory=list)
    admin_key: str | None = None
    # Bounds a model load (downloads, copies) and a remote node's wait for an answer.
    request_timeout_s: float = 600.0
    # Once a stream is under way, this long without a chunk from its node ends it with an
    # error event: a frozen node is not left holding the client. Raise it for prompts whose
    # prefill takes longer than this on your slowest device. 0 disables it.
    stream_idle_timeout_s: float = Field(default=120.0, ge=0)
    # On SIGTERM/quit, how long streams in flight may take to finish before each is ended
    # with an error event in its dialect (and requests still waiting are answered 503).
    drain_s: float = Field(default=20.0, ge=0)
    # Streams one remote node carries at once; more wait for a slot, counted by the
    # helexa_node_streams_waiting gauge. 0: no limit. The node's engine queues what its
    # devices cannot run at once, so this only bounds connections to it.
    max_streams_per_node: int = Field(default=1024, ge=0)
    # The largest request body accepted, in MiB. Unset: what the largest context served
    # can use at 64 bytes a token (at least 1 MiB; 8 MiB while no context length is known),
    # so a full conversation with big tool results fits and a runaway body is refused
    # (413) before it is read, let alone parsed.
    max_body_mb: float | None = Field(default=None, gt=0)
    # Web pages allowed to call the gateway and read its answers (CORS); "*" for any.
    cors_origins: list[str] = Field(default_factory=list)
    # Host names accepted besides loopback ones on a loopback bind (DNS rebinding guard).
    allowed_hosts: list[str] = Field(default_factory=list)
    # One INFO line per request on the helexa.access logger (what --serve prints).
    access_log: bool = True

    _listen = field_validator("listen", "metrics_listen")(check_listen)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            scheme, sep, rest = origin.partition("://")
            if origin != "*" and (
                scheme not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/")
            ):
                raise ValueError(
                    f"expected an origin like 'http://localhost:3000' or '*', got {origin!r}"
                )
        return value


class EvictionSettings(_Strict):
    strategy: Literal["lru", "priority"] = "lru"
    idle_ttl_s: float = 0.0  # 0 disables idle unloading
    defrag_after_cycles: int = 0


class NeuronEndpoint(_Strict):
    name: str
    endpoint: str
    token: str | None = None

    _endpoint = field_validator("endpoint")(check_http_url)


class LocalSettings(_Strict):
    enabled: bool = True
    name: str = "local"
    devices: list[int] | None = None  # None: every device discovered
    # Host memory (MiB) per loaded model for snapshots of earlier conversations' KV cache,
    # restored when a conversation comes back after another; None: the engine's default
    # for the device (4096 on a GPU, 0 on a CPU). The last conversation stays on the
    # device and is reused whatever this says.
    prompt_cache_mb: int | None = Field(default=None, ge=0)
    # Directories whose files a load request may name by path; the catalogue's own paths
    # are always loadable. Empty: no other path is (the neuron API must not open any file).
    model_dirs: list[str] = Field(default_factory=list)
    # A device serves one stream at a time: chunks a stream may hold for a reader that is
    # behind, and how long the device waits with them all unread before it cancels that
    # stream and serves the next (a client that stopped reading must not freeze the rest).
    stream_buffer: int = Field(default=256, ge=1)
    stream_stall_s: float = Field(default=10.0, gt=0)
    # The longest a running generation may go without producing its next chunk (its whole
    # prefill, or one decode step) before it is aborted and its model marked failed: a
    # step that hangs (a driver fault, a collective that never completes) must not hang
    # the node. None (the default): GPU_STEP_TIMEOUT_S on a GPU and no limit on a CPU,
    # where a step cannot hang that way and a long prompt's prefill may take many minutes.
    step_timeout_s: float | None = Field(default=None, gt=0)

    def step_timeout(self, device: str) -> float | None:
        """The step timeout on a device of type ``device`` ("cuda", "cpu")."""
        if self.step_timeout_s is not None:
            return self.step_timeout_s
        return GPU_STEP_TIMEOUT_S if device == "cuda" else None


class NeuronServerSettings(_Strict):
    """``helexa neuron``: the node plane served over HTTP."""

    listen: str = f"127.0.0.1:{DEFAULT_NEURON_PORT}"
    token: str | None = None

    _listen = field_validator("listen")(check_listen)


class SourceSettings(_Strict):
    """A model source: its own hub endpoint and cache dir so names never collide."""

    name: str
    endpoint: str | None = None
    cache_dir: str | None = None
    token_env: str | None = None


class PollerSettings(_Strict):
    interval_s: float = 5.0
    timeout_s: float = 3.0


class SamplingDefaults(_Strict):
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_tokens: int | None = None


class ModelProfile(_Strict):
    """One ``[[models]]`` entry of models.toml: how to serve a model, not where.

    ``path`` is the exception: a GGUF file or HF directory already on the serving host,
    served under ``id`` (a friendly name) instead of being resolved through a source.
    """

    id: str
    source: str | None = None
    path: str | None = None
    quant: str | None = None
    vram_mb: int = 0
    min_devices: int = 1
    min_device_vram_mb: int = 0
    pinned_on: list[str] = Field(default_factory=list)
    priority: int = 0
    aliases: list[str] = Field(default_factory=list)
    context_length: int | None = None
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    # Which file declared it, as (file, 1-based entry), for messages about it.
    _declared: tuple[str, int] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_origin(self) -> ModelProfile:
        if self.path and self.source:
            raise ValueError("give either source or path, not both")
        return self

    @property
    def qualified_id(self) -> str:
        """The id a neuron is asked to load: the source prefixed when there is one (an
        empty ``source`` counts as none, so blanking it never yields ``:org/name``). A
        ``path`` profile keeps its own id; the neuron finds the file in its catalogue."""
        return f"{self.source}:{self.id}" if self.source else self.id

    @property
    def names(self) -> tuple[str, ...]:
        """What a client or a load request may call this model: its id and its aliases."""
        return (self.id, *self.aliases)


class Settings(_Strict):
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    eviction: EvictionSettings = Field(default_factory=EvictionSettings)
    neurons: list[NeuronEndpoint] = Field(default_factory=list)
    local: LocalSettings = Field(default_factory=LocalSettings)
    neuron: NeuronServerSettings = Field(default_factory=NeuronServerSettings)
    poller: PollerSettings = Field(default_factory=PollerSettings)
    sources: list[SourceSettings] = Field(default_factory=list)
    default_source: str = "huggingface"
    models: list[ModelProfile] = Field(default_factory=list)
    # Where these settings came from, for messages and `helexa status`.
    config_file: str | None = None
    models_file: str | None = None

    def profile(self, name: str) -> ModelProfile | None:
        """The catalogue entry ``name`` is the id or an alias of (the first, should two
        claim it), so a neuron and its source lookup agree on what a name means; the
        gateway's Catalogue indexes the same :attr:`ModelProfile.names`."""
        return next((p for p in self.models if name in p.names), None)


class _Catalogue(_Strict):
    models: list[ModelProfile] = Field(default_factory=list)


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed file, or a :class:`ConfigError` naming it (unreadable, not TOML)."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read ({exc.strerror})") from None


_MESSAGE_PREFIXES = ("Value error, ", "Assertion failed, ")


def _key_of(loc: tuple[int | str, ...], data: Any) -> str:
    """pydantic's ``("models", 0, "path")`` as people count and name things:
    ``models[1] (qwen3-8b).path``, the entry's id (or name) beside its number."""
    key, node = "", data
    for part in loc:
        if isinstance(part, int):
            item = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            key += f"[{part + 1}]"
            name = (item.get("id") or item.get("name")) if isinstance(item, Mapping) else None
            if isinstance(name, str) and name:
                key += f" ({name})"
            node = item
        else:
            key += f".{part}" if key else str(part)
            node = node.get(part) if isinstance(node, Mapping) else None
    return key


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys the table at ``loc`` may hold, for 'did you mean' (none when unknown)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
        while get_args(current) and not (
            isinstance(current, type) and issubclass(current, BaseModel)
        ):
            inner = [
                a for a in get_args(current) if isinstance(a, type) and issubclass(a, BaseModel)
            ]
            if not inner:
                return []
            current = inner[0]
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _reported(exc: ValidationError) -> ErrorDetails:
    """The error worth one line: an unknown key first (a misspelt ``idd`` also makes ``id``
    missing, and the misspelling is the news), else the first."""
    errors = exc.errors()
    return next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])


def first_error(
    file: str, exc: ValidationError, data: Any = None, model: type[BaseModel] | None = None
) -> ConfigError:
    """One of ``exc``'s errors as one :class:`ConfigError` line blamed on ``file``.

    An unknown key comes with the nearest known key when ``model`` is given; ``data`` (what was validated) lets list entries be named by their id."""
    err = _reported(exc)
    loc = tuple(err["loc"])
    key = _key_of(loc, data)
    msg = err["msg"]
    for prefix in _MESSAGE_PREFIXES:
        msg = msg.removeprefix(prefix)
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
        known = _fields_at(model, loc[:-1]) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    return ConfigError(file, key, msg)


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``HELEXA_GATEWAY__LISTEN=x`` -> ``{"gateway": {"listen": "x"}}``."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith("HELEXA_") or "__" not in name:
            continue
        path = name[len("HELEXA_") :].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _env_value(raw)
    return out


def _override_of(overrides: Mapping[str, Any], loc: tuple[int | str, ...]) -> str | None:
    """The ``HELEXA_*`` variable that set the value at ``loc``, if one did, so an error
    in an override is never blamed on the file."""
    node: Any = overrides
    for depth, part in enumerate(loc):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
        if not isinstance(node, Mapping):
            return "HELEXA_" + "__".join(str(p).upper() for p in loc[: depth + 1])
    return None


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    config_path: str | Path | None = None,
    models_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read helexa.toml and models.toml (either may be absent unless named explicitly)."""
    environ = os.environ if environ is None else environ
    explicit_cfg = config_path or environ.get("HELEXA_CONFIG")
    explicit_models = models_path or environ.get("HELEXA_MODELS")
    cfg_file = Path(explicit_cfg) if explicit_cfg else config_dir() / "helexa.toml"
    models_file = Path(explicit_models) if explicit_models else config_dir() / "models.toml"

    raw: dict[str, Any] = {}
    if explicit_cfg or cfg_file.exists():
        raw = read_toml(cfg_file)
    overrides = env_overrides(environ)
    try:
        settings = Settings.model_validate(_merge(raw, overrides))
    except ValidationError as exc:
        merged = _merge(raw, overrides)
        variable = _override_of(overrides, _reported(exc)["loc"])
        where = variable or (str(cfg_file) if raw else "environment (HELEXA_*)")
        raise first_error(where, exc, merged, Settings) from None
    settings.models = [
        _anchored(p, cfg_file.parent, (str(cfg_file), i + 1)) for i, p in enumerate(settings.models)
    ]
    settings.local.model_dirs = [_anchor(d, cfg_file.parent) for d in settings.local.model_dirs]

    if explicit_models or models_file.exists():
        table = read_toml(models_file)
        try:
            catalogue = _Catalogue.model_validate(table)
        except ValidationError as exc:
            raise first_error(str(models_file), exc, table, _Catalogue) from None
        here = models_file.parent
        declared = [
            _anchored(p, here, (str(models_file), i + 1)) for i, p in enumerate(catalogue.models)
        ]
        settings.models = [*settings.models, *declared]
        settings.models_file = str(models_file)
    if raw:
        settings.config_file = str(cfg_file)
    _check_unique(settings)
    return settings


def _anchor(path: str, directory: Path) -> str:
    """A relative path means relative to the file that names it, not to wherever helexa
    was started from."""
    resolved = Path(path).expanduser()
    return str(resolved if resolved.is_absolute() else directory / resolved)


def _anchored(profile: ModelProfile, directory: Path, declared: tuple[str, int]) -> ModelProfile:
    """A profile whose ``path`` is anchored (:func:`_anchor`) and which knows where it was
    declared."""
    if profile.path is not None:
        profile = profile.model_copy(update={"path": _anchor(profile.path, directory)})
    profile._declared = declared
    return profile


def check_local_paths(settings: Settings) -> None:
    """A ``path`` that names nothing, found at start-up instead of at the first request
    (which would blame a missing download). Only where this process serves the paths."""
    for profile in settings.models:
        if profile.path is None or Path(profile.path).exists():
            continue
        file, entry = profile._declared or (settings.models_file or "config", 0)
        key = f"models[{entry}] ({profile.id}).path" if entry else f"{profile.id}.path"
        raise ConfigError(file, key, f"{profile.path} does not exist")


def _check_unique(settings: Settings) -> None:
    where = settings.models_file or settings.config_file or "config"
    seen: set[str] = set()
    for i, profile in enumerate(settings.models):
        for name in profile.names:
            if name in seen:
                key = f"models[{i + 1}] ({profile.id})"
                raise ConfigError(where, key, f"{name!r} is declared twice")
            seen.add(name)
    names = [n.name for n in settings.neurons]
    for i, name in enumerate(names):
        if name in names[:i] or name == settings.local.name and settings.local.enabled:
            raise ConfigError(
                settings.config_file or "config",
                f"neurons[{i + 1}].name",
                f"{name!r} is not unique",
            )
