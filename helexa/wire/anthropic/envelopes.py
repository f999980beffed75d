"""Anthropic Messages envelopes (``POST /v1/messages`` and ``/v1/messages/count_tokens``).

Only the shapes helexa can honour validate; images, documents and server-side tools fail
with a message that says so, rather than a list of the block types we do accept.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator

from helexa.wire.base import (
    IMAGES_UNSUPPORTED,
    Unsupported,
    WireModel,
    check_tool_choice,
    parse_body,
    tag_of,
)

# -- content blocks ------------------------------------------------------------------------


class TextBlock(WireModel):
    type: Literal["text"]
    text: str


class ImageBlock(Unsupported):
    reason = IMAGES_UNSUPPORTED
    type: Literal["image"]


class DocumentBlock(Unsupported):
    reason = "documents are not supported yet"
    type: Literal["document"]


class ToolUseBlock(WireModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


ToolResultPart = Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]


class ToolResultBlock(WireModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ToolResultPart] | None = None
    is_error: bool | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n\n".join(p.text for p in self.content if isinstance(p, TextBlock))


class ThinkingBlock(WireModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(WireModel):
    type: Literal["redacted_thinking"]
    data: str = ""


ContentBlock = Annotated[
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class InputMessage(WireModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


# -- tools ---------------------------------------------------------------------------------


class Tool(WireModel):
    """A client tool: the model calls it, the client runs it."""

    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None


class ServerTool(Unsupported):
    """A tool Anthropic runs server-side (web search, code execution); helexa has none."""

    reason = "server tool '{kind}' is not supported; only client tools with an input_schema"


def _tool_kind(value: Any) -> str:
    return "client" if tag_of(value) in (None, "custom") else "server"


AnyTool = Annotated[
    Annotated[Tool, Tag("client")] | Annotated[ServerTool, Tag("server")],
    Discriminator(_tool_kind),
]


class ToolChoiceAuto(WireModel):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(WireModel):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(WireModel):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(WireModel):
    type: Literal["none"]


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")
]


# -- thinking ------------------------------------------------------------------------------


class ThinkingEnabled(WireModel):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=0)


class ThinkingAdaptive(WireModel):
    type: Literal["adaptive"]


class ThinkingDisabled(WireModel):
    type: Literal["disabled"]


ThinkingConfig = Annotated[
    ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled, Field(discriminator="type")
]


# -- requests ------------------------------------------------------------------------------


class Metadata(WireModel):
    user_id: str | None = None


class CountTokensRequest(WireModel):
    """The conversation part of a Messages request: everything that shapes the prompt."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnyTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None

    @field_validator("tool_choice")
    @classmethod
    def _callable(cls, choice: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        if "tools" in info.data:  # else the tools' own error is the one to report
            named = choice.name if isinstance(choice, ToolChoiceTool) else None
            forced = "any" if isinstance(choice, ToolChoiceAny) else None
            check_tool_choice([t.name for t in info.data["tools"] or []], forced, named)
        return choice


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool | None = None
    metadata: Metadata | None = None


def parse_messages_request(body: Any) -> MessagesRequest:
    """Validate a ``POST /v1/messages`` body; raise WireError(400) on bad input."""
    return parse_body(MessagesRequest, body)


def parse_count_tokens_request(body: Any) -> CountTokensRequest:
    """Validate a ``POST /v1/messages/count_tokens`` body; raise WireError(400) on bad input."""
    return parse_body(CountTokensRequest, body)
