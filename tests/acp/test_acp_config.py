from __future__ import annotations

import logging
from pathlib import Path

import pytest

from helexa.acp.agent import main
from helexa.acp.config import (
    DEFAULT_BASE_URL,
    SelectorError,
    default_selection,
    load_acp_config,
    local_gateway,
    resolve_selector,
)
from helexa.config import ConfigError

TWO_ENDPOINTS = """
default_endpoint = "claude"
max_iterations = 7

[[endpoints]]
name = "home"
base_url = "http://10.0.0.2:31313/"
default_model = "qwen3"

[[endpoints]]
name = "claude"
base_url = "https://api.anthropic.com"
wire_api = "anthropic-messages"
default_model = "claude-sonnet"
api_key_env = "MY_KEY"
context_window = 200000
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "acp.toml"
    path.write_text(text)
    return path


def test_file_with_two_endpoints(tmp_path: Path) -> None:
    settings = load_acp_config(write(tmp_path, TWO_ENDPOINTS), {"MY_KEY": "k"})
    assert settings.default_endpoint == "claude" and settings.max_iterations == 7
    home, claude = settings.endpoints["home"], settings.endpoints["claude"]
    assert (home.base_url, home.wire_api, home.api_key) == (
        "http://10.0.0.2:31313",
        "openai-chat",
        None,
    )
    assert (claude.wire_api, claude.api_key, claude.context_window) == (
        "anthropic-messages", "k", 200000,
    )  # fmt: skip
    assert default_selection(settings).selector == "claude:claude-sonnet"


def test_selectors(tmp_path: Path) -> None:
    settings = load_acp_config(write(tmp_path, TWO_ENDPOINTS), {"MY_KEY": "k"})
    home = resolve_selector(settings, "home:Qwen/Qwen3-8B-GGUF:Q4_K_M")
    assert (home.endpoint.name, home.model) == ("home", "Qwen/Qwen3-8B-GGUF:Q4_K_M")
    assert resolve_selector(settings, "home").model == "qwen3"
    assert resolve_selector(settings, "home:").model == "qwen3"
    # A prefix that names no endpoint is part of a model id on the default endpoint.
    bare = resolve_selector(settings, "huggingface:org/model")
    assert (bare.endpoint.name, bare.model) == ("claude", "huggingface:org/model")
    with pytest.raises(SelectorError, match="empty"):
        resolve_selector(settings, "  ")


def test_env_fallback_defaults_to_the_local_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # no acp.toml there
    settings = load_acp_config(environ={})
    [endpoint] = settings.endpoints.values()
    assert (endpoint.base_url, endpoint.wire_api, endpoint.default_model) == (
        DEFAULT_BASE_URL, "openai-chat", None,
    )  # fmt: skip
    env = {
        "HELEXA_ACP_BASE_URL": "https://api.openai.com/v1",
        "HELEXA_ACP_MODEL": "gpt",
        "HELEXA_ACP_WIRE_API": "openai-responses",
        "HELEXA_ACP_API_KEY": "sk",
    }
    [endpoint] = load_acp_config(environ=env).endpoints.values()
    (tmp_path / "helexa").mkdir()
    (tmp_path / "helexa" / "acp.toml").write_text(TWO_ENDPOINTS)
    assert set(load_acp_config(environ={"MY_KEY": "k"}).endpoints) == {"home", "claude"}
    assert (endpoint.wire_api, endpoint.default_model, endpoint.api_key) == (
        "openai-responses", "gpt", "sk",
    )  # fmt: skip


def helexa_toml(config_home: Path, text: str) -> Path:
    path = config_home / "helexa" / "helexa.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def base_url(environ: dict[str, str] | None = None) -> str:
    [endpoint] = load_acp_config(environ=environ or {}).endpoints.values()
    return endpoint.base_url


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("0.0.0.0:4242", "http://127.0.0.1:4242"),
        ("[::]:4243", "http://[::1]:4243"),
        (":::4244", "http://[::1]:4244"),
        ("10.1.2.3:5000", "http://10.1.2.3:5000"),
        ("[fe80::1]:7", "http://[fe80::1]:7"),
        ("localhost:8080", "http://localhost:8080"),
    ],
)
def test_default_endpoint_follows_the_gateway_listen(
    listen: str, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    helexa_toml(tmp_path, f'[gateway]\nlisten = "{listen}"\napi_keys = []\n\n[local]\n')
    assert base_url() == url


def test_gateway_address_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert base_url() == DEFAULT_BASE_URL  # no helexa.toml
    helexa_toml(tmp_path, "[eviction]\nstrategy = 'lru'\n")
    assert base_url() == DEFAULT_BASE_URL  # no [gateway] listen
    helexa_toml(tmp_path, '[gateway]\nlisten = "0.0.0.0:1111"\n')
    other = tmp_path / "elsewhere.toml"
    other.write_text('[gateway]\nlisten = "127.0.0.2:2222"\n')
    assert base_url() == "http://127.0.0.1:1111"
    assert base_url({"HELEXA_CONFIG": str(other)}) == "http://127.0.0.2:2222"
    env = {"HELEXA_CONFIG": str(other), "HELEXA_GATEWAY__LISTEN": "127.0.0.3:3333"}
    assert base_url(env) == "http://127.0.0.3:3333"
    assert base_url({**env, "HELEXA_ACP_BASE_URL": "http://h:9/v1"}) == "http://h:9/v1"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[gateway", "not valid TOML"),
        ("gateway = 5", "gateway: "),
        ('[gateway]\nlisten = "nope"', "gateway.listen: expected HOST:PORT"),
        ("[gateway]\nlisten = 31313", "gateway.listen: Input should be a valid string"),
        ('[gateway]\nlisten = "0.0.0.0:0"', "port 0 is a random port"),
        ('[gateway]\napi_keys = "k"', "gateway.api_keys: Input should be a valid list"),
    ],
)
def test_a_broken_helexa_toml_falls_back_with_a_warning(
    text: str,
    problem: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The agent reads two keys of the gateway's file; a mistake there is the gateway's to
    report, so the agent starts anyway, on the default address, and says why."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    path = helexa_toml(tmp_path, text)
    with caplog.at_level(logging.WARNING, "helexa.acp.config"):
        assert base_url() == DEFAULT_BASE_URL
    [warning] = caplog.records
    assert str(path) in warning.message and problem in warning.message
    assert DEFAULT_BASE_URL in warning.message
    caplog.clear()
    assert base_url({"HELEXA_ACP_BASE_URL": "http://h:1"}) == "http://h:1"
    assert caplog.records == []  # not even read when the address is given
    missing = {"HELEXA_CONFIG": str(tmp_path / "missing.toml")}
    assert local_gateway(missing).url == DEFAULT_BASE_URL


def endpoint_key(environ: dict[str, str] | None = None) -> str | None:
    [endpoint] = load_acp_config(environ=environ or {}).endpoints.values()
    return endpoint.api_key


def test_the_local_gateway_key_comes_from_helexa_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Defaulting to the local gateway, the agent sends the first of its api_keys, unless
    HELEXA_ACP_API_KEY gives a key; another endpoint never gets the gateway's key."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert endpoint_key() is None  # no helexa.toml
    helexa_toml(tmp_path, '[gateway]\nlisten = "127.0.0.1:4000"\napi_keys = []\n')
    assert endpoint_key() is None
    helexa_toml(tmp_path, '[gateway]\napi_keys = ["", "key-one", "key-two"]\nadmin_key = "adm"\n')
    with caplog.at_level(logging.INFO, "helexa.acp.config"):
        assert endpoint_key() == "key-one"
    assert base_url() == DEFAULT_BASE_URL  # a key without a listen: the default address
    assert "key-one" not in caplog.text and "api_keys" in caplog.text  # says where, not what
    assert endpoint_key({"HELEXA_ACP_API_KEY": "mine"}) == "mine"
    assert endpoint_key({"HELEXA_ACP_BASE_URL": "http://elsewhere:1"}) is None
    assert endpoint_key({"HELEXA_GATEWAY__API_KEYS": '["from-env"]'}) == "from-env"
    env = {"HELEXA_GATEWAY__LISTEN": "127.0.0.5:5555"}
    assert (base_url(env), endpoint_key(env)) == ("http://127.0.0.5:5555", "key-one")
    assert local_gateway(env, want_key=False).api_key is None


def test_a_key_given_leaves_the_file_keys_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the keys the agent needs are checked: with HELEXA_ACP_API_KEY set, a bad
    api_keys does not cost it the gateway's address."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    helexa_toml(tmp_path, '[gateway]\nlisten = "127.0.0.1:4001"\napi_keys = "not a list"\n')
    with caplog.at_level(logging.WARNING, "helexa.acp.config"):
        assert base_url({"HELEXA_ACP_API_KEY": "mine"}) == "http://127.0.0.1:4001"
        assert caplog.records == []
        assert (base_url(), endpoint_key()) == (DEFAULT_BASE_URL, None)
    assert "gateway.api_keys" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "helexa.acp.config"):
        assert endpoint_key({"HELEXA_GATEWAY__API_KEYS": "oops"}) is None
    assert "HELEXA_GATEWAY__API_KEYS: gateway.api_keys" in caplog.text


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        (TWO_ENDPOINTS, {}, "endpoints.1.api_key_env: environment variable MY_KEY is not set"),
        (TWO_ENDPOINTS.replace('"claude"\nmax', '"nope"\nmax'), {"MY_KEY": "k"},
         "default_endpoint: 'nope' is not an endpoint (home, claude)"),
        (TWO_ENDPOINTS.replace('name = "claude"', 'name = "home"'), {"MY_KEY": "k"},
         "endpoints.1.name: 'home' is not unique"),
        ('[[endpoints]]\nname = "a:b"\nbase_url = "http://x"', {}, "endpoints[1] (a:b).name"),
        ('[[endpoints]]\nname = "a"\nbase_url = "ftp://x"', {}, "expected an http(s):// URL"),
        ('[[endpoints]]\nname = "a"\nbase_url = "http://x"\nwire_api = "grpc"', {},
         "endpoints[1] (a).wire_api"),
        ('[[endpoints]]\nname = "a"\nbase_url = "http://x"\ncolour = 1', {},
         "endpoints[1] (a).colour: unknown key"),
        ("endpoints = []", {}, "endpoints"),
        ("[[endpoints]", {}, "not valid TOML"),
    ],
)  # fmt: skip
def test_mistakes_are_one_clear_line(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_acp_config(path, env)
    assert message in str(info.value) and str(path) in str(info.value)


def test_main_exits_2_with_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[[endpoints]]\nname = "a"\nbase_url = "nope"')
    assert main(str(path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("helexa acp: config error: ")
