"""The generation pipeline (sampler -> stream decoder -> stop matcher -> output parser ->
chunks) driven by a scripted model, so what the "model" says is known exactly."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from openai.types.chat import ChatCompletionChunk
from openai.types.completion import Completion

from helexa.engine.generate import LoadedModel
from helexa.engine.request import RequestError
from helexa.engine.text.chat_template import QWEN3_TEMPLATE
from helexa.engine.text.tokenizer import Tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


class ScriptedLM:
    """A test double for the model: forward call k puts all probability on script[k].

    Call 0 is the prefill, so the first sampled token is script[0]. Records the positions
    it was run at, to check the loop stops feeding tokens when it should.
    """

    device = torch.device("cpu")

    def __init__(self, script: list[int], vocab_size: int, max_seq: int = 512) -> None:
        self.script = script
        self.vocab_size = vocab_size
        self.max_seq = max_seq
        self.nbytes = 1234
        self.calls: list[list[int]] = []

    def forward(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, *, last_only: bool = False
    ) -> torch.Tensor:
        step = len(self.calls)
        self.calls.append(input_pos.tolist())
        logits = torch.full((1, 1, self.vocab_size), -1e9)
        if step < len(self.script):
            logits[0, 0, self.script[step]] = 0.0
        return logits


def scripted(tokenizer: Tokenizer, text: str, *, eos: bool = True, **kw: Any) -> LoadedModel:
    ids = tokenizer.encode(text)
    if eos:
        ids.append(tokenizer.encode("<|im_end|>")[0])
    return LoadedModel(
        model=ScriptedLM(ids, tokenizer.vocab_size, **kw),
        tokenizer=tokenizer,
        chat_template=QWEN3_TEMPLATE,
        eos_token_ids=frozenset(tokenizer.eos_token_ids),
        name="scripted",
    )


def chat(model: LoadedModel, cancel: threading.Event | None = None, **body: Any) -> list[dict]:
    request = {
        "model": "scripted",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0,
        **body,
    }
    return list(model.stream_chat(request, cancel or threading.Event()))


def joined(chunks: list[dict], key: str) -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])


def finish(chunks: list[dict]) -> dict:
    (choice,) = [
        c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    return choice


def test_content_stream_shape_and_usage(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, "Hello world, héllo 🌍!")
    chunks = chat(model, temperature=0)
    for c in chunks:
        ChatCompletionChunk.model_validate(c)  # every chunk is a valid OpenAI chunk
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in chunks}) == 1
    assert joined(chunks, "content") == "Hello world, héllo 🌍!"
    assert finish(chunks)["finish_reason"] == "stop"
    assert "stop_sequence" not in finish(chunks)
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    prompt = model.count_tokens({"messages": [{"role": "user", "content": "hi"}]})
    script = model.model.script
    assert usage == {
        "prompt_tokens": prompt,
        "completion_tokens": len(script),
        "total_tokens": prompt + len(script),
        "prompt_tokens_details": {"cached_tokens": 0},  # a fresh model has nothing cached
    }
    # Prefill, then one forward per token except the last (EOS is never fed back).
    assert model.model.calls[0] == list(range(prompt))
    assert model.model.calls[1:] == [[prompt + i] for i in range(len(script) - 1)]


def test_thinking_becomes_reasoning_content(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, "<think>\nweigh the options\n</think>\n\nThe answer.")
    chunks = chat(model)
    assert joined(chunks, "reasoning_content").strip() == "weigh the options"
    assert joined(chunks, "content").strip() == "The answer."
    assert "<think>" not in joined(chunks, "content")


def test_tool_call_is_parsed_and_finishes_with_tool_calls(tokenizer: Tokenizer) -> None:
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    model = scripted(tokenizer, f"<tool_call>\n{json.dumps(call)}\n</tool_call>")
    chunks = chat(model, tools=[WEATHER_TOOL])
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    deltas = [
        d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or []
    ]
    assert deltas[0]["function"]["name"] == "get_weather"
    assert deltas[0]["id"] and deltas[0]["type"] == "function"
    assert {d["index"] for d in deltas} == {0}
    arguments = "".join(d["function"].get("arguments") or "" for d in deltas)
    assert json.loads(arguments) == {"city": "Paris"}
    assert joined(chunks, "content").strip() == ""
    assert finish(chunks)["finish_reason"] == "tool_calls"


def test_tool_call_text_without_tools_stays_content(tokenizer: Tokenizer) -> None:
    text = '<tool_call>\n{"name": "x", "arguments": {}}\n</tool_call>'
    chunks = chat(scripted(tokenizer, text))
    assert "tool_call" in joined(chunks, "content")
    assert finish(chunks)["finish_reason"] == "stop"


def test_stop_string_ends_early_and_is_reported(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, "one two three four five six")
    chunks = chat(model, stop=["three"])
    assert joined(chunks, "content") == "one two "
    assert finish(chunks)["finish_reason"] == "stop"
    assert finish(chunks)["stop_sequence"] == "three"
    produced = chunks[-1]["usage"]["completion_tokens"]
    assert produced < len(model.model.script)
    assert len(model.model.calls) == produced  # prefill + (produced - 1) decode steps


def test_max_tokens_finishes_with_length(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, "a b c d e f g h i j k l m n o p")
    chunks = chat(model, max_tokens=5)
    assert finish(chunks)["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert len(model.model.calls) == 5
    assert joined(chunks, "content") == tokenizer.decode(model.model.script[:5])


def test_cancel_stops_between_tokens(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, "a b c d e f g h i j k l m n o p", eos=False)
    cancel = threading.Event()
    seen: list[dict] = []
    stream: Iterator[dict] = model.stream_chat(
        {"messages": [{"role": "user", "content": "hi"}]}, cancel
    )
    for chunk in stream:
        seen.append(chunk)
        if len(seen) == 3:
            cancel.set()
    assert len(seen) == 3  # no finish or usage chunk after a cancel
    assert len(model.model.calls) <= 3


def test_context_overflow_is_a_clear_request_error(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, "x", max_seq=40)
    with pytest.raises(RequestError, match="maximum context length is 40") as err:
        chat(model, max_tokens=500)
    assert err.value.code == "context_length_exceeded"
    prompt = model.count_tokens({"messages": [{"role": "user", "content": "hi"}]})
    assert err.value.extra == {"prompt_tokens": prompt, "max_context": 40}  # for each dialect
    assert model.model.calls == []  # refused before any forward pass


LONG_TEXT = "The quick brown fox jumps over the lazy dog, 3.14 times.\n    def f(x): return x\n"


@pytest.mark.parametrize(
    "text",
    [LONG_TEXT * 20_000, "word " * 300_000, "x" * 1_200_000],
    ids=["lines", "one line", "no boundary"],
)
def test_a_prompt_far_past_the_context_is_refused_before_it_is_all_tokenized(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    model = scripted(tokenizer, "x", max_seq=512)
    encoded: list[int] = []  # the length of each text the tokenizer was given
    real_encode = tokenizer.encode

    def encode(piece: str) -> list[int]:
        encoded.append(len(piece))
        return real_encode(piece)

    monkeypatch.setattr(tokenizer, "encode", encode)
    for stream in (
        lambda: chat(model, messages=[{"role": "user", "content": text}]),
        lambda: list(model.stream_completion({"prompt": text}, threading.Event())),
    ):
        encoded.clear()
        with pytest.raises(RequestError, match="maximum context length is 512") as err:
            stream()
        assert err.value.code == "context_length_exceeded"
        assert err.value.extra["max_context"] == 512
        assert 512 <= err.value.extra["prompt_tokens"] <= len(real_encode(text))
        assert sum(encoded) < len(text) / 4  # a small part of it was ever tokenized
    assert model.model.calls == []


def test_a_long_prompt_that_fits_is_tokenized_as_one_text(tokenizer: Tokenizer) -> None:
    from helexa.engine.request import DENSE_CHARS_PER_TOKEN, prompt_tokens

    # Over four characters a token, so counted in pieces first, then encoded whole.
    text = "The quick brown fox jumps over the lazy dog. " * 2_000
    whole = tokenizer.encode(text)
    assert len(text) > DENSE_CHARS_PER_TOKEN * (len(whole) + 1)
    assert prompt_tokens(text, tokenizer.encode, len(whole) + 1) == whole
    with pytest.raises(RequestError) as err:
        prompt_tokens(text, tokenizer.encode, len(whole) // 2)
    assert len(whole) // 2 <= err.value.extra["prompt_tokens"] <= len(whole)


def test_default_budget_fills_the_context(tokenizer: Tokenizer) -> None:
    model = scripted(
        tokenizer, "a b c d e f g h i j k l m n o p q r s t u v w x y z", eos=False, max_seq=24
    )
    chunks = chat(model)
    usage = chunks[-1]["usage"]
    assert usage["total_tokens"] == 24
    assert finish(chunks)["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"messages": []}, "invalid_request"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:,"}}],
                    }
                ]
            },
            "unsupported_content",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "unsupported_parameter"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "invalid_value"),
    ],
)
def test_bad_requests(tokenizer: Tokenizer, body: dict, code: str) -> None:
    with pytest.raises(RequestError) as err:
        list(scripted(tokenizer, "x").stream_chat(body, threading.Event()))
    assert err.value.code == code


def test_enable_thinking_false_renders_an_empty_think_block(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, "x")
    messages = [{"role": "user", "content": "hi"}]
    off = model.render({"messages": messages, "chat_template_kwargs": {"enable_thinking": False}})
    on = model.render({"messages": messages})
    assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")
    assert model.render({"messages": messages, "enable_thinking": False}) == off


def test_legacy_completion_stream(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, " and then some more")
    chunks = list(
        model.stream_completion(
            {"model": "scripted", "prompt": "Once upon a time", "max_tokens": 50}, threading.Event()
        )
    )
    # The SDK's Completion type insists on a finish_reason, which OpenAI's own stream
    # leaves null until the end: validate the finish chunk, check the rest by shape.
    Completion.model_validate(chunks[-2])
    for c in chunks[:-2]:
        assert c["object"] == "text_completion"
        assert c["choices"][0].keys() == {"index", "text", "logprobs", "finish_reason"}
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == " and then some more"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["prompt_tokens"] == len(tokenizer.encode("Once upon a time"))
    assert model.model.calls[0] == list(range(len(tokenizer.encode("Once upon a time"))))


def test_a_decode_hook_runs_every_step_after_prefill(tokenizer: Tokenizer) -> None:
    model = scripted(tokenizer, "one two three")
    lm = model.model
    hooked: list[int] = []

    def decode(tokens: torch.Tensor, pos: int) -> torch.Tensor:
        hooked.append(pos)
        return lm.forward(tokens, torch.tensor([pos]), last_only=True)

    model.decode = decode
    chunks = chat(model)
    assert joined(chunks, "content") == "one two three"
    prompt = chunks[-1]["usage"]["prompt_tokens"]
    assert lm.calls[0] == list(range(prompt))  # prefill through forward ...
    assert hooked == [prompt + i for i in range(len(lm.script) - 1)]  # ... each step hooked


class FailingLM(ScriptedLM):
    """Raises (as a CUDA out-of-memory would) on forward call ``fail_at``."""

    def __init__(self, *args: Any, fail_at: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.fail_at = fail_at

    def forward(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, *, last_only: bool = False
    ) -> torch.Tensor:
        if len(self.calls) == self.fail_at:
            self.calls.append(input_pos.tolist())
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().forward(tokens, input_pos, last_only=last_only)


def test_a_step_that_fails_part_way_is_not_reused_by_the_next_prompt(
    tokenizer: Tokenizer,
) -> None:
    """A forward that raised may have left some layers' state written: the next prompt,
    though it extends what the cache held, is prefilled from position 0."""
    from itertools import islice

    from helexa.engine.sampling import SamplingParams

    lm = FailingLM([5, 6, 7, 8] * 8, tokenizer.vocab_size, fail_at=3)
    model = LoadedModel(model=lm, tokenizer=tokenizer, name="failing")
    params = SamplingParams(temperature=0.0)
    first = list(range(10, 30))
    assert list(islice(model.tokens(first, params, threading.Event()), 3)) == [5, 6, 7]
    second = [*first, 5, 6, 40, 41]  # extends the first turn: the cache would reuse it
    with pytest.raises(RuntimeError, match="out of memory"):
        list(islice(model.tokens(second, params, threading.Event()), 1))
    assert lm.calls[-1][0] == len(first) + 2  # it had started past the cached prefix
    assert list(islice(model.tokens(second, params, threading.Event()), 1))
    assert lm.calls[-1][0] == 0 and model.prompt_cache.reused == 0  # all prefilled again
