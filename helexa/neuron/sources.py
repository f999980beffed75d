"""Where model files come from: ``scheme:org/name[:quant]`` ids, per-source hubs and caches.

A model id names a source as well as a repo, so ``helexa:Qwen/Qwen3-8B-GGUF`` (a mirror)
and ``huggingface:Qwen/Qwen3-8B-GGUF`` never share a cache entry: each source has its own
huggingface_hub endpoint and its own cache dir under ``cache_dir()/sources/<name>``. A
``file:`` id or a plain path points at a local GGUF file or HF model directory.

Resolution on a serving path (:func:`resolve_local`) never touches the network: a model
is either already on disk or the operator runs ``helexa pull`` first. Only :func:`pull`
downloads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from helexa.config import Settings, cache_dir
from helexa.units import size_text

HUGGINGFACE = "huggingface"
FILE = "file"

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")
_QUANT_TOKEN = re.compile(
    r"(?i)(?<![a-z0-9])(i?q\d+(?:_[a-z0-9]+)*|bf16|fp16|fp32|f16|f32)(?![a-z0-9])"
)
_SPLIT = re.compile(r"(?i)-(\d{5})-of-(\d{5})\.gguf$")
# What a safetensors model needs; never pickles (*.bin, *.pt): a download must not run code.
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class ModelRef:
    """A parsed model id. ``scheme`` is a source name or ``file``; file refs carry ``path``."""

    scheme: str
    repo: str = ""
    quant: str | None = None
    path: Path | None = None

    @property
    def is_file(self) -> bool:
        return self.scheme == FILE

    def __str__(self) -> str:
        if self.is_file:
            return f"{FILE}:{self.path}"
        return f"{self.scheme}:{self.repo}" + (f":{self.quant}" if self.quant else "")


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or s.lower().endswith(".gguf")


def parse_model_id(s: str, default_source: str = HUGGINGFACE) -> ModelRef:
    """``[scheme:]org/name[:quant]``, ``file:PATH`` or a path; no scheme -> ``default_source``.

    The first ``:`` is a scheme separator only when what precedes it has no ``/``, so
    ``Qwen/Qwen3-8B-GGUF:Q4_K_M`` is a repo with a quant, not a scheme.
    """
    text = s.strip()
    if not text:
        raise ValueError("empty model id")
    if text.lower().startswith(f"{FILE}:"):
        rest = text[len(FILE) + 1 :]
        rest = rest[2:] if rest.startswith("//") else rest
        if not rest:
            raise ValueError(f"{s!r}: file: needs a path")
        return ModelRef(FILE, path=Path(rest).expanduser())
    if _looks_like_path(text):
        return ModelRef(FILE, path=Path(text).expanduser())
    scheme, remainder = default_source, text
    head, sep, rest = text.partition(":")
    if sep and "/" not in head:
        scheme, remainder = head or default_source, rest
    if not _SCHEME.match(scheme):
        raise ValueError(f"{s!r}: {scheme!r} is not a valid source name")
    repo, _, quant = remainder.partition(":")
    if not _REPO.match(repo):
        raise ValueError(f"{s!r}: expected scheme:org/name[:quant] or a file path")
    if quant and not re.fullmatch(r"[\w.-]+", quant):
        raise ValueError(f"{s!r}: {quant!r} is not a valid quant")
    return ModelRef(scheme.lower(), repo, quant or None)


# -- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One hub: where to download from and where its files live on this host."""

    name: str
    endpoint: str | None  # None: the huggingface_hub default (honours HF_ENDPOINT)
    cache_dir: Path
    token: str | None = None  # None: huggingface_hub's own token lookup (HF_TOKEN, login)


def sources(settings: Settings) -> dict[str, Source]:
    """Built-in ``huggingface`` plus every ``[[sources]]`` entry (which may override it)."""
    root = cache_dir() / "sources"
    out = {HUGGINGFACE: Source(HUGGINGFACE, None, root / HUGGINGFACE)}
    for s in settings.sources:
        token = os.environ.get(s.token_env) if s.token_env else None
        where = Path(s.cache_dir).expanduser() if s.cache_dir else root / s.name
        out[s.name] = Source(s.name, s.endpoint, where, token)
    return out


def source_for(ref: ModelRef, settings: Settings) -> Source:
    known = sources(settings)
    if ref.scheme not in known:
        raise ValueError(
            f"unknown model source {ref.scheme!r} (configured: {', '.join(sorted(known))})"
        )
    return known[ref.scheme]


def ref_for(model_id: str, settings: Settings) -> ModelRef:
    """The ref a model id means here: catalogue ids and aliases bring their source and quant."""
    profile = settings.profile(model_id)
    if profile is not None and profile.path:
        return ModelRef(FILE, path=Path(profile.path).expanduser())
    if profile is not None:
        model_id = profile.qualified_id
    ref = parse_model_id(model_id, settings.default_source)
    if ref.quant is None and not ref.is_file:
        profile = profile or settings.profile(ref.repo)
        if profile is not None and profile.quant:
            ref = replace(ref, quant=profile.quant)
    return ref


# -- choosing a GGUF -------------------------------------------------------------------------


def quant_of(filename: str) -> str | None:
    """The quant a GGUF file name carries (``Qwen3-8B-Q4_K_M.gguf`` -> ``Q4_K_M``)."""
    stem = _SPLIT.sub("", Path(filename).name)
    stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    found = _QUANT_TOKEN.findall(stem)
    return found[-1].upper() if found else None


def split_part(filename: str) -> tuple[int, int] | None:
    """``(part, of)`` for ``...-00001-of-00003.gguf``, None for a single-file GGUF."""
    m = _SPLIT.search(filename)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _model_ggufs(filenames: list[str]) -> list[str]:
    # Vision projectors ship next to the weights; they are never the model itself.
    return [
        f
        for f in filenames
        if f.lower().endswith(".gguf") and not Path(f).name.lower().startswith("mmproj")
    ]


def pick_gguf(filenames: list[str], quant: str | None) -> str:
    """The GGUF to serve for ``quant`` (case-insensitive), single-file preferred over split.

    For a split GGUF the first part is returned (:func:`split_files` lists the rest).
    Raises ValueError naming the quants that are available.
    """
    ggufs = _model_ggufs(filenames)
    if not ggufs:
        raise ValueError("no .gguf files")
    available = sorted({q for f in ggufs if (q := quant_of(f))})
    listing = ", ".join(available) or "none recognisable"
    if quant is None:
        if len({quant_of(f) for f in ggufs}) > 1:
            raise ValueError(f"several quants, name one as org/name:QUANT (available: {listing})")
        matches = ggufs
    else:
        matches = [f for f in ggufs if quant_of(f) == quant.upper()]
        if not matches:
            raise ValueError(f"no {quant} GGUF (available quants: {listing})")
    singles = sorted(f for f in matches if split_part(f) is None)
    if singles:
        return min(singles, key=lambda f: (f.count("/"), f))
    firsts = sorted(f for f in matches if (split_part(f) or (0, 0))[0] == 1)
    if not firsts:
        raise ValueError(f"split GGUF for {quant or 'the model'} has no first part")
    return firsts[0]


def split_files(first: str) -> list[str]:
    """Every part of the split GGUF that ``first`` begins, by name (``[first]`` if single)."""
    m = _SPLIT.search(first)
    if m is None:
        return [first]
    total = int(m.group(2))
    return [f"{first[: m.start()]}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]


# -- local resolution (no network) -----------------------------------------------------------


def snapshot_dir(cache: Path, repo: str) -> Path | None:
    """The cached snapshot of ``repo``'s main revision in a huggingface_hub cache dir."""
    from huggingface_hub.file_download import repo_folder_name

    folder = cache / repo_folder_name(repo_id=repo, repo_type="model")
    ref = folder / "refs" / "main"
    if ref.is_file():
        snapshot = folder / "snapshots" / ref.read_text().strip()
        return snapshot if snapshot.is_dir() else None
    snapshots = [p for p in (folder / "snapshots").glob("*") if p.is_dir()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def _real(path: Path) -> Path | None:
    """``path`` absolute, its ``..`` and links resolved (what opening it would open)."""
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError):  # a link loop, an unreadable directory on the way
        return None


def path_allowed(path: Path, settings: Settings) -> bool:
    """Whether a load request may name ``path``: a catalogue profile's own path, or one
    inside a ``[local] model_dirs`` directory once links and ``..`` are resolved (so
    neither leads out). Nothing else on the host is opened on a client's say-so."""
    real = _real(path)
    if real is None:
        return False
    for profile in settings.models:
        try:
            ref = ref_for(profile.id, settings)
        except ValueError:
            continue
        if ref.path is not None and _real(ref.path) == real:
            return True
    roots = [_real(Path(d)) for d in settings.local.model_dirs]
    return any(root is not None and real.is_relative_to(root) for root in roots)


def resolve_local(model_id: str, settings: Settings) -> Path | None:
    """The GGUF file or HF directory for ``model_id`` already on this host, else None.

    Never reaches the network: a model that is not on disk is pulled explicitly.
    """
    try:
        ref = ref_for(model_id, settings)
        source = None if ref.is_file else source_for(ref, settings)
    except ValueError:
        return None
    if source is None:
        return ref.path if ref.path is not None and ref.path.exists() else None
    snapshot = snapshot_dir(source.cache_dir, ref.repo)
    if snapshot is None:
        return None
    return _serving_path(snapshot, _snapshot_files(snapshot), ref.quant)


def downloaded(settings: Settings) -> list[str]:
    """The models already in the sources' caches, by the ids that serve them: one
    ``org/name:QUANT`` per complete GGUF quant, ``org/name`` for a safetensors snapshot,
    prefixed with the source unless it is the default one. So ``helexa pull X`` makes X
    servable by name at once, catalogued or not (as ``ollama pull`` does)."""
    ids: list[str] = []
    for source in sources(settings).values():
        prefix = "" if source.name == settings.default_source else f"{source.name}:"
        for folder in sorted(source.cache_dir.glob("models--*--*")):
            repo = folder.name[len("models--") :].replace("--", "/", 1)
            snapshot = snapshot_dir(source.cache_dir, repo)
            if snapshot is None:
                continue
            files = _snapshot_files(snapshot)
            quants = sorted({q for f in _model_ggufs(files) if (q := quant_of(f))})
            for quant in quants or [None]:
                if _serving_path(snapshot, files, quant) is not None:
                    ids.append(f"{prefix}{repo}" + (f":{quant}" if quant else ""))
    return ids


@dataclass(frozen=True)
class OnDisk:
    """A servable model in a source's cache: its serving id, what serves it, the files
    that are it (for ``helexa rm``), their size and when the newest arrived."""

    id: str
    path: Path
    files: tuple[Path, ...]
    size_bytes: int
    modified: float


def _stat_sum(files: list[Path]) -> tuple[int, float]:
    size, newest = 0, 0.0
    for f in files:
        try:
            st = f.stat()  # through the snapshot's link: the blob's size and time
        except OSError:
            continue
        size += st.st_size
        newest = max(newest, st.st_mtime)
    return size, newest


def on_disk(settings: Settings) -> list[OnDisk]:
    """Every model :func:`downloaded` lists, with its files, size and date."""
    out: list[OnDisk] = []
    for model_id in downloaded(settings):
        path = resolve_local(model_id, settings)
        if path is None:
            continue
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            files = [path.parent / f for f in split_files(path.name)]
        size, modified = _stat_sum(files)
        out.append(OnDisk(model_id, path, tuple(files), size, modified))
    return out


def remove(model_id: str, settings: Settings) -> OnDisk:
    """Delete a downloaded model's files from its source's cache (the snapshot's links
    and the blobs they point at); the repo's folder goes with its last model. A file the
    catalogue names by ``path`` is the operator's own and is never deleted."""
    ref = ref_for(model_id, settings)
    if ref.is_file:
        raise ValueError(
            f"{ref.path} is a catalogue path, not a download: helexa rm deletes downloads"
        )
    entry = next((m for m in on_disk(settings) if m.id == _serving_id(ref, settings)), None)
    if entry is None:
        raise FileNotFoundError(f"{model_id} is not downloaded (helexa list shows what is)")
    from huggingface_hub.file_download import repo_folder_name

    # The repo's own folder in the cache, wherever in its snapshot the file sits (a split
    # quant lives in a subfolder); only blobs inside it are deleted, never what a link
    # someone placed there points at.
    repo_folder = source_for(ref, settings).cache_dir / repo_folder_name(
        repo_id=ref.repo, repo_type="model"
    )
    blobs = (repo_folder / "blobs").resolve()
    for link in entry.files:
        blob = link.resolve()
        link.unlink(missing_ok=True)
        if blob != link and blob.is_relative_to(blobs):
            blob.unlink(missing_ok=True)
    if not any(p.is_file() for p in (repo_folder / "snapshots").rglob("*")):
        shutil.rmtree(repo_folder, ignore_errors=True)
    return entry


def _serving_id(ref: ModelRef, settings: Settings) -> str:
    prefix = "" if ref.scheme == settings.default_source else f"{ref.scheme}:"
    if ref.quant is None:
        return f"{prefix}{ref.repo}"
    source = source_for(ref, settings)
    snapshot = snapshot_dir(source.cache_dir, ref.repo)
    files = _snapshot_files(snapshot) if snapshot else []
    try:
        quant = quant_of(pick_gguf(files, ref.quant)) or ref.quant
    except ValueError:
        quant = ref.quant
    return f"{prefix}{ref.repo}:{quant}"


def _snapshot_files(snapshot: Path) -> list[str]:
    """The snapshot's files, relative: huggingface_hub links a file in only once it is
    whole, so a download in progress shows as missing files."""
    return [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]


def _serving_path(snapshot: Path, files: list[str], quant: str | None) -> Path | None:
    """What serves ``quant`` (None: the only one) from a snapshot holding ``files``: the
    first part of a GGUF with every part there, or the directory of a safetensors model
    with its config and every shard; None when it is not (all) there."""
    if _model_ggufs(files):
        try:
            first = pick_gguf(files, quant)
        except ValueError:
            return None
        return snapshot / first if all(p in files for p in split_files(first)) else None
    if quant is not None or "config.json" not in files:
        return None
    if SAFETENSORS_INDEX in files:
        try:
            index = json.loads((snapshot / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
            shards = set((index.get("weight_map") or {}).values())
        except (OSError, ValueError, AttributeError):
            return None
        return snapshot if shards and shards <= set(files) else None
    return snapshot if any(f.endswith(".safetensors") for f in files) else None


# -- downloading -----------------------------------------------------------------------------


def pull(model_id: str, settings: Settings) -> Path:
    """Download ``model_id`` into its source's cache (with huggingface_hub's progress bars).

    GGUF repos fetch only the requested quant's file(s); safetensors repos fetch weights,
    configs and tokenizer files, never pickles.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    ref = ref_for(model_id, settings)
    if ref.is_file:
        assert ref.path is not None
        if not ref.path.exists():
            raise FileNotFoundError(f"{ref.path}: no such file or directory")
        return ref.path
    source = source_for(ref, settings)
    check_resolves(source.endpoint or _default_endpoint())
    common: dict[str, Any] = {
        "cache_dir": source.cache_dir,
        "endpoint": source.endpoint,
        "token": source.token,
        "tqdm_class": PullBar,
    }
    files = HfApi(endpoint=source.endpoint, token=source.token).list_repo_files(ref.repo)
    if _model_ggufs(files):
        first = pick_gguf(files, ref.quant)
        paths = [hf_hub_download(ref.repo, f, **common) for f in split_files(first)]
        return Path(paths[0])
    if ref.quant is not None:
        raise ValueError(f"{ref.repo} has no GGUF files, so :{ref.quant} cannot be chosen")
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        raise ValueError(f"{ref.repo} has neither GGUF nor safetensors weights")
    # One bar for the whole snapshot, named by the repo (its files come in parallel).
    bars = type("RepoBar", (PullBar,), {"label": ref.repo, "made": [], "only": SNAPSHOT_BAR})
    common["tqdm_class"] = bars
    try:
        return Path(snapshot_download(ref.repo, allow_patterns=SAFETENSORS_PATTERNS, **common))
    finally:
        for bar in bars.made:  # huggingface_hub leaves a snapshot's bars to the collector
            bar.close()


def _default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


class HubUnreachable(OSError):
    """The hub's host name does not resolve: no network, or a mistyped endpoint."""


def check_resolves(endpoint: str) -> None:
    """Fail in one line when the hub's name does not resolve, before huggingface_hub's
    client retries the lookup for half a minute with a warning per try: a name that does
    not resolve now will not resolve in the next 20 s either."""
    parts = urlsplit(endpoint)
    host = parts.hostname
    if not host:
        return
    try:
        socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
    except socket.gaierror as exc:
        raise HubUnreachable(
            f"cannot reach {endpoint}: {host!r} does not resolve ({exc.strerror}); "
            "no network, or a wrong endpoint"
        ) from None


def progress_line(
    name: str, done: float, total: float | None, elapsed_s: float, width: int = 25
) -> str:
    """One ollama-style progress line: name, percent, bar, bytes, speed, time left.

    ``pulling m-Q8_0.gguf  45% ▕███████████              ▏ 275 MiB/610 MiB  12 MiB/s  27s``
    """
    speed = done / elapsed_s if elapsed_s > 0 else 0.0
    if total:
        fraction = min(1.0, done / total)
        filled = round(fraction * width)
        bar = "▕" + "█" * filled + " " * (width - filled) + "▏"
        left = (total - done) / speed if speed > 0 else None
        eta = "" if left is None or done >= total else f"  {_duration(left)}"
        return (
            f"pulling {name} {fraction:4.0%} {bar} {size_text(done)}/{size_text(total)}"
            f"  {size_text(speed)}/s{eta}"
        )
    return f"pulling {name} {size_text(done)}  {size_text(speed)}/s"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# How huggingface_hub describes a snapshot's bar of bytes as written (it also counts
# them as received, and per file): the one bar a snapshot draws.
SNAPSHOT_BAR = "Reconstructing"


class PullBar(tqdm):  # type: ignore[type-arg]
    """huggingface_hub's progress bar as ``helexa pull`` draws it (:func:`progress_line`):
    redrawn in place on a terminal, and on anything else (a log, a pipe) one line at the
    end of each file instead of a stream of carriage returns."""

    label = ""  # what the bar names; empty: the file its description ends with
    only: str | None = None  # draw only the bar whose description starts so
    made: list[PullBar] = []  # a subclass that lists its bars, to close what others leave

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        desc = str(kwargs.get("desc") or "")
        kwargs["disable"] = self.only is not None and not desc.startswith(self.only)
        kwargs.setdefault("file", sys.stderr)
        self._out: TextIO = kwargs["file"]
        self._tty = self._out.isatty()
        self._started = time.monotonic()
        super().__init__(*args, **kwargs)
        if "made" in type(self).__dict__:
            type(self).made.append(self)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self._tty and not self.disable:
            self._out.write("\r\x1b[2K" + self._line())
            self._out.flush()
        return True

    def _line(self) -> str:
        # huggingface_hub describes a download by its (shortened) URL: the file is the end
        name = self.label or (self.desc or "").strip().rstrip(":").rpartition("/")[2] or "model"
        return progress_line(name, self.n, self.total, time.monotonic() - self._started)

    def close(self) -> None:
        if not self.disable and not getattr(self, "_closed_line", False):
            self._closed_line = True
            prefix = "\r\x1b[2K" if self._tty else ""
            self._out.write(prefix + self._line() + "\n")
            self._out.flush()
        self.disable = True
        super().close()


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return (text or type(exc).__name__)[:300]


def _hub_of(model_id: str, settings: Settings) -> str:
    try:
        source = source_for(ref_for(model_id, settings), settings)
    except ValueError:
        return "the hub"
    return source.endpoint or _default_endpoint()


def run_pull(settings: Settings, model_id: str) -> int:
    """``helexa pull``: prints the local path; any failure is one line on stderr, exit 1."""
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, RepositoryNotFoundError

    try:
        path = pull(model_id, settings)
    except RepositoryNotFoundError:
        reason = f"no such repository on {_hub_of(model_id, settings)} (or it needs a token)"
    except HTTPError as exc:
        hub = _hub_of(model_id, settings)
        reason = _one_line(exc) if isinstance(exc, HfHubHTTPError) else f"cannot reach {hub}: {exc}"
    except (OSError, ValueError) as exc:
        reason = _one_line(exc)
    else:
        print(path)
        return 0
    print(f"helexa pull: {model_id}: {reason}", file=sys.stderr)
    return 1
