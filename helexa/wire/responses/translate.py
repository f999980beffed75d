"""OpenAI Responses to and from OpenAI chat, and the Response objects both answers share.

The item and usage builders here serve the streamed answer too (see ``stream.py``), so a
streamed Response and a non-streamed one are the same object. Both dialects count cached
tokens inside the input tokens, so usage maps field for field.
"""

from __future__ import annotations

from typing import Any

from helexa.wire.openai.envelopes import JsonObjectFormat
from helexa.wire.openai.translate import (
    PARAGRAPH,
    first_choice,
    id_suffix,
    stream_flags,
    thinking_flags,
)
from helexa.wire.responses.envelopes import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolChoice,
    InputItem,
    JsonSchemaTextFormat,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
    parts_text,
)

# -- Responses -> OpenAI -------------------------------------------------------------------


def responses_to_openai(req: ResponsesRequest) -> dict[str, Any]:
    """The OpenAI chat request for a Responses request."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    else:
        messages.extend(_items_to_messages(req.input))

    out: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.tools:
        out["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description is not None else {}),
                    "parameters": t.parameters or {"type": "object", "properties": {}},
                    **({"strict": t.strict} if t.strict is not None else {}),
                },
            }
            for t in req.tools
        ]
    if isinstance(req.tool_choice, FunctionToolChoice):
        out["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        out["tool_choice"] = req.tool_choice
    effort = req.reasoning.effort if req.reasoning else None
    if effort is not None:
        out["reasoning_effort"] = effort
        out.update(thinking_flags(effort not in ("none", "minimal")))
    fmt = req.text.format if req.text else None
    if isinstance(fmt, JsonObjectFormat):
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, JsonSchemaTextFormat):
        schema = fmt.model_dump(by_alias=True, exclude_unset=True, exclude={"type"})
        out["response_format"] = {"type": "json_schema", "json_schema": schema}
    optional = {
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "parallel_tool_calls": req.parallel_tool_calls,
        "user": req.user,
    }
    out.update({k: v for k, v in optional.items() if v is not None})
    out.update(stream_flags(req.stream))
    return out


def _items_to_messages(items: list[InputItem]) -> list[dict[str, Any]]:
    """Fold Responses items into chat messages.

    Reasoning, assistant text and function calls of one model turn arrive as separate items;
    chat wants them as one assistant message (reasoning first, then text, then tool calls),
    so they collect in ``turn`` until something else starts.
    """
    out: list[dict[str, Any]] = []
    turn: dict[str, Any] | None = None

    def flush() -> None:
        nonlocal turn
        if turn is not None:
            if turn["content"] is None and not turn.get("tool_calls"):
                turn["content"] = ""
            out.append(turn)
            turn = None

    def current_turn() -> dict[str, Any]:
        nonlocal turn
        if turn is None:
            turn = {"role": "assistant", "content": None}
        return turn

    for item in items:
        if isinstance(item, MessageItem) and item.role == "assistant":
            if turn is not None and turn.get("tool_calls"):
                flush()
            t = current_turn()
            text = parts_text(item.content)
            t["content"] = text if t["content"] is None else t["content"] + PARAGRAPH + text
        elif isinstance(item, MessageItem):
            flush()
            out.append({"role": item.role, "content": parts_text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            current_turn().setdefault("tool_calls", []).append(call)
        elif isinstance(item, FunctionCallOutputItem):
            flush()
            out.append(
                {"role": "tool", "tool_call_id": item.call_id, "content": parts_text(item.output)}
            )
        elif isinstance(item, ReasoningItem):
            if turn is not None and (turn["content"] is not None or turn.get("tool_calls")):
                flush()
            t = current_turn()
            previous = t.get("reasoning_content")
            text = item.text()
            t["reasoning_content"] = text if previous is None else previous + PARAGRAPH + text
    flush()
    return out


# -- OpenAI -> Responses -------------------------------------------------------------------


def responses_status(finish_reason: str | None) -> tuple[str, dict[str, str] | None]:
    """Response ``status`` and ``incomplete_details`` for a finish reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def responses_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Responses usage from OpenAI usage; both count cached tokens inside input_tokens."""
    if usage is None:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(cached), "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(reasoning)},
        "total_tokens": int(usage.get("total_tokens") or prompt + completion),
    }


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "role": "assistant",
        "status": status,
        "content": [output_text_part(text)],
    }


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def responses_envelope(
    req: ResponsesRequest,
    *,
    response_id: str,
    created_at: float,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    incomplete_details: dict[str, str] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Response object around ``output``, echoing the request's settings."""
    if isinstance(req.tool_choice, FunctionToolChoice):
        tool_choice: Any = req.tool_choice.model_dump()
    else:
        tool_choice = req.tool_choice or "auto"
    text = req.text.model_dump(by_alias=True, exclude_unset=True) if req.text else {}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": incomplete_details,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": req.model,
        "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
        "store": False,
        "temperature": req.temperature,
        "text": text or {"format": {"type": "text"}},
        "tool_choice": tool_choice,
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "top_p": req.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": req.user,
        "metadata": req.metadata or {},
    }


def openai_to_responses(
    completion: dict[str, Any], req: ResponsesRequest, *, response_id: str | None = None
) -> dict[str, Any]:
    """A Response object for an OpenAI chat completion.

    Items come in the order a model produces them: reasoning, text, then function calls.
    """
    choice = first_choice(completion)
    message = choice.get("message") or {}
    response_id = response_id or f"resp_{id_suffix(completion.get('id'))}"
    suffix = id_suffix(response_id)
    status, incomplete = responses_status(choice.get("finish_reason"))
    output: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        output.append(reasoning_item(f"rs_{suffix}_{len(output)}", message["reasoning_content"]))
    if message.get("content"):
        item_status = "incomplete" if status == "incomplete" else "completed"
        output.append(message_item(f"msg_{suffix}_{len(output)}", message["content"], item_status))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        n = len(output)
        output.append(
            function_call_item(
                f"fc_{suffix}_{n}",
                call.get("id") or f"call_{suffix}_{n}",
                function.get("name", ""),
                function.get("arguments") or "",
            )
        )
    return responses_envelope(
        req,
        response_id=response_id,
        created_at=completion.get("created") or 0,
        status=status,
        output=output,
        usage=responses_usage(completion.get("usage")),
        incomplete_details=incomplete,
    )
