"""Model ids, per-source caches, GGUF choice, local resolution and ``helexa pull``.

Local resolution runs against a huggingface_hub cache layout the test writes itself; pull
runs against a small fake hub on loopback (the hub API endpoints huggingface_hub calls),
so nothing here reaches the network.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from helexa.config import ModelProfile, Settings, SourceSettings
from helexa.cortex.status import run_list, run_rm
from helexa.neuron.sources import (
    ModelRef,
    downloaded,
    parse_model_id,
    path_allowed,
    pick_gguf,
    progress_line,
    pull,
    quant_of,
    ref_for,
    resolve_local,
    run_pull,
    sources,
    split_files,
)
from helexa.units import GIB, MIB
from tests.support.servers import serving_in_thread

# -- parse_model_id ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Qwen/Qwen3-8B-GGUF", ModelRef("huggingface", "Qwen/Qwen3-8B-GGUF")),
        ("Qwen/Qwen3-8B-GGUF:Q4_K_M", ModelRef("huggingface", "Qwen/Qwen3-8B-GGUF", "Q4_K_M")),
        ("helexa:Qwen/Qwen3-8B-GGUF:q8_0", ModelRef("helexa", "Qwen/Qwen3-8B-GGUF", "q8_0")),
        ("huggingface:org/name", ModelRef("huggingface", "org/name")),
        (":org/name", ModelRef("huggingface", "org/name")),
        ("Mirror:org/name", ModelRef("mirror", "org/name")),
        ("file:/models/x.gguf", ModelRef("file", path=Path("/models/x.gguf"))),
        ("file:///models/x.gguf", ModelRef("file", path=Path("/models/x.gguf"))),
        ("/models/qwen3-dir", ModelRef("file", path=Path("/models/qwen3-dir"))),
        ("./rel/model.gguf", ModelRef("file", path=Path("rel/model.gguf"))),
        ("weights/model.gguf", ModelRef("file", path=Path("weights/model.gguf"))),
    ],
)
def test_parse_model_id(text: str, expected: ModelRef) -> None:
    assert parse_model_id(text) == expected


def test_parse_model_id_default_source_is_configurable() -> None:
    assert parse_model_id("org/name", default_source="helexa").scheme == "helexa"


@pytest.mark.parametrize(
    "text", ["", "noslash", "helexa:noslash", "a/b/c", "org/name:Q4 K", "9x:a/b"]
)
def test_parse_model_id_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_model_id(text)


def test_ref_str_round_trips() -> None:
    for text in ["helexa:org/name:Q4_K_M", "huggingface:org/name", "file:/x/y.gguf"]:
        assert str(parse_model_id(text)) == text


def test_catalogue_profile_brings_source_and_quant() -> None:
    settings = Settings(
        sources=[SourceSettings(name="helexa", endpoint="http://127.0.0.1:1")],
        models=[ModelProfile(id="org/name", source="helexa", quant="Q8_0", aliases=["nick"])],
    )
    expected = ModelRef("helexa", "org/name", "Q8_0")
    assert ref_for("nick", settings) == expected
    assert ref_for("org/name", settings) == expected
    assert ref_for("helexa:org/name", settings) == expected  # qualified id the gateway sends
    assert ref_for("helexa:org/name:Q4_0", settings).quant == "Q4_0"  # explicit quant wins


# -- sources -----------------------------------------------------------------------------------


def test_each_source_has_its_own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("MIRROR_TOKEN", "s3cret")
    settings = Settings(
        sources=[
            SourceSettings(name="helexa", endpoint="https://mirror.example"),
            SourceSettings(
                name="other", cache_dir=str(tmp_path / "elsewhere"), token_env="MIRROR_TOKEN"
            ),
        ]
    )
    found = sources(settings)
    assert set(found) == {"huggingface", "helexa", "other"}
    assert found["huggingface"].cache_dir == tmp_path / "helexa" / "sources" / "huggingface"
    assert found["helexa"].cache_dir == tmp_path / "helexa" / "sources" / "helexa"
    assert found["helexa"].endpoint == "https://mirror.example"
    assert found["other"].cache_dir == tmp_path / "elsewhere"
    assert found["other"].token == "s3cret"
    assert len({s.cache_dir for s in found.values()}) == 3


# -- pick_gguf ---------------------------------------------------------------------------------

REPO_FILES = [
    "README.md",
    "Qwen3-8B-Q4_K_M.gguf",
    "Qwen3-8B-Q4_K_S.gguf",
    "Qwen3-8B-Q8_0.gguf",
    "Q8_0/Qwen3-8B-Q8_0-00001-of-00002.gguf",
    "Q8_0/Qwen3-8B-Q8_0-00002-of-00002.gguf",
    "BF16/Qwen3-8B-BF16-00002-of-00002.gguf",
    "BF16/Qwen3-8B-BF16-00001-of-00002.gguf",
    "mmproj-Qwen3-8B-F16.gguf",
]


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("Qwen3-8B-Q4_K_M.gguf", "Q4_K_M"),
        ("qwen3-0.6b-q8_0.gguf", "Q8_0"),
        ("x/Qwen3-8B-BF16-00001-of-00002.gguf", "BF16"),
        ("model-UD-IQ2_XXS.gguf", "IQ2_XXS"),
        ("Qwen3-8B-f16.gguf", "F16"),
        ("model.gguf", None),
    ],
)
def test_quant_of(name: str, quant: str | None) -> None:
    assert quant_of(name) == quant


def test_pick_gguf_matches_quant_case_insensitively() -> None:
    assert pick_gguf(REPO_FILES, "q4_k_m") == "Qwen3-8B-Q4_K_M.gguf"
    assert pick_gguf(REPO_FILES, "Q4_K_S") == "Qwen3-8B-Q4_K_S.gguf"


def test_pick_gguf_prefers_single_file_over_split() -> None:
    assert pick_gguf(REPO_FILES, "Q8_0") == "Qwen3-8B-Q8_0.gguf"


def test_pick_gguf_split_only_returns_first_part_and_lists_all() -> None:
    first = pick_gguf(REPO_FILES, "bf16")
    assert first == "BF16/Qwen3-8B-BF16-00001-of-00002.gguf"
    assert split_files(first) == [
        "BF16/Qwen3-8B-BF16-00001-of-00002.gguf",
        "BF16/Qwen3-8B-BF16-00002-of-00002.gguf",
    ]


def test_pick_gguf_unknown_quant_lists_available() -> None:
    with pytest.raises(ValueError) as err:
        pick_gguf(REPO_FILES, "Q5_K_M")
    message = str(err.value)
    assert "Q5_K_M" in message
    for quant in ("BF16", "Q4_K_M", "Q4_K_S", "Q8_0"):
        assert quant in message
    assert "F16" not in message.replace("BF16", "")  # the projector is not a model quant


def test_pick_gguf_without_quant() -> None:
    assert pick_gguf(["a/model-Q8_0.gguf", "README.md"], None) == "a/model-Q8_0.gguf"
    with pytest.raises(ValueError, match="several quants"):
        pick_gguf(REPO_FILES, None)
    with pytest.raises(ValueError, match="no .gguf"):
        pick_gguf(["config.json", "model.safetensors"], None)


# -- resolve_local -----------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_snapshot(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """The huggingface_hub cache layout: blobs, a snapshot of symlinks, refs/main."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / COMMIT
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_settings(tmp_path: Path) -> Settings:
    return Settings(
        sources=[
            SourceSettings(name="huggingface", cache_dir=str(tmp_path / "hf")),
            SourceSettings(name="helexa", cache_dir=str(tmp_path / "mirror")),
        ]
    )


def test_resolve_local_gguf_by_quant(tmp_path: Path, hub_settings: Settings) -> None:
    snap = write_snapshot(
        tmp_path / "hf", "Qwen/Q-GGUF", {"Q-Q4_K_M.gguf": b"four", "Q-Q8_0.gguf": b"eight"}
    )
    assert resolve_local("Qwen/Q-GGUF:Q8_0", hub_settings) == snap / "Q-Q8_0.gguf"
    assert resolve_local("huggingface:Qwen/Q-GGUF:q4_k_m", hub_settings) == snap / "Q-Q4_K_M.gguf"
    assert resolve_local("Qwen/Q-GGUF:Q6_K", hub_settings) is None  # not downloaded
    assert resolve_local("Qwen/Q-GGUF", hub_settings) is None  # ambiguous: two quants cached


def test_resolve_local_keeps_sources_apart(tmp_path: Path, hub_settings: Settings) -> None:
    write_snapshot(tmp_path / "mirror", "Qwen/Q-GGUF", {"Q-Q8_0.gguf": b"mirror"})
    assert resolve_local("Qwen/Q-GGUF:Q8_0", hub_settings) is None  # default source: not cached
    found = resolve_local("helexa:Qwen/Q-GGUF:Q8_0", hub_settings)
    assert found is not None and found.read_bytes() == b"mirror"


def test_resolve_local_split_gguf_needs_every_part(tmp_path: Path, hub_settings: Settings) -> None:
    snap = write_snapshot(
        tmp_path / "hf",
        "org/big",
        {"big-Q8_0-00001-of-00002.gguf": b"1", "big-Q8_0-00002-of-00002.gguf": b"2"},
    )
    assert resolve_local("org/big:Q8_0", hub_settings) == snap / "big-Q8_0-00001-of-00002.gguf"
    (snap / "big-Q8_0-00002-of-00002.gguf").unlink()
    assert resolve_local("org/big:Q8_0", hub_settings) is None


def test_resolve_local_safetensors_dir(tmp_path: Path, hub_settings: Settings) -> None:
    snap = write_snapshot(
        tmp_path / "hf", "org/dense", {"config.json": b"{}", "model.safetensors": b"w"}
    )
    assert resolve_local("org/dense", hub_settings) == snap
    assert resolve_local("org/dense:Q4_K_M", hub_settings) is None  # no GGUF to pick from


def test_resolve_local_catalogue_alias(tmp_path: Path) -> None:
    settings = Settings(
        sources=[SourceSettings(name="helexa", cache_dir=str(tmp_path / "mirror"))],
        models=[ModelProfile(id="org/m", source="helexa", quant="Q8_0", aliases=["m"])],
    )
    snap = write_snapshot(tmp_path / "mirror", "org/m", {"m-Q8_0.gguf": b"x", "m-Q4_0.gguf": b"y"})
    assert resolve_local("m", settings) == snap / "m-Q8_0.gguf"


def test_resolve_local_files(tmp_path: Path, hub_settings: Settings) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"gguf")
    assert resolve_local(str(model), hub_settings) == model
    assert resolve_local(f"file:{model}", hub_settings) == model
    assert resolve_local(f"file:{tmp_path / 'absent.gguf'}", hub_settings) is None


def test_paths_allowed_are_the_catalogues_and_those_in_model_dirs(tmp_path: Path) -> None:
    from helexa.config import LocalSettings

    models, other = tmp_path / "models", tmp_path / "other"
    models.mkdir()
    other.mkdir()
    (models / "out").symlink_to(other, target_is_directory=True)
    settings = Settings(
        models=[
            ModelProfile(id="mine", path=str(other / "mine.gguf")),
            ModelProfile(id=str(other / "by-id.gguf")),
        ],
        local=LocalSettings(model_dirs=[str(models)]),
    )
    for allowed in (
        models,
        models / "a.gguf",
        models / "sub" / "dir",
        other / "mine.gguf",
        other / "by-id.gguf",
        models / "out" / "mine.gguf",  # a link to a catalogue path is that path
    ):
        assert path_allowed(allowed, settings), allowed
    for refused in (other / "x.gguf", models / "out" / "x.gguf", models / ".." / "other"):
        assert not path_allowed(refused, settings), refused
    assert not path_allowed(
        models / "a.gguf", Settings()
    )  # no model_dirs: none but the catalogue's


def test_downloaded_lists_what_resolves_by_its_serving_id(
    tmp_path: Path, hub_settings: Settings
) -> None:
    write_snapshot(
        tmp_path / "hf", "Qwen/Q-GGUF", {"Q-Q4_K_M.gguf": b"4", "Q-Q8_0.gguf": b"8", "x.md": b""}
    )
    write_snapshot(
        tmp_path / "hf",
        "org/big",  # a split quant with a part missing is not servable yet
        {"big-Q8_0-00001-of-00002.gguf": b"1", "mmproj-big-f16.gguf": b"p"},
    )
    write_snapshot(tmp_path / "hf", "org/dense", {"config.json": b"{}", "model.safetensors": b"w"})
    write_snapshot(tmp_path / "hf", "org/docs", {"README.md": b"no weights"})
    index = b'{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    write_snapshot(  # a sharded download still in progress: one shard of two
        tmp_path / "hf",
        "org/sharded",
        {
            "config.json": b"{}",
            "model.safetensors.index.json": index,
            "model-00001-of-00002.safetensors": b"w",
        },
    )
    write_snapshot(tmp_path / "mirror", "org/m", {"m-Q6_K.gguf": b"6"})
    ids = downloaded(hub_settings)
    assert ids == ["Qwen/Q-GGUF:Q4_K_M", "Qwen/Q-GGUF:Q8_0", "org/dense", "helexa:org/m:Q6_K"]
    assert all(resolve_local(i, hub_settings) is not None for i in ids)
    assert resolve_local("org/sharded", hub_settings) is None


def test_resolve_local_bad_ids_are_none(hub_settings: Settings) -> None:
    assert resolve_local("nosuchsource:org/name", hub_settings) is None
    assert resolve_local("not an id", hub_settings) is None


# -- pull against a fake hub on loopback -------------------------------------------------------


class FakeHub:
    """The hub endpoints huggingface_hub uses to list and download a model repo."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.downloads: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self.tree)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        return app

    def _repo(self, request: web.Request) -> dict[str, bytes]:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo not in self.repos:
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
            )
        return self.repos[repo]

    async def info(self, request: web.Request) -> web.Response:
        files = self._repo(request)
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        siblings = [{"rfilename": p} for p in files]
        return web.json_response({"id": repo, "sha": COMMIT, "siblings": siblings})

    async def tree(self, request: web.Request) -> web.Response:
        files = self._repo(request)
        return web.json_response(
            [
                {"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for p, d in files.items()
            ]
        )

    async def resolve(self, request: web.Request) -> web.Response:
        files = self._repo(request)
        path = request.match_info["path"]
        if path not in files:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        data = files[path]
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Content-Length": str(len(data)),
        }
        if request.method == "HEAD":
            return web.Response(headers=headers)
        self.downloads.append(path)
        return web.Response(body=data, headers=headers)


@pytest.fixture
def fake_hub() -> Iterator[tuple[FakeHub, str]]:
    """The hub in its own thread: huggingface_hub's client is synchronous."""
    hub = FakeHub(
        {
            "org/gguf": {"m-Q4_K_M.gguf": b"q4" * 10, "m-Q8_0.gguf": b"q8" * 10, "README.md": b"r"},
            "org/dense": {
                "config.json": b'{"architectures": ["Qwen3ForCausalLM"]}',
                "model.safetensors": b"weights",
                "pytorch_model.bin": b"pickle",
                "tokenizer.json": b"{}",
            },
        }
    )
    with serving_in_thread(hub.app()) as url:
        yield hub, url


def _pull_settings(tmp_path: Path, endpoint: str) -> Settings:
    return Settings(
        sources=[SourceSettings(name="helexa", endpoint=endpoint, cache_dir=str(tmp_path / "c"))],
        default_source="helexa",
    )


def test_pull_gguf_downloads_only_the_quant(tmp_path: Path, fake_hub: tuple[FakeHub, str]) -> None:
    hub, endpoint = fake_hub
    settings = _pull_settings(tmp_path, endpoint)
    path = pull("org/gguf:q8_0", settings)
    assert path.read_bytes() == b"q8" * 10
    assert hub.downloads == ["m-Q8_0.gguf"]
    assert resolve_local("org/gguf:Q8_0", settings) == path  # now served from the cache


def test_pull_safetensors_skips_pickles(tmp_path: Path, fake_hub: tuple[FakeHub, str]) -> None:
    hub, endpoint = fake_hub
    settings = _pull_settings(tmp_path, endpoint)
    path = pull("org/dense", settings)
    assert (path / "model.safetensors").read_bytes() == b"weights"
    assert not (path / "pytorch_model.bin").exists()
    assert "pytorch_model.bin" not in hub.downloads
    assert resolve_local("org/dense", settings) == path


def test_run_pull_prints_path(
    tmp_path: Path, fake_hub: tuple[FakeHub, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, endpoint = fake_hub
    assert run_pull(_pull_settings(tmp_path, endpoint), "org/gguf:Q4_K_M") == 0
    assert capsys.readouterr().out.strip().endswith("m-Q4_K_M.gguf")


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("org/missing", "no such repository on http://127.0.0.1:"),
        ("org/gguf:Q2_K", "Q4_K_M, Q8_0"),
        ("org/dense:Q8_0", "no GGUF"),
        ("elsewhere:org/gguf", "unknown model source"),
        ("file:/nonexistent/model.gguf", "no such file"),
    ],
)
def test_run_pull_errors_are_one_line(
    tmp_path: Path,
    fake_hub: tuple[FakeHub, str],
    capsys: pytest.CaptureFixture[str],
    model: str,
    needle: str,
) -> None:
    _, endpoint = fake_hub
    assert run_pull(_pull_settings(tmp_path, endpoint), model) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"helexa pull: {model}: ")
    assert needle in err


def test_pull_draws_one_progress_line_per_file(
    tmp_path: Path, fake_hub: tuple[FakeHub, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Off a terminal the bar is one final line per file: its name, 100%, the bytes of the
    whole file against its size, a speed; no carriage returns, no retry chatter."""
    _, endpoint = fake_hub
    assert run_pull(_pull_settings(tmp_path, endpoint), "org/gguf:Q8_0") == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    (line,) = err.splitlines()
    assert line.startswith("pulling m-Q8_0.gguf 100% ▕" + "█" * 25 + "▏ 20 B/20 B  ")
    assert line.endswith("/s")


@pytest.mark.parametrize(
    ("done", "total", "elapsed", "expected"),
    [
        (0, 640 * MIB, 0.0, "pulling f   0% ▕          ▏ 0 B/640 MiB  0 B/s"),
        (320 * MIB, 640 * MIB, 10.0, "pulling f  50% ▕█████     ▏ 320 MiB/640 MiB  32 MiB/s  10s"),
        (3 * GIB, 6 * GIB, 30.0, "pulling f  50% ▕█████     ▏ 3.0 GiB/6.0 GiB  102 MiB/s  30s"),
        (MIB, None, 2.0, "pulling f 1 MiB  512.0 KiB/s"),
    ],
)
def test_progress_line(done: int, total: int | None, elapsed: float, expected: str) -> None:
    assert progress_line("f", done, total, elapsed, width=10) == expected


def test_pull_fails_at_once_when_the_hub_name_does_not_resolve(tmp_path: Path) -> None:
    """No network (here: a hub whose name cannot resolve, set as a user sets it) is one
    line naming the host, before any request: huggingface_hub would retry the lookup
    for 20 s with a warning each time. The CLI runs as the user runs it, in a process of
    its own, since huggingface_hub reads HF_ENDPOINT once, at import."""
    env = {**os.environ, "HF_ENDPOINT": "http://nonexistent.invalid", "HF_HOME": str(tmp_path)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-m", "helexa.cli", "pull", "Qwen/Qwen3-0.6B-GGUF:Q8_0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(
        "helexa pull: Qwen/Qwen3-0.6B-GGUF:Q8_0: cannot reach http://nonexistent.invalid: "
        "'nonexistent.invalid' does not resolve"
    )


def test_pull_of_a_snapshot_draws_one_line_named_by_the_repo(
    tmp_path: Path, fake_hub: tuple[FakeHub, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, endpoint = fake_hub
    assert run_pull(_pull_settings(tmp_path, endpoint), "org/dense") == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("pulling org/dense 100% ▕")


# -- helexa list / helexa rm -----------------------------------------------------------------


def _gateway_with(models: list[dict[str, object]]) -> web.Application:
    """A stand-in gateway whose fleet table lists ``models``."""

    async def fleet(request: web.Request) -> web.Response:
        return web.json_response({"nodes": [], "models": models})

    app = web.Application()
    app.router.add_get("/admin/fleet", fleet)
    return app


def test_list_shows_downloads_catalogue_files_and_what_is_loaded(
    tmp_path: Path, fake_hub: tuple[FakeHub, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, endpoint = fake_hub
    settings = _pull_settings(tmp_path, endpoint)
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"x" * 3000)
    settings.models = [
        ModelProfile(id="mine", path=str(mine)),
        ModelProfile(id="gone", path=str(tmp_path / "gone.gguf")),
    ]
    assert run_pull(settings, "org/gguf:Q8_0") == 0 and run_pull(settings, "org/dense") == 0
    capsys.readouterr()
    loaded = [
        {"id": "org/gguf:Q8_0", "node": "local", "status": "loaded", "vram_used_mb": 700},
        {"id": "org/dense", "node": "far", "status": "loading"},
    ]
    with serving_in_thread(_gateway_with(loaded)) as url:
        assert run_list(settings, url=url) == 0
    out, err = capsys.readouterr()
    assert err == ""
    disk, gateway = out.strip().split("\n\n")
    header, *rows = disk.splitlines()
    assert header.split() == ["NAME", "SIZE", "MODIFIED", "LOADED", "ON"]
    by_name = {row.split()[0]: row.split() for row in rows}
    assert by_name["org/gguf:Q8_0"][1:3] == ["20", "B"] and by_name["org/gguf:Q8_0"][-1] == "local"
    assert by_name["org/dense"][-2:] == ["far", "(loading)"]
    assert by_name["mine"][2:4] == ["2.9", "KiB"]
    assert by_name["gone"][2] == "missing"
    assert gateway.splitlines()[1].split() == [
        "org/gguf:Q8_0",
        "local",
        "loaded",
        "700",
        "MiB",
        "-",
    ]


def test_list_without_a_gateway_still_lists_the_disk(
    tmp_path: Path, fake_hub: tuple[FakeHub, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, endpoint = fake_hub
    settings = _pull_settings(tmp_path, endpoint)
    assert run_pull(settings, "org/gguf:Q4_K_M") == 0
    capsys.readouterr()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert run_list(settings, url=url) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1].startswith("org/gguf:Q4_K_M ")
    assert err.startswith(f"helexa list: what is loaded is not shown: no gateway at {url}")
    assert err.count("\n") == 1


def test_rm_deletes_one_quant_and_the_repo_with_its_last(
    tmp_path: Path, fake_hub: tuple[FakeHub, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, endpoint = fake_hub
    settings = _pull_settings(tmp_path, endpoint)
    assert run_pull(settings, "org/gguf:Q8_0") == 0 and run_pull(settings, "org/gguf:Q4_K_M") == 0
    capsys.readouterr()
    with serving_in_thread(_gateway_with([])) as url:
        assert run_rm(settings, "org/gguf:q8_0", url=url) == 0
        assert capsys.readouterr().out == "deleted org/gguf:Q8_0 (20 B, 1 file(s))\n"
        assert resolve_local("org/gguf:Q8_0", settings) is None
        assert resolve_local("org/gguf:Q4_K_M", settings) is not None  # the other quant stays
        assert run_rm(settings, "org/gguf:Q4_K_M", url=url) == 0
        assert not list((tmp_path / "c").glob("models--org--gguf"))  # the last one: all gone
        assert run_rm(settings, "org/gguf:Q4_K_M", url=url) == 1
    assert capsys.readouterr().err == (
        "helexa rm: org/gguf:Q4_K_M: org/gguf:Q4_K_M is not downloaded (helexa list shows "
        "what is)\n"
    )


def test_rm_of_a_split_quant_in_a_subfolder_leaves_the_repos_other_quants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Split quants live in a subfolder of the snapshot: deleting one must not take the
    repo's other quants, nor a file outside the cache that a link points at."""
    settings = _pull_settings(tmp_path, "http://127.0.0.1:9")
    repo = tmp_path / "c" / "models--org--M-GGUF"
    snapshot = repo / "snapshots" / "abc"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "blobs").mkdir()
    (snapshot / "Q4_K_M").mkdir(parents=True)
    outside = tmp_path / "someone-elses.gguf"
    outside.write_bytes(b"keep")
    for name, blob in [
        ("Q4_K_M/M-Q4_K_M-00001-of-00002.gguf", "b1"),
        ("Q4_K_M/M-Q4_K_M-00002-of-00002.gguf", "b2"),
        ("M-Q8_0.gguf", "b3"),
    ]:
        (repo / "blobs" / blob).write_bytes(b"gguf")
        (snapshot / name).symlink_to(repo / "blobs" / blob)
    (snapshot / "Q4_K_M" / "M-Q4_K_M-00002-of-00002.gguf").unlink()
    (snapshot / "Q4_K_M" / "M-Q4_K_M-00002-of-00002.gguf").symlink_to(outside)
    with serving_in_thread(_gateway_with([])) as url:
        assert run_rm(settings, "org/M-GGUF:Q4_K_M", url=url) == 0, capsys.readouterr().err
    assert resolve_local("org/M-GGUF:Q4_K_M", settings) is None
    assert resolve_local("org/M-GGUF:Q8_0", settings) == snapshot / "M-Q8_0.gguf"
    assert (repo / "blobs" / "b3").exists() and not (repo / "blobs" / "b1").exists()
    assert outside.read_bytes() == b"keep"


def test_rm_refuses_a_model_loaded_under_another_spelling_or_when_the_gateway_will_not_say(
    tmp_path: Path, fake_hub: tuple[FakeHub, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, endpoint = fake_hub
    settings = _pull_settings(tmp_path, endpoint)
    assert run_pull(settings, "org/gguf:Q8_0") == 0
    capsys.readouterr()
    loaded = [{"id": "org/gguf:Q8_0", "node": "local", "status": "loaded"}]
    with serving_in_thread(_gateway_with(loaded)) as url:
        assert run_rm(settings, "helexa:org/gguf:q8_0", url=url) == 1
    assert "loaded on local as org/gguf:Q8_0" in capsys.readouterr().err

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "bad key"}}, status=401)

    refusing = web.Application()
    refusing.router.add_get("/admin/fleet", refuse)
    with serving_in_thread(refusing) as url:
        assert run_rm(settings, "org/gguf:Q8_0", url=url) == 1
    assert "does not say what it has loaded" in capsys.readouterr().err
    assert resolve_local("org/gguf:Q8_0", settings) is not None
    assert run_rm(settings, "org/", url=url) == 2  # not a model id: a usage error


def test_rm_refuses_a_loaded_model_and_a_file_of_yours(
    tmp_path: Path, fake_hub: tuple[FakeHub, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, endpoint = fake_hub
    settings = _pull_settings(tmp_path, endpoint)
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"x")
    settings.models = [ModelProfile(id="mine", path=str(mine))]
    assert run_pull(settings, "org/dense") == 0
    capsys.readouterr()
    loaded = [{"id": "org/dense", "node": "local", "status": "loaded"}]
    with serving_in_thread(_gateway_with(loaded)) as url:
        assert run_rm(settings, "org/dense", url=url) == 1
        assert run_rm(settings, "mine", url=url) == 1
    first, second = capsys.readouterr().err.splitlines()
    assert first.startswith("helexa rm: org/dense: loaded on local as org/dense by the gateway at ")
    assert (
        second
        == f"helexa rm: mine: {mine} is a catalogue path, not a download: helexa rm deletes downloads"
    )
    assert resolve_local("org/dense", settings) is not None and mine.exists()
