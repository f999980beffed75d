"""Pure request/response mapping between the client dialects and OpenAI chat.

OpenAI chat is the internal lingua franca: Anthropic Messages and OpenAI Responses
requests become chat requests on the way in, and chat completions become the client's
dialect on the way out. Streaming uses the same item and usage builders (see
``streams.py``), so a streamed answer and a non-streamed one are the same object.

Decisions worth knowing:

- Several text blocks or parts in one message are joined with a blank line, so
  paragraphs stay paragraphs in the rendered prompt.
- Anthropic's ``input_tokens`` excludes cache reads while OpenAI's ``prompt_tokens``
  includes them, so ``input_tokens = prompt_tokens - cached_tokens``.
- Tool arguments the model produced that are not a JSON object cannot be a ``tool_use``
  ``input``; they arrive as ``{"_raw_arguments": "<what the model wrote>"}`` so the client
  (and the model, via the tool error) sees the real output instead of a silent ``{}``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from helexa.wire.anthropic import (
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
from helexa.wire.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolChoice,
    InputItem,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
    parts_text,
)

PARAGRAPH = "\n\n"

# -- small shared pieces -------------------------------------------------------------------


def new_id() -> str:
    """A fresh id body for responses that upstream gave none."""
    return uuid.uuid4().hex[:24]


def id_suffix(upstream_id: str | None) -> str:
    """The unique part of an upstream id, so translated ids stay traceable to it."""
    if not upstream_id:
        return new_id()
    for prefix in ("chatcmpl-", "cmpl-", "resp_", "msg_"):
        if upstream_id.startswith(prefix):
            return upstream_id[len(prefix) :] or new_id()
    return upstream_id


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


def _first_choice(completion: dict[str, Any]) -> dict[str, Any]:
    choices = completion.get("choices") or []
    return choices[0] if choices else {}


def _thinking_flags(enabled: bool) -> dict[str, Any]:
    """Both spellings engines read: vLLM/SGLang ``chat_template_kwargs`` and a top-level flag."""
    return {"chat_template_kwargs": {"enable_thinking": enabled}, "enable_thinking": enabled}


def _stream_flags(stream: bool | None) -> dict[str, Any]:
    return {"stream": True, "stream_options": {"include_usage": True}} if stream else {}


# -- Anthropic -> OpenAI -------------------------------------------------------------------


def anthropic_to_openai(req: MessagesRequest | CountTokensRequest) -> dict[str, Any]:
    """The OpenAI chat request for an Anthropic Messages (or count_tokens) request."""
    messages: list[dict[str, Any]] = []
    if req.system:
        system = (
            req.system
            if isinstance(req.system, str)
            else PARAGRAPH.join(b.text for b in req.system)
        )
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
    out.update(_thinking_flags(isinstance(req.thinking, ThinkingEnabled | ThinkingAdaptive)))

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
        out.update(_stream_flags(req.stream))
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
    return out


def openai_to_anthropic(completion: dict[str, Any], model: str) -> dict[str, Any]:
    """A non-streaming Anthropic Messages response for an OpenAI chat completion."""
    choice = _first_choice(completion)
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
        out.update(_thinking_flags(effort not in ("none", "minimal")))
    fmt = (req.text or {}).get("format") or {}
    if fmt.get("type") == "json_object":
        out["response_format"] = {"type": "json_object"}
    elif fmt.get("type") == "json_schema":
        schema = {k: v for k, v in fmt.items() if k != "type"}
        out["response_format"] = {"type": "json_schema", "json_schema": schema}
    optional = {
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "parallel_tool_calls": req.parallel_tool_calls,
        "user": req.user,
    }
    out.update({k: v for k, v in optional.items() if v is not None})
    out.update(_stream_flags(req.stream))
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
        "text": req.text or {"format": {"type": "text"}},
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
    choice = _first_choice(completion)
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


# -- folding streams -----------------------------------------------------------------------


@dataclass
class _ChoiceFold:
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    stop_sequence: str | None = None

    def add_tool_delta(self, delta: dict[str, Any]) -> None:
        index = delta.get("index")
        if index is None:  # non-conforming upstream: a new id starts a new call
            index = len(self.tool_calls) if delta.get("id") else max(self.tool_calls, default=0)
        call = self.tool_calls.setdefault(
            index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        function = delta.get("function") or {}
        if delta.get("id") and not call["id"]:
            call["id"] = delta["id"]
        if function.get("name") and not call["function"]["name"]:
            call["function"]["name"] = function["name"]
        call["function"]["arguments"] += function.get("arguments") or ""


class ChatAccumulator:
    """Folds ``chat.completion.chunk`` dicts into one ``chat.completion`` as they stream."""

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _ChoiceFold] = {}
        self._usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        for key in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(key) is not None and key not in self._head:
                self._head[key] = chunk[key]
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            fold = self._choices.setdefault(choice.get("index", 0), _ChoiceFold())
            delta = choice.get("delta") or {}
            if delta.get("content"):
                fold.content.append(delta["content"])
            if delta.get("reasoning_content"):
                fold.reasoning.append(delta["reasoning_content"])
            for call in delta.get("tool_calls") or []:
                fold.add_tool_delta(call)
            if choice.get("finish_reason"):
                fold.finish_reason = choice["finish_reason"]
            if choice.get("stop_sequence"):
                fold.stop_sequence = choice["stop_sequence"]

    def result(self) -> dict[str, Any]:
        """The completion so far; ``finish_reason`` stays None if upstream never sent one."""
        choices = []
        for index in sorted(self._choices) or [0]:
            fold = self._choices.get(index, _ChoiceFold())
            tool_calls = [fold.tool_calls[i] for i in sorted(fold.tool_calls)]
            text = "".join(fold.content)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text if text or not tool_calls else None,
            }
            if fold.reasoning:
                message["reasoning_content"] = "".join(fold.reasoning)
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice: dict[str, Any] = {
                "index": index,
                "message": message,
                "finish_reason": fold.finish_reason,
                "logprobs": None,
            }
            if fold.stop_sequence is not None:
                choice["stop_sequence"] = fold.stop_sequence
            choices.append(choice)
        out: dict[str, Any] = {
            "id": self._head.get("id") or f"chatcmpl-{new_id()}",
            "object": "chat.completion",
            "created": self._head.get("created", 0),
            "model": self._head.get("model", ""),
            "choices": choices,
        }
        if "system_fingerprint" in self._head:
            out["system_fingerprint"] = self._head["system_fingerprint"]
        if self._usage is not None:
            out["usage"] = self._usage
        return out


def accumulate_chat(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One ``chat.completion`` from a whole stream of chunks."""
    acc = ChatAccumulator()
    for chunk in chunks:
        acc.add(chunk)
    return acc.result()


def accumulate_completion(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One ``text_completion`` from a stream of legacy completion chunks."""
    head: dict[str, Any] = {}
    texts: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    usage: dict[str, Any] | None = None
    for chunk in chunks:
        for key in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(key) is not None and key not in head:
                head[key] = chunk[key]
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0)
            texts.setdefault(index, []).append(choice.get("text") or "")
            if choice.get("finish_reason"):
                finish[index] = choice["finish_reason"]
    out: dict[str, Any] = {
        "id": head.get("id") or f"cmpl-{new_id()}",
        "object": "text_completion",
        "created": head.get("created", 0),
        "model": head.get("model", ""),
        "choices": [
            {
                "index": i,
                "text": "".join(texts.get(i, [])),
                "finish_reason": finish.get(i),
                "logprobs": None,
            }
            for i in sorted(texts) or [0]
        ],
    }
    if "system_fingerprint" in head:
        out["system_fingerprint"] = head["system_fingerprint"]
    if usage is not None:
        out["usage"] = usage
    return out
