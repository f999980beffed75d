"""Pieces shared by the dialect envelopes, so every dialect validates the same way: the
lenient base model, the refusal of parts helexa cannot serve, and the parse that turns any
validation failure into a readable 400.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from helexa.wire.errors import WireError, wire_error_from_validation

# Refusals more than one dialect gives, worded once.
IMAGES_UNSUPPORTED = "images are not supported yet"
FILES_UNSUPPORTED = "file inputs are not supported"


class WireModel(BaseModel):
    """Base for every envelope: unknown fields pass through untouched.

    Clients send vendor extensions (``cache_control``, ``top_k``, ``chat_template_kwargs``)
    that we either forward or safely ignore; rejecting them would break real tools.
    """

    model_config = ConfigDict(extra="allow")


def tag_of(value: Any, default: str | None = None) -> str | None:
    """The ``type`` of a union member being validated, a raw dict or an already built model;
    callable discriminators need it from both."""
    if isinstance(value, dict):
        return value.get("type", default)
    return getattr(value, "type", None)


class Unsupported(WireModel):
    """A part the dialect defines but helexa cannot serve yet; validating one fails clearly.

    Modelling these (rather than leaving them to "unknown tag") lets the error say what is
    missing instead of listing the tags we do accept. ``reason`` may name the part's own
    ``type`` as ``{kind}``, for the classes that stand for a whole family of types.
    """

    reason: ClassVar[str] = "not supported"

    @model_validator(mode="before")
    @classmethod
    def _reject(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        raise PydanticCustomError("unsupported_content", cls.reason, {"kind": kind})


M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], body: Any) -> M:
    """Validate a decoded JSON body, turning every failure into a readable 400."""
    if not isinstance(body, dict):
        raise WireError(400, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise wire_error_from_validation(exc, body) from None
