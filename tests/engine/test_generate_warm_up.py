"""A load does its compiling up front: the warm-up runs each kind of step once (on CUDA
inside LoadedModel.load, capturing every decode graph), and leaves nothing cached that a
request could mistake for its own prompt."""

from __future__ import annotations

import os
import random
import threading
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch

from helexa.config import cache_dir
from helexa.engine.generate import LoadedModel
from helexa.engine.models.cuda_graph import GraphDecoder, bucket_starts, kv_bucket
from helexa.engine.quant import ops
from helexa.engine.sampling import SamplingParams
from helexa.engine.text.chat_template import QWEN3_TEMPLATE
from helexa.engine.text.tokenizer import Tokenizer
from tests.engine.factories import make_tiny_hf_model
from tests.engine.gguf_factories import write_model_gguf, write_tiny_moe_gguf
from tests.engine.tiny_tokenizer import make_tiny_tokenizer_json

PROMPT = "<|im_start|>user\ndef add(a, b):<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Q8_0, so on CUDA the Triton matvec (compiled, autotuned) is part of every step."""
    tokenizer_json = make_tiny_tokenizer_json()
    hf = make_tiny_hf_model(Tokenizer.from_hf(tokenizer_json).vocab_size, seed=29)
    return write_model_gguf(
        tmp_path_factory.mktemp("warm") / "tiny.gguf",
        hf,
        quant="Q8_0",
        tokenizer_json=tokenizer_json,
        chat_template=QWEN3_TEMPLATE,
    )


def greedy(model: LoadedModel, prompt: list[int], n: int = 8) -> list[int]:
    params = SamplingParams.from_request({"temperature": 0})
    return list(islice(model.tokens(prompt, params, threading.Event()), n))


def test_bucket_starts_reach_every_bucket_once() -> None:
    assert bucket_starts(4096) == [0, 256, 512, 1024, 2048]
    assert [kv_bucket(p, 4096) for p in bucket_starts(4096)] == [256, 512, 1024, 2048, 4096]
    assert bucket_starts(6000)[-1] == 4096 and kv_bucket(4096, 6000) == 6000  # capped
    assert bucket_starts(100, 4) == [0, 4, 8, 16, 32, 64]
    assert bucket_starts(200) == [0]


def test_warm_up_runs_every_step_and_leaves_nothing_cached(gguf: Path) -> None:
    """What a CUDA load runs (there with graph captures), here eagerly through the same
    GraphDecoder, over several KV length buckets."""
    model = LoadedModel.load(gguf, "cpu", torch.float32, 64)
    prompt = model.tokenizer.encode(PROMPT)
    expected = greedy(model, prompt)
    model.prompt_cache.clear()
    model.decode = GraphDecoder(model.model, min_kv_len=8)  # buckets 8, 16, 32, 64
    seen: list[float] = []
    model.warm_up(seen.append)
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == 5
    assert model.prompt_cache.held == [] and model.prompt_cache.reused == 0
    assert greedy(model, prompt) == expected


def test_warm_up_prefills_each_few_row_count_a_turn_can_bring(
    gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the first prompt, extensions of exactly 2 and 3 tokens: with decode's one
    row, every row-count bucket (1, 2, 4) the few-row matvec tunes for, whatever the first
    sampled token was, so a short second turn never times kernels."""
    model = LoadedModel.load(gguf, "cpu", torch.float32, 64)
    model.decode = GraphDecoder(model.model, min_kv_len=8)
    prefills: list[int] = []
    forward = model.model.forward

    def spy(tokens: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        prefills.append(tokens.shape[1])
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(model.model, "forward", spy)
    model.warm_up()
    assert prefills == [16, 2, 3]


def test_a_cpu_load_skips_the_warm_up(gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: LoadedModel, progress: object = None) -> None:
        raise AssertionError("warm_up ran on a CPU load")

    monkeypatch.setattr(LoadedModel, "warm_up", fail)
    seen: list[float] = []
    LoadedModel.load(gguf, progress=seen.append)
    assert seen[-1] == 1.0  # the weights alone make the whole of a CPU load


def test_triton_cache_dir_is_helexas_unless_the_user_set_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", "")  # unset, as far as helexa is concerned
    assert ops.triton_cache_dir() == str(cache_dir() / "triton")
    assert os.environ["TRITON_CACHE_DIR"] == str(cache_dir() / "triton")  # for Triton to read
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")
    assert ops.triton_cache_dir() == "/somewhere/else"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_load_captures_every_graph_before_a_request(gguf: Path) -> None:
    seen: list[float] = []
    model = LoadedModel.load(gguf, "cuda", torch.float32, 512, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 1.0
    decoder = model.decode
    assert isinstance(decoder, GraphDecoder)
    captured = dict(decoder._graphs)
    # One graph where attention reads the live length, else one per KV-length bucket.
    assert sorted(kv for _, kv in captured) == ([512] if decoder.live else [256, 512])
    assert model.prompt_cache.held == []
    kernels = ops.kernels()
    tuned = dict(kernels._matvec_tuned.cache) if kernels is not None else {}

    prompt = model.tokenizer.encode(PROMPT)
    first = greedy(model, prompt)
    assert greedy(model, [*prompt, *first, 5, 6]) and model.prompt_cache.reused > len(prompt)
    # Nothing captured or tuned for the requests: the load did it all.
    assert decoder._graphs == captured
    if kernels is not None:
        assert dict(kernels._matvec_tuned.cache) == tuned


def compiled_variants(kernel: Any) -> int:
    """How many variants of a Triton kernel this process has compiled (on any device)."""
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_moe_load_compiles_every_expert_kernel_a_prompt_can_pick(tmp_path: Path) -> None:
    """A MoE prompt's length picks its prefill's expert kernel (the grouped GEMM's launch
    config by rows per expert, or dequantize + torch's grouped GEMM past
    EXPERT_GEMM_MAX_ROWS): the load compiles each one, so no prompt compiles any."""
    from helexa.engine.quant import expert_gemm, triton_kernels

    path = write_tiny_moe_gguf(tmp_path / "moe.gguf", seed=31, max_position_embeddings=1024)
    model = LoadedModel.load(path, "cuda", torch.bfloat16, 1024)
    vocab = model.tokenizer.vocab_size
    kernels = (expert_gemm._expert_gemm_kernel, triton_kernels._dequant_kernel)
    at_load = [compiled_variants(k) for k in kernels]
    assert at_load[0] >= len(expert_gemm.CONFIGS)  # each config, fused gate/up and down

    gen = random.Random(5)
    # 8 experts, top 2: ~2.5, ~25, ~50 and ~125 rows an expert, every regime
    for n in (10, 100, 200, 500):
        model.prompt_cache.clear()
        assert len(greedy(model, [gen.randrange(vocab) for _ in range(n)], 2)) == 2
    assert [compiled_variants(k) for k in kernels] == at_load


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_decode_queued_ahead_streams_what_a_step_at_a_time_loop_does(gguf: Path) -> None:
    """On CUDA each token's step is queued before its id is read back: the tokens are a
    plain sample-then-step loop's over the same graphs, and the prompt cache, which then
    holds the last token too, gives a second turn the tokens a fresh prefill gives."""
    model = LoadedModel.load(gguf, "cuda", torch.float32, 512)
    prompt = model.tokenizer.encode(PROMPT)
    streamed = greedy(model, prompt, 12)
    assert model.prompt_cache.held == [*prompt, *streamed]

    model.prompt_cache.clear()
    known = model.tokenizer.vocab_size
    positions = torch.arange(len(prompt), device="cuda")
    tokens = torch.tensor([prompt], device="cuda")
    logits = model.model.forward(tokens, positions, last_only=True)
    stepped: list[int] = []
    for pos in range(len(prompt), len(prompt) + 12):
        stepped.append(int(logits[0, -1, :known].argmax()))
        assert model.decode is not None
        logits = model.decode(torch.tensor([[stepped[-1]]], device="cuda"), pos)
    assert streamed == stepped

    model.prompt_cache.clear()
    turn = [*prompt, *streamed, 5, 6]
    fresh = greedy(model, turn)
    model.prompt_cache.clear()
    greedy(model, prompt, 12)
    assert greedy(model, turn) == fresh and model.prompt_cache.reused >= len(prompt) + 12
