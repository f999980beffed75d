"""A model split by layers across devices computes what the unsplit model computes.

No machine here has two GPUs, so the split runs over ``["cpu", "cpu"]``: the devices are
named, not inferred, so every move of the residual, the positions and the token ids at a
stage boundary still runs (a copy to the same device is the one thing that differs)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from threading import Event

import pytest
import torch

from helexa.engine.checkpoint.safetensors import load_safetensors_dir
from helexa.engine.generate import LoadedModel
from helexa.engine.models.layer_split import LayerSplit, SplitError, layer_counts
from helexa.engine.models.qwen3 import Qwen3
from helexa.engine.models.qwen3_moe import Qwen3Moe
from helexa.engine.quant.tensor import QuantizedTensor
from helexa.engine.sampling import SamplingParams
from tests.engine.factories import (
    make_tiny_hf_model,
    make_tiny_model_dir,
    make_tiny_moe_hf_model,
    save_model_dir,
)
from tests.engine.gguf_factories import write_tiny_moe_gguf

GB = 1 << 30
MB = 1 << 20
CPUS = [torch.device("cpu"), torch.device("cpu")]
LAYERS = 4

# -- layer_counts -----------------------------------------------------------------------------


def test_shares_follow_free_memory() -> None:
    # A 12 GB card beside a 24 GB one, 36 layers of 0.5 GB: one third and two thirds.
    assert layer_counts([12 * GB, 24 * GB], [GB // 2] * 36) == [12, 24]
    assert layer_counts([24 * GB, 12 * GB], [GB // 2] * 36) == [24, 12]
    assert layer_counts([10 * GB] * 3, [GB] * 9) == [3, 3, 3]


def test_embedding_and_lm_head_count_on_their_devices() -> None:
    # Equal cards, 2 GB of embedding on the first: it has 8 GB left for layers, the
    # second 10 GB, and 18 layers of 0.5 GB split 8:10 by that room.
    assert layer_counts([10 * GB, 10 * GB], [GB // 2] * 18, first_bytes=2 * GB) == [8, 10]
    # The same 2 GB as a last-device lm_head moves the larger share to the first.
    assert layer_counts([10 * GB, 10 * GB], [GB // 2] * 18, last_bytes=2 * GB) == [10, 8]


def test_every_device_takes_a_layer_and_uneven_layers_are_weighed() -> None:
    assert layer_counts([1 * GB, 100 * GB], [100 * MB] * 4) == [1, 3]
    # Bytes, not layer counts, are shared: one heavy layer (a dense layer among sparse
    # ones) is half of the 16 GB on its own, so it is the first device's half.
    assert layer_counts([10 * GB, 10 * GB], [8 * GB] + [GB] * 8) == [1, 8]


def test_a_split_that_cannot_fit_is_refused_with_the_sizes() -> None:
    with pytest.raises(SplitError) as info:
        layer_counts([12 * GB, 24 * GB], [GB] * 40)
    err = info.value
    assert (err.status, err.code, err.type) == (507, "insufficient_vram", "preflight")
    assert "12.0 GiB, 24.0 GiB free" in err.message
    assert err.extra == {"needed_mb": 40 * 1024, "free_mb": [12 * 1024, 24 * 1024]}
    # Enough in all, but the embedding alone does not fit on the first device.
    with pytest.raises(SplitError):
        layer_counts([GB, 24 * GB], [MB] * 4, first_bytes=2 * GB)
    # Fits in total, but no boundary gives each device what it holds (a layer too big).
    with pytest.raises(SplitError):
        layer_counts([10 * GB, 10 * GB], [2 * GB, 11 * GB])


def test_fewer_layers_than_devices_is_refused() -> None:
    with pytest.raises(SplitError) as info:
        layer_counts([GB, GB, GB], [MB, MB])
    assert (info.value.status, info.value.code) == (422, "invalid_devices")


# -- the split model --------------------------------------------------------------------------


def run(model: Qwen3 | LayerSplit, tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Logits of a prefill of ``tokens`` [1, T], then of ``steps`` cached decode steps,
    each fed the previous step's argmax."""
    model.setup_cache(1, 64)
    n = tokens.shape[1]
    out = [model.forward(tokens, torch.arange(n))]
    for pos in range(n, n + steps):
        token = out[-1][:, -1:].argmax(-1)
        out.append(model.forward(token, torch.tensor([pos]), last_only=True))
    return out


@pytest.mark.parametrize(
    ("moe", "tie", "counts"),
    [(False, True, [1, 3]), (False, False, [2, 2]), (True, False, [3, 1])],
)
def test_split_logits_match_the_unsplit_model(
    tmp_path: Path, moe: bool, tie: bool, counts: list[int]
) -> None:
    make = make_tiny_moe_hf_model if moe else make_tiny_hf_model
    cls = Qwen3Moe if moe else Qwen3
    path = save_model_dir(tmp_path, make(seed=3, tie=tie, num_hidden_layers=LAYERS))
    whole = cls.from_checkpoint(load_safetensors_dir(path))
    split = LayerSplit.from_checkpoint(load_safetensors_dir(path), cls, CPUS, counts, torch.float32)
    assert [(s.start, s.stop) for s in split.stages] == [(0, counts[0]), (counts[0], LAYERS)]
    tokens = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(4))
    expected, got = run(whole, tokens, 5), run(split, tokens, 5)
    assert len(got) == 6
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    held = split.device_bytes()
    assert sum(held.values()) == split.nbytes > whole.nbytes - whole.cache_bytes


def greedy(model: LoadedModel, prompt: list[int], n: int = 12) -> list[int]:
    params = SamplingParams.from_request({"temperature": 0}, {})
    return list(islice(model.tokens(prompt, params, Event()), n))


def test_a_split_load_generates_the_same_greedy_tokens(tmp_path: Path) -> None:
    path = make_tiny_model_dir(tmp_path / "m", seed=5)
    whole = LoadedModel.load(path, context_length=96)
    split = LoadedModel.load(path, context_length=96, devices=["cpu", "cpu"])
    assert isinstance(split.model, LayerSplit) and split.decode is None  # eager decode
    assert [s.stop - s.start for s in split.model.stages] == [1, 1]  # equal CPUs: even
    assert split.context_length == whole.context_length == 96
    prompt = split.tokenizer.encode("def add(a, b): return a + b")
    first = greedy(whole, prompt)
    assert greedy(split, prompt) == first
    # A prompt extending the last conversation reuses the split's KV caches.
    longer = [*prompt, *first[:4]]
    assert greedy(split, longer) == greedy(whole, longer)
    assert split.prompt_cache.reused > 0


def test_devices_that_do_not_exist_are_refused_before_loading(tmp_path: Path) -> None:
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    with pytest.raises(SplitError) as info:
        LoadedModel.load(tmp_path / "never-read", devices=["cpu", missing])
    err = info.value
    assert (err.status, err.code) == (422, "unknown_device")
    assert missing in err.message


def test_a_quantized_moe_gguf_splits_with_its_blocks_as_they_are(tmp_path: Path) -> None:
    """Qwen3-MoE from a Q8_0 GGUF: stacked experts move to their layer's device as raw
    blocks, and the split gives the unsplit model's greedy tokens."""
    path = write_tiny_moe_gguf(tmp_path / "moe.gguf", seed=8, num_hidden_layers=LAYERS)
    whole = LoadedModel.load(path, context_length=96)
    split = LoadedModel.load(path, context_length=96, devices=["cpu", "cpu"])
    assert isinstance(split.model, LayerSplit)
    experts = split.model.model.layers[-1].mlp
    assert isinstance(experts, type(whole.model.layers[-1].mlp))  # type: ignore[attr-defined]
    assert isinstance(experts.gate_proj, QuantizedTensor)  # type: ignore[attr-defined]
    prompt = split.tokenizer.encode("def mul(a, b): return a * b")
    assert greedy(split, prompt) == greedy(whole, prompt)
