"""Choosing the next token: sampling parameters, logits processors, the sampler.

The processors are pure functions on ``[..., vocab]`` logits, each matching a reference:
repetition penalty, temperature, top-k, top-p and min-p behave as transformers' logits
processors (tests compare them), presence and frequency penalties as OpenAI documents them.
They run on the logits' device, vectorised; a disabled one costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

# Below this a temperature is treated as 0: dividing by it would overflow float32 logits.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None  # None = as many as the context allows
    stop: list[str] = field(default_factory=list)

    @classmethod
    def from_request(
        cls, request: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
    ) -> SamplingParams:
        """The request's values, else ``defaults`` (generation_config / catalogue), else the
        neutral ones. A null value counts as absent. Bad values raise ValueError naming the
        field, in words a client can act on."""
        request = dict(request)
        if request.get("max_completion_tokens") is not None:  # the newer OpenAI name wins
            request["max_tokens"] = request["max_completion_tokens"]
        merged: dict[str, Any] = {}
        for f in fields(cls):
            for source in (request, defaults or {}):
                if source.get(f.name) is not None:
                    merged[f.name] = source[f.name]
                    break
        return cls(**{k: _check(k, v) for k, v in merged.items()})


_FLOAT_RANGES: dict[str, tuple[float, float, str]] = {
    "temperature": (0.0, math.inf, "at least 0"),
    "top_p": (0.0, 1.0, "in (0, 1]"),
    "min_p": (0.0, 1.0, "in [0, 1]"),
    "repetition_penalty": (0.0, math.inf, "greater than 0"),
    "presence_penalty": (-2.0, 2.0, "between -2 and 2"),
    "frequency_penalty": (-2.0, 2.0, "between -2 and 2"),
}


def _check(name: str, value: Any) -> Any:
    if name in _FLOAT_RANGES:
        low, high, words = _FLOAT_RANGES[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, not {value!r}")
        value = float(value)
        exclusive_low = name in ("top_p", "repetition_penalty")
        if not (low < value if exclusive_low else low <= value) or value > high:
            raise ValueError(f"{name} must be {words}, got {value}")
        return value
    if name in ("top_k", "seed", "max_tokens"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, not {value!r}")
        if name == "top_k" and value < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {value}")
        return value
    if name == "stop":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return list(stops)
    return value


# -- logits processors: [..., vocab] -> [..., vocab] --------------------------------------------


def token_counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in ``ids`` ([..., seq] -> [..., vocab], float32)."""
    counts = torch.zeros((*ids.shape[:-1], vocab_size), dtype=torch.float32, device=ids.device)
    return counts.scatter_add_(
        -1, ids, torch.ones(ids.shape, dtype=counts.dtype, device=ids.device)
    )


def apply_repetition_penalty(
    logits: torch.Tensor, counts: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL / transformers semantics: seen tokens' positive logits divided by ``penalty``,
    negative ones multiplied, so a penalty > 1 always makes them less likely."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(counts > 0, penalised, logits)


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI semantics: ``logit -= frequency * count + presence * (count > 0)``."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (ties with the k-th are kept, as transformers does)."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``
    (always at least the most likely one)."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending, as transformers
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1 - top_p
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than ``min_p`` times the most likely one."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, -math.inf)


class Sampler:
    """Picks one token from one row of logits per call, on the logits' device.

    :meth:`pick` leaves the token there and never waits for the device, so the generation
    loop can queue the next decode step behind it before the id is read (see
    LoadedModel.tokens). Penalties need the tokens picked so far: the sampler keeps their
    counts on the device and adds each pick to them, so a step costs the same at any
    length. Given the ``prompt`` ids, the repetition penalty also covers tokens of the
    prompt (as transformers and vLLM apply it); presence and frequency penalties count
    generated tokens only (OpenAI and vLLM semantics).
    """

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        device: str | torch.device = "cpu",
        *,
        prompt: Sequence[int] | None = None,
    ) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        p = params
        self._penalised = (
            p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        )
        self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)
        self._one = torch.ones(1, dtype=torch.float32, device=self.device)
        self._prompt_counts: torch.Tensor | None = None
        if prompt is not None and len(prompt) and p.repetition_penalty != 1.0:
            ids = torch.as_tensor(prompt, dtype=torch.long, device=self.device)
            self._prompt_counts = token_counts(ids, vocab_size)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token id from ``logits`` [vocab], as a [1] int64 tensor on their device
        (greedy when the temperature is 0); it counts towards the next picks' penalties."""
        p = self.params
        logits = logits.float()
        if self._penalised:
            counts = self._counts
            if p.repetition_penalty != 1.0:
                seen = counts if self._prompt_counts is None else counts + self._prompt_counts
                logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                logits = apply_presence_frequency(
                    logits, counts, p.presence_penalty, p.frequency_penalty
                )
        if p.temperature < GREEDY_BELOW:
            token = torch.argmax(logits).view(1)
        else:
            logits = apply_temperature(logits, p.temperature)
            if p.top_k > 0:
                logits = apply_top_k(logits, p.top_k)
            if p.top_p < 1.0:
                logits = apply_top_p(logits, p.top_p)
            if p.min_p > 0.0:
                logits = apply_min_p(logits, p.min_p)
            probs = logits.softmax(dim=-1)
            token = torch.multinomial(probs, 1, generator=self.generator)
        if self._penalised:
            self._counts.index_add_(0, token, self._one)
        return token

    def sample(self, logits: torch.Tensor) -> int:
        """:meth:`pick`, read: waits for the device."""
        return int(self.pick(logits))
