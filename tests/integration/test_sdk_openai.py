"""The official ``openai`` SDK, unmodified, against the gateway over loopback.

Chain under test: AsyncOpenAI -> gateway app -> Fleet -> RemoteNeuron -> neuron HTTP API ->
ScriptedNeuron. Expected values come from the script, never from the gateway's output.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import openai
import pytest

from helexa.config import ModelProfile, SamplingDefaults
from helexa.cortex.catalogue import Catalogue
from helexa.cortex.fleet import Fleet
from helexa.neuron.interface import Neuron
from tests.conftest import COLD_MODEL, MODEL
from tests.support.scripted_neuron import Reply, ScriptedNeuron, ToolCallScript
from tests.support.servers import Gateway, gateway_over, gateway_settings

USER = [{"role": "user", "content": "What is the weather in Prague?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


async def test_chat_text(openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron) -> None:
    scripted.script = Reply(text=["Sunny", " and", " warm."], prompt_tokens=17)
    completion = await openai_client.chat.completions.create(model=MODEL, messages=USER)
    choice = completion.choices[0]
    assert choice.message.content == "Sunny and warm."
    assert choice.finish_reason == "stop"
    assert completion.model == MODEL
    assert completion.usage is not None
    assert completion.usage.model_dump(exclude_none=True) == scripted.script.usage()
    [received] = scripted.requests
    assert received["messages"] == USER and received["model"] == MODEL


async def test_chat_stream_text(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(text=["Sunny", " and", " warm."])
    stream = await openai_client.chat.completions.create(model=MODEL, messages=USER, stream=True)
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Sunny and warm."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks)  # not asked for: not sent
    assert {c.model for c in chunks} == {MODEL}


async def test_chat_stream_usage_when_asked(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(text=["a", "b"], prompt_tokens=5)
    stream = await openai_client.chat.completions.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == scripted.script.usage()


async def test_tool_call_round_trip(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    arguments = ['{"city": ', '"Prague"}']
    scripted.script = Reply(tool_calls=[ToolCallScript("call_7", "get_weather", arguments)])
    completion = await openai_client.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER_TOOL]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert (call.id, call.function.name) == ("call_7", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Prague"}
    assert scripted.requests[0]["tools"] == [WEATHER_TOOL]

    scripted.script = Reply(text=["It is sunny."])
    followup = [
        *USER,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "22C, sunny"},
    ]
    answer = await openai_client.chat.completions.create(
        model=MODEL, messages=followup, tools=[WEATHER_TOOL]
    )
    assert answer.choices[0].message.content == "It is sunny."
    sent = scripted.requests[1]["messages"]
    assert sent[1]["role"] == "assistant"
    assert sent[1]["tool_calls"][0]["id"] == "call_7"
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == "".join(arguments)
    assert sent[2] == {"role": "tool", "tool_call_id": "call_7", "content": "22C, sunny"}


async def test_tool_call_stream_deltas(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    arguments = ['{"ci', 'ty": "Pra', 'gue"}']
    scripted.script = Reply(
        tool_calls=[
            ToolCallScript("call_1", "get_weather", arguments),
            ToolCallScript("call_2", "get_weather", ['{"city": "Brno"}']),
        ]
    )
    stream = await openai_client.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER_TOOL], stream=True
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert calls == {
        0: {"id": "call_1", "name": "get_weather", "arguments": "".join(arguments)},
        1: {"id": "call_2", "name": "get_weather", "arguments": '{"city": "Brno"}'},
    }


WEATHER_FUNCTION = WEATHER_TOOL["function"]


async def test_legacy_functions_are_served_as_tools_and_answered_as_function_call(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    arguments = ['{"city": ', '"Prague"}']
    scripted.script = Reply(tool_calls=[ToolCallScript("call_7", "get_weather", arguments)])
    completion = await openai_client.chat.completions.create(
        model=MODEL,
        messages=USER,
        functions=[WEATHER_FUNCTION],
        function_call={"name": "get_weather"},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.tool_calls is None and choice.message.function_call is not None
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Prague"}
    sent = scripted.requests[0]
    assert "functions" not in sent and "function_call" not in sent
    assert sent["tools"] == [WEATHER_TOOL]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False

    scripted.script = Reply(text=["It is sunny."])
    followup = [
        *USER,
        choice.message.model_dump(exclude_none=True),
        {"role": "function", "name": "get_weather", "content": "22C, sunny"},
    ]
    answer = await openai_client.chat.completions.create(
        model=MODEL, messages=followup, functions=[WEATHER_FUNCTION]
    )
    assert answer.choices[0].message.content == "It is sunny."
    assert answer.choices[0].finish_reason == "stop"
    turn, result = scripted.requests[1]["messages"][1:]
    [call] = turn["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": "".join(arguments)}
    assert result == {"role": "tool", "tool_call_id": call["id"], "content": "22C, sunny"}


async def test_legacy_functions_stream_function_call_deltas(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    arguments = ['{"ci', 'ty": "Pra', 'gue"}']
    scripted.script = Reply(tool_calls=[ToolCallScript("call_1", "get_weather", arguments)])
    stream = await openai_client.chat.completions.create(
        model=MODEL, messages=USER, functions=[WEATHER_FUNCTION], stream=True
    )
    name, pieces, finish = "", [], None
    async for chunk in stream:
        for choice in chunk.choices:
            assert not choice.delta.tool_calls
            if choice.delta.function_call is not None:
                name += choice.delta.function_call.name or ""
                pieces.append(choice.delta.function_call.arguments or "")
            finish = choice.finish_reason or finish
    assert (name, "".join(pieces), finish) == ("get_weather", "".join(arguments), "function_call")


async def test_reasoning_content(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(reasoning=["Prague is", " in Czechia."], text=["Sunny."])
    completion = await openai_client.chat.completions.create(model=MODEL, messages=USER)
    message = completion.choices[0].message
    assert message.content == "Sunny."
    assert (message.model_extra or {})["reasoning_content"] == "Prague is in Czechia."

    stream = await openai_client.chat.completions.create(model=MODEL, messages=USER, stream=True)
    reasoning = []
    async for chunk in stream:
        for choice in chunk.choices:
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
    assert "".join(reasoning) == "Prague is in Czechia."


@pytest.mark.parametrize("finish", ["length", "stop", "content_filter"])
async def test_finish_reason_passes_through(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron, finish: str
) -> None:
    scripted.script = Reply(text=["x"], finish_reason=finish)
    completion = await openai_client.chat.completions.create(model=MODEL, messages=USER)
    assert completion.choices[0].finish_reason == finish


async def test_legacy_completions(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(text=["one", " two"], finish_reason="length")
    completion = await openai_client.completions.create(model=MODEL, prompt="count:")
    assert completion.choices[0].text == "one two"
    assert completion.choices[0].finish_reason == "length"
    assert completion.model == MODEL
    assert scripted.requests[0]["prompt"] == "count:"

    stream = await openai_client.completions.create(model=MODEL, prompt="count:", stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "one two"


async def test_legacy_completions_take_token_ids(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    completion = await openai_client.completions.create(model=MODEL, prompt=[100, 200, 300])
    assert completion.choices[0].text == "".join(scripted.script.text)
    assert scripted.requests[0]["prompt"] == [100, 200, 300]
    with pytest.raises(openai.BadRequestError) as info:
        await openai_client.completions.create(model=MODEL, prompt=["one", "two"])
    assert info.value.param == "prompt"


async def test_cold_model_is_loaded_then_served(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    completion = await openai_client.chat.completions.create(model=COLD_MODEL, messages=USER)
    assert completion.choices[0].message.content == "".join(scripted.script.text)
    assert [r.model_id for r in scripted.loads] == [COLD_MODEL]
    assert scripted.requests[0]["model"] == COLD_MODEL


async def test_models_list_and_retrieve(openai_client: openai.AsyncOpenAI) -> None:
    models = {m.id: m async for m in openai_client.models.list()}
    assert set(models) == {MODEL, COLD_MODEL}
    assert models[MODEL].owned_by == "helexa"
    assert (models[MODEL].model_extra or {})["status"] == "loaded"
    assert (models[COLD_MODEL].model_extra or {})["status"] == "unloaded"
    assert (models[MODEL].model_extra or {})["nodes"] == ["node-a"]
    assert (await openai_client.models.retrieve(MODEL)).id == MODEL
    with pytest.raises(openai.NotFoundError):
        await openai_client.models.retrieve("no-such-model")


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model_is_404(openai_client: openai.AsyncOpenAI, stream: bool) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await openai_client.chat.completions.create(
            model="no-such-model", messages=USER, stream=stream
        )
    assert info.value.code == "model_not_found"
    assert info.value.type == "invalid_request_error"  # OpenAI has no not_found_error type
    assert "no-such-model" in info.value.message


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": USER, "temperature": 7}, "temperature"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ],
)
async def test_malformed_request_is_400(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron, kwargs: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await openai_client.chat.completions.create(model=MODEL, **kwargs)
    assert info.value.param == param
    assert scripted.requests == []


async def test_neuron_refusal_before_streaming_keeps_its_status(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    from helexa.neuron.interface import NeuronError

    refusal = NeuronError(
        "prompt is 9000 tokens; the context holds 4096",
        status=400,
        type="invalid_request_error",
        code="context_length_exceeded",
    )
    scripted.script = Reply(text=["never"], fail_after=0, error=refusal)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await openai_client.chat.completions.create(model=MODEL, messages=USER, stream=stream)
        assert info.value.code == "context_length_exceeded"
        assert "9000 tokens" in info.value.message


async def test_failure_mid_stream_is_an_error_frame(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(text=["partial", " answer", " lost"], fail_after=2)
    stream = await openai_client.chat.completions.create(model=MODEL, messages=USER, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            received.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(received) == "partial"
    assert "scripted failure" in info.value.message


async def test_client_disconnect_cancels_generation(
    openai_client: openai.AsyncOpenAI, gateway: Gateway, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(text=["a", "b", "c", "d"], block_after=3)
    stream = await openai_client.chat.completions.create(model=MODEL, messages=USER, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content == "b":
            break
    assert not scripted.cancelled.is_set()
    await stream.close()
    await asyncio.wait_for(scripted.cancelled.wait(), timeout=5)
    assert gateway.fleet.use[("node-a", MODEL)].in_flight == 0


async def test_keyed_gateway_needs_a_valid_key(scripted: ScriptedNeuron) -> None:
    settings = gateway_settings(api_keys=["key-one", "key-two"])
    async with gateway_over(scripted, settings) as gw:
        for key in ("wrong", "key-one-and-more", "key-on"):
            client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
            async with client:
                with pytest.raises(openai.AuthenticationError):
                    await client.chat.completions.create(model=MODEL, messages=USER)
                with pytest.raises(openai.AuthenticationError):
                    await client.models.list()
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="key-two", max_retries=0)
        async with client:
            completion = await client.chat.completions.create(model=MODEL, messages=USER)
        assert completion.choices[0].message.content == "".join(scripted.script.text)
    assert len(scripted.requests) == 1


async def test_model_ids_with_slashes() -> None:
    slashed = "Qwen/Qwen3-0.6B-GGUF:Q8_0"
    async with gateway_over(ScriptedNeuron("node-b", models={slashed: "loaded"})) as gw:
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        async with client:
            assert (await client.models.retrieve(slashed)).id == slashed
            completion = await client.chat.completions.create(model=slashed, messages=USER)
    assert completion.model == slashed


def with_catalogue(*profiles: ModelProfile) -> Callable[[list[Neuron]], Fleet]:
    """A make_fleet for gateway_over: the fleet over these catalogue profiles."""
    return lambda nodes: Fleet(nodes, Catalogue(list(profiles)))


async def test_alias_is_rewritten_for_the_neuron_and_kept_for_the_client() -> None:
    """The neuron gets the id it knows (source-qualified); the client sees its own name."""
    profile = ModelProfile(id="qwen3-small", source="helexa", aliases=["small"])
    neuron = ScriptedNeuron("node-q", models={"helexa:qwen3-small": "loaded"})

    async with gateway_over(neuron, make_fleet=with_catalogue(profile)) as gw:
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        async with client:
            completion = await client.chat.completions.create(model="small", messages=USER)
            stream = await client.chat.completions.create(model="small", messages=USER, stream=True)
            models = {c.model async for c in stream}
    assert completion.model == "small" and models == {"small"}
    assert [r["model"] for r in neuron.requests] == ["helexa:qwen3-small"] * 2


async def test_models_list_shows_aliases_and_context_length() -> None:
    profile = ModelProfile(id="qwen3-small", aliases=["small", "s"], context_length=8192)
    neuron = ScriptedNeuron("node-q", models={"qwen3-small": "unloaded"})

    async with gateway_over(neuron, make_fleet=with_catalogue(profile)) as gw:
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        async with client:
            (model,) = [m async for m in client.models.list()]
    assert model.id == "qwen3-small"
    assert (model.model_extra or {})["aliases"] == ["small", "s"]
    assert (model.model_extra or {})["context_length"] == 8192  # the catalogue's, until loaded


async def test_catalogue_sampling_defaults_go_under_the_clients_values() -> None:
    profile = ModelProfile(
        id=MODEL, sampling=SamplingDefaults(temperature=0.6, top_p=0.95, max_tokens=512)
    )
    neuron = ScriptedNeuron("node-q", models={MODEL: "loaded"})

    async with gateway_over(neuron, make_fleet=with_catalogue(profile)) as gw:
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        async with client:
            await client.chat.completions.create(model=MODEL, messages=USER)
            await client.chat.completions.create(
                model=MODEL, messages=USER, temperature=0, max_completion_tokens=9
            )
    defaulted, explicit = neuron.requests
    assert (defaulted["temperature"], defaulted["top_p"], defaulted["max_tokens"]) == (
        0.6,
        0.95,
        512,
    )
    assert (explicit["temperature"], explicit["top_p"]) == (0, 0.95)
    assert "max_tokens" not in explicit and explicit["max_completion_tokens"] == 9
