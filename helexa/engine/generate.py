"""Generation for one loaded model: an OpenAI request dict in, OpenAI chunk dicts out.

The loop is deliberately small and synchronous (it runs on the device's worker thread):
prefill the prompt, then one token at a time ``Sampler -> StreamDecoder -> StopMatcher
-> OutputParser -> chunk``. Cancellation is a ``threading.Event`` checked between tokens,
so a closed client stream stops the GPU work within one decode step.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event
from typing import Any, Protocol

import torch

from helexa.engine.checkpoint.types import Progress
from helexa.engine.json_mode import JsonConstraint
from helexa.engine.sampling import Sampler, SamplingParams
from helexa.engine.text.chat_template import QWEN3_TEMPLATE, render_chat
from helexa.engine.text.parsers import OutputParser
from helexa.engine.text.stops import StopMatcher
from helexa.engine.text.tokenizer import Tokenizer

# Context allocated when neither the request to load nor the catalogue names one: the KV
# cache is preallocated, and a model's full window (40k for Qwen3) would cost GBs unasked.
DEFAULT_CONTEXT = 8192
# Prompt tokens per prefill forward: bounds activation memory for long prompts.
PREFILL_CHUNK = 2048
SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


class RequestError(ValueError):
    """A request this model cannot serve as asked; the client's mistake, reported as 400."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class CausalLM(Protocol):
    """What the generation loop needs from a model (Qwen3, or a scripted test double)."""

    device: torch.device

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_seq(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def forward(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, *, last_only: bool = False
    ) -> torch.Tensor: ...


def generation_defaults(
    generation_config: dict[str, Any], sampling: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Sampling defaults: the model's generation_config.json, overridden by the catalogue
    profile's non-null sampling values. The request overrides both (SamplingParams)."""
    out = {k: generation_config[k] for k in SAMPLING_KEYS if generation_config.get(k) is not None}
    if generation_config.get("do_sample") is False:
        out["temperature"] = 0.0
    out.update({k: v for k, v in (sampling or {}).items() if v is not None})
    return out


def eos_ids(tokenizer: Tokenizer, generation_config: dict[str, Any]) -> frozenset[int]:
    """The tokenizer's end tokens plus generation_config's (Qwen lists <|im_end|> and
    <|endoftext|> there)."""
    extra = generation_config.get("eos_token_id")
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    return frozenset({*tokenizer.eos_token_ids, *extra})


def thinking_requested(request: dict[str, Any]) -> bool:
    """``chat_template_kwargs.enable_thinking`` (vLLM/SGLang style), a top-level
    ``enable_thinking``, else OpenAI's ``reasoning_effort`` ("none"/"minimal" mean no
    thinking: Qwen3 has no levels in between); Qwen3 thinks unless told not to."""
    kwargs = request.get("chat_template_kwargs") or {}
    for value in (kwargs.get("enable_thinking"), request.get("enable_thinking")):
        if value is not None:
            return bool(value)
    effort = request.get("reasoning_effort")
    return effort not in ("none", "minimal")


def forced_tool_prefix(request: dict[str, Any]) -> str:
    """What the model is made to have written first so that it calls a tool: ``tool_choice``
    "required" opens a Qwen3 ``<tool_call>``, a named function also writes its name. The
    text is fed to the output parser as if generated, so the call streams as usual."""
    choice = request.get("tool_choice")
    if choice == "required":
        return "<tool_call>\n"
    if not isinstance(choice, dict):
        return ""
    name = (choice.get("function") or {}).get("name")
    known = {(t.get("function") or {}).get("name") for t in request.get("tools") or []}
    if not isinstance(name, str) or name not in known:
        raise RequestError(
            f"tool_choice names {name!r}, which is not among the request's tools",
            code="invalid_value",
        )
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": '


def json_format(request: dict[str, Any]) -> dict[str, Any] | None:
    """The ``response_format`` when it asks for JSON (json_object or json_schema), else
    None; anything else it could say is a RequestError."""
    fmt = request.get("response_format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") in (None, "text")):
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("json_object", "json_schema"):
        raise RequestError(
            f"response_format type {kind!r} is not one of text, json_object, json_schema",
            code="invalid_value",
        )
    if kind == "json_schema" and not isinstance((fmt.get("json_schema") or {}).get("schema"), dict):
        raise RequestError("response_format json_schema needs json_schema.schema (an object)")
    return fmt


def _json_instruction(fmt: dict[str, Any], *, tools: bool) -> str | None:
    """What the system prompt says about the JSON answer: a json_schema's schema (decoding
    enforces the syntax; what the value says is the model's to get right), and with tools,
    where nothing is enforced (the model may call one instead), the format itself."""
    when = "When you answer rather than call a tool, answer" if tools else "Answer"
    if fmt["type"] == "json_object":
        return f"{when} with a single JSON object." if tools else None
    spec = fmt["json_schema"]
    return (
        f"{when} with a single JSON value that conforms to this JSON schema"
        + (f" ({spec['name']})" if spec.get("name") else "")
        + f":\n{json.dumps(spec['schema'], ensure_ascii=False)}"
    )


def _with_system_note(messages: list[Any], note: str) -> list[Any]:
    """``note`` appended to the leading system message, or as one."""
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") in ("system", "developer"):
        content = first.get("content")
        if isinstance(content, str):
            return [{**first, "content": f"{content}\n\n{note}"}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


@dataclass(frozen=True)
class ChatPrompt:
    """A chat request as the generation loop runs it, worked out once: the prompt text
    (ending in any forced tool-call start) and what shapes decoding and parsing."""

    text: str
    tools: bool  # <tool_call> blocks become tool calls
    forced: str  # the forced start of a call, already in ``text``; fed to the parser first
    single_call: bool  # stop once one call is complete
    json: dict[str, Any] | None  # the response_format whose syntax decoding enforces
    continuing: bool  # the prompt ends inside the last assistant message


def _check_supported(request: dict[str, Any]) -> None:
    """Refuse, rather than silently ignore, what this engine cannot do yet."""
    if request.get("logprobs") or request.get("top_logprobs"):
        raise RequestError(
            "logprobs are not supported by this engine yet", code="unsupported_parameter"
        )


def _check_text_only(messages: list[Any]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object")
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise RequestError(
                        f"messages[{i}]: content part of type {kind!r} is not supported "
                        "by this model (text only)",
                        code="unsupported_content",
                    )


@dataclass
class _Outcome:
    """How a generation ended, filled in by ``_texts`` as it runs."""

    completion_tokens: int = 0
    finish_reason: str = "length"
    stop_sequence: str | None = None
    cancelled: bool = False


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Tokenizer
    chat_template: str = QWEN3_TEMPLATE
    defaults: dict[str, Any] = field(default_factory=dict)
    eos_token_ids: frozenset[int] = frozenset()
    name: str = ""
    # One decode step, (tokens [1, 1], position) -> logits [1, 1, vocab], when something
    # faster than model.forward runs it (a CUDA-graph replay); None: model.forward.
    decode: Callable[[torch.Tensor, int], torch.Tensor] | None = None

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        context_length: int | None = None,
        *,
        sampling_defaults: dict[str, Any] | None = None,
        name: str = "",
        progress: Progress | None = None,
    ) -> LoadedModel:
        """Load a GGUF file or HF directory onto ``device`` (bfloat16 on CUDA, float32 on
        CPU unless ``dtype`` says otherwise) with a KV cache of ``context_length``."""
        from helexa.engine.checkpoint.safetensors import is_gguf, load_checkpoint, read_config
        from helexa.engine.models.qwen3 import Qwen3, check_architecture

        path = Path(path)
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if not is_gguf(path):  # GGUF's loader checks its own metadata first
            check_architecture(read_config(path), str(path))
        ckpt = load_checkpoint(path, device, progress)
        tokenizer = Tokenizer.from_checkpoint(ckpt.tokenizer)
        model = Qwen3.from_checkpoint(ckpt, device, dtype)
        ckpt.tensors.clear()  # the model holds what it needs; drop the loader's references
        context = context_length or min(model.config.max_position_embeddings, DEFAULT_CONTEXT)
        model.setup_cache(1, context)
        decode = None
        if device.type == "cuda":  # replay decode steps from CUDA graphs
            from helexa.engine.models.cuda_graph import GraphDecoder

            decode = GraphDecoder(model)
        return cls(
            model=model,
            tokenizer=tokenizer,
            chat_template=ckpt.chat_template or QWEN3_TEMPLATE,
            defaults=generation_defaults(ckpt.generation_config, sampling_defaults),
            eos_token_ids=eos_ids(tokenizer, ckpt.generation_config),
            name=name or path.name,
            decode=decode,
        )

    @property
    def context_length(self) -> int:
        return self.model.max_seq

    @property
    def memory_bytes(self) -> int:
        """Weights + KV cache on the device, for ``/models`` vram_used_mb."""
        return self.model.nbytes

    # -- prompts ----------------------------------------------------------------------------

    def prepare(self, request: dict[str, Any]) -> ChatPrompt:
        """An OpenAI chat request, rendered and read once for the loop (or a RequestError).

        ``tool_choice`` "required" or a named function ends the prompt in the forced start
        of a call (:func:`forced_tool_prefix`); ``continue_final_message`` (vLLM's name;
        Anthropic prefill arrives as it) ends it inside the last assistant message; a JSON
        ``response_format`` constrains decoding, unless tools are offered (the model may
        call one instead), and then it is only an instruction."""
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list")
        _check_text_only(messages)
        tools = None if request.get("tool_choice") == "none" else request.get("tools") or None
        forced = forced_tool_prefix(request) if tools else ""
        continuing = bool(request.get("continue_final_message"))
        fmt = json_format(request)
        note = None if fmt is None else _json_instruction(fmt, tools=tools is not None)
        if note is not None:
            messages = _with_system_note(messages, note)
        constrained = fmt if fmt is not None and tools is None else None
        try:
            text = render_chat(
                self.chat_template,
                messages,
                tools=tools,
                add_generation_prompt=request.get("add_generation_prompt", not continuing),
                continue_final_message=continuing,
                # A forced call or a JSON answer starts at once: no room for thinking first.
                enable_thinking=thinking_requested(request) and not forced and not constrained,
                bos_token=self.tokenizer.bos_token,
                eos_token=self.tokenizer.eos_token,
            )
        except RequestError:
            raise
        except Exception as exc:  # jinja2 errors, raise_exception() in the template
            raise RequestError(f"cannot render the chat template: {exc}") from exc
        # One call only: asked for, or implied by naming the function to call.
        named = isinstance(request.get("tool_choice"), dict)
        return ChatPrompt(
            text=text + forced,
            tools=tools is not None,
            forced=forced,
            single_call=tools is not None
            and (request.get("parallel_tool_calls") is False or named),
            json=constrained,
            continuing=continuing,
        )

    def render(self, request: dict[str, Any]) -> str:
        """The prompt text an OpenAI chat request renders to (see :meth:`prepare`)."""
        return self.prepare(request).text

    def count_tokens(self, request: dict[str, Any]) -> int:
        return len(self.tokenizer.encode(self.render(request)))

    def _completion_prompt(self, request: dict[str, Any]) -> list[int]:
        prompt = request.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise RequestError("'prompt' must be a string or one list of token ids")

    def _params(self, request: dict[str, Any], prompt_tokens: int) -> tuple[SamplingParams, int]:
        """Sampling parameters and the completion budget, or a RequestError."""
        if (request.get("n") or 1) != 1:
            raise RequestError("only n=1 is supported", code="unsupported_parameter")
        _check_supported(request)
        try:
            params = SamplingParams.from_request(request, self.defaults)
        except (TypeError, ValueError) as exc:
            raise RequestError(str(exc), code="invalid_value") from exc
        context = self.context_length
        if prompt_tokens == 0:
            raise RequestError("the prompt is empty")
        if params.max_tokens is not None and params.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1", code="invalid_value")
        room = context - prompt_tokens
        wanted = room if params.max_tokens is None else params.max_tokens
        if request.get("clamp_max_tokens"):
            # helexa's extension (the Anthropic route sets it): a budget past the context
            # is a ceiling, not an error, so Claude Code's large max_tokens fit a 32k model.
            wanted = min(wanted, room)
        if room < 1 or wanted > room:
            raise RequestError(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt_tokens + max(wanted, 1)} tokens ({prompt_tokens} in the "
                f"prompt, {max(wanted, 1)} for the completion). Please reduce the length of "
                "the prompt or max_tokens.",
                code="context_length_exceeded",
            )
        return params, wanted

    # -- the loop ---------------------------------------------------------------------------

    def tokens(
        self,
        prompt: list[int],
        params: SamplingParams,
        cancel: Event,
        constraint: JsonConstraint | None = None,
    ) -> Iterator[int]:
        """Sampled token ids, one forward pass each, until cancelled: callers stop it at
        EOS, a stop string or their budget, and the last token is never fed back. ``prompt``
        must fit the KV cache with room for the tokens taken. A ``constraint`` (JSON mode)
        picks among the tokens it allows and is advanced by each one taken."""
        model, device = self.model, self.model.device
        sampler = Sampler(params, model.vocab_size, device, prompt=prompt)
        known = self.tokenizer.vocab_size  # a model's vocab is often padded past the tokenizer's
        logits = None
        for start in range(0, len(prompt), PREFILL_CHUNK):
            if cancel.is_set():
                return
            chunk = prompt[start : start + PREFILL_CHUNK]
            tokens = torch.tensor([chunk], dtype=torch.long, device=device)
            positions = torch.arange(start, start + len(chunk), device=device)
            logits = model.forward(tokens, positions, last_only=True)
        assert logits is not None
        pos = len(prompt)
        generated: list[int] = []
        while not cancel.is_set():
            last = logits[0, -1]
            if known < last.shape[-1]:
                last[known:] = float("-inf")
            if constraint is None:
                token = sampler.sample(last, generated)
            else:
                token = constraint.pick(sampler.sample, last, generated)
                constraint.advance(token)
            generated.append(token)
            yield token
            tokens = torch.tensor([[token]], dtype=torch.long, device=device)
            if self.decode is not None:
                logits = self.decode(tokens, pos)
            else:
                logits = model.forward(tokens, torch.tensor([pos], device=device), last_only=True)
            pos += 1

    def _texts(
        self,
        prompt: list[int],
        params: SamplingParams,
        max_tokens: int,
        cancel: Event,
        outcome: _Outcome,
        constraint: JsonConstraint | None = None,
    ) -> Iterator[str]:
        """Decoded text safe to show (whole UTF-8 characters, no partial stop string)."""
        decoder = self.tokenizer.stream_decoder()
        stops = StopMatcher(list(params.stop or []))
        for token in self.tokens(prompt, params, cancel, constraint):
            outcome.completion_tokens += 1
            if token in self.eos_token_ids:
                outcome.finish_reason = "stop"
                break
            text, matched = stops.feed(decoder.add(token))
            if text:
                yield text
            if matched is not None:
                outcome.finish_reason, outcome.stop_sequence = "stop", matched
                return
            if constraint is not None and constraint.closed:
                outcome.finish_reason = "stop"  # the JSON value is complete
                break
            if outcome.completion_tokens >= max_tokens:
                break
        else:
            outcome.cancelled = True  # _tokens only runs dry when cancelled
            return
        text, matched = stops.feed(decoder.flush())
        if matched is not None:
            outcome.finish_reason, outcome.stop_sequence = "stop", matched
        else:
            text += stops.flush()
        if text:
            yield text

    def stream_chat(self, request: dict[str, Any], cancel: Event) -> Iterator[dict[str, Any]]:
        """``chat.completion.chunk`` dicts: the role, content/reasoning/tool-call deltas, a
        finish chunk, then a usage chunk. Nothing more once ``cancel`` is set."""
        chat = self.prepare(request)
        prompt = self.tokenizer.encode(chat.text)
        params, max_tokens = self._params(request, len(prompt))
        constraint = None
        if chat.json is not None:
            constraint = JsonConstraint(
                self.tokenizer.token_bytes,
                self.eos_token_ids,
                object_only=chat.json["type"] == "json_object",
            )
        parser = OutputParser(
            tools=chat.tools,
            thinking=True,
            starts_in_thinking=chat.text.rstrip().endswith("<think>"),
            continues_content=chat.continuing,
        )
        chunks = _Chunks("chat.completion.chunk", "chatcmpl", request.get("model") or self.name)
        outcome = _Outcome()

        yield chunks.chat({"role": "assistant", "content": ""})
        for delta in parser.feed(chat.forced):  # a forced call start: held until it closes
            yield chunks.chat(delta)
        texts_of = self._texts(prompt, params, max_tokens, cancel, outcome, constraint)
        with closing(texts_of) as texts:
            for text in texts:
                for delta in parser.feed(text):
                    yield chunks.chat(delta)
                if chat.single_call and parser.tool_calls:
                    outcome.finish_reason = "stop"  # the one call is complete: stop here
                    break
        if outcome.cancelled:
            return
        for delta in parser.finish():
            yield chunks.chat(delta)
        finish = outcome.finish_reason
        if finish == "stop" and parser.tool_calls:
            finish = "tool_calls"
        yield chunks.chat({}, finish, outcome.stop_sequence)
        yield chunks.usage(len(prompt), outcome.completion_tokens)

    def stream_completion(self, request: dict[str, Any], cancel: Event) -> Iterator[dict[str, Any]]:
        """``text_completion`` chunks for a legacy completions request (raw prompt, no
        template, no parsing), then a usage chunk."""
        prompt = self._completion_prompt(request)
        params, max_tokens = self._params(request, len(prompt))
        chunks = _Chunks("text_completion", "cmpl", request.get("model") or self.name)
        outcome = _Outcome()
        for text in self._texts(prompt, params, max_tokens, cancel, outcome):
            yield chunks.text(text)
        if outcome.cancelled:
            return
        yield chunks.text("", outcome.finish_reason, outcome.stop_sequence)
        yield chunks.usage(len(prompt), outcome.completion_tokens)


class _Chunks:
    """Builds the chunk dicts of one response (shared id, created, model)."""

    def __init__(self, obj: str, prefix: str, model: str) -> None:
        self.base = {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": obj,
            "created": int(time.time()),
            "model": model,
        }

    @staticmethod
    def _finish(choice: dict[str, Any], finish: str | None, stop: str | None) -> dict[str, Any]:
        choice["finish_reason"] = finish
        if stop is not None:
            choice["stop_sequence"] = stop  # non-standard: Anthropic's stop_sequence needs it
        return choice

    def chat(
        self, delta: dict[str, Any], finish: str | None = None, stop: str | None = None
    ) -> dict[str, Any]:
        choice = self._finish({"index": 0, "delta": delta, "logprobs": None}, finish, stop)
        return {**self.base, "choices": [choice]}

    def text(self, text: str, finish: str | None = None, stop: str | None = None) -> dict[str, Any]:
        choice = self._finish({"index": 0, "text": text, "logprobs": None}, finish, stop)
        return {**self.base, "choices": [choice]}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            **self.base,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
