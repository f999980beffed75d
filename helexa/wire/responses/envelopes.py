"""OpenAI Responses envelopes (``POST /v1/responses``).

helexa is stateless: every request carries its whole conversation in ``input``, so
``previous_response_id``, ``conversation`` and ``item_reference`` items are refused with a
message saying so instead of silently answering without the earlier turns.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from helexa.wire.base import (
    FILES_UNSUPPORTED,
    IMAGES_UNSUPPORTED,
    Unsupported,
    WireModel,
    check_tool_choice,
    parse_body,
    tag_of,
)
from helexa.wire.openai.envelopes import (
    InputAudioPart,
    JsonObjectFormat,
    JsonSchemaSpec,
    RefusalPart,
    TextFormat,
)

STATELESS = "helexa is stateless; send the whole conversation in input"

# -- message content -----------------------------------------------------------------------
# Refusals and audio parts are the same objects as in chat (``openai.envelopes``).


class InputText(WireModel):
    type: Literal["input_text"]
    text: str


class OutputText(WireModel):
    type: Literal["output_text"]
    text: str


class InputImage(Unsupported):
    reason = IMAGES_UNSUPPORTED
    type: Literal["input_image"]


class InputFile(Unsupported):
    reason = FILES_UNSUPPORTED
    type: Literal["input_file"]


MessagePart = Annotated[
    InputText | OutputText | RefusalPart | InputImage | InputFile | InputAudioPart,
    Field(discriminator="type"),
]


def parts_text(content: str | list[Any]) -> str:
    """The text of message content: a string, or its text parts, one paragraph each."""
    if isinstance(content, str):
        return content
    return "\n\n".join(p.text for p in content if isinstance(p, InputText | OutputText))


# -- input items ---------------------------------------------------------------------------


class MessageItem(WireModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[MessagePart]
    id: str | None = None


class FunctionCallItem(WireModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = ""
    id: str | None = None


class FunctionCallOutputItem(WireModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[MessagePart]


class SummaryText(WireModel):
    type: Literal["summary_text"]
    text: str


class ReasoningText(WireModel):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(WireModel):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None

    def text(self) -> str:
        """The reasoning to show the model again: raw content if present, else the summary."""
        if self.content:
            return "".join(c.text for c in self.content)
        return "\n\n".join(s.text for s in self.summary)


class ItemReference(Unsupported):
    reason = f"item_reference is not supported: {STATELESS}"
    type: Literal["item_reference"]


def _item_type(value: Any) -> str | None:
    return tag_of(value, "message")  # a message item may leave out its type


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[ItemReference, Tag("item_reference")],
    Discriminator(
        _item_type,
        custom_error_type="invalid_item",
        custom_error_message=(
            "input item type must be one of 'message', 'function_call', "
            "'function_call_output', 'reasoning'"
        ),
    ),
]


# -- tools ---------------------------------------------------------------------------------


class FunctionTool(WireModel):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class HostedTool(Unsupported):
    """Any non-function tool (web_search, file_search, ...): OpenAI runs those, we cannot."""

    reason = "tool type '{kind}' is not supported; only function tools"


def _tool_kind(value: Any) -> str:
    return "function" if tag_of(value) == "function" else "hosted"


AnyTool = Annotated[
    Annotated[FunctionTool, Tag("function")] | Annotated[HostedTool, Tag("hosted")],
    Discriminator(_tool_kind),
]


class FunctionToolChoice(WireModel):
    type: Literal["function"]
    name: str


# -- text format ---------------------------------------------------------------------------
# Chat's formats (``openai.envelopes``), with a json_schema's fields flat in the format.


class JsonSchemaTextFormat(JsonSchemaSpec):
    type: Literal["json_schema"]


class TextConfig(WireModel):
    format: (
        Annotated[TextFormat | JsonObjectFormat | JsonSchemaTextFormat, Field(discriminator="type")]
        | None
    ) = None


class ReasoningConfig(WireModel):
    effort: str | None = None
    summary: str | None = None


# -- request -------------------------------------------------------------------------------


class ResponsesRequest(WireModel):
    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    tools: list[AnyTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stream: bool | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @field_validator("tool_choice")
    @classmethod
    def _callable(cls, choice: Any, info: ValidationInfo) -> Any:
        if "tools" in info.data:  # else the tools' own error is the one to report
            named = choice.name if isinstance(choice, FunctionToolChoice) else None
            forced = "required" if choice == "required" else None
            check_tool_choice([t.name for t in info.data["tools"] or []], forced, named)
        return choice

    @field_validator("previous_response_id", "conversation")
    @classmethod
    def _stateless(cls, value: Any) -> Any:
        if value is not None:
            raise PydanticCustomError("unsupported_content", f"not supported: {STATELESS}")
        return value


def parse_responses_request(body: Any) -> ResponsesRequest:
    """Validate a ``POST /v1/responses`` body; raise WireError(400) on bad input."""
    return parse_body(ResponsesRequest, body)
