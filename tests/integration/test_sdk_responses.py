"""The official ``openai`` SDK's Responses API, unmodified, against the gateway."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import MODEL
from tests.support.scripted_neuron import Reply, ScriptedNeuron, ToolCallScript

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


async def test_text(openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron) -> None:
    scripted.script = Reply(text=["Sunny", " and warm."], prompt_tokens=13)
    response = await openai_client.responses.create(
        model=MODEL, instructions="Be brief.", input="Weather in Prague?"
    )
    assert response.status == "completed"
    assert response.output_text == "Sunny and warm."
    assert response.model == MODEL
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (
        13,
        scripted.script.output_tokens,
    )
    assert scripted.requests[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Prague?"},
    ]


async def test_stream_text(openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron) -> None:
    scripted.script = Reply(text=["Sunny", " and", " warm."])
    stream = await openai_client.responses.create(model=MODEL, input="Weather?", stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == scripted.script.text
    assert events[-1].response.output_text == "Sunny and warm."  # type: ignore[union-attr]
    assert [e.sequence_number for e in events] == list(range(len(events)))


async def test_stream_helper_final_response(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(text=["a", "b"])
    async with openai_client.responses.stream(model=MODEL, input="hi") as stream:
        final = await stream.get_final_response()
    assert final.output_text == "ab"


@pytest.mark.parametrize("streaming", [False, True])
async def test_function_call_round_trip(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron, streaming: bool
) -> None:
    scripted.script = Reply(
        tool_calls=[ToolCallScript("call_5", "get_weather", ['{"city": ', '"Prague"}'])]
    )
    request = {"model": MODEL, "input": "Weather in Prague?", "tools": [WEATHER_TOOL]}
    if streaming:
        async with openai_client.responses.stream(**request) as stream:
            response = await stream.get_final_response()
    else:
        response = await openai_client.responses.create(**request)
    [call] = response.output
    assert call.type == "function_call"
    assert (call.call_id, call.name, call.arguments) == (
        "call_5",
        "get_weather",
        '{"city": "Prague"}',
    )
    assert scripted.requests[0]["tools"][0]["function"]["name"] == "get_weather"

    scripted.script = Reply(text=["It is sunny."])
    followup = [
        {"role": "user", "content": "Weather in Prague?"},
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": "call_5", "output": "22C, sunny"},
    ]
    answer = await openai_client.responses.create(model=MODEL, input=followup, tools=[WEATHER_TOOL])
    assert answer.output_text == "It is sunny."
    sent = scripted.requests[1]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_5"
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Prague"}'
    assert sent[2] == {"role": "tool", "tool_call_id": "call_5", "content": "22C, sunny"}


@pytest.mark.parametrize("streaming", [False, True])
async def test_reasoning_items(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron, streaming: bool
) -> None:
    scripted.script = Reply(reasoning=["Prague is", " in Czechia."], text=["Sunny."])
    request = {"model": MODEL, "input": "Weather?", "reasoning": {"effort": "high"}}
    if streaming:
        stream = await openai_client.responses.create(**request, stream=True)
        events = [e async for e in stream]
        deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
        assert deltas == scripted.script.reasoning
        response = events[-1].response  # type: ignore[union-attr]
    else:
        response = await openai_client.responses.create(**request)
    reasoning, message = response.output
    assert reasoning.type == "reasoning"
    assert "".join(c.text for c in reasoning.content or []) == "Prague is in Czechia."
    assert message.type == "message"
    assert response.output_text == "Sunny."
    assert scripted.requests[0]["reasoning_effort"] == "high"


async def test_length_is_incomplete(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(text=["trunc"], finish_reason="length")
    response = await openai_client.responses.create(
        model=MODEL, input="Weather?", max_output_tokens=16
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert scripted.requests[0]["max_tokens"] == 16


async def test_unknown_model_is_404(openai_client: openai.AsyncOpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError):
            await openai_client.responses.create(model="no-such-model", input="x", stream=stream)


async def test_stateful_request_is_400(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await openai_client.responses.create(
            model=MODEL, input="x", previous_response_id="resp_123"
        )
    assert "stateless" in info.value.message
    assert scripted.requests == []


async def test_failure_mid_stream_fails_the_response(
    openai_client: openai.AsyncOpenAI, scripted: ScriptedNeuron
) -> None:
    scripted.script = Reply(text=["partial", " lost"], fail_after=2)
    stream = await openai_client.responses.create(model=MODEL, input="x", stream=True)
    events = [e async for e in stream]
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2].message == "scripted failure"  # type: ignore[union-attr]
    assert events[-2].code == "generation_failed"  # type: ignore[union-attr]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["partial"]
