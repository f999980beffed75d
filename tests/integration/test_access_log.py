"""The access log (``helexa.access``): one line per request, with what only the relay
knows for a generation, read off a real gateway with the SDK a client uses."""

from __future__ import annotations

import logging
import re

import openai
import pytest

from tests.conftest import MODEL
from tests.support.scripted_neuron import Reply, ScriptedNeuron
from tests.support.servers import Gateway, fetch, gateway_over, gateway_settings

USER = [{"role": "user", "content": "hi"}]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "helexa.access"]


async def test_a_stream_that_fails_after_its_200_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The status line was 200 (the stream had begun); the line adds how it ended."""
    caplog.set_level(logging.INFO, "helexa.access")
    neuron = ScriptedNeuron("n1", script=Reply(text=["a", "b", "c"], fail_after=2))
    async with gateway_over(neuron) as gw:
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="-", max_retries=0)
        async with client:
            stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    pass
    (line,) = access_lines(caplog)
    assert re.fullmatch(
        rf"127\.0\.0\.1 POST /v1/chat/completions 200 [0-9.]+s model={MODEL} node=n1 "
        r"ttft=[0-9.]+s error=generation_failed",
        line,
    ), line


async def test_a_refusal_before_routing_is_logged_with_its_status(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "helexa.access")
    answer = await fetch(
        "POST", f"{gateway.url}/v1/chat/completions", json_body={"model": "nope", "messages": USER}
    )
    assert answer.status == 404
    (line,) = access_lines(caplog)
    assert re.fullmatch(
        r"127\.0\.0\.1 POST /v1/chat/completions 404 [0-9.]+s model=nope error=model_not_found",
        line,
    ), line


async def test_the_access_log_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "helexa.access")
    async with gateway_over(ScriptedNeuron("n1"), gateway_settings(access_log=False)) as gw:
        assert (await fetch("GET", f"{gw.url}/health")).status == 200
    assert access_lines(caplog) == []


async def test_a_path_cannot_forge_a_second_line(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """The decoded path may hold a newline (``%0A``); the line logs the raw one."""
    caplog.set_level(logging.INFO, "helexa.access")
    forged = "/v1/x%0A127.0.0.1%20POST%20/admin/models/unload%20200"
    assert (await fetch("GET", f"{gateway.url}{forged}")).status == 404
    (line,) = access_lines(caplog)
    assert "\n" not in line and f"GET {forged} 404 " in line


def test_a_nodes_odd_usage_is_shown_as_unknown_not_raised() -> None:
    """The line is written after the answer: usage it cannot read as counts (a node's
    bug) is shown as ``?`` instead of raising where the client's answer is finished."""
    from helexa.cortex.access import AccessRecord

    record = AccessRecord()
    record.model = MODEL
    record.chunk({"choices": [], "usage": {"prompt_tokens": "lots", "completion_tokens": 3}})
    assert record.fields() == f"model={MODEL} tokens=?+3"
