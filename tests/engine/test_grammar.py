"""The grammars helexa builds, run by llguidance over the tiny Qwen-shaped tokenizer: what
they let through and what they stop, in the text a model would write, token by token."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from helexa.engine.grammar import (
    ANY_OBJECT,
    Constraint,
    Grammar,
    GrammarError,
    ToolSchema,
    answer_grammar,
    call_grammar,
    grammar_tokenizer,
)
from helexa.engine.text.tokenizer import Tokenizer

EDIT = {
    "type": "object",
    "properties": {
        "path": {"type": "string", "pattern": "^[a-z/]+\\.py$"},
        "line": {"$ref": "#/$defs/line"},
        "mode": {"enum": ["add", "cut"]},
    },
    "required": ["path"],
    "$defs": {"line": {"type": "integer", "minimum": 1}},
}
TOOLS = [ToolSchema("edit", EDIT), ToolSchema("ping", None), ToolSchema('say "hi"', ANY_OBJECT)]


@pytest.fixture(scope="module")
def vocab(tokenizer: Tokenizer) -> Any:
    return grammar_tokenizer(tokenizer.to_json(), tokenizer.vocab_size, tokenizer.eos_token_ids)


def taken(
    tokenizer: Tokenizer, vocab: Any, grammar: Grammar, text: str, *, thinking: bool = False
) -> Constraint:
    """A constraint advanced by ``text``'s tokens, each checked against the mask first."""
    constraint = Constraint(grammar, vocab, lambda tag: tokenizer.encode(tag)[0], thinking=thinking)
    for token in tokenizer.encode(text):
        logits = constraint.mask(torch.zeros(tokenizer.vocab_size))
        if logits[token] == float("-inf"):
            raise AssertionError(f"masked: {tokenizer.decode([token])!r} in {text!r}")
        constraint.advance(token)
    return constraint


def allowed(tokenizer: Tokenizer, vocab: Any, grammar: Grammar, text: str) -> bool:
    try:
        taken(tokenizer, vocab, grammar, text)
    except AssertionError:
        return False
    return True


XML_CALLS = [
    ("<function=edit>\n<parameter=path>\nsrc/a.py\n</parameter>\n</function>\n", True),
    (
        "<function=edit>\n<parameter=path>\na.py\n</parameter>\n<parameter=line>\n7\n"
        "</parameter>\n<parameter=mode>\ncut\n</parameter>\n</function>\n",
        True,
    ),
    ("<function=ping>\n<parameter=q>\ntwo\nlines\n</parameter>\n</function>\n", True),
    ('<function=say "hi">\n</function>\n', True),
    ("<function=edit>\n<parameter=path>\nA.PY\n</parameter>\n</function>\n", False),  # pattern
    ("<function=edit>\n<parameter=line>\n7\n</parameter>\n</function>\n", False),  # no path
    ("<function=edit>\n<parameter=path>\na.py\n</parameter>\n<parameter=line>\n0\n", False),
    ("<function=edit>\n<parameter=path>\na.py\n</parameter>\n<parameter=mode>\nx", False),
    ("<function=nope>\n", False),
]


@pytest.mark.parametrize(("text", "valid"), XML_CALLS)
def test_an_xml_call_is_held_to_its_tools_schema(
    tokenizer: Tokenizer, vocab: Any, text: str, valid: bool
) -> None:
    grammar = call_grammar(TOOLS, "xml")
    assert allowed(tokenizer, vocab, grammar, text + "</tool_call>") is valid


JSON_CALLS = [
    ('{"name": "edit", "arguments": {"path": "a/b.py", "line": 3}}\n', True),
    ('{"name": "ping", "arguments": {"anything": [1, {"at": null}]}}\n', True),
    ('{"name": "say \\"hi\\"", "arguments": {}}\n', True),
    ('{"name": "edit", "arguments": {"line": 3}}', False),
    ('{"name": "edit", "arguments": {"path": "a.py", "line": "3"', False),
    ('{"name": "ping", "arguments": []', False),
    ('{"name": "pong"', False),
]


@pytest.mark.parametrize(("text", "valid"), JSON_CALLS)
def test_a_json_call_is_held_to_its_tools_schema(
    tokenizer: Tokenizer, vocab: Any, text: str, valid: bool
) -> None:
    grammar = call_grammar(TOOLS, "json")
    assert allowed(tokenizer, vocab, grammar, text + "</tool_call>") is valid


def test_a_forced_call_closes_itself_once_only_its_end_is_left(
    tokenizer: Tokenizer, vocab: Any
) -> None:
    """A named call: once the arguments are complete, the closing text is forced, so it is
    the constraint's ``rest`` (written unsampled) and the constraint is closed."""
    grammar = call_grammar([ToolSchema("edit", EDIT)], "json", named=True)
    constraint = taken(tokenizer, vocab, grammar, '{"path": "a.py", "line": 2, "mode": "add"')
    assert not constraint.closed
    constraint.advance(tokenizer.encode("}")[0])
    assert constraint.closed and tokenizer.decode(constraint.rest) == "}\n</tool_call>"


def test_a_triggered_grammar_holds_only_the_calls(tokenizer: Tokenizer, vocab: Any) -> None:
    """Strict tools amid free text: anything until ``<tool_call>``, then a valid call,
    then anything again, and the next call is held again."""
    grammar = call_grammar(TOOLS, "json", triggered=True)
    call = '<tool_call>\n{"name": "edit", "arguments": {"path": "x.py"}}\n</tool_call>'
    constraint = taken(tokenizer, vocab, grammar, f"Sure! {{not json}} {call} done. {call}")
    assert not constraint.active and not constraint.closed
    bad = '<tool_call>\n{"name": "edit", "arguments": {"path": 1}}'
    assert not allowed(tokenizer, vocab, grammar, f"ok {call} then {bad}")
    # In reasoning a <tool_call> is the reasoning's text (the parser reads no call there).
    musing = f"<think>maybe {bad}?</think>"
    assert not taken(tokenizer, vocab, grammar, musing).active
    assert not taken(tokenizer, vocab, grammar, f"maybe {bad}?</think>", thinking=True).active
    assert not allowed(tokenizer, vocab, grammar, f"{musing} {bad}")


def test_an_answer_is_one_value_of_its_schema(tokenizer: Tokenizer, vocab: Any) -> None:
    grammar = answer_grammar({"type": "array", "items": {"type": "integer"}, "maxItems": 2}, "x")
    assert taken(tokenizer, vocab, grammar, "[1, 2]").closed
    assert not allowed(tokenizer, vocab, grammar, "[1, 2, 3")
    assert not allowed(tokenizer, vocab, grammar, '{"a"')
    blank = " " * 33  # a model cannot stall in valid whitespace
    assert not allowed(tokenizer, vocab, grammar, f"[{blank}1]")


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"type": "object", "properties": {"a": {"not": {}}}}, 'Unimplemented keys: ["not"]'),
        ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum (5) is greater than maximum"),
        ({"$ref": "#/$defs/missing"}, "does not exist"),
        ({"type": "frob"}, "Invalid type: frob"),
    ],
)
def test_a_schema_llguidance_cannot_enforce_is_refused_naming_why(
    schema: dict[str, Any], why: str
) -> None:
    with pytest.raises(GrammarError, match="the answer's schema cannot be enforced") as err:
        answer_grammar(schema, "the answer's schema")
    assert why in str(err.value)


def test_a_lenient_tool_schema_drops_only_what_llguidance_does_not_implement() -> None:
    unimplemented = {"type": "object", "properties": {"a": {"not": {}}}}
    call_grammar([ToolSchema("t", unimplemented, lenient=True)], "json")
    with pytest.raises(GrammarError, match="'t'.*Unimplemented keys"):
        call_grammar([ToolSchema("t", unimplemented)], "json")
    with pytest.raises(GrammarError, match="Invalid type: frob"):
        call_grammar([ToolSchema("t", {"type": "frob"}, lenient=True)], "xml")


def test_a_tokenizer_without_the_tool_call_token_is_a_400_not_a_crash(
    tokenizer: Tokenizer,
) -> None:
    """A grammar that passed the request's checks can still need a token this model's
    tokenizer lacks: the request is refused in words, as a client's error."""
    from helexa.engine.generate import LoadedModel
    from helexa.engine.request import RequestError

    eos = frozenset(tokenizer.eos_token_ids)
    model = LoadedModel(model=None, tokenizer=tokenizer, eos_token_ids=eos)  # type: ignore[arg-type]
    grammar = call_grammar(TOOLS, "json", triggered=True)
    assert grammar.trigger == "<tool_call>"
    with pytest.raises(RequestError, match="no <tool_call_x> token") as refused:
        model.constraint(Grammar(grammar.lark, trigger="<tool_call_x>"))
    assert refused.value.code == "invalid_schema"
    assert model.constraint(grammar).active is False  # the real trigger still works
