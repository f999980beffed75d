"""The local engine served over the real neuron HTTP API on loopback: what `helexa neuron`
serves to a remote gateway, driven by the OpenAI SDK and by RemoteNeuron."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from helexa.config import LocalSettings, Settings
from helexa.engine.text.tokenizer import Tokenizer
from helexa.neuron.interface import LoadRequest, NeuronError
from helexa.neuron.local import LocalNeuron
from helexa.neuron.remote import RemoteNeuron
from helexa.neuron.server import make_neuron_app, start_server
from tests.engine.factories import make_tiny_model_dir
from tests.support.servers import fetch, gateway_over

MESSAGES = [{"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, alone in the directory the neuron may load paths from."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny", seed=41)


def path_loads(model_dir: Path) -> Settings:
    return Settings(local=LocalSettings(model_dirs=[str(model_dir.parent)]))


@pytest.fixture
async def served(model_dir: Path) -> AsyncIterator[tuple[LocalNeuron, str]]:
    neuron = LocalNeuron(path_loads(model_dir))
    runner, url = await start_server(make_neuron_app(neuron), "127.0.0.1", 0)
    try:
        yield neuron, url
    finally:
        await runner.cleanup()
        await neuron.close()


@pytest.fixture
async def loaded(served: tuple[LocalNeuron, str], model_dir: Path) -> AsyncIterator[Any]:
    """The tiny model loaded through the HTTP API; yields (neuron, url, model id, SDK)."""
    neuron, url = served
    remote = RemoteNeuron("local", url)
    state = await remote.load(LoadRequest(model_id=str(model_dir), context_length=96))
    assert (state.status, state.context_length) == ("loaded", 96)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    try:
        yield neuron, url, str(model_dir), client
    finally:
        await client.close()
        await remote.close()


async def test_sdk_stream_equals_the_in_process_stream(loaded: Any) -> None:
    neuron, _, model_id, client = loaded
    request = {"model": model_id, "messages": MESSAGES, "temperature": 0, "max_tokens": 12}
    direct = [c async for c in neuron.chat(request)]
    want = "".join(
        (c["choices"][0]["delta"].get("content") or "")
        + (c["choices"][0]["delta"].get("reasoning_content") or "")
        for c in direct
        if c["choices"]
    )

    stream = await client.chat.completions.create(
        model=model_id,
        messages=MESSAGES,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    usage = None
    finish = None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            pieces.append((choice.delta.content or "") + (extra.get("reasoning_content") or ""))
            finish = choice.finish_reason or finish
    assert "".join(pieces) == want
    assert usage is not None and usage.model_dump(
        include={"prompt_tokens", "completion_tokens"}
    ) == {k: direct[-1]["usage"][k] for k in ("prompt_tokens", "completion_tokens")}
    assert finish == direct[-2]["choices"][0]["finish_reason"]


async def test_sdk_non_streaming_and_legacy_completions(loaded: Any) -> None:
    _, _, model_id, client = loaded
    reply = await client.chat.completions.create(
        model=model_id, messages=MESSAGES, temperature=0, max_tokens=8
    )
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 8
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")

    text = await client.completions.create(
        model=model_id, prompt="def add(a, b):", temperature=0, max_tokens=5
    )
    assert text.usage is not None and text.usage.completion_tokens <= 5
    assert text.choices[0].finish_reason in ("stop", "length")


async def test_errors_reach_the_sdk_with_status_and_code(loaded: Any, tmp_path: Path) -> None:
    _, _, model_id, client = loaded
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model=model_id, messages=MESSAGES, max_tokens=10_000, stream=True
        )
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.ConflictError) as conflict:
        await client.chat.completions.create(model="not-loaded", messages=MESSAGES)
    assert conflict.value.code == "model_not_loaded"


async def test_a_prompt_far_past_the_context_is_refused_before_it_is_all_tokenized(
    loaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url, model_id, _ = loaded
    encoded: list[int] = []  # the length of each text the tokenizer was given
    real_encode = Tokenizer.encode

    def encode(self: Tokenizer, text: str) -> list[int]:
        encoded.append(len(text))
        return real_encode(self, text)

    monkeypatch.setattr(Tokenizer, "encode", encode)
    prompt = "The quick brown fox jumps over the lazy dog.\n" * 50_000  # 2.2 MB, 96-token window
    body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "stream": True}
    refused = await fetch("POST", f"{url}/v1/chat/completions", json_body=body)
    assert refused.status == 400
    error = refused.json()["error"]
    assert (error["code"], error["max_context"]) == ("context_length_exceeded", 96)
    assert error["prompt_tokens"] >= 96
    assert sum(encoded) < len(prompt) / 10  # refused after a small part of it


async def test_client_hang_up_cancels_generation(
    loaded: Any, stream_chat_cancels: list[threading.Event]
) -> None:
    _, _, model_id, client = loaded
    cancels = stream_chat_cancels
    stream = await client.chat.completions.create(
        model=model_id, messages=MESSAGES, temperature=0, stream=True
    )  # no max_tokens: it would fill the context
    async for _ in stream:
        break
    await stream.close()
    assert cancels
    assert await asyncio.to_thread(cancels[0].wait, 30)


SECRET = b"root:x:0:0:root:/root:/bin/bash\n"


async def test_a_path_outside_the_model_dirs_is_refused_unread(
    served: tuple[LocalNeuron, str], model_dir: Path, tmp_path: Path
) -> None:
    _, url = served
    secret = tmp_path / "passwd"
    secret.write_bytes(SECRET)
    foreign = tmp_path / "model"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"architectures": ["SecretArchitecture"]}')
    escape = model_dir.parent / f"escape-{tmp_path.name}"
    escape.symlink_to(tmp_path, target_is_directory=True)
    for model_id in (
        str(secret),
        f"file:{secret}",
        str(foreign),
        "/etc/passwd",
        str(escape / "passwd"),  # a link out of the model dir
        f"{model_dir.parent}/../{tmp_path.parent.name}/{tmp_path.name}/passwd",  # ..
    ):
        refused = await fetch("POST", f"{url}/models/load", json_body={"model_id": model_id})
        assert refused.status == 403, model_id
        assert refused.json()["error"]["code"] == "path_not_allowed"
        assert b"root:x" not in refused.body and b"Secret" not in refused.body
    listed = (await fetch("GET", f"{url}/models")).json()
    assert not {m["id"] for m in listed} & {str(secret), str(foreign), "/etc/passwd"}


async def test_a_path_that_fails_to_load_is_not_echoed_nor_listed(model_dir: Path) -> None:
    notes = model_dir.parent / "notes.gguf"  # allowed, but no GGUF file
    notes.write_bytes(SECRET)
    neuron = LocalNeuron(path_loads(model_dir))
    try:
        async with gateway_over(neuron) as gw:
            with pytest.raises(NeuronError) as err:
                await gw.remote.load(LoadRequest(model_id=str(notes)))
            assert (err.value.status, err.value.code) == (422, "invalid_checkpoint")
            assert "does not begin with GGUF" in err.value.message
            assert "root:x" not in err.value.message
            assert str(notes) not in {m.id for m in await gw.remote.models()}
            await gw.fleet.refresh()
            served = (await fetch("GET", f"{gw.url}/v1/models")).json()["data"]
            assert str(notes) not in {m["id"] for m in served}
    finally:
        await neuron.close()
