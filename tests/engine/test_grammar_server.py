"""Decoding held to a grammar, through the real gateway in front of the local engine on a
tiny random-weight Qwen3, read by the official SDKs: whatever random weights would write,
a JSON-schema answer validates against its schema, a forced call ("required", Anthropic's
"any") is a call of one of the tools with arguments valid for that tool, in Qwen3's JSON
and in Qwen3-Coder's XML call syntax; a schema the grammar engine refuses is a 400 in the
caller's dialect that says why."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from helexa.config import ModelProfile, Settings
from helexa.engine.text.chat_template import QWEN3_CODER_TEMPLATE
from helexa.neuron.local import LocalNeuron
from tests.engine.factories import make_tiny_hf_model, save_model_dir
from tests.engine.tiny_tokenizer import make_tiny_tokenizer_config, make_tiny_tokenizer_json
from tests.support.servers import Gateway, gateway_over

HI = [{"role": "user", "content": "What is the weather in Paris?"}]
SEEDS = range(3)
# Budgets past the longest valid output: random weights write up to 32 blank bytes (maybe
# one token each) wherever JSON allows them, a dozen or two places in these schemas; an
# XML call's values are raw text or JSON scalars, which have no such places.
ANSWER_BUDGET = 1000
CALL_BUDGET = {"tiny": 1000, "coder": 400}
# Every value bounded, so any random answer closes within the budget.
PLACE = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "rank": {"type": "integer", "minimum": 1, "maximum": 9},
        "kind": {"enum": ["town", "city"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["city", "rank", "kind"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
ANTHROPIC_TOOLS = [{"name": name, "input_schema": schema} for name, schema in SCHEMAS.items()]
# llguidance implements no "not": refused, not silently dropped.
UNENFORCEABLE = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}


class Place(BaseModel):
    """The openai SDK's parse helper sends this as a strict json_schema."""

    city: str = Field(max_length=12)
    rank: int = Field(ge=1, le=9)


def _model_dir(root: Path, template: str) -> Path:
    vocab_json = make_tiny_tokenizer_json()
    from helexa.engine.text.tokenizer import Tokenizer

    vocab = Tokenizer.from_hf(vocab_json).vocab_size
    return save_model_dir(
        root,
        make_tiny_hf_model(vocab, seed=7),
        tokenizer_json=vocab_json,
        tokenizer_config={**make_tiny_tokenizer_config(), "chat_template": template},
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grammar")
    return {
        "tiny": _model_dir(root / "qwen3", make_tiny_tokenizer_config()["chat_template"]),
        "coder": _model_dir(root / "coder", QWEN3_CODER_TEMPLATE),
    }


@pytest.fixture
async def gateway(model_dirs: dict[str, Path]) -> AsyncIterator[Gateway]:
    profiles = [
        ModelProfile(id=name, path=str(path), context_length=2048)
        for name, path in model_dirs.items()
    ]
    neuron = LocalNeuron(Settings(models=profiles))
    try:
        async with gateway_over(neuron) as gw:
            yield gw
    finally:
        await neuron.close()


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0
    ) as c:
        yield c


@pytest.fixture
async def claude(gateway: Gateway) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=gateway.url, api_key="unused", max_retries=0) as c:
        yield c


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_chat_answer_validates_against_its_schema(
    client: openai.AsyncOpenAI, seed: int
) -> None:
    reply = await client.chat.completions.create(
        model="tiny",
        messages=HI,  # type: ignore[arg-type]
        response_format=_schema_format(PLACE),  # type: ignore[arg-type]
        temperature=1.0,
        seed=seed,
        max_tokens=ANSWER_BUDGET,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content or ""), PLACE)


async def test_the_sdk_parse_helper_gets_its_model_back(client: openai.AsyncOpenAI) -> None:
    for seed in SEEDS:
        reply = await client.chat.completions.parse(
            model="tiny",
            messages=HI,  # type: ignore[arg-type]
            response_format=Place,
            temperature=1.0,
            seed=seed,
            max_tokens=ANSWER_BUDGET,
        )
        parsed = reply.choices[0].message.parsed
        assert isinstance(parsed, Place) and 1 <= parsed.rank <= 9


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_responses_text_format_validates_against_its_schema(
    client: openai.AsyncOpenAI, seed: int
) -> None:
    fmt = {"type": "json_schema", "name": "place", "schema": PLACE, "strict": True}
    async with client.responses.stream(
        model="tiny",
        input="Where?",
        text={"format": fmt},  # type: ignore[typeddict-item]
        temperature=1.0,
        max_output_tokens=ANSWER_BUDGET,
        extra_body={"seed": seed},
    ) as stream:
        response = await stream.get_final_response()
    jsonschema.validate(json.loads(response.output_text), PLACE)


@pytest.mark.parametrize("model", ["tiny", "coder"])
@pytest.mark.parametrize("seed", SEEDS)
async def test_required_tool_choice_is_always_a_call_of_a_given_tool(
    client: openai.AsyncOpenAI, model: str, seed: int
) -> None:
    """Qwen3's JSON calls ("tiny") and Qwen3-Coder's XML ones ("coder"): any output is a
    call naming one of the tools, its arguments valid for that tool. (One call: random
    weights allowed parallel calls may go on calling until the budget runs out.)"""
    reply = await client.chat.completions.create(
        model=model,
        messages=HI,  # type: ignore[arg-type]
        tools=OPENAI_TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        seed=seed,
        max_tokens=CALL_BUDGET[model],
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert not choice.message.content
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("model", ["tiny", "coder"])
@pytest.mark.parametrize("run", SEEDS)  # the Messages API takes no seed: runs, sampled
async def test_anthropic_tool_choice_any_is_always_a_tool_use(
    claude: anthropic.AsyncAnthropic, model: str, run: int
) -> None:
    async with claude.messages.stream(
        model=model,
        max_tokens=CALL_BUDGET[model],
        messages=HI,  # type: ignore[arg-type]
        tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        extra_body={"temperature": 1.0},
    ) as stream:
        message = await stream.get_final_message()
    assert message.stop_reason == "tool_use"
    (use,) = message.content
    assert use.type == "tool_use"
    jsonschema.validate(use.input, SCHEMAS[use.name])


async def test_a_named_xml_call_holds_its_arguments_to_the_schema(
    claude: anthropic.AsyncAnthropic,
) -> None:
    for _ in SEEDS:
        message = await claude.messages.create(
            model="coder",
            max_tokens=400,
            messages=HI,  # type: ignore[arg-type]
            tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "tool", "name": "get_weather"},
            extra_body={"temperature": 1.0},
        )
        (use,) = message.content
        assert use.type == "tool_use" and use.name == "get_weather"
        jsonschema.validate(use.input, WEATHER)


async def test_a_schema_the_grammar_engine_refuses_is_a_400_saying_why(
    client: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic
) -> None:
    why = 'Unimplemented keys: ["not"]'
    with pytest.raises(openai.BadRequestError) as chat_refused:
        await client.chat.completions.create(
            model="tiny",
            messages=HI,  # type: ignore[arg-type]
            response_format=_schema_format(UNENFORCEABLE),  # type: ignore[arg-type]
        )
    assert chat_refused.value.code == "invalid_schema" and why in chat_refused.value.message
    assert "'place'" in chat_refused.value.message

    strict = {**OPENAI_TOOLS[0]["function"], "parameters": UNENFORCEABLE, "strict": True}
    with pytest.raises(openai.BadRequestError) as tool_refused:
        await client.responses.create(
            model="tiny",
            input="hi",
            tools=[{"type": "function", **strict}],  # type: ignore[list-item]
        )
    assert why in tool_refused.value.message and "'get_weather'" in tool_refused.value.message

    # Not strict and forced: what llguidance does not implement is not enforced, but a
    # schema it cannot read at all is still refused.
    broken = {"type": "object", "properties": {"n": {"type": "frob"}}}
    with pytest.raises(anthropic.BadRequestError) as any_refused:
        await claude.messages.create(
            model="tiny",
            max_tokens=16,
            messages=HI,  # type: ignore[arg-type]
            tools=[{"name": "get_weather", "input_schema": broken}],  # type: ignore[list-item]
            tool_choice={"type": "any"},
        )
    body: Any = any_refused.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "Invalid type: frob" in body["error"]["message"]
