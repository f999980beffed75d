"""OpenAI chat-completions and completions envelopes.

OpenAI chat is helexa's internal lingua franca, so these models validate what clients send
and otherwise stay out of the way: unknown fields (``top_k``, ``chat_template_kwargs``,
vendor extensions) pass through, and ``req.model_dump(exclude_none=True)`` is the body to
forward to a neuron.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from helexa.wire.base import (
    FILES_UNSUPPORTED,
    IMAGES_UNSUPPORTED,
    Unsupported,
    WireModel,
    check_tool_choice,
    parse_body,
    unsupported_parameter,
)

# -- content parts -------------------------------------------------------------------------


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class RefusalPart(WireModel):
    type: Literal["refusal"]
    refusal: str


class ImageURLPart(Unsupported):
    reason = IMAGES_UNSUPPORTED
    type: Literal["image_url"]


class InputAudioPart(Unsupported):
    reason = "audio input is not supported"
    type: Literal["input_audio"]


class FilePart(Unsupported):
    reason = FILES_UNSUPPORTED
    type: Literal["file"]


UserPart = Annotated[
    TextPart | ImageURLPart | InputAudioPart | FilePart, Field(discriminator="type")
]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


# -- messages ------------------------------------------------------------------------------


class FunctionCall(WireModel):
    name: str
    arguments: str = ""


class ToolCall(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _Instructions(WireModel):
    """What a system or developer message holds; two classes only so ``role`` can tag them."""

    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class SystemMessage(_Instructions):
    role: Literal["system"]


class DeveloperMessage(_Instructions):
    role: Literal["developer"]


class UserMessage(WireModel):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(WireModel):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None
    refusal: str | None = None
    name: str | None = None
    function_call: FunctionCall | None = None  # deprecated: a call made under ``functions``


class ToolMessage(WireModel):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


class FunctionMessage(WireModel):
    """Deprecated: a function's result, as sent under ``functions``; it names the function
    rather than a call id."""

    role: Literal["function"]
    name: str
    content: str | None = None


ChatMessage = Annotated[
    SystemMessage
    | DeveloperMessage
    | UserMessage
    | AssistantMessage
    | ToolMessage
    | FunctionMessage,
    Field(discriminator="role"),
]


# -- tools ---------------------------------------------------------------------------------


class FunctionDefinition(WireModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(WireModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


# -- response formats ----------------------------------------------------------------------


class JsonSchemaSpec(WireModel):
    """A ``json_schema`` format's schema and name; Responses puts these fields flat in the
    format, chat under ``json_schema``. The schema is what the engine constrains to, so it
    is required (OpenAI leaves it optional, but then there is nothing to constrain)."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextFormat(WireModel):
    type: Literal["text"]


class JsonObjectFormat(WireModel):
    type: Literal["json_object"]


class JsonSchemaFormat(WireModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


# -- requests ------------------------------------------------------------------------------

# The seeds torch.Generator.manual_seed takes (the engine seeds one per request with it):
# int64 and uint64. Past them it raises, which would be a 500 after routing.
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


# A token id as the engine takes one: an integer (not 1.0, not true) a torch.long tensor
# holds. Whether the model's vocabulary has it only the engine can tell.
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
# OpenAI's four prompt shapes; a list of several prompts (a batch) is refused below.
Prompt = str | list[str] | TokenIds | list[TokenIds]


class StreamOptions(WireModel):
    include_usage: bool | None = None


# Parameters accepted only at the value that changes nothing, with what to say otherwise: the
# engine has no logit bias, echo, insertion or best-of-n, and answering as if it had would
# hand back something else than was asked for. (Chat has no echo, suffix or best_of.)
_NO_OPS: dict[str, tuple[Any, str]] = {
    "logit_bias": ({}, "not supported; only an empty object"),
    "echo": (False, "not supported; only false"),
    "suffix": ("", "not supported; only an empty string"),
    "best_of": (1, "only 1 is supported"),
}


class _Generation(WireModel):
    """What chat and completions requests share: the model, streaming and the sampling the
    engine reads, vLLM's extensions (``top_k``, ``min_p``, ``repetition_penalty``) included,
    each bounded so a value the engine cannot take is a 400 here."""

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator(*_NO_OPS, check_fields=False)
    @classmethod
    def _only_no_op(cls, value: Any, info: ValidationInfo) -> Any:
        no_op, refusal = _NO_OPS[info.field_name or ""]
        if value is not None and value != no_op:
            raise unsupported_parameter(refusal)
        return value


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    reasoning_effort: str | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's, passed to the template

    # Deprecated spellings of tools and tool_choice, still accepted by OpenAI: they are
    # served as tools (see ``translate.functions_as_tools``), and answered as OpenAI
    # answers them, with ``function_call``.
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None

    @property
    def uses_functions(self) -> bool:
        """Whether the client asked in the deprecated terms, and so expects its answer so."""
        return bool(self.functions)

    @field_validator("tool_choice")
    @classmethod
    def _callable(cls, choice: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        if "tools" in info.data:  # else the tools' own error is the one to report
            named = choice.function.name if isinstance(choice, NamedToolChoice) else None
            forced = "required" if choice == "required" else None
            check_tool_choice([t.function.name for t in info.data["tools"] or []], forced, named)
        return choice

    @field_validator("functions")
    @classmethod
    def _not_with_tools(
        cls, functions: list[FunctionDefinition] | None, info: ValidationInfo
    ) -> list[FunctionDefinition] | None:
        if functions is not None and info.data.get("tools") is not None:
            raise PydanticCustomError("invalid_value", "give tools or functions, not both")
        return functions

    @field_validator("function_call")
    @classmethod
    def _legacy_callable(cls, choice: Any, info: ValidationInfo) -> Any:
        if choice is not None and info.data.get("tool_choice") is not None:
            raise PydanticCustomError(
                "invalid_value", "give tool_choice or function_call, not both"
            )
        if "functions" in info.data:  # else the functions' own error is the one to report
            named = choice.name if isinstance(choice, NamedFunction) else None
            check_tool_choice([f.name for f in info.data["functions"] or []], None, named)
        return choice


class CompletionRequest(_Generation):
    prompt: Prompt
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1)

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt(cls, value: Any, shapes: ValidatorFunctionWrapHandler) -> Prompt:
        """One prompt, as text or token ids, reaches the engine unchanged; a batch of them
        would need one answer per prompt, which the engine does not give. A shape that
        fits none says what fits, not which of the four union branches failed where."""
        try:
            prompt: Prompt = shapes(value)
        except ValidationError:
            raise PydanticCustomError(
                "prompt_type",
                "must be a string, a list of token ids (integers 0 to 2147483647), or a list "
                "holding one of those",
            ) from None
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return prompt
        if not prompt:
            raise PydanticCustomError("too_short", "must hold a prompt")
        if len(prompt) > 1:
            raise unsupported_parameter(
                f"only one prompt per request is supported, not a list of {len(prompt)}"
            )
        return prompt


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a ``POST /v1/chat/completions`` body; raise WireError(400) on bad input."""
    return parse_body(ChatCompletionRequest, body)


def parse_completion_request(body: Any) -> CompletionRequest:
    """Validate a ``POST /v1/completions`` body; raise WireError(400) on bad input."""
    return parse_body(CompletionRequest, body)


# -- responses -----------------------------------------------------------------------------


class Model(WireModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "helexa"


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[Model] = Field(default_factory=list)
