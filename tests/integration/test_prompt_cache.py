"""The prompt cache through the real server: ``helexa --serve``'s Service (gateway and the
in-process engine) over a tiny random Qwen3, driven by the official openai and anthropic
SDKs. A second turn reports the tokens it found cached in each dialect's own usage field
and prefills only the rest (seen by a spy on the model's forward pass), and the gateway
counts them in its metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import torch

from helexa.config import Settings
from helexa.cortex.service import Service
from helexa.engine.models.qwen3 import Qwen3
from helexa.engine.text.tokenizer import Tokenizer
from tests.engine.factories import make_tiny_model_dir
from tests.engine.tiny_tokenizer import make_tiny_tokenizer_json
from tests.support.servers import fetch

MODEL = "tiny"
SYSTEM = "You are terse. Answer in one line."
QUESTION = "def add(a, b): return a + b  # what does it do?"
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=43)


class Prefills:
    """(first position, tokens) of every forward pass of any loaded Qwen3."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def since(self, mark: int) -> tuple[int, int]:
        """The prefill of the request that started after ``mark`` calls: its first pass."""
        return self.calls[mark]


@pytest.fixture
def prefills(monkeypatch: pytest.MonkeyPatch) -> Iterator[Prefills]:
    spy = Prefills()
    forward = Qwen3.forward

    def counted(self: Qwen3, tokens: torch.Tensor, input_pos: torch.Tensor, **kw: Any) -> Any:
        spy.calls.append((int(input_pos[0]), tokens.shape[1]))
        return forward(self, tokens, input_pos, **kw)

    monkeypatch.setattr(Qwen3, "forward", counted)
    yield spy


@dataclass
class Served:
    service: Service
    openai: openai.AsyncOpenAI
    anthropic: anthropic.AsyncAnthropic


@pytest.fixture
async def served(model_dir: Path) -> AsyncIterator[Served]:
    settings = Settings.model_validate(
        {
            "gateway": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
            "models": [
                {
                    "id": MODEL,
                    "path": str(model_dir),
                    "context_length": 256,
                    "sampling": {"temperature": 0.0},
                }
            ],
        }
    )
    service = Service(settings)  # the local engine, as `helexa --serve` builds it
    await service.start()
    try:
        async with (
            openai.AsyncOpenAI(
                base_url=f"{service.url}/v1", api_key="unused", max_retries=0
            ) as oai,
            anthropic.AsyncAnthropic(base_url=service.url, api_key="unused", max_retries=0) as ant,
        ):
            yield Served(service, oai, ant)
    finally:
        await service.stop()


async def cached_metric(service: Service) -> float:
    scraped = (await fetch("GET", f"{service.metrics_url}/metrics")).body.decode()
    lines = [
        line
        for line in scraped.splitlines()
        if line.startswith("helexa_prompt_cached_tokens_total{") and f'model="{MODEL}"' in line
    ]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


async def test_openai_second_turn_reports_and_skips_cached_tokens(
    served: Served, prefills: Prefills
) -> None:
    client = served.openai
    messages: list[Any] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": QUESTION},
    ]
    first = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0

    messages += [
        {"role": "assistant", "content": first.choices[0].message.content or "It adds."},
        {"role": "user", "content": "And subtraction?"},
    ]
    mark = len(prefills.calls)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage async for chunk in stream if chunk.usage][-1]
    assert usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    # The whole first prompt was cached (up to where the answer was re-rendered).
    assert first.usage.prompt_tokens - 2 <= cached < usage.prompt_tokens
    assert prefills.since(mark) == (cached, usage.prompt_tokens - cached)

    # The same request again: all but the last prompt token is cached.
    mark = len(prefills.calls)
    again = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert prefills.since(mark) == (again.usage.prompt_tokens - 1, 1)

    # Responses counts them in input_tokens_details, inside input_tokens.
    mark = len(prefills.calls)
    response = await client.responses.create(
        model=MODEL, instructions=SYSTEM, input=QUESTION, max_output_tokens=8, temperature=0
    )
    assert response.usage is not None
    reused = response.usage.input_tokens_details.cached_tokens
    assert reused >= first.usage.prompt_tokens - 2  # what the first turn left in the cache
    assert prefills.since(mark) == (reused, response.usage.input_tokens - reused)
    total = cached + again.usage.prompt_tokens_details.cached_tokens + reused
    assert await cached_metric(served.service) == total


def billing(cch: str) -> dict[str, str]:
    """Claude Code's first system block: its cch= changes on every request."""
    text = f"x-anthropic-billing-header: cc_version=2.1.37.0d9; cc_entrypoint=cli; cch={cch};"
    return {"type": "text", "text": text}


async def test_anthropic_second_turn_reads_the_cache_despite_the_billing_header(
    served: Served, prefills: Prefills
) -> None:
    client = served.anthropic
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    first = await client.messages.create(
        model=MODEL,
        max_tokens=8,
        system=[billing("fa690"), {"type": "text", "text": SYSTEM}],  # type: ignore[list-item]
        messages=messages,
    )
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.cache_creation_input_tokens == 0
    first_prompt = first.usage.input_tokens

    text = "".join(b.text for b in first.content if b.type == "text") or "It adds."
    messages += [
        {"role": "assistant", "content": text},
        {"role": "user", "content": "And subtraction?"},
    ]
    mark = len(prefills.calls)
    async with client.messages.stream(
        model=MODEL,
        max_tokens=8,
        system=[billing("0aaa9"), {"type": "text", "text": SYSTEM}],  # type: ignore[list-item]
        messages=messages,
    ) as stream:
        final = await stream.get_final_message()
    usage = final.usage
    cached = usage.cache_read_input_tokens
    # All of the first prompt but the empty thinking block its generation prompt ended in
    # (the Anthropic route asked for no thinking; Qwen3 renders past answers without it).
    # With the billing line left in, the prompts would part at its cch= value instead.
    empty_think = Tokenizer.from_hf(make_tiny_tokenizer_json()).encode(EMPTY_THINK)
    assert cached is not None and cached >= first_prompt - len(empty_think)
    assert usage.cache_creation_input_tokens == 0
    # Anthropic counts input_tokens apart from cache reads: what was prefilled.
    assert prefills.since(mark) == (cached, usage.input_tokens)
    assert usage.input_tokens > 0
    assert await cached_metric(served.service) == cached
