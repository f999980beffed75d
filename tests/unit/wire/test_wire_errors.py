"""Error bodies of every dialect, checked against the SDKs' own types, and validation messages."""

from __future__ import annotations

import anthropic.types as at
import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from helexa.errors import ApiError
from helexa.wire.errors import (
    WireError,
    anthropic_error_body,
    error_body,
    openai_error_body,
    validation_message,
)

_ERRORS = TypeAdapter(at.ErrorResponse)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (418, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
        (507, "api_error"),
        (529, "overloaded_error"),
    ],
)
def test_anthropic_error_types_follow_status(status: int, kind: str) -> None:
    body = anthropic_error_body(status, "nope")
    assert body == {"type": "error", "error": {"type": kind, "message": "nope"}}
    if kind != "request_too_large":  # the SDK's union lacks this documented type
        assert _ERRORS.validate_python(body).error.type == kind


def test_anthropic_error_type_can_be_forced() -> None:
    assert anthropic_error_body(500, "m", "overloaded_error")["error"]["type"] == "overloaded_error"


def test_wire_error_renders_in_both_dialects() -> None:
    err = WireError(404, "no such model", code="model_not_found", param="model")
    assert error_body("openai", err) == openai_error_body(
        "no such model", type="not_found_error", code="model_not_found", param="model"
    )
    assert set(error_body("openai", err)["error"]) == {"message", "type", "param", "code"}
    assert _ERRORS.validate_python(error_body("anthropic", err)).error.type == "not_found_error"
    assert error_body("openai", WireError(502, "x"))["error"]["type"] == "server_error"


def test_any_api_error_renders_with_its_type_and_extras() -> None:
    err = ApiError("too big", status=507, code="insufficient_vram", extra={"needed_mb": 9})
    assert error_body("openai", err)["error"] == {
        "message": "too big",
        "type": "server_error",
        "param": None,
        "code": "insufficient_vram",
        "needed_mb": 9,
    }
    forced = ApiError("x", status=503, type="overloaded_error")
    assert error_body("openai", forced)["error"]["type"] == "overloaded_error"
    # Anthropic clients know a fixed set of types: the status chooses, not ours.
    assert error_body("anthropic", err)["error"]["type"] == "api_error"


def test_a_prompt_past_the_context_is_worded_as_each_dialect_words_it() -> None:
    openai_words = "This model's maximum context length is 64 tokens. However, ..."
    numbers = {"prompt_tokens": 80, "max_context": 64}
    err = ApiError(openai_words, status=400, code="context_length_exceeded", extra=numbers)
    # Claude Code compacts the conversation on Anthropic's own wording only.
    anthropic = error_body("anthropic", err)["error"]
    assert anthropic["message"] == "prompt is too long: 80 tokens > 64 maximum"
    assert anthropic["type"] == "invalid_request_error"
    assert error_body("openai", err)["error"]["message"] == openai_words
    without_numbers = ApiError(openai_words, status=400, code="context_length_exceeded")
    assert error_body("anthropic", without_numbers)["error"]["message"] == openai_words


def test_validation_message_without_body_drops_type_labels() -> None:
    class Probe(BaseModel):
        content: str | list[int]

    with pytest.raises(ValidationError) as info:
        Probe.model_validate({"content": ["a"]})
    message = validation_message(info.value)
    assert message.startswith("content.0: ")
    assert "list[" not in message
