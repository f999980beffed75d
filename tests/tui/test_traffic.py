"""Traffic arithmetic (rates, TTFT, finishing order), and the gateway hooks that feed it."""

from __future__ import annotations

import logging
from typing import Any

import openai
import pytest

from helexa.config import GatewaySettings, Settings
from helexa.cortex.service import Service
from tests.support.scripted_neuron import Reply, ScriptedNeuron
from tui.events import Events, listening, stop_listening
from tui.traffic import Traffic, chunk_tokens, recent_rate


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


async def test_gateway_hooks_feed_traffic() -> None:
    """Requests through the real gateway land in Traffic: ok, failed mid-stream, unknown."""

    def script(request: dict[str, Any]) -> Reply:
        if request["messages"][0]["content"] == "fail":
            return Reply(text=["a", "b", "c"], fail_after=2)
        return Reply(text=["one", " two", " three"], prompt_tokens=4)

    neuron = ScriptedNeuron("gpu", models={"m": "loaded"}, script=script)
    traffic = Traffic()
    settings = Settings(gateway=GatewaySettings(listen="127.0.0.1:0"))
    service = Service(settings, [neuron], observe=traffic.observer)
    await service.start()
    client = openai.AsyncOpenAI(base_url=f"{service.url}/v1", api_key="-", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        with pytest.raises(openai.APIError):
            failing = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "fail"}], stream=True
            )
            async for _ in failing:
                pass
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        await client.close()
        await service.stop()

    # By what they were, not when they finished: the failed stream's handler may record
    # its end after the client has already raised and sent the next request.
    records = traffic.finished_since(0)
    assert len(records) == 3
    (ok,) = [r for r in records if r.status == "ok"]
    (failed,) = [r for r in records if r.status == "error" and r.model == "m"]
    (unknown,) = [r for r in records if r.model == "nope"]
    assert text == "one two three"
    assert (ok.model, ok.node, ok.api, ok.status) == ("m", "gpu", "chat", "ok")
    assert (ok.prompt_tokens, ok.completion_tokens) == (4, 3)
    assert ok.ttft_s is not None and ok.ttft_s >= 0
    assert sum(traffic.series("m")) == 3 + failed.completion_tokens
    assert failed.status == "error" and "scripted failure" in (failed.error or "")
    assert (unknown.model, unknown.node, unknown.status) == ("nope", "", "error")
    assert (unknown.error or "").startswith("404")


def test_events_keep_the_gateways_log_and_each_models_last_failure() -> None:
    """A load failure's record carries the model and why (extra fields): kept until the
    model loads; the access log is the request view's, not an event; the logger's level
    is given back when the dashboard stops listening."""
    events = Events(wall_clock=lambda: 0.0)
    fleet_log = logging.getLogger("helexa.cortex.fleet")
    before = logging.getLogger("helexa").level
    handler = listening(events)
    try:
        fleet_log.info("node %s is up", "gpu")
        fleet_log.warning("loading m failed: oom", extra={"model": "m", "failure": "oom"})
        logging.getLogger("helexa.access").info("127.0.0.1 GET /health 200 0.001s")
        assert [(e.level, e.source, e.text) for e in events.kept] == [
            ("info", "fleet", "node gpu is up"),
            ("warning", "fleet", "loading m failed: oom"),
        ]
        assert events.failures == {"m": "oom"}
        fleet_log.info("loaded m on gpu", extra={"model": "m", "loaded": True})
        assert events.failures == {}
        assert [e.seq for e in events.since(2)] == [3]
    finally:
        stop_listening(handler)
    assert logging.getLogger("helexa").level == before
    fleet_log.warning("after the dashboard")
    assert len(events.kept) == 3
