"""An OpenAI request as the generation loop runs it: the prompt, what shapes decoding, and
the token budget, worked out (or refused) before any device work.

Everything here reads the request dict and nothing else of the model than its chat
template, special tokens, defaults and context length, so a bad request is a
:class:`RequestError` (the client's mistake, a 400) before a single forward pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from helexa.engine.grammar import (
    ANY_OBJECT,
    Grammar,
    GrammarError,
    ToolSchema,
    answer_grammar,
    call_grammar,
)
from helexa.engine.sampling import SamplingParams
from helexa.engine.text.chat_template import render_chat
from helexa.engine.text.parsers import ToolSyntax


class RequestError(ValueError):
    """A request this model cannot serve as asked; the client's mistake, reported as 400.

    ``extra`` holds structured fields a client may act on (a context overflow's
    ``prompt_tokens`` and ``max_context``: each dialect words that error its own way)."""

    def __init__(
        self, message: str, code: str = "invalid_request", extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.extra: dict[str, Any] = dict(extra or {})


# A long prompt is tokenized this many characters at a time, so one far past the context
# is refused once the pieces tokenized so far already fill it, not after all of it.
PROMPT_PIECE_CHARS = 1 << 16
# Below this many characters per context token a prompt is tokenized in one go: it is
# likely to fit, and one pass is cheaper than pieces and then the whole.
DENSE_CHARS_PER_TOKEN = 4
# Tokens a cut may cost the count: text either side of a cut can tokenize differently than
# across it (a word or a special token split), by a few tokens at most.
CUT_MARGIN_TOKENS = 16


def context_error(context: int, prompt_tokens: int, message: str) -> RequestError:
    """A context overflow, with the numbers as fields as well as in OpenAI's words."""
    return RequestError(
        message,
        code="context_length_exceeded",
        extra={"prompt_tokens": prompt_tokens, "max_context": context},
    )


def _cut(text: str, start: int) -> int:
    """Where the piece that begins at ``start`` ends: after a newline, else after a space
    (tokens rarely span either), else wherever the piece is long enough."""
    end = start + PROMPT_PIECE_CHARS
    if end >= len(text):
        return len(text)
    floor = end - PROMPT_PIECE_CHARS // 8
    for boundary in ("\n", " "):
        at = text.rfind(boundary, floor, end)
        if at >= 0:
            return at + 1
    return end


def prompt_tokens(text: str, encode: Callable[[str], list[int]], context: int) -> list[int]:
    """``encode(text)``, unless it cannot fit a ``context``-token window with room for one
    more token: then the context-length RequestError, as soon as that is certain. A prompt
    far longer than the window would cost a second of CPU and hundreds of MB a MiB to
    tokenize whole, so a long one is first counted piece by piece, and refused once the
    pieces counted so far (less a margin for each cut) already fill the window."""
    if len(text) > max(PROMPT_PIECE_CHARS, DENSE_CHARS_PER_TOKEN * context):
        counted, start = 0, 0
        while start < len(text):
            end = _cut(text, start)
            counted += len(encode(text[start:end])) - (CUT_MARGIN_TOKENS if start else 0)
            start = end
            if counted >= context:
                raise context_error(
                    context,
                    counted,
                    f"This model's maximum context length is {context} tokens. However, "
                    f"the prompt alone is at least {counted} tokens. Please reduce the "
                    "length of the prompt.",
                )
    return encode(text)


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


def forced_tool_prefix(request: dict[str, Any], syntax: ToolSyntax | None = None) -> str:
    """What the model is made to have written first so that it calls a tool: ``tool_choice``
    "required" opens a Qwen3 ``<tool_call>``, a named function also writes its name (in
    the model's own call syntax, up to where its arguments begin). The text is fed to the
    output parser as if generated, so the call streams as usual; decoding goes on under
    the call grammar (:func:`call_constraint`)."""
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
    if syntax is not None and syntax.format == "xml":
        return f"<tool_call>\n<function={name}>\n"
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
    enforces it, but a model told it writes values that mean something), and with tools,
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
    tools: ToolSyntax | None  # when set, <tool_call> blocks (in this syntax) become calls
    forced: str  # the forced start of a call, already in ``text``; fed to the parser first
    single_call: bool  # stop once one call is complete
    grammar: Grammar | None  # what decoding enforces: a JSON answer, or tool calls
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


def answer_constraint(fmt: dict[str, Any]) -> Grammar:
    """A JSON ``response_format`` as a grammar: json_object any object, json_schema its
    schema (one llguidance cannot enforce is refused, naming why)."""
    if fmt["type"] == "json_object":
        return answer_grammar(ANY_OBJECT, "json_object")
    spec = fmt["json_schema"]
    name = f" {spec['name']!r}" if spec.get("name") else ""
    return _grammar(answer_grammar, spec["schema"], f"the response format's JSON schema{name}")


def call_constraint(
    request: dict[str, Any], tools: list[Any], syntax: ToolSyntax, *, single: bool
) -> Grammar | None:
    """The grammar of this request's tool calls, or None where calls are free text.

    A forced call (tool_choice "required" or naming a function) holds its arguments to
    its tool's parameters schema, leniently (keywords llguidance does not implement are
    not enforced) unless the tool is ``strict``; otherwise, once any tool is ``strict``,
    each call the model opens names one of the tools, a strict one's arguments held to its
    schema exactly and any other's to a JSON object."""
    choice = request.get("tool_choice")
    functions = [t.get("function") or t for t in tools if isinstance(t, dict)]
    functions = [f for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str)]
    forced = choice == "required" or isinstance(choice, dict)
    if not forced and not any(f.get("strict") is True for f in functions):
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        functions = [f for f in functions if f["name"] == name][:1]  # the first, if repeated
    specs = []
    for f in functions:
        strict = f.get("strict") is True
        schema = f.get("parameters")
        schema = schema if isinstance(schema, dict) else ANY_OBJECT
        specs.append(ToolSchema(f["name"], schema if forced or strict else None, not strict))
    return _grammar(
        call_grammar,
        specs,
        syntax.format,
        named=isinstance(choice, dict),
        single=single,
        triggered=not forced,
    )


def _grammar(build: Callable[..., Grammar], *args: Any, **kwargs: Any) -> Grammar:
    try:
        return build(*args, **kwargs)
    except GrammarError as exc:
        raise RequestError(str(exc), code="invalid_schema") from exc


def chat_prompt(
    request: dict[str, Any], template: str, *, bos_token: str | None, eos_token: str | None
) -> ChatPrompt:
    """An OpenAI chat request, rendered and read once for the loop (or a RequestError).

    ``tool_choice`` "required" or a named function ends the prompt in the forced start
    of a call (:func:`forced_tool_prefix`) and decoding follows the call grammar, as it
    does for calls to ``strict`` tools (:func:`call_constraint`); ``continue_final_message``
    (vLLM's name; Anthropic prefill arrives as it) ends it inside the last assistant
    message; a JSON ``response_format`` constrains decoding to its schema, unless tools
    are offered (the model may call one instead), and then it is only an instruction."""
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    _check_text_only(messages)
    tools = None if request.get("tool_choice") == "none" else request.get("tools") or None
    syntax = ToolSyntax.for_request(template, tools) if tools else None
    forced = forced_tool_prefix(request, syntax) if tools else ""
    continuing = bool(request.get("continue_final_message"))
    fmt = json_format(request)
    note = None if fmt is None else _json_instruction(fmt, tools=tools is not None)
    if note is not None:
        messages = _with_system_note(messages, note)
    constrained = fmt if fmt is not None and tools is None else None
    try:
        text = render_chat(
            template,
            messages,
            tools=tools,
            add_generation_prompt=request.get("add_generation_prompt", not continuing),
            continue_final_message=continuing,
            # A forced call or a JSON answer starts at once: no room for thinking first.
            enable_thinking=thinking_requested(request) and not forced and not constrained,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except RequestError:
        raise
    except Exception as exc:  # jinja2 errors, raise_exception() in the template
        raise RequestError(f"cannot render the chat template: {exc}") from exc
    # One call only: asked for, or implied by naming the function to call.
    named = isinstance(request.get("tool_choice"), dict)
    single = tools is not None and (request.get("parallel_tool_calls") is False or named)
    grammar = None
    if constrained is not None:
        grammar = answer_constraint(constrained)
    elif tools is not None and syntax is not None:
        grammar = call_constraint(request, tools, syntax, single=single)
    return ChatPrompt(
        text=text + forced,
        tools=syntax,
        forced=forced,
        single_call=single,
        grammar=grammar,
        continuing=continuing,
    )


def completion_prompt(
    request: dict[str, Any], encode: Callable[[str], list[int]], vocab_size: int
) -> list[int]:
    """A legacy completions ``prompt``: one string (encoded) or one list of token ids, each
    an id of this model's vocabulary (an id past it would index out of the embedding: on
    CUDA a device-side assert that breaks every later request on the device)."""
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return encode(prompt)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise RequestError(
                f"token id {bad} in 'prompt' is outside this model's vocabulary"
                f" (0..{vocab_size - 1})",
                code="invalid_value",
            )
        return list(prompt)
    raise RequestError("'prompt' must be a string or one list of token ids")


def sampling_and_budget(
    request: dict[str, Any], defaults: dict[str, Any], context: int, prompt_tokens: int
) -> tuple[SamplingParams, int]:
    """Sampling parameters (the request's over ``defaults``) and how many tokens the
    completion may take in a ``context``-token window, or a RequestError."""
    if (request.get("n") or 1) != 1:
        raise RequestError("only n=1 is supported", code="unsupported_parameter")
    _check_supported(request)
    try:
        params = SamplingParams.from_request(request, defaults)
    except (TypeError, ValueError) as exc:
        raise RequestError(str(exc), code="invalid_value") from exc
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
        raise context_error(
            context,
            prompt_tokens,
            f"This model's maximum context length is {context} tokens. However, you "
            f"requested {prompt_tokens + max(wanted, 1)} tokens ({prompt_tokens} in the "
            f"prompt, {max(wanted, 1)} for the completion). Please reduce the length of "
            "the prompt or max_tokens.",
        )
    return params, wanted
