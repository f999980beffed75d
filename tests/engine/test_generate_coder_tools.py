"""A model whose chat template is Qwen3-Coder's writes XML tool calls; the generation loop
turns them into OpenAI tool_calls (arguments typed by the tools' schemas) and the Anthropic
stream into tool_use blocks, tool_choice forcing included. Driven by a scripted model."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from helexa.engine.generate import LoadedModel
from helexa.engine.text.chat_template import QWEN3_CODER_TEMPLATE
from helexa.engine.text.tokenizer import Tokenizer
from helexa.wire.anthropic.stream import AnthropicStreamTranslator
from tests.engine.test_generate_options import calls
from tests.engine.test_generate_scripted import chat, finish, joined, scripted

EDIT_TOOL = {
    "type": "function",
    "function": {
        "name": "edit",
        "description": "Replace lines of a file",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "line": {"type": "integer"},
                "dry_run": {"type": "boolean"},
                "text": {"type": "string"},
            },
            "required": ["path", "line", "text"],
        },
    },
}
CALL = (
    "Editing now.\n<tool_call>\n<function=edit>\n<parameter=path>\nsrc/a.py\n</parameter>\n"
    "<parameter=line>\n12\n</parameter>\n<parameter=dry_run>\nfalse\n</parameter>\n"
    "<parameter=text>\n    return 1\n</parameter>\n</function>\n</tool_call>"
)
ARGUMENTS = {"path": "src/a.py", "line": 12, "dry_run": False, "text": "    return 1"}


def coder(tokenizer: Tokenizer, text: str) -> LoadedModel:
    # Qwen3-Coder's tool prompt is long, in the tiny tokenizer's short tokens.
    model = scripted(tokenizer, text, max_seq=4096)
    return dataclasses.replace(model, chat_template=QWEN3_CODER_TEMPLATE)


def test_xml_calls_become_typed_openai_tool_calls(tokenizer: Tokenizer) -> None:
    model = coder(tokenizer, CALL)
    prompt = model.render({"messages": [{"role": "user", "content": "hi"}], "tools": [EDIT_TOOL]})
    assert "<function>\n<name>edit</name>" in prompt  # the tools, in Qwen3-Coder's format
    chunks = chat(model, tools=[EDIT_TOOL])
    assert calls(chunks) == [("edit", ARGUMENTS)]
    assert joined(chunks, "content") == "Editing now."
    assert finish(chunks)["finish_reason"] == "tool_calls"


def test_xml_calls_become_anthropic_tool_use(tokenizer: Tokenizer) -> None:
    chunks = chat(coder(tokenizer, CALL), tools=[EDIT_TOOL])
    translator = AnthropicStreamTranslator("coder")
    events = [e for c in chunks for e in translator.feed(c)] + translator.finish()
    blocks: list[dict[str, Any]] = []
    for name, payload in events:
        if name == "content_block_start":
            blocks.append({**payload["content_block"], "json": ""})
        elif name == "content_block_delta" and payload["delta"]["type"] == "input_json_delta":
            blocks[payload["index"]]["json"] += payload["delta"]["partial_json"]
    assert [b["type"] for b in blocks] == ["text", "tool_use"]
    assert blocks[1]["name"] == "edit" and json.loads(blocks[1]["json"]) == ARGUMENTS
    (stop,) = [p for n, p in events if n == "message_delta"]
    assert stop["delta"]["stop_reason"] == "tool_use"


def test_a_named_tool_choice_forces_the_xml_call(tokenizer: Tokenizer) -> None:
    # The prompt ends in '<tool_call>\n<function=edit>\n': the model writes the parameters.
    rest = CALL.split("<function=edit>\n", 1)[1] + "\nand more text"
    model = coder(tokenizer, rest)
    choice = {"type": "function", "function": {"name": "edit"}}
    request = {"messages": [{"role": "user", "content": "hi"}], "tools": [EDIT_TOOL]}
    assert model.render({**request, "tool_choice": choice}).endswith(
        "<|im_start|>assistant\n<tool_call>\n<function=edit>\n"
    )
    chunks = chat(model, tools=[EDIT_TOOL], tool_choice=choice)
    assert calls(chunks) == [("edit", ARGUMENTS)]
    assert finish(chunks)["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] < len(model.model.script)


def test_required_tool_choice_opens_an_xml_call(tokenizer: Tokenizer) -> None:
    model = coder(tokenizer, CALL.split("<tool_call>\n", 1)[1])
    chunks = chat(model, tools=[EDIT_TOOL], tool_choice="required")
    assert calls(chunks) == [("edit", ARGUMENTS)]
