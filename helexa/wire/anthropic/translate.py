"""Anthropic Messages to and from OpenAI chat.

Decisions worth knowing:

- Anthropic's ``input_tokens`` excludes cache reads while OpenAI's ``prompt_tokens``
  includes them, so ``input_tokens = prompt_tokens - cached_tokens``; a prompt cache
  fills itself as it goes, so nothing counts as ``cache_creation_input_tokens``.
- Claude Code starts its first system block with an ``x-anthropic-billing-header: ...``
  line that changes every request; left in, it would be the prompt's first tokens and no
  request would share a prefix with the one before, so that line is dropped.
- Tool arguments the model produced that are not a JSON object cannot be a ``tool_use``
  ``input``; they arrive as ``{"_raw_arguments": "<what the model wrote>"}`` so the client
  (and the model, via the tool error) sees the real output instead of a silent ``{}``.
"""

from __future__ import annotations

import json
from typing import Any

from helexa.wire.anthropic.envelopes import (
    CountTokensRequest,
    InputMessage,
    MessagesRequest,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingAdaptive,
    ThinkingBlock,
    ThinkingEnabled,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)
from helexa.wire.errors import WireError
from helexa.wire.openai.translate import (
    PARAGRAPH,
    first_choice,
    id_suffix,
    stream_flags,
    thinking_flags,
)


def map_stop_reason(finish_reason: str | None, stop_sequence: str | None = None) -> str:
    """Anthropic ``stop_reason`` for an OpenAI ``finish_reason``.

    The engine reports which stop string matched as ``choices[0]["stop_sequence"]`` (a
    non-standard field); when present on a ``stop`` finish it becomes ``stop_sequence``.
    """
    if finish_reason in ("stop", None) and stop_sequence:
        return "stop_sequence"
    return {
        "length": "max_tokens",
        "tool_calls": "tool_use",
        "function_call": "tool_use",
        "content_filter": "refusal",
    }.get(finish_reason or "stop", "end_turn")


def parse_tool_arguments(arguments: str | None) -> dict[str, Any]:
    """A tool call's JSON arguments as a ``tool_use`` input (see the module notes)."""
    if not arguments or not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"_raw_arguments": arguments}
    return value if isinstance(value, dict) else {"_raw_arguments": arguments}


# -- Anthropic -> OpenAI -------------------------------------------------------------------


BILLING_HEADER = "x-anthropic-billing-header:"


def system_text(system: str | list[TextBlock]) -> str:
    """The system prompt as one text, without Claude Code's per-request billing line
    (see the module notes): only that line, only at the start of the first text."""
    texts = [system] if isinstance(system, str) else [b.text for b in system]
    if texts and texts[0].startswith(BILLING_HEADER):
        texts[0] = texts[0].partition("\n")[2]
        if not texts[0].strip():
            texts.pop(0)
    return PARAGRAPH.join(texts)


def anthropic_to_openai(req: MessagesRequest | CountTokensRequest) -> dict[str, Any]:
    """The OpenAI chat request for an Anthropic Messages (or count_tokens) request."""
    messages: list[dict[str, Any]] = []
    system = system_text(req.system) if req.system else ""
    if system:
        messages.append({"role": "system", "content": system})
    tool_use_ids: set[str] = set()  # ids of the latest assistant turn's tool_use blocks
    for i, message in enumerate(req.messages):
        if message.role == "assistant":
            converted = _anthropic_assistant(message, f"messages.{i}")
            tool_use_ids = {c["id"] for c in converted.get("tool_calls", [])}
            messages.append(converted)
        else:
            messages.extend(_anthropic_user(message, f"messages.{i}", tool_use_ids))

    out: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.messages[-1].role == "assistant":
        # Anthropic prefill: the model continues the last assistant turn.
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False
    if req.tools:
        out["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description is not None else {}),
                    "parameters": t.input_schema,
                },
            }
            for t in req.tools
        ]
    if req.tool_choice is not None:
        choice = req.tool_choice
        if isinstance(choice, ToolChoiceAuto):
            out["tool_choice"] = "auto"
        elif isinstance(choice, ToolChoiceAny):
            out["tool_choice"] = "required"
        elif isinstance(choice, ToolChoiceTool):
            out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif isinstance(choice, ToolChoiceNone):
            out["tool_choice"] = "none"
        if getattr(choice, "disable_parallel_tool_use", None):
            out["parallel_tool_calls"] = False
    out.update(thinking_flags(isinstance(req.thinking, ThinkingEnabled | ThinkingAdaptive)))

    if isinstance(req, MessagesRequest):
        out["max_tokens"] = req.max_tokens
        # Anthropic clients (Claude Code) ask for large budgets whatever the model's window:
        # the neuron treats this one as a ceiling, not an error (helexa's extension).
        out["clamp_max_tokens"] = True
        optional = {
            "stop": req.stop_sequences,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "user": req.metadata.user_id if req.metadata else None,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        out.update(stream_flags(req.stream))
    return out


def _anthropic_assistant(message: InputMessage, path: str) -> dict[str, Any]:
    if isinstance(message.content, str):
        return {"role": "assistant", "content": message.content}
    texts: list[str] = []
    reasoning: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for j, block in enumerate(message.content):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            reasoning.append(block.thinking)
        elif isinstance(block, RedactedThinkingBlock):
            continue  # opaque to us; nothing to show the model
        elif isinstance(block, ToolUseBlock):
            tool_calls.append(
                {
                    "id": block.id,
                    "type": "function",
                    "function": {
                        "name": block.name,
                        "arguments": json.dumps(block.input, ensure_ascii=False),
                    },
                }
            )
        else:
            raise _misplaced(block.type, "user", f"{path}.content.{j}")
    out: dict[str, Any] = {
        "role": "assistant",
        "content": PARAGRAPH.join(texts) if texts or not tool_calls else None,
    }
    if reasoning:
        out["reasoning_content"] = PARAGRAPH.join(reasoning)
    if tool_calls:
        out["tool_calls"] = tool_calls
    return out


def _anthropic_user(
    message: InputMessage, path: str, tool_use_ids: set[str]
) -> list[dict[str, Any]]:
    """A user turn: text runs become user messages, tool results ``tool`` messages, in order."""
    if isinstance(message.content, str):
        return [{"role": "user", "content": message.content}]
    out: list[dict[str, Any]] = []
    texts: list[str] = []

    def flush_text() -> None:
        if texts:
            out.append({"role": "user", "content": PARAGRAPH.join(texts)})
            texts.clear()

    for j, block in enumerate(message.content):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            if block.tool_use_id not in tool_use_ids:
                raise WireError(
                    400,
                    f"{path}.content.{j}: tool_result for unknown tool_use_id "
                    f"{block.tool_use_id!r}; it must answer a tool_use in the preceding "
                    "assistant message",
                    param=f"{path}.content.{j}.tool_use_id",
                )
            flush_text()
            text = block.text()
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": block.tool_use_id,
                    "content": f"Error: {text}" if block.is_error else text,
                }
            )
        else:
            raise _misplaced(block.type, "assistant", f"{path}.content.{j}")
    flush_text()
    return out or [{"role": "user", "content": ""}]


def _misplaced(block_type: str, role: str, path: str) -> WireError:
    return WireError(400, f"{path}: {block_type} blocks belong in {role} messages", param=path)


# -- OpenAI -> Anthropic -------------------------------------------------------------------


def anthropic_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    """Anthropic usage from OpenAI usage (cache reads counted apart, as Anthropic does)."""
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    out = {
        "input_tokens": prompt - int(cached or 0),
        "output_tokens": int(usage.get("completion_tokens") or 0),
    }
    if cached is not None:
        out["cache_read_input_tokens"] = int(cached)
        out["cache_creation_input_tokens"] = 0
    return out


def openai_to_anthropic(completion: dict[str, Any], model: str) -> dict[str, Any]:
    """A non-streaming Anthropic Messages response for an OpenAI chat completion."""
    choice = first_choice(completion)
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        content.append(
            {"type": "thinking", "thinking": message["reasoning_content"], "signature": ""}
        )
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    suffix = id_suffix(completion.get("id"))
    for n, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{suffix}_{n}",
                "name": function.get("name", ""),
                "input": parse_tool_arguments(function.get("arguments")),
            }
        )
    stop_reason = map_stop_reason(choice.get("finish_reason"), choice.get("stop_sequence"))
    return {
        "id": f"msg_{suffix}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": choice.get("stop_sequence") if stop_reason == "stop_sequence" else None,
        "usage": anthropic_usage(completion.get("usage")),
    }
