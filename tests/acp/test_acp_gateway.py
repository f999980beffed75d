"""The agent against a real helexa gateway (in front of a ScriptedNeuron), in each dialect
the gateway serves: the agent's encoders meet the gateway's parsers and translators."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from acp import RequestError

from helexa.config import ModelProfile
from helexa.cortex.catalogue import Catalogue
from helexa.cortex.fleet import Fleet
from tests.acp.harness import Editor, env_for, prompt_once

servers = pytest.importorskip("tests.support.servers")  # the gateway's own test harness
scripted = pytest.importorskip("tests.support.scripted_neuron")


def model_turns(request: dict[str, Any]) -> Any:
    """Call read_file first; once its result is in the conversation, answer with it."""
    results = [m["content"] for m in request["messages"] if m["role"] == "tool"]
    if not results:
        call = scripted.ToolCallScript("call_1", "read_file", ['{"path": ', '"notes.txt"}'])
        return scripted.Reply(text=["Reading."], tool_calls=[call])
    return scripted.Reply(text=["The file says: ", results[-1].strip()])


async def test_agent_through_the_helexa_gateway(
    wire_api: str, workspace: Path, xdg: dict[str, str]
) -> None:
    (workspace / "notes.txt").write_text("pineapple\n")
    neuron = scripted.ScriptedNeuron(models={"scripted": "loaded"}, script=model_turns)
    editor = Editor()
    async with servers.gateway_over(neuron) as gateway:
        env = env_for(xdg, gateway.url, wire_api)
        response = await prompt_once(editor, env, workspace, "What's in notes?")

    assert response.stop_reason == "end_turn"
    assert editor.reads == [str(workspace / "notes.txt")]
    assert editor.tool_statuses("call_1") == ["pending", "in_progress", "completed"]
    assert editor.message_text() == "Reading.The file says: pineapple"
    first, second = neuron.requests
    assert [t["function"]["name"] for t in first["tools"]][:2] == ["read_file", "write_file"]
    [result] = [m for m in second["messages"] if m["role"] == "tool"]
    assert result["tool_call_id"] == "call_1" and result["content"] == "pineapple\n"


def with_catalogue(nodes: list[Any]) -> Any:
    """A fleet whose catalogue gives "scripted" a 4096-token window and an alias."""
    profile = ModelProfile(id="scripted", aliases=["small"], context_length=4096)
    return Fleet(nodes, Catalogue([profile]))


async def test_the_gateway_context_length_sizes_the_answer(
    workspace: Path, xdg: dict[str, str]
) -> None:
    """The gateway lists the catalogue's context_length (4096) for the model the session
    names by an alias; an Anthropic request then reserves 1024 tokens, not 8192."""
    neuron = scripted.ScriptedNeuron(models={"scripted": "loaded"})
    editor = Editor()
    async with servers.gateway_over(neuron, make_fleet=with_catalogue) as gateway:
        env = {**env_for(xdg, gateway.url, "anthropic-messages"), "HELEXA_ACP_MODEL": "small"}
        response = await prompt_once(editor, env, workspace)
    assert response.stop_reason == "end_turn" and editor.message_text() == "Hello world"
    [request] = neuron.requests
    assert request["max_tokens"] == 1024


async def test_a_keyed_local_gateway_needs_no_acp_config(
    wire_api: str, workspace: Path, xdg: dict[str, str]
) -> None:
    """helexa.toml names the gateway's address and keys; with no acp.toml, base URL or key
    of its own the agent sends the first key (in its dialect's header) and is let in. A
    key it is given explicitly wins, and this gateway refuses a wrong one."""
    neuron = scripted.ScriptedNeuron(models={"scripted": "loaded"})
    settings = servers.gateway_settings(api_keys=["key-one"])
    async with servers.gateway_over(neuron, settings) as gateway:
        config = Path(xdg["XDG_CONFIG_HOME"]) / "helexa" / "helexa.toml"
        config.parent.mkdir(parents=True)
        listen = gateway.url.removeprefix("http://")
        config.write_text(f'[gateway]\nlisten = "{listen}"\napi_keys = ["key-one", "key-two"]\n')
        env = {**xdg, "HELEXA_ACP_MODEL": "scripted", "HELEXA_ACP_WIRE_API": wire_api}
        editor = Editor()
        response = await prompt_once(editor, env, workspace)
        assert response.stop_reason == "end_turn" and editor.message_text() == "Hello world"
        with pytest.raises(RequestError, match="401"):
            await prompt_once(Editor(), {**env, "HELEXA_ACP_API_KEY": "key-two"}, workspace)
    assert len(neuron.requests) == 1
