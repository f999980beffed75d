"""Chat templates: OpenAI-shaped messages -> the prompt text a model was trained on.

Templates come from model files, so they are untrusted code: they run in jinja2's immutable
sandbox, in an environment set up like transformers' ``apply_chat_template`` (same options,
filters and globals), because that is what template authors test against. Rendering the
same messages must give the same text as transformers does, or a model sees prompts that
differ from its training in small, damaging ways.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

_TEMPLATES = Path(__file__).resolve().parent / "templates"
QWEN3_TEMPLATE: str = (_TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8")
# Qwen3-Coder's format: tools as <function> blocks, calls as <function=...> XML.
QWEN3_CODER_TEMPLATE: str = (_TEMPLATES / "qwen3_coder.jinja").read_text(encoding="utf-8")

# Names clients use for an assistant turn's reasoning; templates read ``reasoning_content``.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    enable_thinking: bool | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    """Render ``messages`` (OpenAI chat shape) with ``template``.

    ``enable_thinking`` is passed only when given, so templates that test ``is defined``
    see what they would under transformers. ``continue_final_message`` ends the prompt
    inside the last (assistant) message, so the model continues it (Anthropic prefill),
    cut as transformers cuts it. Bad messages raise ValueError; template errors
    (including its own ``raise_exception``) raise jinja2.TemplateError.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt exclude each other")
    normalized = normalize_messages(messages)
    variables: dict[str, Any] = {
        "messages": normalized,
        "tools": tools,
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
    }
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    if enable_thinking is not None:
        variables["enable_thinking"] = enable_thinking
    if continue_final_message:
        if not normalized or not normalized[-1]["content"].strip():
            raise ValueError("continue_final_message needs a final message with text to continue")
        last = normalized[-1]
        normalized[-1] = {**last, "content": last["content"] + _CONTINUE_TAG}
    rendered = _compile(template).render(**variables)
    return _cut_at_tag(rendered) if continue_final_message else rendered


# transformers' marker: appended to the final message, rendered, then cut away with all
# that follows it (the end-of-turn), wherever the template put the message.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _cut_at_tag(rendered: str) -> str:
    """``rendered`` up to the tag. A template that strips messages also strips the tag's
    trailing space; then the message's own trailing whitespace went too (transformers)."""
    at = rendered.rfind(_CONTINUE_TAG.strip())
    if at < 0:
        raise ValueError("continue_final_message: the chat template dropped the final message")
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as chat templates expect them, from what OpenAI clients send.

    - ``content`` is always a string: text parts are joined with newlines (as vLLM does),
      a missing or null content becomes "" (templates concatenate it; transformers would
      drop the key and most templates then fail on an undefined value).
    - keys whose value is null are dropped, as transformers does.
    - ``developer`` (OpenAI's newer name for the system role, which Codex and current SDKs
      send) becomes ``system``: templates know only the latter and drop what they do not.
    - ``reasoning`` / ``thinking`` fill ``reasoning_content`` (and the reverse), as
      transformers aliases them.
    - tool call ``arguments`` that are a JSON object in a string become that object: the
      chat-template convention (transformers' docs) is a dict, and most templates render it
      with ``tojson`` unconditionally, so a string would be quoted twice. Qwen3's template
      renders a string verbatim and a dict through ``tojson``, which is the same text for
      the ``json.dumps`` strings OpenAI clients send back. Anything that does not parse as
      an object is left as given.
    """
    if not isinstance(messages, list):
        raise ValueError("messages must be a list")
    return [_normalize_message(i, m) for i, m in enumerate(messages)]


def _normalize_message(index: int, message: Any) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ValueError(f"messages[{index}] must be an object")
    out = {k: v for k, v in message.items() if v is not None}
    if not isinstance(out.get("role"), str):
        raise ValueError(f"messages[{index}] needs a string 'role'")
    if out["role"] == "developer":
        out["role"] = "system"
    out["content"] = _text(index, out.get("content"))
    reasoning = next((out[k] for k in _REASONING_KEYS if out.get(k) is not None), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    if "tool_calls" in out:
        calls = out["tool_calls"]
        if not isinstance(calls, list):
            raise ValueError(f"messages[{index}].tool_calls must be a list")
        out["tool_calls"] = [_normalize_tool_call(index, j, c) for j, c in enumerate(calls)]
    return out


def _text(index: int, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"messages[{index}]: content part of type {kind!r} is not supported (text only)"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"messages[{index}].content must be a string or a list of text parts")


def _normalize_tool_call(index: int, j: int, call: Any) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ValueError(f"messages[{index}].tool_calls[{j}] must be an object")
    call = dict(call)
    function = call.get("function")
    if isinstance(function, Mapping):
        function = dict(function)
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                function["arguments"] = parsed
        call["function"] = function
    return call


# -- the jinja environment, as transformers builds it -----------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in
    transformers; some templates use it, so accept it and render its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes, closing a route to interpreter
    internals from template code (transformers does the same)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace ({name!r})"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """jinja's own tojson HTML-escapes (<, >, &, ') and cannot indent; templates expect
    plain json.dumps."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(template)
