"""The local engine behind the real gateway (through the neuron HTTP API, as a remote node
is reached), read by the official SDKs: what a client of each dialect is told."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import openai
import pytest

from helexa.config import ModelProfile, Settings
from helexa.neuron.local import LocalNeuron
from tests.engine.factories import make_tiny_model_dir
from tests.support.servers import Gateway, fetch, gateway_over

CONTEXT = 64
TOO_LONG = [{"role": "user", "content": "hello " * 100}]  # well past 64 tokens
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=41)


@pytest.fixture
async def gateway(model_dir: Path) -> AsyncIterator[Gateway]:
    profile = ModelProfile(id="tiny", path=str(model_dir), context_length=CONTEXT)
    neuron = LocalNeuron(Settings(models=[profile]))
    try:
        async with gateway_over(neuron) as gw:
            yield gw
    finally:
        await neuron.close()


@pytest.fixture
async def claude(gateway: Gateway) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, api_key="unused", max_retries=0
    ) as client:
        yield client


async def test_a_prompt_past_the_context_is_worded_as_each_api_words_it(
    gateway: Gateway, claude: anthropic.AsyncAnthropic
) -> None:
    # Claude Code compacts the conversation on Anthropic's own wording, and no other.
    anthropic_words = re.compile(rf"prompt is too long: (\d+) tokens > {CONTEXT} maximum")
    with pytest.raises(anthropic.BadRequestError) as refused:
        await claude.messages.create(model="tiny", max_tokens=16, messages=TOO_LONG)
    found = anthropic_words.fullmatch(refused.value.body["error"]["message"])  # type: ignore[index]
    assert found is not None and int(found[1]) > CONTEXT
    with pytest.raises(anthropic.BadRequestError) as refused:
        async with claude.messages.stream(model="tiny", max_tokens=16, messages=TOO_LONG) as s:
            await s.get_final_message()
    assert anthropic_words.fullmatch(refused.value.body["error"]["message"])  # type: ignore[index]

    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0
    ) as client:
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="tiny", messages=TOO_LONG, max_tokens=16)
    assert err.value.code == "context_length_exceeded"
    assert f"This model's maximum context length is {CONTEXT} tokens" in err.value.message


async def test_message_start_reports_the_prompt_size(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(model="tiny", max_tokens=4, messages=HI) as stream:
        starts = [e async for e in stream if e.type == "message_start"]
        final = await stream.get_final_message()
    assert [e.message.usage.input_tokens for e in starts] == [final.usage.input_tokens]
    assert final.usage.input_tokens > 0


async def test_openai_clients_never_see_helexas_own_field(gateway: Gateway) -> None:
    body = {"model": "tiny", "messages": HI, "max_tokens": 4, "stream": True}
    streamed = await fetch("POST", f"{gateway.url}/v1/chat/completions", json_body=body)
    assert streamed.status == 200 and b'"role":"assistant"' in streamed.body.replace(b" ", b"")
    assert b"x_helexa" not in streamed.body
