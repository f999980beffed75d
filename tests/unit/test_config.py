"""Settings: files, env overrides, and one-line errors that name file, key and problem."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helexa.cli import build_parser, settings_for
from helexa.config import (
    ConfigError,
    Settings,
    check_local_paths,
    config_dir,
    env_overrides,
    load_settings,
    split_listen,
)

ASSETS = Path(__file__).resolve().parents[2] / "assets"


def test_examples_parse() -> None:
    s = load_settings(ASSETS / "helexa.example.toml", ASSETS / "models.example.toml", environ={})
    assert s.gateway.listen == "127.0.0.1:31313"
    assert [m.id for m in s.models][:1] == ["Qwen/Qwen3-8B-GGUF:Q4_K_M"]
    assert s.models[0].sampling.top_k == 20
    assert s.models[1].pinned_on == ["local"]


def test_defaults_bind_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    s = load_settings(environ={})
    assert split_listen(s.gateway.listen)[0] == "127.0.0.1"
    assert split_listen(s.neuron.listen) == ("127.0.0.1", 13131)


def test_env_overrides_nested_and_typed() -> None:
    over = env_overrides(
        {"HELEXA_GATEWAY__LISTEN": "0.0.0.0:9", "HELEXA_EVICTION__IDLE_TTL_S": "30", "PATH": "x"}
    )
    assert over == {"gateway": {"listen": "0.0.0.0:9"}, "eviction": {"idle_ttl_s": 30}}


def test_env_wins_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "helexa.toml"
    cfg.write_text('[gateway]\nlisten = "127.0.0.1:1000"\n')
    s = load_settings(cfg, environ={"HELEXA_GATEWAY__LISTEN": "127.0.0.1:2000"})
    assert s.gateway.listen == "127.0.0.1:2000"


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[gateway]\nlisten = "nope"\n', "gateway.listen", "HOST:PORT"),
        ("[gateway]\nlisen = 1\n", "gateway.lisen", "unknown key"),
        ('[eviction]\nstrategy = "fifo"\n', "eviction.strategy", "'lru' or 'priority'"),
        ('[[neurons]]\nname = "a"\nendpoint = "beast:13131"\n', "neurons[1] (a).endpoint", "http"),
    ],
)
def test_bad_config_names_file_key_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    cfg = tmp_path / "helexa.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert info.value.file == str(cfg)
    assert info.value.key == key
    assert problem in info.value.problem
    assert not info.value.problem.startswith("Value error")


def test_invalid_toml_and_duplicate_models(tmp_path: Path) -> None:
    bad = tmp_path / "helexa.toml"
    bad.write_text("[gateway\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, environ={})
    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nid = "a"\n[[models]]\nid = "b"\naliases = ["a"]\n')
    with pytest.raises(ConfigError, match="'a' is declared twice"):
        load_settings(None, models, environ={})


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "helexa.toml"
    cfg.write_text('[gateway]\nmetrics_listen = "x"\n')
    exe = shutil.which("helexa")
    cmd = [exe] if exe else [sys.executable, "-m", "helexa.cli"]
    proc = subprocess.run(
        [*cmd, "--serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(cfg) in lines[0] and "gateway.metrics_listen" in lines[0]


def test_cli_version_and_help() -> None:
    from helexa import __version__
    from helexa.cli import build_parser

    parser = build_parser()
    help_text = parser.format_help()
    for word in ("--serve", "neuron", "status", "pull", "acp"):
        assert word in help_text
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--version"])
    assert info.value.code == 0
    assert __version__ == "0.1.0"


def test_an_env_override_error_names_the_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "helexa.toml"
    cfg.write_text('[gateway]\nlisten = "127.0.0.1:1000"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={"HELEXA_EVICTION__STRATEGY": "fifo"})
    assert info.value.file == "HELEXA_EVICTION__STRATEGY"
    assert info.value.key == "eviction.strategy"
    cfg.write_text('[eviction]\nstrategy = "fifo"\n')  # the file's own mistake stays the file's
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={"HELEXA_GATEWAY__LISTEN": "127.0.0.1:2000"})
    assert info.value.file == str(cfg)


def test_prompt_cache_mb_defaults_to_the_device_and_is_never_negative(tmp_path: Path) -> None:
    cfg = tmp_path / "helexa.toml"
    cfg.write_text("[local]\n")
    assert load_settings(cfg, environ={}).local.prompt_cache_mb is None  # the engine's default
    sized = load_settings(cfg, environ={"HELEXA_LOCAL__PROMPT_CACHE_MB": "512"})
    assert sized.local.prompt_cache_mb == 512
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={"HELEXA_LOCAL__PROMPT_CACHE_MB": "-1"})
    assert info.value.key == "local.prompt_cache_mb"


def test_a_profile_comes_from_a_source_or_a_path(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nid = "mine"\npath = "/models/mine.gguf"\n')
    (profile,) = load_settings(None, models, environ={}).models
    assert (profile.path, profile.qualified_id) == ("/models/mine.gguf", "mine")
    models.write_text('[[models]]\nid = "mine"\npath = "weights/mine.gguf"\n')
    (profile,) = load_settings(None, models, environ={}).models
    assert profile.path == str(tmp_path / "weights" / "mine.gguf")  # relative to models.toml
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    (elsewhere / "helexa.toml").write_text('[[models]]\nid = "own"\npath = "own.gguf"\n')
    (profile,) = load_settings(elsewhere / "helexa.toml", environ={}).models
    assert profile.path == str(elsewhere / "own.gguf")  # or to helexa.toml, if it is there
    models.write_text('[[models]]\nid = "mine"\npath = "/m.gguf"\nsource = "helexa"\n')
    with pytest.raises(ConfigError, match="either source or path"):
        load_settings(None, models, environ={})


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("helexa")
    cmd = [exe] if exe else [sys.executable, "-m", "helexa.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_cli_options_before_a_subcommand_count(tmp_path: Path) -> None:
    bad = tmp_path / "helexa.toml"
    bad.write_text("[gateway]\nlisen = 1\n")
    for args in (("--config", str(bad), "status"), ("status", "--config", str(bad))):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, args
        assert "gateway.lisen: unknown key" in proc.stderr


@pytest.mark.parametrize("args", [("--serve", "--listen", "bogus"), ("neuron", "--listen", "x:y")])
def test_cli_bad_listen_is_a_one_line_config_error(tmp_path: Path, args: tuple[str, ...]) -> None:
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("helexa: config error: --listen:") and "HOST:PORT" in line


def test_an_unknown_key_is_named_before_what_it_leaves_missing(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nid = "a"\n[[models]]\nidd = "b"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(None, models, environ={})
    assert (info.value.file, info.value.key) == (str(models), "models[2].idd")
    assert info.value.problem == "unknown key (did you mean 'id'?)"


def test_a_missing_local_path_is_found_at_start_up(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nid = "ok"\n[[models]]\nid = "broken"\npath = "gone.gguf"\n')
    settings = load_settings(models_path=models, environ={})
    with pytest.raises(ConfigError) as info:
        check_local_paths(settings)
    assert (info.value.file, info.value.key) == (str(models), "models[2] (broken).path")
    assert info.value.problem == f"{tmp_path / 'gone.gguf'} does not exist"
    (tmp_path / "gone.gguf").write_bytes(b"")
    check_local_paths(settings)


def test_the_cli_exits_2_on_a_missing_path(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nid = "broken"\npath = "/nonexistent/x.gguf"\n')
    proc = run_cli("--models", str(models), "--serve", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"helexa: config error: {models}: models[1] (broken).path: /nonexistent/x.gguf"
        " does not exist"
    ]


def test_help_prints_the_config_dir(tmp_path: Path) -> None:
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert f"config dir here: {config_dir()}" in proc.stdout


def test_model_dirs_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "helexa.toml"
    cfg.write_text('[local]\nmodel_dirs = ["weights", "/srv/models"]\n')
    local = load_settings(cfg, environ={}).local
    assert local.model_dirs == [str(tmp_path / "weights"), "/srv/models"]
    assert Settings().local.model_dirs == []  # by default no path loads outside the catalogue


@pytest.mark.parametrize(
    ("config", "listen", "metrics"),
    [
        ("", "127.0.0.1:4000", "127.0.0.1:4001"),  # the default pair moves together
        ("", "[::1]:4000", "[::1]:4001"),
        ("", "127.0.0.1:0", "127.0.0.1:0"),  # a free port: and a free one for metrics
        ("", "0.0.0.0:8080", "127.0.0.1:8081"),  # the keyless metrics stay on loopback
        ("", "127.0.0.1:65535", "127.0.0.1:0"),  # no port above the last one
        ('[gateway]\nmetrics_listen = "127.0.0.1:9100"\n', "127.0.0.1:4000", "127.0.0.1:9100"),
    ],
)
def test_listen_moves_the_metrics_port_unless_it_is_configured(
    tmp_path: Path, config: str, listen: str, metrics: str
) -> None:
    cfg, models = tmp_path / "helexa.toml", tmp_path / "models.toml"
    cfg.write_text(config)
    models.write_text("")
    argv = ["--config", str(cfg), "--models", str(models), "--serve", "--listen", listen]
    settings = settings_for(build_parser().parse_args(argv))
    assert (settings.gateway.listen, settings.gateway.metrics_listen) == (listen, metrics)


@pytest.mark.parametrize("value", ["-1", "0", "nan", "soon"])
def test_status_watch_needs_a_positive_interval(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["status", "--watch", value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{value!r}" in err.splitlines()[-1]


def test_the_step_timeout_guards_gpus_and_leaves_cpu_prefills_alone(tmp_path: Path) -> None:
    """A GPU step can hang on a driver fault or a collective; a CPU step is plain compute,
    and a long prompt's prefill there may take many minutes: no limit unless set."""
    local = Settings().local
    assert local.step_timeout("cuda") == 600.0
    assert local.step_timeout("cpu") is None
    cfg = tmp_path / "helexa.toml"
    cfg.write_text("[local]\nstep_timeout_s = 30\n")
    set_here = load_settings(cfg, environ={}).local
    assert set_here.step_timeout("cpu") == set_here.step_timeout("cuda") == 30.0
