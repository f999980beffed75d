"""OutputParser: reasoning, content and tool calls (Qwen3 JSON, Qwen3-Coder XML) from
streamed text, however the text is split into chunks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from openai.types.chat.chat_completion_chunk import ChoiceDelta

from helexa.engine.text.chat_template import QWEN3_CODER_TEMPLATE, QWEN3_TEMPLATE
from helexa.engine.text.parsers import OutputParser, ToolSyntax, tool_format


@dataclass
class Parsed:
    """The deltas of one generation, accumulated the way an OpenAI client does."""

    content: str = ""
    reasoning: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, delta: dict[str, Any]) -> None:
        ChoiceDelta.model_validate(delta)  # every delta is a valid OpenAI delta
        assert len(delta) == 1, delta
        self.content += delta.get("content", "")
        self.reasoning += delta.get("reasoning_content", "")
        for tc in delta.get("tool_calls", []):
            if tc["index"] == len(self.calls):
                assert tc["id"].startswith("call_") and tc["type"] == "function"
                assert tc["function"]["arguments"] == ""
                self.calls.append({"id": tc["id"], "name": tc["function"]["name"], "arguments": ""})
            else:
                assert "id" not in tc and "name" not in tc["function"]
                self.calls[tc["index"]]["arguments"] += tc["function"]["arguments"]

    def summary(self) -> tuple[str, str, list[tuple[str, Any]]]:
        calls = [(c["name"], json.loads(c["arguments"])) for c in self.calls]
        return self.reasoning, self.content, calls


def parse(chunks: list[str], **options: Any) -> Parsed:
    options = {"tools": True, "thinking": True, **options}
    parser = OutputParser(**options)
    parsed = Parsed()
    for chunk in chunks:
        for delta in parser.feed(chunk):
            parsed.add(delta)
    for delta in parser.finish():
        parsed.add(delta)
    assert parser.tool_calls == len(parsed.calls)
    return parsed


# (text, options, expected (reasoning, content, [(name, arguments)]))
CASES: list[tuple[str, dict[str, Any], tuple[str, str, list[tuple[str, Any]]]]] = [
    ("Just an answer.", {}, ("", "Just an answer.", [])),
    (
        "<think>\nweigh the options\n</think>\n\nThe answer.",
        {},
        ("weigh the options", "The answer.", []),
    ),
    ("\n<think>a\n\nb</think>c", {}, ("a\n\nb", "c", [])),
    (
        "reasoning so far</think>\n\nanswer",
        {"starts_in_thinking": True},
        ("reasoning so far", "answer", []),
    ),
    ("<think>x</think>y", {"thinking": False}, ("", "<think>x</think>y", [])),
    ("answer <think>not reasoning</think>", {}, ("", "answer <think>not reasoning</think>", [])),
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        {},
        ("", "", [("get_weather", {"city": "Paris"})]),
    ),
    (
        "<think>\nneed two calls\n</think>\n\nChecking.\n"
        '<tool_call>\n{"name": "a", "arguments": {"x": [1, 2], "s": "é<tool_call>"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": "{\\"y\\": true}"}\n</tool_call>',
        {},
        (
            "need two calls",
            "Checking.",
            [("a", {"x": [1, 2], "s": "é<tool_call>"}), ("b", {"y": True})],
        ),
    ),
    (
        '<tool_call>{"name": "noargs"}</tool_call><tool_call>{"name": "p", "parameters": {"k": 1}}</tool_call>',
        {},
        ("", "", [("noargs", {}), ("p", {"k": 1})]),
    ),
    (
        '<tool_call>\n{"name": "x", "arguments": {}}\n</tool_call>',
        {"tools": False},
        ("", '<tool_call>\n{"name": "x", "arguments": {}}\n</tool_call>', []),
    ),
    (
        "<tool_call>{not json}</tool_call> tail",
        {},
        ("", "<tool_call>{not json}</tool_call> tail", []),
    ),
    (
        "a <tool_call>[]</tool_call>\n<tool_call>{}</tool_call>",
        {},
        ("", "a <tool_call>[]</tool_call>\n<tool_call>{}</tool_call>", []),
    ),
    (
        '<tool_call>{"arguments": {}}</tool_call>',
        {},
        ("", '<tool_call>{"arguments": {}}</tool_call>', []),
    ),
    (
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        {},
        ("", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', []),
    ),
    (
        'before <tool_call>{"name": "f", "argu',
        {},
        ("", 'before <tool_call>{"name": "f", "argu', []),
    ),
    ("<think>\nnever closed\n", {}, ("never closed", "", [])),
    ("<thi", {}, ("", "<thi", [])),
    ("text ends with <tool_", {}, ("", "text ends with <tool_", [])),
    ("keeps  inner\n\nwhitespace \n", {}, ("", "keeps  inner\n\nwhitespace \n", [])),
    ("   ", {}, ("", "", [])),
]


@pytest.mark.parametrize(("text", "options", "expected"), CASES)
def test_whole_text(text: str, options: dict[str, Any], expected: tuple) -> None:
    assert parse([text], **options).summary() == expected


@pytest.mark.parametrize(("text", "options", "expected"), CASES)
def test_every_split_point(text: str, options: dict[str, Any], expected: tuple) -> None:
    for i in range(len(text) + 1):
        assert parse([text[:i], text[i:]], **options).summary() == expected, i


@pytest.mark.parametrize(("text", "options", "expected"), CASES)
def test_character_by_character(text: str, options: dict[str, Any], expected: tuple) -> None:
    assert parse(list(text), **options).summary() == expected


def test_content_streams_before_the_end() -> None:
    """Held-back text is only what could still be a tag or droppable whitespace."""
    parser = OutputParser(tools=True, thinking=True)
    assert parser.feed("<think>\nstep one") == [{"reasoning_content": "step one"}]
    assert parser.feed("\n</th") == []
    assert parser.feed("ink>\n\nHello <tool") == [{"content": "Hello"}]
    assert parser.feed("box> there") == [{"content": " <toolbox> there"}]


def test_tool_call_deltas_shape_and_ids() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"q": "日本"}}</tool_call>' * 3
    parser = OutputParser(tools=True, thinking=False, seed=7)
    deltas = parser.feed(text) + parser.finish()
    assert [len(d["tool_calls"]) for d in deltas] == [1] * 6
    starts = [d["tool_calls"][0] for d in deltas[::2]]
    assert [s["index"] for s in starts] == [0, 1, 2]
    assert len({s["id"] for s in starts}) == 3
    assert deltas[1]["tool_calls"][0]["function"]["arguments"] == '{"q": "日本"}'  # not \u-escaped
    again = OutputParser(tools=True, thinking=False, seed=7)
    assert [d["tool_calls"][0]["id"] for d in (again.feed(text) + again.finish())[::2]] == [
        s["id"] for s in starts
    ]


# -- Qwen3-Coder's XML calls ---------------------------------------------------------------

CODER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "ratio": {"type": "number"},
                    "opts": {"type": "object"},
                    "tags": {"type": "array"},
                    "note": {"type": ["string", "null"]},
                    "limit": {"type": ["integer", "null"]},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object"}}},
]
XML = ToolSyntax.for_request(QWEN3_CODER_TEMPLATE, CODER_TOOLS)


def xml_call(name: str, *params: tuple[str, str]) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


CODE = 'def f():\n    return "</tool_call>"  # <parameter=x> is just text\n'
XML_CASES: list[tuple[str, dict[str, Any], tuple[str, str, list[tuple[str, Any]]]]] = [
    (
        xml_call("get_weather", ("city", "Paris"), ("days", "3")),
        {},
        ("", "", [("get_weather", {"city": "Paris", "days": 3})]),
    ),
    (  # every schema type, values typed; a string stays a string even if it looks numeric
        "I'll check.\n\n"
        + xml_call(
            "get_weather",
            ("city", "123"),
            ("metric", "true"),
            ("ratio", "0.5"),
            ("opts", '{"a": [1, 2]}'),
            ("tags", '["x", "y"]'),
            ("note", "null"),
            ("limit", "null"),
            ("days", "three"),  # not an integer: kept as written
            ("extra", "42"),  # not in the schema: a string
        ),
        {},
        (
            "",
            "I'll check.",
            [
                (
                    "get_weather",
                    {
                        "city": "123",
                        "metric": True,
                        "ratio": 0.5,
                        "opts": {"a": [1, 2]},
                        "tags": ["x", "y"],
                        "note": None,
                        "limit": None,
                        "days": "three",
                        "extra": "42",
                    },
                )
            ],
        ),
    ),
    (  # values are raw text: tags inside them, newlines, a </tool_call> in code
        "<think>\nwrite it\n</think>\n\n"
        + xml_call("write_file", ("path", "a.py"), ("content", CODE))
        + "\n"
        + xml_call("get_weather", ("city", "Oslo"), ("metric", "False"))
        + xml_call("unknown_fn", ("n", "1")),
        {},
        (
            "write it",
            "",
            [
                ("write_file", {"path": "a.py", "content": CODE}),
                ("get_weather", {"city": "Oslo", "metric": False}),
                ("unknown_fn", {"n": "1"}),
            ],
        ),
    ),
    ("<tool_call>\n<function=noop>\n</function>\n</tool_call>", {}, ("", "", [("noop", {})])),
    # Not calls: returned to the content as written.
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',
        {},
        ("", '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>', []),
    ),
    (
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</tool_call> after",
        {},
        ("", "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</tool_call> after", []),
    ),
    (
        xml_call("f", ("a", "1"), ("a", "2")),
        {},
        ("", xml_call("f", ("a", "1"), ("a", "2")), []),
    ),
    (
        "<tool_call>\n<function=>\n</function>\n</tool_call>",
        {},
        ("", "<tool_call>\n<function=>\n</function>\n</tool_call>", []),
    ),
    (
        "<tool_call>\n<function=f>\nstray text\n</function>\n</tool_call>",
        {},
        ("", "<tool_call>\n<function=f>\nstray text\n</function>\n</tool_call>", []),
    ),
    (
        xml_call("get_weather", ("city", "Paris")),
        {"tools": False},
        ("", xml_call("get_weather", ("city", "Paris")), []),
    ),
    (  # unterminated, inside a value: content at the end
        "see <tool_call>\n<function=f>\n<parameter=a>\nhalf",
        {},
        ("", "see <tool_call>\n<function=f>\n<parameter=a>\nhalf", []),
    ),
]


def parse_xml(chunks: list[str], **options: Any) -> Parsed:
    return parse(chunks, **{"tools": XML, **options})


@pytest.mark.parametrize(("text", "options", "expected"), XML_CASES)
def test_xml_whole_text(text: str, options: dict[str, Any], expected: tuple) -> None:
    assert parse_xml([text], **options).summary() == expected


@pytest.mark.parametrize(("text", "options", "expected"), XML_CASES)
def test_xml_every_split_point(text: str, options: dict[str, Any], expected: tuple) -> None:
    for i in range(len(text) + 1):
        assert parse_xml([text[:i], text[i:]], **options).summary() == expected, i


@pytest.mark.parametrize(("text", "options", "expected"), XML_CASES)
def test_xml_character_by_character(text: str, options: dict[str, Any], expected: tuple) -> None:
    assert parse_xml(list(text), **options).summary() == expected


@pytest.mark.parametrize(("text", "options", "expected"), XML_CASES)
def test_xml_byte_by_byte(text: str, options: dict[str, Any], expected: tuple) -> None:
    """As a stream decoder hands text over: whole characters, at any byte boundary."""
    data = text.encode()
    pieces, held = [], b""
    for byte in data:
        held += bytes([byte])
        try:
            pieces.append(held.decode())
        except UnicodeDecodeError:
            continue
        held = b""
    assert "".join(pieces) == text
    assert parse_xml(pieces, **options).summary() == expected


def test_the_template_decides_the_syntax() -> None:
    assert tool_format(QWEN3_CODER_TEMPLATE) == "xml"
    assert tool_format(QWEN3_TEMPLATE) == "json"
    assert ToolSyntax.for_request(QWEN3_TEMPLATE, CODER_TOOLS).format == "json"
    assert XML.parameters["write_file"] == {}  # a schema without properties: all strings
    assert XML.parameters["get_weather"]["days"] == {"type": "integer"}


def test_a_json_call_in_a_json_model_is_not_read_as_xml() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert parse([text], tools=ToolSyntax("json")).summary() == ("", "", [("f", {"a": 1})])
