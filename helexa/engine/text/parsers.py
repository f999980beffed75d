"""Qwen3 output text -> OpenAI chat deltas: ``<think>`` reasoning and ``<tool_call>`` calls,
in Qwen3's JSON or Qwen3-Coder's XML.

A small state machine fed decoded text as it streams. Tags may arrive split across feeds
(``<tool_`` then ``call>``), so text that could still become a tag is held back until it
either completes one or cannot. Whitespace that only separates a tag from its neighbours
(the newlines Qwen writes around ``<think>``, ``</think>`` and ``<tool_call>``) is dropped;
whitespace inside content is kept.

Tool calls are buffered whole, until ``</tool_call>``, then emitted as two deltas (id and
name with empty arguments, then the arguments): the call must be complete to be checked,
and a call that does not parse is returned to the content stream as the text it was.

Which syntax a model writes is read from its chat template (:func:`tool_format`):

- JSON (Qwen3): ``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``.
- XML (Qwen3-Coder): ``<tool_call>\n<function=NAME>\n<parameter=P>\nvalue\n</parameter>\n
  </function>\n</tool_call>``. Values are raw text (one newline each side is the
  format's, not the value's); each is typed by the tool's JSON schema for ``P`` where the
  request gives one (integers, numbers, booleans, null, objects and arrays parsed; a value
  that does not parse as its type stays the string the model wrote), else kept a string.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Literal

from helexa.engine.text.stops import partial_suffix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"

ToolFormat = Literal["json", "xml"]


def tool_format(template: str) -> ToolFormat:
    """The tool-call syntax a chat template teaches: one that writes ``<function=`` and
    ``<parameter=`` (Qwen3-Coder's) is the XML format, anything else Qwen3's JSON."""
    return "xml" if FUNCTION_OPEN in template and PARAMETER_OPEN in template else "json"


@dataclass(frozen=True)
class ToolSyntax:
    """How this request's tool calls are written and what their parameters are: the
    format, and each function's JSON-schema ``properties`` (to type XML values)."""

    format: ToolFormat = "json"
    parameters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def for_request(cls, template: str, tools: list[Any]) -> ToolSyntax:
        """The syntax of ``template`` with the parameter schemas of ``tools`` (OpenAI
        ``[{"type": "function", "function": {"name", "parameters"}}]``)."""
        parameters: dict[str, Mapping[str, Any]] = {}
        for tool in tools:
            fn = tool.get("function") if isinstance(tool, Mapping) else None
            fn = fn if isinstance(fn, Mapping) else tool
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                continue
            schema = fn.get("parameters")
            props = schema.get("properties") if isinstance(schema, Mapping) else None
            parameters[fn["name"]] = props if isinstance(props, Mapping) else {}
        return cls(tool_format(template), parameters)


class _State(Enum):
    START = auto()  # nothing but whitespace yet: a <think> may still open
    THINK = auto()  # inside <think>: reasoning until </think>
    CONTENT = auto()  # answer text; <tool_call> opens a call when tools are on
    TOOL = auto()  # inside <tool_call>: buffering the JSON until </tool_call>


class OutputParser:
    """Splits generated text into content, reasoning and tool-call deltas.

    ``thinking``: a leading ``<think>`` opens reasoning. ``starts_in_thinking``: the prompt
    already opened it (templates that end the generation prompt with ``<think>\\n``), so the
    text up to ``</think>`` is reasoning. ``tools``: ``<tool_call>`` blocks become tool calls.
    ``continues_content``: the prompt ends inside an answer (a continued assistant message),
    so the text is content from its first character, leading whitespace included.
    ``seed`` makes the generated call ids reproducible. ``tools`` is True for Qwen3's
    JSON calls, or a :class:`ToolSyntax` saying which syntax (and parameter schemas).
    """

    def __init__(
        self,
        *,
        tools: bool | ToolSyntax | None,
        thinking: bool,
        starts_in_thinking: bool = False,
        continues_content: bool = False,
        seed: int | None = None,
    ) -> None:
        self.tools = bool(tools)
        self._syntax = tools if isinstance(tools, ToolSyntax) else ToolSyntax()
        self.tool_calls = 0
        self._ids = random.Random(seed)
        self._buf = ""
        self._lstrip = not continues_content  # drop whitespace before the next emitted text
        self._gap = ""  # whitespace dropped before the open <tool_call>, restored if it fails
        if starts_in_thinking:
            self._state = _State.THINK
        elif continues_content:
            self._state = _State.CONTENT
        elif thinking:
            self._state = _State.START
        else:
            self._state = _State.CONTENT

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buf += text
        return _coalesce(self._run(final=False))

    def finish(self) -> list[dict[str, Any]]:
        """Flush held text: an unterminated ``<think>`` is reasoning, an unterminated
        ``<tool_call>`` (or a partial tag) is content."""
        return _coalesce(self._run(final=True))

    # -- the machine ------------------------------------------------------------------------

    def _run(self, *, final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            state, buf = self._state, self._buf
            if state is _State.START:
                stripped = buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._enter(_State.THINK, stripped[len(THINK_OPEN) :])
                elif not final and THINK_OPEN.startswith(stripped):
                    return out  # only whitespace or the start of "<think>" so far
                else:
                    self._state = _State.CONTENT
            elif state is _State.THINK:
                end = buf.find(THINK_CLOSE)
                if end >= 0:
                    self._emit(out, "reasoning_content", buf[:end].rstrip())
                    self._enter(_State.CONTENT, buf[end + len(THINK_CLOSE) :])
                else:
                    self._emit_safe(out, "reasoning_content", THINK_CLOSE, final, rstrip=True)
                    return out
            elif state is _State.CONTENT:
                start = buf.find(TOOL_OPEN) if self.tools else -1
                if start >= 0:
                    before = buf[:start].rstrip()
                    self._emit(out, "content", before)
                    self._gap = "" if self._lstrip else buf[len(before) : start]
                    self._enter(_State.TOOL, buf[start + len(TOOL_OPEN) :])
                elif self.tools:
                    self._emit_safe(out, "content", TOOL_OPEN, final)
                    return out
                else:
                    self._emit(out, "content", buf)
                    self._buf = ""
                    return out
            else:  # TOOL
                end = _xml_call_end(buf) if self._syntax.format == "xml" else buf.find(TOOL_CLOSE)
                if end >= 0:
                    raw, rest = buf[:end], buf[end + len(TOOL_CLOSE) :]
                    call = self._parse_call(raw)
                    if call is None:  # not a call after all: give the text back verbatim
                        self._state, self._buf = _State.CONTENT, rest
                        self._give_back(out, TOOL_OPEN + raw + TOOL_CLOSE)
                    else:
                        out.extend(self._call_deltas(*call))
                        self._enter(_State.CONTENT, rest)
                elif final:
                    self._give_back(out, TOOL_OPEN + buf)
                    self._buf = ""
                    return out
                else:
                    return out

    def _enter(self, state: _State, rest: str) -> None:
        self._state, self._buf, self._lstrip = state, rest, True

    def _emit(self, out: list[dict[str, Any]], key: str, text: str) -> None:
        if self._lstrip:
            text = text.lstrip()
        if text:
            self._lstrip = False
            out.append({key: text})

    def _give_back(self, out: list[dict[str, Any]], text: str) -> None:
        """A ``<tool_call>`` that is not one returns to the content as it was written,
        with the whitespace before it."""
        if self._gap:
            self._lstrip = False
        self._emit(out, "content", self._gap + text)

    def _emit_safe(
        self, out: list[dict[str, Any]], key: str, tag: str, final: bool, *, rstrip: bool = False
    ) -> None:
        """Emit the buffer except what could still be the start of ``tag`` or whitespace
        that would be dropped if ``tag`` follows; on ``final`` emit it all (reasoning is
        stripped of trailing whitespace, content kept as written)."""
        buf = self._buf
        if final:
            self._emit(out, key, buf.rstrip() if rstrip else buf)
            self._buf = ""
            return
        held = partial_suffix(buf, tag)
        body = buf[: len(buf) - held]
        safe = body.rstrip()
        self._emit(out, key, safe)
        self._buf = buf[len(safe) :]

    def _parse_call(self, raw: str) -> tuple[str, str] | None:
        if self._syntax.format == "xml":
            return _parse_xml_tool_call(raw, self._syntax.parameters)
        return _parse_tool_call(raw)

    def _call_deltas(self, name: str, arguments: str) -> list[dict[str, Any]]:
        index = self.tool_calls
        self.tool_calls += 1
        call_id = f"call_{self._ids.getrandbits(96):024x}"
        start = {"index": index, "id": call_id, "type": "function"}
        start["function"] = {"name": name, "arguments": ""}
        args = {"index": index, "function": {"arguments": arguments}}
        return [{"tool_calls": [start]}, {"tool_calls": [args]}]


def _parse_tool_call(raw: str) -> tuple[str, str] | None:
    """(name, arguments JSON) from the text between the tags, or None if it is not a call.

    Accepts ``arguments`` (or ``parameters``) as an object or as a string holding one;
    missing arguments are ``{}``.
    """
    try:
        call = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return call["name"], json.dumps(arguments, ensure_ascii=False)


def _xml_call_end(buf: str) -> int:
    """Where the ``</tool_call>`` closing an XML call starts, or -1 while it is still
    open: parameter values are raw text (code, often), so a ``</tool_call>`` inside one
    is the value's, not the call's end."""
    pos = 0
    while True:
        close = buf.find(TOOL_CLOSE, pos)
        param = buf.find(PARAMETER_OPEN, pos)
        if param < 0 or 0 <= close < param:
            return close
        value_end = buf.find(PARAMETER_CLOSE, param)
        if value_end < 0:
            return -1
        pos = value_end + len(PARAMETER_CLOSE)


def _parse_xml_tool_call(
    raw: str, parameters: Mapping[str, Mapping[str, Any]]
) -> tuple[str, str] | None:
    """(name, arguments JSON) from the text between the tags in Qwen3-Coder's format, or
    None if it is not exactly one ``<function=NAME>`` of ``<parameter=P>`` blocks (a
    repeated parameter is ambiguous, so not a call either)."""
    body = raw.strip()
    if not body.startswith(FUNCTION_OPEN) or not body.endswith(FUNCTION_CLOSE):
        return None
    head = body.find(">")
    name = body[len(FUNCTION_OPEN) : head].strip()
    if not name or any(c in name for c in "<\n"):
        return None
    inner = body[head + 1 : len(body) - len(FUNCTION_CLOSE)]
    schema = parameters.get(name) or {}
    arguments: dict[str, Any] = {}
    pos = 0
    while inner[pos:].strip():
        start = pos + len(inner[pos:]) - len(inner[pos:].lstrip())
        if not inner.startswith(PARAMETER_OPEN, start):
            return None
        close = inner.find(">", start)
        end = inner.find(PARAMETER_CLOSE, close)
        key = inner[start + len(PARAMETER_OPEN) : close].strip() if close >= 0 else ""
        if end < 0 or not key or any(c in key for c in "<\n") or key in arguments:
            return None
        value = inner[close + 1 : end]
        value = value.removeprefix("\n").removesuffix("\n")
        arguments[key] = _typed_value(value, schema.get(key))
        pos = end + len(PARAMETER_CLOSE)
    return name, json.dumps(arguments, ensure_ascii=False)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_UNPARSED = object()
_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "integer": int,
    "number": (int, float),
    "object": dict,
    "array": list,
}


def _typed_value(value: str, schema: Any) -> Any:
    """``value`` as the JSON type its schema gives (the first of a list of types that it
    parses as), else the string itself."""
    types = schema.get("type") if isinstance(schema, Mapping) else None
    types = [types] if isinstance(types, str) else [t for t in types or [] if isinstance(t, str)]
    text = value.strip()
    if "null" in types and text == "null":
        return None
    if not types or "string" in types:
        return value
    for kind in types:
        parsed = _parse_as(kind, text)
        if parsed is not _UNPARSED:
            return parsed
    return value


def _parse_as(kind: str, text: str) -> Any:
    """``text`` as a value of JSON-schema type ``kind``, or _UNPARSED. Booleans take the
    Python spelling too (Qwen3-Coder's template renders past arguments with ``string``)."""
    if kind == "boolean":
        return {"true": True, "false": False}.get(text.lower(), _UNPARSED)
    wanted = _JSON_TYPES.get(kind)
    try:
        parsed = json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return _UNPARSED
    if wanted is None or isinstance(parsed, bool) or not isinstance(parsed, wanted):
        return _UNPARSED
    if isinstance(parsed, float) and not math.isfinite(parsed):
        return _UNPARSED  # 1e999: json.dumps would write Infinity, which is not JSON
    return parsed


def _coalesce(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge neighbouring text deltas of one kind, so a feed yields as few chunks as it can."""
    out: list[dict[str, Any]] = []
    for delta in deltas:
        prev = out[-1] if out else None
        key = next(iter(delta))
        if prev is not None and key != "tool_calls" and next(iter(prev)) == key:
            out[-1] = {key: prev[key] + delta[key]}
        else:
            out.append(delta)
    return out
