"""Traffic arithmetic (rates, TTFT, finishing order) and the stream tap, without a terminal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from helexa.neuron.interface import NeuronError
from tui.traffic import TappedNeuron, Traffic, chunk_tokens, recent_rate


class Clock:
    """A hand-driven clock so every rate and TTFT below is exact."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def delta(content: str = "", **extra: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": content, **extra}}]}


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}


def test_chunk_tokens_counts_token_bearing_choices() -> None:
    assert chunk_tokens(delta("hi")) == 1
    assert chunk_tokens(delta("", reasoning_content="hm")) == 1
    assert chunk_tokens(delta("", tool_calls=[{"index": 0}])) == 1
    assert chunk_tokens(delta("")) == 0  # role-only first chunk
    assert chunk_tokens(usage(3, 4)) == 0
    assert chunk_tokens({"choices": [{"index": 0, "text": "x"}]}) == 1  # legacy completions


def test_series_rate_and_ttft() -> None:
    clock = Clock()
    traffic = Traffic(window_s=10, clock=clock)
    r = traffic.begin("m", "local")
    clock.t += 0.25
    traffic.observe(r, delta("a"))
    for _ in range(3):
        clock.t += 1.0
        traffic.observe(r, delta("b"))
        traffic.observe(r, delta("c"))
    traffic.observe(r, usage(5, 7))
    traffic.finish(r)

    assert r.ttft_s == pytest.approx(0.25)
    assert r.completion_tokens == 7 and r.prompt_tokens == 5
    assert r.tokens_per_s == pytest.approx(6 / 3.0)
    series = traffic.series("m")
    assert len(series) == 10
    assert series[-4:] == [1.0, 2.0, 2.0, 2.0]
    assert traffic.series() == series  # one model: overall equals it
    assert recent_rate(series, over_s=2) == pytest.approx(2.0)
    assert traffic.recent_ttft() == [r]


def test_usage_tops_up_tokens_the_chunks_did_not_show() -> None:
    clock = Clock()
    traffic = Traffic(clock=clock)
    r = traffic.begin("m", "n")
    traffic.observe(r, delta("x"))
    traffic.observe(r, usage(1, 5))
    assert r.completion_tokens == 5
    assert sum(traffic.series("m")) == 5


def test_overall_sums_models_and_old_seconds_fall_out() -> None:
    clock = Clock()
    traffic = Traffic(window_s=5, clock=clock)
    a, b = traffic.begin("a", "n"), traffic.begin("b", "n")
    traffic.observe(a, delta("x"))
    traffic.observe(b, delta("y"))
    assert traffic.series()[-1] == 2.0
    assert traffic.models() == ["a", "b"]
    clock.t += 5
    traffic.observe(a, delta("z"))
    assert traffic.series("a") == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert sum(traffic.series("b")) == 0


def test_log_follows_finishing_order() -> None:
    traffic = Traffic(clock=Clock())
    first, second = traffic.begin("m", "n"), traffic.begin("m", "n")
    traffic.finish(second)
    traffic.finish(first, "error", "boom")
    assert [r.id for r in traffic.finished_since(0)] == [second.id, first.id]
    assert traffic.finished_since(second.done_seq) == [first]
    assert first.status == "error" and first.error == "boom"


class StreamNeuron:
    """Just enough of a Neuron to feed the tap: a fixed stream, optionally failing."""

    name = "double"

    def __init__(self, chunks: list[dict[str, Any]], fail_after: int | None = None) -> None:
        self.chunks = chunks
        self.fail_after = fail_after
        self.closed = False

    async def _stream(self) -> AsyncIterator[dict[str, Any]]:
        try:
            for i, chunk in enumerate(self.chunks):
                if i == self.fail_after:
                    raise NeuronError("device lost", status=502)
                yield chunk
        finally:
            self.closed = True

    def chat(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream()


async def test_tap_passes_chunks_through_and_records_them() -> None:
    chunks = [delta("a"), delta("b"), usage(2, 2)]
    traffic = Traffic()
    tapped = TappedNeuron(StreamNeuron(chunks), traffic)  # type: ignore[arg-type]
    got = [c async for c in tapped.chat({"model": "m"})]
    assert got == chunks
    (record,) = traffic.done
    assert (record.model, record.node, record.status) == ("m", "double", "ok")
    assert record.completion_tokens == 2


async def test_tap_records_errors_and_early_close() -> None:
    traffic = Traffic()
    failing = TappedNeuron(StreamNeuron([delta("a"), delta("b")], fail_after=1), traffic)  # type: ignore[arg-type]
    with pytest.raises(NeuronError):
        async for _ in failing.chat({"model": "m"}):
            pass
    assert traffic.done[-1].status == "error" and traffic.done[-1].error == "device lost"

    inner = StreamNeuron([delta("a"), delta("b")])
    stream = TappedNeuron(inner, traffic).chat({"model": "m"})  # type: ignore[arg-type]
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert inner.closed, "closing the tap must close the neuron's stream (cancellation)"
    assert traffic.done[-1].status == "cancelled"
