"""render_chat against transformers' apply_chat_template, the Qwen3 format of our template,
message normalisation, and the jinja environment (filters, globals, sandbox)."""

from __future__ import annotations

import copy
import json
from typing import Any

import jinja2
import pytest
from tokenizers import Tokenizer as RustTokenizer
from transformers import PreTrainedTokenizerFast

from helexa.engine.text.chat_template import (
    QWEN3_CODER_TEMPLATE,
    QWEN3_TEMPLATE,
    normalize_messages,
    render_chat,
)
from tests.engine.tiny_tokenizer import make_tiny_tokenizer_json

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city — <b>live</b> & accurate",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "名前 of the city"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A tool call as OpenAI clients send it back: arguments as a json.dumps string."""
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "user only": ([{"role": "user", "content": "Hello"}], None),
    "system and user": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        None,
    ),
    "multi-turn with think in content": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
            {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "<think>\nagain\n</think>\n\n6"},
        ],
        None,
    ),
    "reasoning_content in history": (
        [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "one", "reasoning_content": "old thoughts"},
            {"role": "user", "content": "second"},
        ],
        None,
    ),
    "tools listed with a system prompt": (
        [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather?"}],
        [WEATHER, TIME],
    ),
    "tool call round trip": (
        [
            {"role": "user", "content": "Weather in Paris and the time?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "I need both tools.",
                "tool_calls": [
                    call("call_1", "get_weather", {"city": "Paris"}),
                    call("call_2", "get_time", {}),
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
            {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
            {
                "role": "assistant",
                "content": "Sunny, 21°C at noon.",
                "reasoning_content": "Summarise.",
            },
            {"role": "user", "content": "Thanks! And Zürich?"},
        ],
        [WEATHER, TIME],
    ),
    "in the middle of a tool loop": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [call("call_1", "get_weather", {"city": "Paris"})],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        [WEATHER],
    ),
    "system message later in the chat": (
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "Now answer in French."},
            {"role": "user", "content": "bye"},
        ],
        None,
    ),
}


@pytest.fixture(scope="module")
def reference() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=RustTokenizer.from_str(make_tiny_tokenizer_json()),
        chat_template=QWEN3_TEMPLATE,
    )


@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_matches_transformers(
    reference: PreTrainedTokenizerFast, name: str, enable_thinking: bool | None
) -> None:
    messages, tools = CONVERSATIONS[name]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected = reference.apply_chat_template(
        copy.deepcopy(messages),
        tools=tools,
        tokenize=False,
        add_generation_prompt=True,
        **kwargs,
    )
    ours = render_chat(QWEN3_TEMPLATE, messages, tools=tools, enable_thinking=enable_thinking)
    assert ours == expected


def test_render_without_generation_prompt_matches_transformers(
    reference: PreTrainedTokenizerFast,
) -> None:
    messages, tools = CONVERSATIONS["tool call round trip"]
    expected = reference.apply_chat_template(
        copy.deepcopy(messages), tools=tools, tokenize=False, add_generation_prompt=False
    )
    assert (
        render_chat(QWEN3_TEMPLATE, messages, tools=tools, add_generation_prompt=False) == expected
    )


@pytest.mark.parametrize("prefill", ["Hello! I am", "  spaced out  ", "line\n"])
def test_continue_final_message_matches_transformers(
    reference: PreTrainedTokenizerFast, prefill: str
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": prefill},
    ]
    expected = reference.apply_chat_template(
        copy.deepcopy(messages), tokenize=False, continue_final_message=True
    )
    ours = render_chat(
        QWEN3_TEMPLATE, messages, add_generation_prompt=False, continue_final_message=True
    )
    assert ours == expected
    assert ours.rstrip().endswith(prefill.strip())
    assert "<|im_end|>" not in ours.split("<|im_start|>assistant")[-1]


def test_continue_final_message_needs_text_and_no_generation_prompt() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]
    with pytest.raises(ValueError, match="final message with text"):
        render_chat(
            QWEN3_TEMPLATE, messages, add_generation_prompt=False, continue_final_message=True
        )
    with pytest.raises(ValueError, match="exclude each other"):
        render_chat(QWEN3_TEMPLATE, messages, continue_final_message=True)


def test_developer_role_renders_as_system() -> None:
    as_developer = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    as_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = render_chat(QWEN3_TEMPLATE, as_developer)
    assert rendered == render_chat(QWEN3_TEMPLATE, as_system)
    assert "Be brief." in rendered


# -- the Qwen3 format, spelled out --------------------------------------------------------------


def test_qwen3_turns_and_generation_prompt() -> None:
    text = render_chat(
        QWEN3_TEMPLATE,
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        enable_thinking=False,
    )
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    thinking = render_chat(QWEN3_TEMPLATE, [{"role": "user", "content": "U"}])
    assert thinking.endswith("<|im_start|>assistant\n")


def test_qwen3_tools_calls_and_responses() -> None:
    messages, tools = CONVERSATIONS["in the middle of a tool loop"]
    text = render_chat(QWEN3_TEMPLATE, messages, tools=tools)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n# Tools\n")
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in system
    assert (
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        in system
    )
    assert (
        "<|im_start|>assistant\nLet me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    ) in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n" in text


def test_qwen3_keeps_reasoning_only_after_the_last_query() -> None:
    messages, tools = CONVERSATIONS["tool call round trip"]
    text = render_chat(QWEN3_TEMPLATE, messages, tools=tools)
    assert "I need both tools." not in text  # before the last user query: dropped
    in_loop = render_chat(QWEN3_TEMPLATE, messages[:-1], tools=tools)
    assert "<think>\nI need both tools.\n</think>\n\n" in in_loop
    assert "<think>\nSummarise.\n</think>\n\nSunny" in in_loop


# -- normalisation ------------------------------------------------------------------------------


def test_text_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    as_parts = render_chat(QWEN3_TEMPLATE, [{"role": "user", "content": parts}])
    as_text = render_chat(QWEN3_TEMPLATE, [{"role": "user", "content": "first\nsecond"}])
    assert as_parts == as_text


def test_null_content_and_null_fields() -> None:
    messages, tools = CONVERSATIONS["in the middle of a tool loop"]
    nulled = copy.deepcopy(messages)
    nulled[1]["content"] = None
    nulled[0]["name"] = None
    empty = copy.deepcopy(messages)
    empty[1]["content"] = ""
    assert render_chat(QWEN3_TEMPLATE, nulled, tools=tools) == render_chat(
        QWEN3_TEMPLATE, empty, tools=tools
    )
    assert "name" not in normalize_messages(nulled)[0]


def test_tool_call_arguments_parsed_to_objects(reference: PreTrainedTokenizerFast) -> None:
    compact = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"a":1,"b":"é"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c", "content": "r"},
    ]
    as_dict = copy.deepcopy(compact)
    as_dict[1]["tool_calls"][0]["function"]["arguments"] = {"a": 1, "b": "é"}
    expected = reference.apply_chat_template(as_dict, tokenize=False, add_generation_prompt=True)
    assert render_chat(QWEN3_TEMPLATE, compact) == expected
    assert '"arguments": {"a": 1, "b": "é"}' in expected
    assert compact[1]["tool_calls"][0]["function"]["arguments"] == '{"a":1,"b":"é"}'  # not mutated


def test_tool_call_arguments_that_are_not_an_object_stay_as_given() -> None:
    message = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}],
    }
    (normalized,) = normalize_messages([message])
    assert normalized["tool_calls"][0]["function"]["arguments"] == "not json"
    text = render_chat(QWEN3_TEMPLATE, [{"role": "user", "content": "q"}, message])
    assert '"arguments": not json}' in text


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_aliases(key: str) -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", key: "why"}]
    text = render_chat(QWEN3_TEMPLATE, messages, add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\n<think>\nwhy\n</think>\n\na<|im_end|>\n")


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "image_url",
        ),
        ([{"role": "user", "content": 3}], "string or a list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "x"}], "role"),
        ([{"role": "assistant", "content": "", "tool_calls": {"x": 1}}], "must be a list"),
    ],
)
def test_bad_messages_are_clear_errors(messages: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_chat(QWEN3_TEMPLATE, messages)


# -- the environment ----------------------------------------------------------------------------

USER = [{"role": "user", "content": "x"}]


def test_tojson_like_transformers(reference: PreTrainedTokenizerFast) -> None:
    template = (
        "{{ tools | tojson }}|{{ tools | tojson(indent=2) }}|"
        "{{ tools | tojson(separators=(',', ':'), sort_keys=true) }}"
    )
    expected = reference.apply_chat_template(
        USER, tools=[WEATHER], chat_template=template, tokenize=False
    )
    assert render_chat(template, USER, tools=[WEATHER], add_generation_prompt=False) == expected
    assert "<b>live</b> &" in expected and "名前" in expected  # no HTML escaping, no \u escapes


def test_template_globals_and_tags() -> None:
    template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
        "{{ bos_token }}{{ eos_token }}{{ strftime_now('%Y') | length }}"
    )
    text = render_chat(template, USER * 3, bos_token="<s>", eos_token="</s>")
    assert text == "x<s></s>4"
    with pytest.raises(jinja2.TemplateError, match="no system"):
        render_chat("{{ raise_exception('no system') }}", USER)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{% set x = messages.append(1) %}",
    ],
)
def test_sandbox_blocks_escapes(template: str) -> None:
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat(template, USER)


# -- Qwen3-Coder ---------------------------------------------------------------------------

CODER_INSTRUCTIONS = (
    "\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:"
    "\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\n"
    "value_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the "
    "second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>"
    "\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner "
    "<function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n- You may provide optional reasoning for your "
    "function call in natural language BEFORE the function call, but NOT after\n- If there is "
    "no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\n</IMPORTANT>"
)


def test_qwen3_coder_renders_tools_calls_and_results() -> None:
    """Qwen3-Coder's format: tools as <function> blocks (schema keys beyond name, type and
    description as tags), the call as <function=...> XML, the result as a user turn."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [call("c1", "get_weather", {"city": "Paris", "days": 2})],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
    ]
    assert render_chat(QWEN3_CODER_TEMPLATE, messages, tools=[WEATHER]) == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou have access to the following "
        "functions:\n\n<tools>\n<function>\n<name>get_weather</name>\n<description>Current "
        "weather for a city — <b>live</b> & accurate</description>\n<parameters>\n<parameter>"
        "\n<name>city</name>\n<type>string</type>\n<description>名前 of the city</description>"
        '\n</parameter>\n<required>["city"]</required>\n</parameters>\n</function>\n</tools>'
        + CODER_INSTRUCTIONS
        + "<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\nChecking.\n\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n"
        "</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response>\n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # No system message: tools bring Qwen3-Coder's default one; no tools, no system turn.
    plain = [{"role": "user", "content": "hi"}]
    assert render_chat(QWEN3_CODER_TEMPLATE, plain, tools=[TIME]).startswith(
        "<|im_start|>system\nYou are Qwen, a helpful AI assistant that can interact with a "
        "computer to solve tasks.\n\n# Tools\n\n"
    )
    assert render_chat(QWEN3_CODER_TEMPLATE, plain) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_qwen3_coder_template_renders_as_under_transformers(
    reference: PreTrainedTokenizerFast, name: str
) -> None:
    messages, tools = CONVERSATIONS[name]
    # transformers passes messages as given; the template needs arguments as objects,
    # which is what normalize_messages makes of the JSON strings clients send.
    expected = reference.apply_chat_template(
        normalize_messages(copy.deepcopy(messages)),
        tools=tools,
        chat_template=QWEN3_CODER_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert render_chat(QWEN3_CODER_TEMPLATE, messages, tools=tools) == expected
