"""Qwen3 output text -> OpenAI chat deltas: ``<think>`` reasoning and ``<tool_call>`` JSON.

A small state machine fed decoded text as it streams. Tags may arrive split across feeds
(``<tool_`` then ``call>``), so text that could still become a tag is held back until it
either completes one or cannot. Whitespace that only separates a tag from its neighbours
(the newlines Qwen writes around ``<think>``, ``</think>`` and ``<tool_call>``) is dropped;
whitespace inside content is kept.

Tool calls are buffered whole, until ``</tool_call>``, then emitted as two deltas (id and
name with empty arguments, then the arguments): the JSON must be complete to be checked,
and a call that does not parse is returned to the content stream as the text it was.
"""

from __future__ import annotations

import json
import random
from enum import Enum, auto
from typing import Any

from helexa.engine.text.stops import partial_suffix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


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
    ``seed`` makes the generated call ids reproducible.
    """

    def __init__(
        self,
        *,
        tools: bool,
        thinking: bool,
        starts_in_thinking: bool = False,
        continues_content: bool = False,
        seed: int | None = None,
    ) -> None:
        self.tools = tools
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
                end = buf.find(TOOL_CLOSE)
                if end >= 0:
                    raw, rest = buf[:end], buf[end + len(TOOL_CLOSE) :]
                    call = _parse_tool_call(raw)
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
