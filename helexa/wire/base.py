"""Pieces shared by the dialect envelopes, so every dialect validates the same way: the
one body decoder both servers use, the lenient base model, the refusal of parts helexa
cannot serve, and the parse that turns any validation failure into a readable 400.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from helexa.wire.errors import WireError, wire_error_from_validation

# -- the body -------------------------------------------------------------------------------

# Nesting deeper than this is refused. No request helexa serves comes close, and every later
# walk of the value recurses (pydantic, json.dumps on the way to a neuron, the chat
# template), so a deep one would fail in whichever gives out first.
MAX_JSON_DEPTH = 128

# A ``\u`` escape of a UTF-16 surrogate: the only way JSON text spells one. A false hit (an
# escaped backslash before ``ud800``) only costs the exact check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether ``value``'s arrays and objects nest deeper than ``limit``, level by level, so
    the walk costs one check per element (less than decoding it did) and never recurses."""
    level = [value]
    for _ in range(limit):
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
        ]
        if not level:
            return False
    return any(isinstance(node, dict | list) for node in level)


def _lone_surrogate(value: Any) -> tuple[str, str] | None:
    """The dotted path and ``\\uXXXX`` of the first string (or key) in ``value`` holding a
    surrogate no partner completes; a pair the decoder joined into one character is fine."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError as exc:
                return path, f"\\u{ord(node[exc.start]):04x}"
            continue
        children: list[tuple[Any, Any]]  # (value, its name in the path)
        if isinstance(node, dict):
            # A key is checked like a value; in the path a bad one shows its escape.
            named = [
                (key, item, key.encode("utf-8", "backslashreplace").decode())
                for key, item in node.items()
            ]
            children = [pair for key, item, name in named for pair in ((key, name), (item, name))]
        elif isinstance(node, list):
            children = [(item, index) for index, item in enumerate(node)]
        else:
            continue
        # Reversed, so the stack pops them in document order.
        stack.extend(
            (child, f"{path}.{name}" if path else str(name)) for child, name in reversed(children)
        )
    return None


def parse_json(raw: bytes) -> Any:
    """A request body decoded, or a WireError(400) saying why it cannot be served.

    Beyond invalid JSON this refuses what would otherwise fail deep inside helexa with a
    500: nesting past :data:`MAX_JSON_DEPTH` (the decoder's own recursion guard stops far
    deeper bodies early, the walk after it the rest), and lone surrogates (``"\\ud800"``),
    which no tokenizer can encode. The text is decoded strictly, so surrogates encoded as
    bytes are invalid text like any other.
    """
    too_deep = WireError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        text = raw.decode(json.detect_encoding(raw))
        body = json.loads(text)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise WireError(400, f"request body is not valid JSON: {exc}") from None
    # Fewer brackets than the limit in all cannot nest past it: most bodies skip the walk.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _nests_deeper(body, MAX_JSON_DEPTH):
        raise too_deep
    if _SURROGATE_ESCAPE.search(text):
        found = _lone_surrogate(body)
        if found is not None:
            path, escape = found
            message = f"contains a lone surrogate ({escape}); strings must be valid Unicode"
            raise WireError(400, f"{path}: {message}" if path else message, param=path or None)
    return body


# -- envelopes ------------------------------------------------------------------------------

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


def unsupported_parameter(message: str) -> PydanticCustomError:
    """The error a validator raises for a parameter helexa would otherwise ignore: README
    promises a clear 400 rather than a silent no-op. The message says what is accepted."""
    return PydanticCustomError("unsupported_parameter", message)


def check_tool_choice(tools: list[str], forced: str | None, name: str | None) -> None:
    """Refuse a ``tool_choice`` that makes the model call a tool the request does not give
    (the engine would start a call to nothing): ``forced`` is the choice's own word when it
    forces some call ("required", "any"), ``name`` the tool it names, ``tools`` the names
    the request gives."""
    if name is not None and name not in tools:
        raise PydanticCustomError(
            "invalid_value",
            "names {name}, which is not among the request's tools",
            {"name": repr(name)},
        )
    if forced is not None and not tools:
        raise PydanticCustomError(
            "invalid_value",
            "{choice} needs tools to call, and the request has none",
            {"choice": repr(forced)},
        )


M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], body: Any) -> M:
    """Validate a decoded JSON body, turning every failure into a readable 400."""
    if not isinstance(body, dict):
        raise WireError(400, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise wire_error_from_validation(exc, body) from None
