"""Decoding under a grammar: an answer that is JSON of a given schema, or tool calls in the
model's own call syntax with each tool's arguments per its parameters schema.

The grammars are llguidance's Lark dialect, where ``%json {schema}`` is a JSON Schema and
``<tool_call>`` names a special token. :class:`Grammar` is the text, built and checked from
the request alone (a schema llguidance refuses is a :class:`GrammarError` before any device
work); :class:`Constraint` runs one over one generation: before each sample it sets the
logits of every token the grammar forbids next to -inf (the mask is computed on the CPU by
llguidance's matcher and applied on the logits' device), so the model's own preferences
decide among what is valid; after it, the token advances the matcher.

Two shapes. A grammar that covers the whole output (a JSON answer; a forced call, which the
prompt has already opened) ends the generation once it is complete, and what is left when
every remaining token is forced (a call's closing ``}`` and ``</tool_call>``) is written
without sampling (:attr:`Constraint.rest`). A grammar with a ``trigger`` (calls to
``strict`` tools amid free text) is off until the model writes that token, then holds for
one call and is off again; a trigger inside ``<think>`` reasoning is the reasoning's text
(the output parser reads no call there either).

Whitespace outside strings is bounded (:data:`WHITESPACE`), so a model cannot stall in
blank space that is valid JSON forever.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import llguidance
import torch

from helexa.engine.text.parsers import (
    FUNCTION_CLOSE,
    FUNCTION_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CLOSE,
    TOOL_OPEN,
    ToolFormat,
)

# JSON's whitespace, at most 32 bytes in a row (llguidance's default is unbounded).
WHITESPACE = r"[\x20\x0A\x0D\x09]{0,32}"
ANY_OBJECT: dict[str, Any] = {"type": "object"}
_SCHEMA_DEFS = ("$defs", "definitions")
_UNESCAPED_SLASH = re.compile(r"(?<!\\)/")  # Lark's regex delimiter


class GrammarError(ValueError):
    """A schema the grammar engine cannot enforce: unknown or unimplemented keywords, a
    ``$ref`` to nowhere, an unsatisfiable range. The message names the schema and why."""


@dataclass(frozen=True)
class ToolSchema:
    """A tool a call may name, with the schema its arguments are held to (None: any
    object). ``lenient``: keywords llguidance does not implement are not enforced rather
    than refused (for a tool not marked ``strict``, whose schema nobody promised)."""

    name: str
    parameters: Mapping[str, Any] | None
    lenient: bool = False


@dataclass(frozen=True)
class Grammar:
    """llguidance Lark text, and the token that switches it on (None: the whole output)."""

    lark: str
    trigger: str | None = None


def _options(schema: Mapping[str, Any], *, lenient: bool) -> dict[str, Any]:
    """``schema`` with helexa's compile options (bounded whitespace; leniency)."""
    ours = {"whitespace_pattern": WHITESPACE, "lenient": lenient}
    return {**schema, "x-guidance": {**(schema.get("x-guidance") or {}), **ours}}


def _check(schema: Mapping[str, Any], what: str, *, lenient: bool = False) -> dict[str, Any]:
    """``schema`` ready to embed as ``%json``, or a GrammarError naming ``what``."""
    schema = _options(schema, lenient=lenient)
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(schema)
    except ValueError as exc:
        raise GrammarError(f"{what} cannot be enforced: {exc}") from exc
    error = llguidance.LLMatcher.validate_grammar(text)
    if error:
        raise GrammarError(f"{what} cannot be enforced: {error.strip()}")
    return schema


def _json(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def answer_grammar(schema: Mapping[str, Any], what: str) -> Grammar:
    """The whole output is one JSON value of ``schema`` (``response_format``)."""
    return Grammar(f"start: {_json(_check(schema, what))}\n")


def call_grammar(
    tools: Iterable[ToolSchema],
    syntax: ToolFormat,
    *,
    named: bool = False,
    single: bool = True,
    triggered: bool = False,
) -> Grammar:
    """Tool calls in ``syntax``, each naming one of ``tools`` with arguments per its schema.

    ``named``: the prompt already holds the call's start up to its arguments (one tool,
    tool_choice naming it); otherwise it holds ``<tool_call>\\n`` (tool_choice "required")
    or, ``triggered``, the grammar starts when the model writes ``<tool_call>`` itself (a
    strict tool among free text). ``single``: one call, else more may follow it."""
    tools = list(tools)
    rules: list[str] = []
    heads = []
    for i, tool in enumerate(tools):
        what = f"the parameters schema of tool {tool.name!r}"
        schema = None
        if tool.parameters is not None:
            schema = _check(tool.parameters, what, lenient=tool.lenient)
        if syntax == "xml":
            head = f"{FUNCTION_OPEN}{tool.name}>\n"
            body = _xml_arguments(f"a{i}", schema, rules, lenient=tool.lenient)
            close = f"{FUNCTION_CLOSE}\n"
        else:
            head = f'{{"name": {json.dumps(tool.name, ensure_ascii=False)}, "arguments": '
            body, close = _json(schema or _options(ANY_OBJECT, lenient=False)), "}\n"
        rules.append(f"call{i}: {body} {_lit(close)} {TOOL_CLOSE}")
        heads.append(f"{_lit(head)} call{i}")
    if named:
        (call,) = [f"call{i}" for i in range(len(tools))]
    else:
        call = "call"
        rules.append("call: " + " | ".join(heads))
    if triggered:
        start = f'start: "\\n" {call}'
    elif single:
        start = f"start: {call}"
    else:  # parallel calls: each after the last, as the chat template writes them
        start = f'start: {call} ("\\n" {TOOL_OPEN} "\\n" {call})*'
    lark = "\n".join([start, *rules, "TEXT: /(.|\\n)*/", ""])
    error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(lark))
    if error:  # each schema passed alone: this is the calls' own part (an XML value's pattern)
        raise GrammarError(f"the tool-call grammar cannot be built: {error.strip()}")
    return Grammar(lark, TOOL_OPEN if triggered else None)


def _xml_arguments(
    rule: str, schema: Mapping[str, Any] | None, rules: list[str], *, lenient: bool
) -> str:
    """Qwen3-Coder's ``<parameter=P>\nvalue\n</parameter>\n`` blocks for ``schema``: its
    properties in its order, the required ones present; a string value is raw text
    (:func:`_xml_text`), any other ``%json`` of the property's schema (with the root's
    ``$defs``, which its ``$ref``s point into). A schema without properties: any names."""
    props = (schema or {}).get("properties")
    end = _lit(f"\n{PARAMETER_CLOSE}\n")
    if not isinstance(props, Mapping) or not props:
        rules.append(f'{rule}_any: {_lit(PARAMETER_OPEN)} /[^<>\\n]+/ ">\\n" {rule}_text')
        rules.append(f"{rule}_text[lazy]: TEXT {end}")
        return f"{rule}_any*"
    required = set((schema or {}).get("required") or [])
    defs = {k: schema[k] for k in _SCHEMA_DEFS if schema is not None and k in schema}
    parts = []
    for j, (name, sub) in enumerate(props.items()):
        value = f"{rule}_{j}"
        open_ = _lit(f"{PARAMETER_OPEN}{name}>\n")
        if _is_text(sub):
            rules.append(_xml_text(value, sub, end))
        else:
            sub = _options({**sub, **defs}, lenient=lenient)
            rules.append(f"{value}: {_json(sub)} {end}")
        parts.append(f"({open_} {value})" + ("" if name in required else "?"))
    return " ".join(parts)


def _xml_text(rule: str, schema: Any, end: str) -> str:
    """A raw-text value up to ``end``: one of a string ``enum``, else its ``pattern``, else
    any text of ``minLength``..``maxLength`` characters."""
    schema = schema if isinstance(schema, Mapping) else {}
    choices = schema.get("enum")
    if isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
        return f"{rule}: ({' | '.join(_lit(c) for c in choices)}) {end}"
    pattern = schema.get("pattern")
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if isinstance(pattern, str):  # anchored, as llguidance holds JSON strings to theirs
        regex = _UNESCAPED_SLASH.sub(r"\/", pattern.removeprefix("^").removesuffix("$"))
    elif low or high is not None:
        regex = f"(.|\\n){{{low},{'' if high is None else high}}}"
    else:
        regex = "(.|\\n)*"
    terminal = rule.upper()
    return f"{rule}[lazy]: {terminal} {end}\n{terminal}: /{regex}/"


def _is_text(schema: Any) -> bool:
    """A parameter Qwen3-Coder writes as raw text: a string (or untyped) one."""
    kind = schema.get("type") if isinstance(schema, Mapping) else None
    kinds = [kind] if isinstance(kind, str) else list(kind or [])
    return not kinds or "string" in kinds


def grammar_tokenizer(tokenizer_json: str, vocab_size: int, eos: Iterable[int]) -> Any:
    """The llguidance view of a model's tokenizer (``llguidance.LLTokenizer``): built once
    per model, as it indexes the whole vocabulary (about a second for Qwen3's 151k)."""
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=sorted(eos))


class Constraint:
    """One generation decoded under ``grammar`` (see the module doc): :meth:`mask` before
    each sample, :meth:`advance` after it. ``token_id`` gives the id of a special token
    (the trigger, the thinking tags); ``thinking``: the prompt opened ``<think>``."""

    def __init__(
        self,
        grammar: Grammar,
        tokenizer: Any,
        token_id: Callable[[str], int | None],
        *,
        thinking: bool = False,
    ) -> None:
        self._matcher = llguidance.LLMatcher(tokenizer, grammar.lark, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())
        self._vocab: int = tokenizer.vocab_size
        self._bits = torch.zeros((self._vocab + 31) // 32, dtype=torch.int32)
        self._shifts: torch.Tensor | None = None
        trigger = None if grammar.trigger is None else token_id(grammar.trigger)
        if grammar.trigger is not None and trigger is None:
            raise GrammarError(
                f"this model's tokenizer has no {grammar.trigger} token, so its tool calls"
                " cannot be enforced"
            )
        self._trigger = trigger
        think = (token_id(THINK_OPEN), token_id(THINK_CLOSE))
        # Without both tags as tokens the model cannot think: nothing to step around.
        self._think: tuple[int, int] | None = None
        if trigger is not None and think[0] is not None and think[1] is not None:
            self._think = (think[0], think[1])
        self._thinking = thinking
        self.active = trigger is None
        self.closed = False  # nothing more may be generated
        self.rest: list[int] = []  # forced tokens that end the grammar, written unsampled
        if self.active:
            self._close_if_forced()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [vocab], -inf where the grammar forbids the token (a new tensor when
        it masks, as the model's output may be an inference tensor, which only inference
        mode may write; ``logits`` itself while the grammar is not yet active)."""
        if not self.active:
            return logits
        bits = self._bits
        self._matcher.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
        if self._matcher.is_error():
            raise RuntimeError(f"grammar: {self._matcher.get_error()}")
        if self._shifts is None or self._shifts.device != logits.device:
            self._shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        vocab = logits.shape[-1]
        words = bits.to(logits.device)  # [vocab/32] int32, bit t%32 of word t//32: t allowed
        allowed = ((words[:, None] >> self._shifts) & 1).view(-1)  # [32 * words]
        if allowed.shape[0] < vocab:  # ids past the tokenizer's (a padded vocab): never
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[0]))
        return logits.masked_fill(allowed[:vocab] == 0, float("-inf"))

    def advance(self, token: int) -> None:
        if not self.active:
            if self._think is not None and token in self._think:
                self._thinking = token == self._think[0]
            self.active = token == self._trigger and not self._thinking
            return
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"grammar: {self._matcher.get_error()}")
        if self._trigger is not None:
            if self._matcher.is_stopped():  # the call is complete: free text again
                self._matcher.reset()
                self.active = False
        elif self._matcher.is_stopped():
            self.closed = True
        else:
            self._close_if_forced()

    def _close_if_forced(self) -> None:
        """Closed, with :attr:`rest`, when all that may follow is forced to the end."""
        forced = self._matcher.compute_ff_tokens()
        if forced:
            probe = self._matcher.deep_copy()
            if probe.consume_tokens(forced) and probe.is_stopped():
                self.rest, self.closed = forced, True
