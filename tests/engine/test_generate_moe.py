"""A tiny random Qwen3-MoE end to end, as `helexa --serve` runs it: a real gateway in
front of the in-process local neuron, greedy tokens equal to transformers' generate, from
an HF directory and from a GGUF."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from itertools import islice
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import Qwen3MoeForCausalLM

from helexa.config import GatewaySettings, ModelProfile, Settings
from helexa.cortex.service import Service
from helexa.engine.generate import LoadedModel
from helexa.engine.models.qwen3_moe import Qwen3Moe
from helexa.engine.sampling import SamplingParams
from helexa.engine.text.chat_template import QWEN3_TEMPLATE, render_chat
from helexa.engine.text.parsers import OutputParser
from helexa.engine.text.tokenizer import Tokenizer
from tests.engine.factories import make_tiny_moe_hf_model, save_model_dir
from tests.engine.gguf_factories import write_model_gguf
from tests.engine.tiny_tokenizer import make_tiny_tokenizer_config, make_tiny_tokenizer_json

NEW_TOKENS = 12
CONTEXT = 96
MESSAGES = [{"role": "user", "content": "def add(a, b): return a + b  # what does it do?"}]


@pytest.fixture(scope="module")
def hf_model() -> Qwen3MoeForCausalLM:
    vocab = Tokenizer.from_hf(make_tiny_tokenizer_json()).vocab_size
    return make_tiny_moe_hf_model(vocab, seed=23)


@pytest.fixture(scope="module")
def checkpoints(
    tmp_path_factory: pytest.TempPathFactory, hf_model: Qwen3MoeForCausalLM
) -> dict[str, Path]:
    """The same model as an HF directory and as an F32 GGUF (same weights, exactly)."""
    root = tmp_path_factory.mktemp("moe")
    directory = save_model_dir(
        root / "dir",
        hf_model,
        tokenizer_json=make_tiny_tokenizer_json(),
        tokenizer_config=make_tiny_tokenizer_config(),
    )
    gguf = write_model_gguf(
        root / "moe.gguf",
        hf_model,
        tokenizer_json=make_tiny_tokenizer_json(),
        chat_template=QWEN3_TEMPLATE,
    )
    return {"tiny-moe": directory, "tiny-moe-gguf": gguf}


def hf_greedy(hf: Qwen3MoeForCausalLM, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def until_eos(ids: list[int], eos: frozenset[int]) -> list[int]:
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return ids[:cut]


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-moe-gguf"])
def test_loads_as_a_moe_and_counts_every_expert(
    checkpoints: dict[str, Path], hf_model: Qwen3MoeForCausalLM, name: str
) -> None:
    model = LoadedModel.load(checkpoints[name], context_length=CONTEXT)
    assert isinstance(model.model, Qwen3Moe)
    weights = sum(p.numel() * 4 for p in hf_model.parameters())
    assert model.memory_bytes == weights + model.model.cache_bytes
    prompt = model.tokenizer.encode(model.render({"messages": MESSAGES}))
    params = SamplingParams.from_request({"temperature": 0})
    got = list(islice(model.tokens(prompt, params, threading.Event()), NEW_TOKENS))
    assert got == hf_greedy(hf_model, prompt)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_hf(make_tiny_tokenizer_json(), make_tiny_tokenizer_config())


@pytest.fixture
async def gateway(checkpoints: dict[str, Path]) -> AsyncIterator[tuple[Service, Any]]:
    """``helexa --serve`` in-process: the gateway and its local neuron, both models in the
    catalogue by path, loaded on first use."""
    settings = Settings(
        gateway=GatewaySettings(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"),
        models=[
            ModelProfile(id=name, path=str(path), context_length=CONTEXT)
            for name, path in checkpoints.items()
        ],
    )
    service = Service(settings)
    await service.start()
    client = openai.AsyncOpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    try:
        yield service, client
    finally:
        await client.close()
        await service.stop()


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-moe-gguf"])
@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the local neuron serves in bfloat16 on CUDA; fp32 parity is a CPU property",
)
async def test_server_greedy_tokens_equal_transformers_generate(
    gateway: tuple[Service, Any],
    hf_model: Qwen3MoeForCausalLM,
    tokenizer: Tokenizer,
    name: str,
) -> None:
    _, client = gateway
    eos = frozenset(tokenizer.eos_token_ids)
    # Raw completion (no template, no parsing): the text is the generated tokens, decoded.
    raw = "def add(a, b):\n    return"
    prompt = tokenizer.encode(raw)
    text = await client.completions.create(
        model=name, prompt=raw, temperature=0, max_tokens=NEW_TOKENS
    )
    expected = until_eos(hf_greedy(hf_model, prompt), eos)
    assert text.choices[0].text == tokenizer.decode(expected)
    assert text.usage is not None and text.usage.completion_tokens == min(
        len(expected) + 1, NEW_TOKENS
    )

    # Chat, streamed: content and reasoning are what parsing the greedy text gives.
    stream = await client.chat.completions.create(
        model=name,
        messages=MESSAGES,
        temperature=0,
        max_tokens=NEW_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    content, reasoning = [], []
    async for chunk in stream:
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
    chat_prompt = tokenizer.encode(render_chat(QWEN3_TEMPLATE, MESSAGES, enable_thinking=True))
    parser = OutputParser(tools=False, thinking=True)
    want = parser.feed(tokenizer.decode(until_eos(hf_greedy(hf_model, chat_prompt), eos)))
    want += parser.finish()
    assert "".join(content) == "".join(d.get("content") or "" for d in want)
    assert "".join(reasoning) == "".join(d.get("reasoning_content") or "" for d in want)


async def test_models_list_the_moe_with_its_context(gateway: tuple[Service, Any]) -> None:
    _, client = gateway
    await client.completions.create(model="tiny-moe", prompt="x", max_tokens=1)
    listed = {m.id: m for m in (await client.models.list()).data}
    assert (listed["tiny-moe"].model_extra or {}).get("context_length") == CONTEXT
