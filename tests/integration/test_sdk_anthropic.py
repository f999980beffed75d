"""The official ``anthropic`` SDK, unmodified, against the gateway over loopback.

The neuron behind the gateway speaks OpenAI chat; these tests check both ends of the
translation: what the SDK receives, and the OpenAI messages the neuron was sent.
"""

from __future__ import annotations

import asyncio

import anthropic
import pytest

from helexa.config import ModelProfile
from helexa.cortex.catalogue import Catalogue
from helexa.cortex.fleet import Fleet
from helexa.neuron.interface import Neuron, NeuronError
from tests.conftest import MODEL
from tests.support.scripted_neuron import Reply, ScriptedNeuron, ToolCallScript, word_count
from tests.support.servers import Gateway, gateway_over, gateway_settings

USER = [{"role": "user", "content": "What is the weather in Prague?"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


async def test_message_text(
    anthropic_client: anthropic.AsyncAnthropic, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(text=["Sunny", " and warm."], prompt_tokens=21)
    message = await anthropic_client.messages.create(
        model=MODEL, max_tokens=64, system="Be brief.", messages=USER
    )
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Sunny and warm."  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.model == MODEL
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        21,
        scripted.script.output_tokens,
    )
    [sent] = scripted.requests
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, *USER]
    assert sent["max_tokens"] == 64 and sent["model"] == MODEL


async def test_message_stream_text(
    anthropic_client: anthropic.AsyncAnthropic, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(text=["Sunny", " and", " warm."], prompt_tokens=9)
    async with anthropic_client.messages.stream(
        model=MODEL, max_tokens=64, messages=USER
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert pieces == scripted.script.text
    assert final.content[0].text == "Sunny and warm."  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.model == MODEL
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        9,
        scripted.script.output_tokens,
    )


async def test_stream_event_order(
    anthropic_client: anthropic.AsyncAnthropic, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(reasoning=["hm"], text=["ok"])
    stream = await anthropic_client.messages.create(
        model=MODEL, max_tokens=64, messages=USER, stream=True
    )
    kinds = [event.type async for event in stream]
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 2


@pytest.mark.parametrize("streaming", [False, True])
async def test_tool_use_round_trip(
    anthropic_client: anthropic.AsyncAnthropic, scripted: ScriptedNeuron, streaming: bool
) -> None:
    scripted.script = Reply(
        text=["Let me check."],
        tool_calls=[ToolCallScript("call_9", "get_weather", ['{"city":', ' "Prague"}'])],
    )
    request = {"model": MODEL, "max_tokens": 64, "messages": USER, "tools": [WEATHER_TOOL]}
    if streaming:
        async with anthropic_client.messages.stream(**request) as stream:
            message = await stream.get_final_message()
    else:
        message = await anthropic_client.messages.create(**request)
    assert message.stop_reason == "tool_use"
    text, tool_use = message.content
    assert text.type == "text" and text.text == "Let me check."
    assert tool_use.type == "tool_use"
    assert (tool_use.id, tool_use.name, tool_use.input) == (
        "call_9",
        "get_weather",
        {"city": "Prague"},
    )
    tools_sent = scripted.requests[0]["tools"]
    assert tools_sent[0]["function"]["name"] == "get_weather"
    assert tools_sent[0]["function"]["parameters"] == WEATHER_TOOL["input_schema"]

    scripted.script = Reply(text=["It is sunny."])
    followup = [
        *USER,
        {
            "role": "assistant",
            "content": [b.model_dump(exclude_none=True) for b in message.content],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "call_9", "content": "22C, sunny"}],
        },
    ]
    answer = await anthropic_client.messages.create(
        model=MODEL, max_tokens=64, messages=followup, tools=[WEATHER_TOOL]
    )
    assert answer.content[0].text == "It is sunny."  # type: ignore[union-attr]
    sent = scripted.requests[1]["messages"]
    assert sent[1]["role"] == "assistant" and sent[1]["content"] == "Let me check."
    [call] = sent[1]["tool_calls"]
    assert call["id"] == "call_9" and call["function"]["name"] == "get_weather"
    assert call["function"]["arguments"].replace(" ", "") == '{"city":"Prague"}'
    assert sent[2] == {"role": "tool", "tool_call_id": "call_9", "content": "22C, sunny"}


@pytest.mark.parametrize("streaming", [False, True])
async def test_thinking_blocks(
    anthropic_client: anthropic.AsyncAnthropic, scripted: ScriptedNeuron, streaming: bool
) -> None:
    scripted.script = Reply(reasoning=["Prague is", " in Czechia."], text=["Sunny."])
    request = {
        "model": MODEL,
        "max_tokens": 256,
        "messages": USER,
        "thinking": {"type": "enabled", "budget_tokens": 128},
    }
    if streaming:
        async with anthropic_client.messages.stream(**request) as stream:
            thinking = [e.thinking async for e in stream if e.type == "thinking"]
            message = await stream.get_final_message()
        assert thinking == scripted.script.reasoning
    else:
        message = await anthropic_client.messages.create(**request)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Prague is in Czechia."  # type: ignore[union-attr]
    assert message.content[1].text == "Sunny."  # type: ignore[union-attr]
    assert scripted.requests[0]["chat_template_kwargs"] == {"enable_thinking": True}


async def test_thinking_is_sent_back_as_reasoning(
    anthropic_client: anthropic.AsyncAnthropic, scripted: ScriptedNeuron
) -> None:
    history = [
        *USER,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "look it up", "signature": ""},
                {"type": "text", "text": "Sunny."},
            ],
        },
        {"role": "user", "content": "And tomorrow?"},
    ]
    await anthropic_client.messages.create(model=MODEL, max_tokens=64, messages=history)
    assistant = scripted.requests[0]["messages"][1]
    assert assistant == {
        "role": "assistant",
        "content": "Sunny.",
        "reasoning_content": "look it up",
    }


@pytest.mark.parametrize(
    ("finish", "stop_sequence", "stop_reason"),
    [("length", None, "max_tokens"), ("stop", "END", "stop_sequence"), ("stop", None, "end_turn")],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_stop_reasons(
    anthropic_client: anthropic.AsyncAnthropic,
    scripted: ScriptedNeuron,
    finish: str,
    stop_sequence: str | None,
    stop_reason: str,
    streaming: bool,
) -> None:
    scripted.script = Reply(text=["x"], finish_reason=finish, stop_sequence=stop_sequence)
    request = {"model": MODEL, "max_tokens": 5, "messages": USER, "stop_sequences": ["END"]}
    if streaming:
        async with anthropic_client.messages.stream(**request) as stream:
            message = await stream.get_final_message()
    else:
        message = await anthropic_client.messages.create(**request)
    assert message.stop_reason == stop_reason
    assert message.stop_sequence == stop_sequence
    assert scripted.requests[0]["stop"] == ["END"]


async def test_count_tokens(
    anthropic_client: anthropic.AsyncAnthropic, scripted: ScriptedNeuron
) -> None:
    result = await anthropic_client.messages.count_tokens(
        model=MODEL, system="Be very brief.", messages=USER, tools=[WEATHER_TOOL]
    )
    [sent] = scripted.count_requests
    assert sent["messages"] == [{"role": "system", "content": "Be very brief."}, *USER]
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert result.input_tokens == word_count(sent)
    assert scripted.requests == []  # counting generates nothing


async def test_models_list_in_anthropic_shape(anthropic_client: anthropic.AsyncAnthropic) -> None:
    ids = [m.id async for m in anthropic_client.models.list()]
    assert MODEL in ids
    assert (await anthropic_client.models.retrieve(MODEL)).id == MODEL


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
async def test_unknown_model_is_404(
    anthropic_client: anthropic.AsyncAnthropic, streaming: bool
) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        await anthropic_client.messages.create(
            model="no-such-model", max_tokens=8, messages=USER, stream=streaming
        )
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        await anthropic_client.messages.count_tokens(model="no-such-model", messages=USER)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_tokens": 0, "messages": USER}, "max_tokens"),
        ({"max_tokens": 8, "messages": []}, "messages"),
        (
            {
                "max_tokens": 8,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {"type": "base64", "media_type": "image/png", "data": ""},
                            }
                        ],
                    }
                ],
            },
            "images are not supported",
        ),
    ],
)
async def test_malformed_request_is_400(
    anthropic_client: anthropic.AsyncAnthropic, scripted: ScriptedNeuron, kwargs: dict, needle: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        await anthropic_client.messages.create(model=MODEL, **kwargs)
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert needle in info.value.body["error"]["message"]  # type: ignore[index]
    assert scripted.requests == []


async def test_failure_mid_stream_is_an_error_event(
    anthropic_client: anthropic.AsyncAnthropic, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(text=["partial", " lost"], fail_after=2)
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as info:
        async with anthropic_client.messages.stream(
            model=MODEL, max_tokens=64, messages=USER
        ) as stream:
            async for text in stream.text_stream:
                received.append(text)
    assert received == ["partial"]
    body = info.value.body
    assert body["type"] == "error"  # type: ignore[index]
    assert body["error"]["message"] == "scripted failure"  # type: ignore[index]
    assert body["error"]["type"] == "api_error"  # type: ignore[index]


async def test_overloaded_neuron_maps_to_anthropic_type(
    anthropic_client: anthropic.AsyncAnthropic, scripted: ScriptedNeuron
) -> None:
    busy = NeuronError("all slots busy", status=503, type="server_error", code="busy")
    scripted.script = Reply(text=["x"], fail_after=0, error=busy)
    with pytest.raises(anthropic.APIStatusError) as info:
        await anthropic_client.messages.create(model=MODEL, max_tokens=8, messages=USER)
    assert info.value.status_code == 503
    assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


async def test_client_disconnect_cancels_generation(
    anthropic_client: anthropic.AsyncAnthropic, gateway: Gateway, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(text=["a", "b", "c"], block_after=2)
    async with anthropic_client.messages.stream(model=MODEL, max_tokens=64, messages=USER) as s:
        async for text in s.text_stream:
            if text == "a":
                break
        assert not scripted.cancelled.is_set()
    await asyncio.wait_for(scripted.cancelled.wait(), timeout=5)
    assert gateway.fleet.use[("node-a", MODEL)].in_flight == 0


async def test_keyed_gateway_takes_x_api_key(scripted: ScriptedNeuron) -> None:
    async with gateway_over(scripted, gateway_settings(api_keys=["sk-right"])) as gw:
        wrong = anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-wrong", max_retries=0)
        async with wrong:
            with pytest.raises(anthropic.AuthenticationError) as info:
                await wrong.messages.create(model=MODEL, max_tokens=8, messages=USER)
        assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        right = anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-right", max_retries=0)
        async with right:
            message = await right.messages.create(model=MODEL, max_tokens=8, messages=USER)
        assert message.content[0].text == "".join(scripted.script.text)  # type: ignore[union-attr]


async def test_alias_is_rewritten_for_the_neuron_and_kept_for_the_client() -> None:
    profile = ModelProfile(id="qwen3-small", source="helexa", aliases=["small"])
    neuron = ScriptedNeuron("node-q", models={"helexa:qwen3-small": "loaded"})

    def with_catalogue(nodes: list[Neuron]) -> Fleet:
        return Fleet(nodes, Catalogue([profile]))

    async with gateway_over(neuron, make_fleet=with_catalogue) as gw:
        client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="unused", max_retries=0)
        async with client:
            message = await client.messages.create(model="small", max_tokens=8, messages=USER)
            async with client.messages.stream(model="small", max_tokens=8, messages=USER) as s:
                streamed = await s.get_final_message()
            count = await client.messages.count_tokens(model="small", messages=USER)
    assert message.model == streamed.model == "small"
    assert [r["model"] for r in neuron.requests] == ["helexa:qwen3-small"] * 2
    assert [r["model"] for r in neuron.count_requests] == ["helexa:qwen3-small"]
    assert count.input_tokens == word_count(neuron.count_requests[0])
