"""The shipped smoke-test model: small, a real Qwen3 GGUF, and answers a chat through the engine.

These guard the committed file (assets/helexa-demo.gguf), not the script that made it: a
regenerated file that grew, lost its template or stopped answering fails here.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk

from helexa.config import load_settings
from helexa.demo import DEMO_MODEL_ID, demo_model_path, with_demo
from helexa.engine.checkpoint.gguf import load_gguf, read_gguf_info
from helexa.engine.generate import LoadedModel
from helexa.engine.text.tokenizer import Tokenizer

MAX_BYTES = 3 * 1024 * 1024
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_path() -> Path:
    path = demo_model_path()
    assert path is not None, "assets/helexa-demo.gguf is missing: run assets/make_demo_model.py"
    return path


@pytest.fixture(scope="module")
def demo_model(demo_path: Path) -> LoadedModel:
    return LoadedModel.load(demo_path, name=DEMO_MODEL_ID)


def chat_chunks(model: LoadedModel, request: dict[str, Any]) -> list[ChatCompletionChunk]:
    """The stream as the OpenAI SDK parses it, so a malformed chunk fails validation."""
    raw = model.stream_chat(request, threading.Event())
    return [ChatCompletionChunk.model_validate(chunk) for chunk in raw]


def test_demo_model_path_is_the_repository_asset(demo_path: Path) -> None:
    assert demo_path == REPO / "assets" / "helexa-demo.gguf"


def test_demo_file_is_small(demo_path: Path) -> None:
    assert demo_path.stat().st_size < MAX_BYTES


def test_demo_is_a_named_qwen3_gguf_with_template_and_tokenizer(demo_path: Path) -> None:
    info = read_gguf_info(demo_path)
    assert info.architecture == "qwen3"
    assert info.name == DEMO_MODEL_ID

    ckpt = load_gguf(demo_path)
    assert ckpt.config["model_type"] == "qwen3"
    assert ckpt.config["architectures"] == ["Qwen3ForCausalLM"]
    assert ckpt.chat_template and "<|im_start|>" in ckpt.chat_template
    assert ckpt.generation_config.get("temperature") is not None
    tokenizer = Tokenizer.from_checkpoint(ckpt.tokenizer)
    assert tokenizer.eos_token == "<|im_end|>"
    for special in ("<|im_start|>", "<|im_end|>", "<think>", "<tool_call>"):
        assert len(tokenizer.encode(special)) == 1, special
    text = "Hello, helexa! café 日本"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_greedy_hello_answers_and_finishes(demo_model: LoadedModel) -> None:
    request = {
        "model": DEMO_MODEL_ID,
        "messages": [{"role": "user", "content": "Hello"}],
        "temperature": 0,
        "max_tokens": 120,
    }
    chunks = chat_chunks(demo_model, request)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text.strip()
    assert finishes[-1] in ("stop", "length")
    assert all(c.model == DEMO_MODEL_ID for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_without_thinking_answer_is_the_same(demo_model: LoadedModel) -> None:
    """The model learned to open with the empty <think> block the template writes, so a
    request that turns thinking off (the block is then in the prompt) gets the same answer."""
    base = {"messages": [{"role": "user", "content": "Hello"}], "temperature": 0, "max_tokens": 120}
    plain = chat_chunks(demo_model, base)
    off = chat_chunks(demo_model, {**base, "chat_template_kwargs": {"enable_thinking": False}})

    def content(chunks: list[ChatCompletionChunk]) -> str:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert content(off) == content(plain)


def test_with_demo_fills_only_an_absent_catalogue(tmp_path: Path) -> None:
    empty = load_settings(environ={"XDG_CONFIG_HOME": str(tmp_path)}, config_path=None)
    served = with_demo(empty)
    assert [(m.id, m.path) for m in served.models] == [(DEMO_MODEL_ID, str(demo_model_path()))]
    assert empty.models == []  # the given settings are not changed
    catalogue = tmp_path / "models.toml"
    catalogue.write_text("")  # an operator's (empty) catalogue is theirs: no demo added
    assert with_demo(load_settings(None, catalogue, environ={})).models == []
    catalogue.write_text('[[models]]\nid = "Qwen/Qwen3-0.6B-GGUF:Q8_0"\n')
    assert [m.id for m in with_demo(load_settings(None, catalogue, environ={})).models] == [
        "Qwen/Qwen3-0.6B-GGUF:Q8_0"
    ]


async def test_serve_answers_out_of_the_box(tmp_path: Path) -> None:
    """README's first command on a fresh machine: no config, no network, no GPU, and the
    openai and anthropic SDKs get an answer from the demo model."""
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HELEXA_GATEWAY__METRICS_LISTEN": "127.0.0.1:0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "helexa.cli", "--serve", "--listen", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
        url = re.findall(r"http://127\.0\.0\.1:\d+", line)[0]
        openai = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
        assert [m.id for m in (await openai.models.list()).data] == [DEMO_MODEL_ID]
        reply = await openai.chat.completions.create(
            model=DEMO_MODEL_ID, messages=[{"role": "user", "content": "hello"}], max_tokens=24
        )
        assert reply.choices[0].message.content
        (listed,) = (await openai.models.list()).data
        context = (listed.model_extra or {})["context_length"]
        assert isinstance(context, int) and context > 0  # the loaded copy's KV cache
        anthropic = AsyncAnthropic(base_url=url, api_key="unused")
        async with anthropic.messages.stream(
            model=DEMO_MODEL_ID, max_tokens=100_000, messages=[{"role": "user", "content": "hello"}]
        ) as stream:  # a budget past the demo's context is a ceiling here, as Claude Code needs
            message = await stream.get_final_message()
        assert message.content[0].type == "text" and message.content[0].text
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
