"""End to end on a real (tiny, random) Qwen3: load from an HF directory or a GGUF, greedy
tokens equal transformers' generate, the chat stream is what OpenAI clients accept."""

from __future__ import annotations

import json
import threading
from itertools import islice
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from openai.types.chat import ChatCompletionChunk
from transformers import Qwen3ForCausalLM

from helexa.engine.checkpoint.errors import UnsupportedArchitecture
from helexa.engine.generate import DEFAULT_CONTEXT, LoadedModel, generation_defaults
from helexa.engine.request import RequestError
from helexa.engine.sampling import SamplingParams
from helexa.engine.text.chat_template import QWEN3_TEMPLATE
from helexa.engine.text.parsers import OutputParser
from helexa.engine.text.tokenizer import Tokenizer
from tests.engine.devices import DEVICES
from tests.engine.factories import make_tiny_hf_model, save_model_dir
from tests.engine.gguf_factories import write_foreign_gguf, write_model_gguf
from tests.engine.tiny_tokenizer import make_tiny_tokenizer_config, make_tiny_tokenizer_json

NEW_TOKENS = 16
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "def add(a, b): return a + b  # what does it do?"},
]


@pytest.fixture(scope="module")
def hf_model() -> Qwen3ForCausalLM:
    vocab = Tokenizer.from_hf(make_tiny_tokenizer_json()).vocab_size
    return make_tiny_hf_model(vocab, seed=21)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, hf_model: Qwen3ForCausalLM) -> Path:
    return save_model_dir(
        tmp_path_factory.mktemp("tiny"),
        hf_model,
        tokenizer_json=make_tiny_tokenizer_json(),
        tokenizer_config=make_tiny_tokenizer_config(),
        generation_config={"temperature": 0.6, "top_k": 20, "top_p": 0.95, "do_sample": True},
    )


def greedy(model: LoadedModel, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    params = SamplingParams.from_request({"temperature": 0})
    return list(islice(model.tokens(prompt, params, threading.Event()), n))


def hf_greedy(hf: Qwen3ForCausalLM, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_tokens_equal_transformers_generate(
    model_dir: Path, hf_model: Qwen3ForCausalLM, device: str
) -> None:
    model = LoadedModel.load(model_dir, device, torch.float32)
    prompt = model.tokenizer.encode(model.render({"messages": MESSAGES}))
    assert greedy(model, prompt) == hf_greedy(hf_model, prompt)


def test_chat_stream_matches_parsing_the_greedy_text(
    model_dir: Path, hf_model: Qwen3ForCausalLM
) -> None:
    model = LoadedModel.load(model_dir)
    request = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": NEW_TOKENS}
    chunks = list(model.stream_chat(request, threading.Event()))
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        assert chunk["model"] == "tiny"
    usage = chunks[-1]["usage"]
    prompt = model.tokenizer.encode(model.render(request))
    assert usage["prompt_tokens"] == len(prompt)

    # The same text parsed in one piece: streaming must not change what comes out.
    expected_ids = hf_greedy(hf_model, prompt)[: usage["completion_tokens"]]
    eos = [i for i, t in enumerate(expected_ids) if t in model.eos_token_ids]
    text = model.tokenizer.decode(expected_ids[: eos[0]] if eos else expected_ids)
    parser = OutputParser(tools=False, thinking=True)
    want = parser.feed(text) + parser.finish()
    for key in ("content", "reasoning_content"):
        got = "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])
        assert got == "".join(d.get(key) or "" for d in want)
    assert usage["completion_tokens"] == (eos[0] + 1 if eos else NEW_TOKENS)


PLACE = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "rank": {"type": "integer", "minimum": 1, "maximum": 9},
        "kind": {"enum": ["town", "city"]},
    },
    "required": ["city", "rank", "kind"],
    "additionalProperties": False,
}


# Any object may go on for thousands of tokens (these seeds' close within the budget);
# every value of PLACE is bounded, so any seed's does.
@pytest.mark.parametrize(
    ("fmt", "seed"),
    [
        *[({"type": "json_object"}, seed) for seed in (1, 3)],
        *[
            ({"type": "json_schema", "json_schema": {"name": "p", "schema": PLACE}}, s)
            for s in range(4)
        ],
    ],
)
@pytest.mark.parametrize("device", DEVICES)  # the mask is applied on the logits' device
def test_json_mode_turns_a_random_model_into_json(
    model_dir: Path, seed: int, fmt: dict[str, Any], device: str
) -> None:
    """Random weights say nothing in particular; under JSON mode every answer is a JSON
    object, of the schema where one is given (without the grammar these weights write
    no JSON at all)."""
    model = LoadedModel.load(model_dir, device, context_length=2048)
    request = {
        "messages": MESSAGES,
        "response_format": fmt,
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 900,  # past any PLACE: up to 32 blank bytes in each of its ~14 gaps
    }
    chunks = list(model.stream_chat(request, threading.Event()))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    (done,) = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert done["finish_reason"] == "stop", text
    value = json.loads(text)
    assert isinstance(value, dict)
    if fmt["type"] == "json_schema":
        jsonschema.validate(value, PLACE)


def test_the_grammar_index_is_built_while_the_model_loads(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Indexing the vocabulary takes about a second at Qwen3's size: a load starts it in
    the background, so the first JSON-mode request finds it built or under way."""
    from helexa.engine import generate

    started = threading.Event()
    build = generate.grammar_tokenizer

    def recording(*args: Any) -> Any:
        started.set()
        return build(*args)

    monkeypatch.setattr(generate, "grammar_tokenizer", recording)
    model = LoadedModel.load(model_dir, context_length=256)
    assert started.wait(timeout=30)  # no constrained request has run
    index = model.index_grammar()
    assert index is model.index_grammar()  # built once
    assert index.result(timeout=30).vocab_size == model.tokenizer.vocab_size


def test_gguf_loads_and_generates_like_the_hf_directory(
    tmp_path: Path, model_dir: Path, hf_model: Qwen3ForCausalLM
) -> None:
    path = write_model_gguf(
        tmp_path / "tiny.gguf",
        hf_model,
        quant="F32",
        tokenizer_json=make_tiny_tokenizer_json(),
        chat_template=QWEN3_TEMPLATE,
    )
    from_gguf = LoadedModel.load(path)
    from_dir = LoadedModel.load(model_dir)
    request = {"messages": MESSAGES}
    assert from_gguf.render(request) == from_dir.render(request)
    prompt = from_dir.tokenizer.encode(from_dir.render(request))
    assert from_gguf.tokenizer.encode(from_gguf.render(request)) == prompt
    assert from_gguf.eos_token_ids >= {from_dir.tokenizer.token_to_id("<|im_end|>")}
    assert greedy(from_gguf, prompt) == greedy(from_dir, prompt)


def test_unsupported_architecture_is_refused_before_reading_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UnsupportedArchitecture, match="LlamaForCausalLM"):
        LoadedModel.load(tmp_path)
    with pytest.raises(UnsupportedArchitecture):
        LoadedModel.load(write_foreign_gguf(tmp_path / "llama.gguf", "llama"))


def test_context_memory_and_defaults(model_dir: Path) -> None:
    model = LoadedModel.load(model_dir, context_length=64, sampling_defaults={"temperature": 0.2})
    assert model.context_length == 64
    qwen = model.model
    assert model.memory_bytes == qwen.weight_bytes + qwen.cache_bytes
    assert model.defaults == {"temperature": 0.2, "top_k": 20, "top_p": 0.95}
    assert model.name == model_dir.name
    # No context asked for: the model's window, capped so the KV cache stays modest.
    assert LoadedModel.load(model_dir).context_length == min(256, DEFAULT_CONTEXT)


def test_generation_defaults() -> None:
    assert generation_defaults({"do_sample": False, "temperature": 0.7}) == {"temperature": 0.0}
    assert generation_defaults(
        {"temperature": 0.6, "top_p": 0.95, "eos_token_id": [1, 2]},
        {"top_p": 0.8, "top_k": None, "max_tokens": 100},
    ) == {"temperature": 0.6, "top_p": 0.8, "max_tokens": 100}


def test_a_token_id_prompt_is_served_only_inside_the_vocabulary(model_dir: Path) -> None:
    model = LoadedModel.load(model_dir)
    vocab = model.model.vocab_size

    def completion(prompt: object) -> list[dict[str, object]]:
        request = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
        return list(model.stream_completion(request, threading.Event()))

    assert completion([3, 5, 7])[-1]["usage"]["prompt_tokens"] == 3
    assert completion([7])[-1]["usage"]["prompt_tokens"] == 1  # one token, not a batch
    assert completion([[3, 5]])[-1]["usage"]["prompt_tokens"] == 2  # a batch of one
    for bad in ([3, vocab], [-1]):
        with pytest.raises(RequestError, match="outside this model's vocabulary"):
            completion(bad)


# A schema whose every value is bounded, so any random call closes within the budget.
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS},
}


@pytest.mark.parametrize("seed", range(6))
def test_a_forced_call_on_a_random_model_is_always_a_call(model_dir: Path, seed: int) -> None:
    """A named tool_choice: whatever random weights would write, the arguments are decoded
    to the tool's schema and the call closed after it, so there is exactly one call
    (without the grammar these weights write no valid call at all: raw markup as content)."""
    from helexa.wire.openai.translate import ChatAccumulator

    model = LoadedModel.load(model_dir, context_length=2048)
    request = {
        "messages": MESSAGES,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 600,  # past any valid call: up to 32 blank bytes in each of ~10 gaps
    }
    chunks = list(model.stream_chat(request, threading.Event()))
    (done,) = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    deltas = [
        d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or []
    ]
    assert done["finish_reason"] == "tool_calls", chunks
    assert {d["index"] for d in deltas} == {0}
    assert "".join(d["function"].get("name") or "" for d in deltas) == "get_weather"
    assert isinstance(json.loads("".join(d["function"]["arguments"] for d in deltas)), dict)
    assert not "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    )
    whole = ChatAccumulator()  # the non-streamed response: the stream folded into one
    for chunk in chunks:
        whole.add(chunk)
    message = whole.result()["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    (call,) = message["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_PARAMETERS)
