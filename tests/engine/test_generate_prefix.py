"""Prompt reuse on a real (tiny, random) Qwen3, from an HF directory and from a GGUF: a
prompt that starts with what the KV cache holds prefills only the rest, and its greedy
tokens are the ones a cold cache gives."""

from __future__ import annotations

import threading
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch

from helexa.engine.generate import LoadedModel
from helexa.engine.models.kv_cache import HostSnapshots
from helexa.engine.prefix_cache import PrefixCache, common_prefix
from helexa.engine.sampling import SamplingParams
from helexa.engine.text.chat_template import QWEN3_TEMPLATE
from helexa.engine.text.tokenizer import Tokenizer
from tests.engine.devices import DEVICES
from tests.engine.factories import make_tiny_hf_model, save_model_dir
from tests.engine.gguf_factories import write_model_gguf
from tests.engine.tiny_tokenizer import make_tiny_tokenizer_config, make_tiny_tokenizer_json

NEW_TOKENS = 8
SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
USER = {"role": "user", "content": "def add(a, b): return a + b  # what does it do?"}


@pytest.fixture(scope="module", params=["safetensors", "gguf"])
def model_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer_json = make_tiny_tokenizer_json()
    hf = make_tiny_hf_model(Tokenizer.from_hf(tokenizer_json).vocab_size, seed=23)
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "gguf":  # quantized weights, the torch fallback dequantizing
        return write_model_gguf(
            root / "tiny.gguf",
            hf,
            quant="Q8_0",
            tokenizer_json=tokenizer_json,
            chat_template=QWEN3_TEMPLATE,
        )
    return save_model_dir(
        root, hf, tokenizer_json=tokenizer_json, tokenizer_config=make_tiny_tokenizer_config()
    )


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(model_path: Path, device: str) -> LoadedModel:
    return LoadedModel.load(model_path, device, torch.float32)


@pytest.fixture
def reference(model_path: Path, device: str) -> LoadedModel:
    """The same model again, for what a cold cache answers."""
    return LoadedModel.load(model_path, device, torch.float32)


class Prefills:
    """(first position, tokens) of each multi-position forward pass: what was prefilled."""

    def __init__(self, model: LoadedModel) -> None:
        self.calls: list[tuple[int, int]] = []
        forward = model.model.forward

        def spy(tokens: torch.Tensor, input_pos: torch.Tensor, **kw: Any) -> torch.Tensor:
            self.calls.append((int(input_pos[0]), tokens.shape[1]))
            return forward(tokens, input_pos, **kw)

        model.model.forward = spy  # type: ignore[method-assign]

    def since(self, mark: int) -> tuple[int, int]:
        """The prefill of the request that started after ``mark`` calls: its first pass."""
        return self.calls[mark]


def greedy(model: LoadedModel, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    params = SamplingParams.from_request({"temperature": 0})
    return list(islice(model.tokens(prompt, params, threading.Event()), n))


def cold(model: LoadedModel, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    """Greedy tokens for ``prompt`` from an empty cache: the reference."""
    model.prompt_cache.clear()
    return greedy(model, prompt, n)


def chat_prompt(model: LoadedModel, *messages: dict[str, Any]) -> list[int]:
    return model.tokenizer.encode(model.render({"messages": list(messages)}))


SECOND_TURNS: dict[str, Callable[[LoadedModel, list[int], list[int]], list[int]]] = {
    # the next turn re-sends the answer (every generated token) and asks again
    "extends": lambda m, p, g: [*p, *g, *m.tokenizer.encode("<|im_end|>\nand now?")],
    "diverges": lambda m, p, g: [*p[: len(p) // 2], *m.tokenizer.encode(" something else")],
    "repeats": lambda m, p, g: list(p),
    "shorter": lambda m, p, g: p[: len(p) * 2 // 3],
}


@pytest.mark.parametrize("case", SECOND_TURNS)
def test_second_turn_reuses_the_cache_and_says_the_same(
    model: LoadedModel, reference: LoadedModel, case: str
) -> None:
    first = chat_prompt(model, SYSTEM, USER)
    prefills = Prefills(model)
    answer = greedy(model, first)
    second = SECOND_TURNS[case](model, first, answer)
    held = [*first, *answer[:-1]]  # the last token taken is never fed back
    assert model.prompt_cache.held == held
    calls = len(prefills.calls)
    assert greedy(model, second) == cold(reference, second)
    reused = min(common_prefix(held, second), len(second) - 1)
    assert reused > 0
    assert model.prompt_cache.reused == reused
    assert prefills.since(calls) == (reused, len(second) - reused)


def test_an_earlier_conversation_comes_back_from_host_memory(
    model: LoadedModel, reference: LoadedModel
) -> None:
    model.prompt_cache = PrefixCache(
        HostSnapshots(model.model.kv_caches), 1 << 20, min_snapshot_tokens=8
    )
    main = chat_prompt(model, SYSTEM, USER)
    answer = greedy(model, main)
    side = chat_prompt(model, {"role": "user", "content": "Name this chat in three words."})
    greedy(model, side)  # overwrites the device cache from its first message on
    (snapshot,) = model.prompt_cache.snapshots
    assert snapshot.tokens == [*main, *answer[:-1]]
    assert model.prompt_cache.snapshot_bytes == snapshot.nbytes > 0

    back = [*main, *answer, *model.tokenizer.encode("<|im_end|>\nthanks")]
    prefills = Prefills(model)
    got = greedy(model, back)
    reused = len(main) + len(answer) - 1
    assert model.prompt_cache.reused == reused
    assert prefills.calls[0] == (reused, len(back) - reused)
    assert got == cold(reference, back)


def test_chat_usage_reports_cached_tokens(model: LoadedModel, reference: LoadedModel) -> None:
    def turn(*messages: dict[str, Any], model: LoadedModel = model) -> tuple[str, dict[str, Any]]:
        request = {"messages": list(messages), "temperature": 0, "max_tokens": 8}
        chunks = list(model.stream_chat(request, threading.Event()))
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        text = "".join(
            (d.get("reasoning_content") or "") + (d.get("content") or "") for d in deltas
        )
        return text, chunks[-1]["usage"]

    _, usage = turn(SYSTEM, USER)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    again = [SYSTEM, USER, {"role": "assistant", "content": "It adds."}, USER]
    text, usage = turn(*again)
    first = chat_prompt(model, SYSTEM, USER)
    # Everything up to where the answer starts was cached; the rest was prefilled.
    assert len(first) - 1 <= usage["prompt_tokens_details"]["cached_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    cold_usage = {**usage, "prompt_tokens_details": {"cached_tokens": 0}}
    assert turn(*again, model=reference) == (text, cold_usage)


def test_prompt_cache_budget_by_device(model_path: Path) -> None:
    assert LoadedModel.load(model_path).prompt_cache.budget_bytes == 0  # CPU: no snapshots
    sized = LoadedModel.load(model_path, prompt_cache_mb=3)
    assert sized.prompt_cache.budget_bytes == 3 << 20
    assert sized.prompt_cache_bytes == 0
    store = sized.prompt_cache.store
    assert store is not None
    cfg = sized.model.config  # type: ignore[attr-defined]
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert store.bytes_per_token == per_token
