"""Sampling: processors against transformers' logits processors, the sampler's greedy and
seeded paths, and request parameters."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from helexa.engine.sampling import (
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    token_counts,
)

VOCAB = 97


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, VOCAB, generator=gen) * 3
    ids = torch.randint(0, VOCAB, (6, 20), generator=gen)
    return ids, logits


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite])


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(batch, penalty: float) -> None:
    ids, logits = batch
    ours = apply_repetition_penalty(logits, token_counts(ids, VOCAB), penalty)
    assert_same(ours, RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()))
    assert not torch.equal(ours, logits)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda x: apply_temperature(x, 0.6), TemperatureLogitsWarper(0.6)),
        (lambda x: apply_top_k(x, 5), TopKLogitsWarper(5)),
        (lambda x: apply_top_k(x, 500), TopKLogitsWarper(500)),
        (lambda x: apply_top_p(x, 0.8), TopPLogitsWarper(0.8)),
        (lambda x: apply_top_p(x, 0.05), TopPLogitsWarper(0.05)),
        (lambda x: apply_min_p(x, 0.1), MinPLogitsWarper(0.1)),
        (lambda x: apply_min_p(x, 0.9), MinPLogitsWarper(0.9)),
    ],
)
def test_warpers_match_transformers(batch, ours, theirs) -> None:
    ids, logits = batch
    expected = theirs(ids, logits.clone())
    assert_same(ours(logits), expected)


def test_top_k_keeps_ties_like_transformers() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert_same(apply_top_k(logits, 2), TopKLogitsWarper(2)(None, logits.clone()))
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [[True, False, False, True, False]]


def test_presence_and_frequency_penalties_follow_openai() -> None:
    logits = torch.zeros(5)
    counts = token_counts(torch.tensor([1, 1, 1, 3]), 5)
    out = apply_presence_frequency(logits, counts, presence=0.5, frequency=0.25)
    # logit -= frequency * count + presence * (count > 0)
    assert out.tolist() == [0.0, -(3 * 0.25 + 0.5), 0.0, -(0.25 + 0.5), 0.0]


# -- the sampler --------------------------------------------------------------------------------


def test_greedy_at_temperature_zero() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    sampler = Sampler(SamplingParams(temperature=0.0), VOCAB)
    assert sampler.sample(logits) == int(logits.argmax())


def test_repetition_penalty_steers_greedy_decoding() -> None:
    logits = torch.tensor([0.0, 5.0, 4.0, 3.0])
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), 4)
    generated: list[int] = []
    for _ in range(3):
        generated.append(sampler.sample(logits.clone()))
    assert generated == [1, 2, 3]  # each pick is penalised once seen (5/2 < 4, 4/2 < 3)
    # The prompt counts too, when given.
    with_prompt = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), 4, prompt=[1])
    assert with_prompt.sample(logits.clone()) == 2


def test_frequency_penalty_counts_each_pick_once() -> None:
    logits = torch.tensor([0.0, 1.0, 0.9])
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.06), 3)
    generated: list[int] = []
    for _ in range(4):
        generated.append(sampler.sample(logits.clone()))
    # 1 wins until its count makes 1.0 - 0.06 * n drop below 0.9 - 0.06 * m.
    assert generated == [1, 1, 2, 1]
    assert sampler.sample(logits.clone()) == 2


def test_seed_reproduces_and_differs() -> None:
    logits = torch.zeros(1000)  # uniform: any two seeds agreeing on 20 draws is ~1e-60

    def draws(seed: int | None) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), 1000)
        return [sampler.sample(logits) for _ in range(20)]

    assert draws(42) == draws(42)
    assert draws(42) != draws(43)
    assert draws(None) != draws(None)


def test_sampling_respects_the_filters() -> None:
    logits = torch.tensor([2.0, 1.9, 1.8, -1.0, -2.0])
    params = SamplingParams(temperature=1.5, top_k=3, top_p=0.99, seed=0)
    sampler = Sampler(params, 5)
    picks = {sampler.sample(logits) for _ in range(200)}
    assert picks == {0, 1, 2}
    min_p = Sampler(SamplingParams(temperature=1.0, min_p=0.5, seed=0), 5)
    assert {min_p.sample(logits) for _ in range(200)} == {0, 1, 2}
    top_k_one = Sampler(SamplingParams(temperature=5.0, top_k=1, seed=0), 5)
    assert {top_k_one.sample(logits) for _ in range(50)} == {0}


# -- parameters ---------------------------------------------------------------------------------


def test_params_request_wins_over_defaults() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
    params = SamplingParams.from_request(
        {"temperature": 0.2, "top_p": None, "max_completion_tokens": 9, "stop": "END", "seed": 3},
        defaults,
    )
    assert params == SamplingParams(
        temperature=0.2, top_p=0.95, top_k=20, min_p=0.0, seed=3, max_tokens=9, stop=["END"]
    )
    assert SamplingParams.from_request({}) == SamplingParams()
    assert SamplingParams.from_request({"max_tokens": 4, "stop": ["a", "b"]}).stop == ["a", "b"]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"temperature": -0.1}, "temperature must be at least 0"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 2}, "min_p"),
        ({"top_k": -5}, "top_k"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"repetition_penalty": 0}, "repetition_penalty must be greater than 0"),
        ({"presence_penalty": 3}, "presence_penalty must be between -2 and 2"),
        ({"frequency_penalty": True}, "frequency_penalty must be a number"),
        ({"max_tokens": "10"}, "max_tokens must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"stop": [1]}, "stop must be a string or a list of strings"),
        ({"stop": [""]}, "must not be empty"),
    ],
)
def test_bad_params_are_clear_errors(request_: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_request(request_)


def test_nan_free_with_tiny_temperature() -> None:
    logits = torch.tensor([0.0, 50.0, 49.0])
    sampler = Sampler(SamplingParams(temperature=1e-9, seed=0), 3)
    assert sampler.sample(logits) == 1
    assert not math.isnan(float(apply_temperature(logits, 1e-3).softmax(-1).sum()))
