"""The hybrid models (Qwen3-Next, Qwen3.5, Qwen3.5-MoE) end to end, tiny and random: greedy
tokens equal to transformers' generate through ``helexa --serve`` (a real gateway in front
of the in-process local neuron), from HF directories and GGUFs; prompt reuse, which for a
recurrent state works only at the exact length it describes."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from itertools import islice
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import PreTrainedModel

from helexa.config import GatewaySettings, ModelProfile, Settings
from helexa.cortex.service import Service
from helexa.engine.generate import LoadedModel
from helexa.engine.models.qwen3_next import Qwen3Next
from helexa.engine.prefix_cache import PrefixCache
from helexa.engine.sampling import SamplingParams
from helexa.engine.text.chat_template import QWEN3_TEMPLATE, render_chat
from helexa.engine.text.parsers import OutputParser
from helexa.engine.text.tokenizer import Tokenizer
from tests.engine.factories import (
    HYBRID_KINDS,
    make_tiny_hybrid_hf_model,
    make_tiny_multimodal_qwen3_5,
    save_model_dir,
)
from tests.engine.gguf_factories import write_model_gguf
from tests.engine.tiny_tokenizer import make_tiny_tokenizer_config, make_tiny_tokenizer_json

NEW_TOKENS = 12
CONTEXT = 256
MESSAGES = [{"role": "user", "content": "def add(a, b): return a + b  # what does it do?"}]
# Long enough that a prompt is more than one delta-rule chunk (64 tokens).
RAW = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n" * 3 + "def mul"
CPU_ONLY = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the local neuron serves in bfloat16 on CUDA; fp32 parity is a CPU property",
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_hf(make_tiny_tokenizer_json(), make_tiny_tokenizer_config())


@pytest.fixture(scope="module")
def hf_models(tokenizer: Tokenizer) -> dict[str, PreTrainedModel]:
    return {
        kind: make_tiny_hybrid_hf_model(kind, tokenizer.vocab_size, seed=31 + i)
        for i, kind in enumerate(HYBRID_KINDS)
    }


@pytest.fixture(scope="module")
def checkpoints(
    tmp_path_factory: pytest.TempPathFactory, hf_models: dict[str, PreTrainedModel]
) -> dict[str, tuple[str, Path]]:
    """name -> (kind, path): each class as an HF directory and as an F32 GGUF (the same
    weights, in llama.cpp's layout)."""
    root = tmp_path_factory.mktemp("hybrid")
    out: dict[str, tuple[str, Path]] = {}
    for kind, hf in hf_models.items():
        out[kind] = (
            kind,
            save_model_dir(
                root / kind,
                hf,
                tokenizer_json=make_tiny_tokenizer_json(),
                tokenizer_config=make_tiny_tokenizer_config(),
            ),
        )
        out[f"{kind}-gguf"] = (
            kind,
            write_model_gguf(
                root / f"{kind}.gguf",
                hf,
                tokenizer_json=make_tiny_tokenizer_json(),
                chat_template=QWEN3_TEMPLATE,
            ),
        )
    return out


def hf_greedy(hf: PreTrainedModel, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def until_eos(ids: list[int], eos: frozenset[int]) -> list[int]:
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return ids[:cut]


def greedy(model: LoadedModel, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    params = SamplingParams.from_request({"temperature": 0})
    return list(islice(model.tokens(prompt, params, threading.Event()), n))


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5", "qwen3_5_moe-gguf"])
def test_loads_counts_its_state_and_generates_as_transformers(
    checkpoints: dict[str, tuple[str, Path]],
    hf_models: dict[str, PreTrainedModel],
    tokenizer: Tokenizer,
    name: str,
) -> None:
    kind, path = checkpoints[name]
    model = LoadedModel.load(path, context_length=CONTEXT)
    assert isinstance(model.model, Qwen3Next)
    hf = hf_models[kind]
    weights = sum(p.numel() * 4 for p in hf.parameters())
    states = model.model.config.recurrent_state_bytes(4)
    kv = sum(c.nbytes for c in model.model.kv_caches())
    assert states > 0 and model.memory_bytes == weights + kv + states
    prompt = tokenizer.encode(RAW)
    assert len(prompt) > 64
    assert greedy(model, prompt) == hf_greedy(hf, prompt)


class Prefills:
    """(first position, tokens, logits) of each multi-position forward pass."""

    def __init__(self, model: LoadedModel) -> None:
        self.calls: list[tuple[int, int, torch.Tensor]] = []
        forward = model.model.forward

        def spy(tokens: torch.Tensor, input_pos: torch.Tensor, **kw: Any) -> torch.Tensor:
            logits = forward(tokens, input_pos, **kw)
            self.calls.append((int(input_pos[0]), tokens.shape[1], logits))
            return logits

        model.model.forward = spy  # type: ignore[method-assign]


@pytest.fixture(params=["qwen3_next", "qwen3_5-gguf"])
def pair(
    request: pytest.FixtureRequest, checkpoints: dict[str, tuple[str, Path]]
) -> tuple[LoadedModel, LoadedModel]:
    """The model under test and a second copy for what a cold cache answers."""
    _, path = checkpoints[request.param]
    return tuple(LoadedModel.load(path, context_length=CONTEXT) for _ in range(2))  # type: ignore[return-value]


def test_a_turn_that_extends_the_last_continues_from_its_state(
    pair: tuple[LoadedModel, LoadedModel],
) -> None:
    model, reference = pair
    first = model.tokenizer.encode(RAW)
    answer = greedy(model, first)
    held = [*first, *answer[:-1]]  # the last token taken is never fed back
    assert model.prompt_cache.held == held
    second = [*first, *answer, *model.tokenizer.encode("\n\ndef div")]
    prefills = Prefills(model)
    request = {"prompt": second, "max_tokens": NEW_TOKENS, "temperature": 0}
    chunks = list(model.stream_completion(request, threading.Event()))
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": len(held)}
    start, length, logits = prefills.calls[0]
    assert (start, length) == (len(held), len(second) - len(held))
    # The same logits as a prefill of the whole prompt on a cold cache.
    device = reference.model.device
    fresh = reference.model.forward(
        torch.tensor([second], device=device),
        torch.arange(len(second), device=device),
        last_only=True,
    )
    torch.testing.assert_close(logits, fresh, atol=1e-4, rtol=0)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    reference.prompt_cache.clear()
    cold = list(reference.stream_completion(request, threading.Event()))
    assert text == "".join(c["choices"][0]["text"] for c in cold if c["choices"])


def test_a_turn_that_re_renders_the_answer_continues_from_the_prompts_end(
    pair: tuple[LoadedModel, LoadedModel],
) -> None:
    """The next prompt keeps all of the last one but not its answer (a chat template
    dropping an earlier turn's thinking): the state marked where that prompt's prefill
    ended is rewound to, and only the rest is prefilled."""
    model, reference = pair
    first = model.tokenizer.encode(RAW)
    greedy(model, first)
    second = [*first, *model.tokenizer.encode(" and then")]
    prefills = Prefills(model)
    got = greedy(model, second)
    assert model.prompt_cache.reused == len(first)
    assert prefills.calls[0][:2] == (len(first), len(second) - len(first))
    assert got == greedy(reference, second)


def test_a_prompt_that_leaves_both_is_prefilled_from_zero(
    pair: tuple[LoadedModel, LoadedModel],
) -> None:
    """A common prefix that ends before the last prompt did has no state to continue
    from, however long it is: the whole prompt runs again."""
    model, reference = pair
    first = model.tokenizer.encode(RAW)
    greedy(model, first)
    second = [*first[:-3], *model.tokenizer.encode(" instead")]
    prefills = Prefills(model)
    got = greedy(model, second)
    assert model.prompt_cache.reused == 0
    assert prefills.calls[0][:2] == (0, len(second))
    assert got == greedy(reference, second)


def test_an_earlier_conversation_comes_back_with_its_state(
    pair: tuple[LoadedModel, LoadedModel],
) -> None:
    model, reference = pair
    model.prompt_cache = PrefixCache(
        model.model.snapshots(), 4 << 20, min_snapshot_tokens=8, exact=True
    )
    main = model.tokenizer.encode(RAW)
    answer = greedy(model, main)
    side = model.tokenizer.encode("Name this chat in three words.")
    greedy(model, side)  # runs from 0: the conversation's state is saved first
    (snapshot,) = model.prompt_cache.snapshots
    assert snapshot.tokens == [*main, *answer[:-1]]
    assert snapshot.nbytes > len(snapshot.tokens) * model.prompt_cache.store.bytes_per_token

    back = [*main, *answer, *model.tokenizer.encode("\n\ndef div")]
    prefills = Prefills(model)
    got = greedy(model, back)
    reused = len(main) + len(answer) - 1
    assert model.prompt_cache.reused == reused
    assert prefills.calls[0][:2] == (reused, len(back) - reused)
    assert got == greedy(reference, back)


@pytest.fixture(scope="module")
def multimodal(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer
) -> tuple[PreTrainedModel, Path]:
    """A Qwen3.5 repo with its vision tower (Qwen3_5ForConditionalGeneration)."""
    hf = make_tiny_multimodal_qwen3_5(tokenizer.vocab_size, seed=41)
    path = save_model_dir(
        tmp_path_factory.mktemp("vl"),
        hf,
        tokenizer_json=make_tiny_tokenizer_json(),
        tokenizer_config=make_tiny_tokenizer_config(),
    )
    return hf, path


@pytest.fixture
async def gateway(
    checkpoints: dict[str, tuple[str, Path]], multimodal: tuple[PreTrainedModel, Path]
) -> AsyncIterator[tuple[Service, Any]]:
    """``helexa --serve`` in-process: the gateway and its local neuron, every checkpoint
    in the catalogue by path, loaded on first use."""
    paths = {name: path for name, (_, path) in checkpoints.items()}
    paths["qwen3_5-vl"] = multimodal[1]
    settings = Settings(
        gateway=GatewaySettings(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"),
        models=[
            ModelProfile(id=name, path=str(path), context_length=CONTEXT)
            for name, path in paths.items()
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


@CPU_ONLY
@pytest.mark.parametrize(
    "name", [f"{kind}{suffix}" for kind in HYBRID_KINDS for suffix in ("", "-gguf")]
)
async def test_server_greedy_tokens_equal_transformers_generate(
    gateway: tuple[Service, Any],
    checkpoints: dict[str, tuple[str, Path]],
    hf_models: dict[str, PreTrainedModel],
    tokenizer: Tokenizer,
    name: str,
) -> None:
    _, client = gateway
    hf = hf_models[checkpoints[name][0]]
    eos = frozenset(tokenizer.eos_token_ids)
    # Raw completion (no template, no parsing): the text is the generated tokens, decoded.
    prompt = tokenizer.encode(RAW)
    text = await client.completions.create(
        model=name, prompt=RAW, temperature=0, max_tokens=NEW_TOKENS
    )
    expected = until_eos(hf_greedy(hf, prompt), eos)
    assert text.choices[0].text == tokenizer.decode(expected)

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
    want = parser.feed(tokenizer.decode(until_eos(hf_greedy(hf, chat_prompt), eos)))
    want += parser.finish()
    assert "".join(content) == "".join(d.get("content") or "" for d in want)
    assert "".join(reasoning) == "".join(d.get("reasoning_content") or "" for d in want)


async def test_models_list_a_hybrid_model_with_its_context_and_memory(
    gateway: tuple[Service, Any],
) -> None:
    _, client = gateway
    await client.completions.create(model="qwen3_5", prompt="x", max_tokens=1)
    listed = {m.id: m for m in (await client.models.list()).data}
    extra = listed["qwen3_5"].model_extra or {}
    assert extra.get("context_length") == CONTEXT


@CPU_ONLY
async def test_a_multimodal_qwen3_5_serves_text_and_refuses_images(
    gateway: tuple[Service, Any],
    multimodal: tuple[PreTrainedModel, Path],
    tokenizer: Tokenizer,
) -> None:
    """A Qwen3.5 repo with a vision tower is served as its text model (greedy text as
    transformers' Qwen3_5ForConditionalGeneration gives it); a request with an image is a
    400 in the caller's dialect, not a model that silently ignores it."""
    _, client = gateway
    hf, _ = multimodal
    text = await client.completions.create(
        model="qwen3_5-vl", prompt=RAW, temperature=0, max_tokens=NEW_TOKENS
    )
    expected = until_eos(hf_greedy(hf, tokenizer.encode(RAW)), frozenset(tokenizer.eos_token_ids))
    assert text.choices[0].text == tokenizer.decode(expected)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model="qwen3_5-vl",
            messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}],
            max_tokens=4,
        )
    assert err.value.status_code == 400
    assert "images are not supported" in str(err.value.message)


def test_a_chat_turn_reports_the_last_prompt_as_cached(
    pair: tuple[LoadedModel, LoadedModel],
) -> None:
    """Through the chat template: the next turn re-renders the answer, so what is cached
    is the last prompt (up to where its answer began), from the state marked there, and
    the turn says what a cold cache says."""
    model, reference = pair
    system = {"role": "system", "content": "You are terse. Answer in one line."}

    def turn(*messages: dict[str, Any], on: LoadedModel = model) -> tuple[str, dict[str, Any]]:
        request = {"messages": list(messages), "temperature": 0, "max_tokens": 8}
        chunks = list(on.stream_chat(request, threading.Event()))
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        text = "".join(
            (d.get("reasoning_content") or "") + (d.get("content") or "") for d in deltas
        )
        return text, chunks[-1]["usage"]

    _, usage = turn(system, *MESSAGES)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    first = model.tokenizer.encode(model.render({"messages": [system, *MESSAGES]}))
    again = [system, *MESSAGES, {"role": "assistant", "content": "It adds."}, *MESSAGES]
    text, usage = turn(*again)
    assert usage["prompt_tokens_details"] == {"cached_tokens": len(first)}
    cold_usage = {**usage, "prompt_tokens_details": {"cached_tokens": 0}}
    assert turn(*again, on=reference) == (text, cold_usage)
