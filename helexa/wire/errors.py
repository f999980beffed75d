"""Error envelopes per dialect, the exception the parsers and translators raise, and the
one-line message a pydantic failure becomes.

Parsers and translators never know which HTTP route they serve, so they raise
:class:`WireError` with a status and a plain message; whoever answers renders any
:class:`~helexa.errors.ApiError` (this one included) in the caller's dialect with
:func:`error_body`. Validation messages name the caller's field as a dotted path of its own
JSON, not of our models, so a client can find what it sent wrong.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from helexa.errors import ApiError

# The error shapes clients parse; Responses clients are OpenAI SDKs and read OpenAI's.
Dialect = Literal["openai", "anthropic"]

# Anthropic names its error types after the status; anything unlisted falls back by class.
_ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    507: "api_error",
    529: "overloaded_error",
}

_OPENAI_TYPES: dict[int, str] = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def anthropic_error_type(status: int) -> str:
    """The Anthropic ``error.type`` a client expects for an HTTP status."""
    if status in _ANTHROPIC_TYPES:
        return _ANTHROPIC_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def openai_error_type(status: int) -> str:
    """The OpenAI ``error.type`` for an HTTP status (SDKs key off the status, humans read this)."""
    if status in _OPENAI_TYPES:
        return _OPENAI_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error body; all four fields are always present, as the SDKs expect."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def anthropic_error_body(status: int, message: str, type: str | None = None) -> dict[str, Any]:
    """Anthropic's error body; ``type`` follows ``status`` unless given."""
    return {
        "type": "error",
        "error": {"type": type or anthropic_error_type(status), "message": message},
    }


def _anthropic_message(error: ApiError) -> str:
    """What Anthropic would say: a prompt past the context in its own words, which Claude
    Code reads to start compacting the conversation; anything else as it is."""
    prompt, maximum = error.extra.get("prompt_tokens"), error.extra.get("max_context")
    if (
        error.code == "context_length_exceeded"
        and isinstance(prompt, int)
        and isinstance(maximum, int)
    ):
        return f"prompt is too long: {prompt} tokens > {maximum} maximum"
    return error.message


def error_body(dialect: Dialect, error: ApiError) -> dict[str, Any]:
    """``error`` as ``dialect``'s error body; structured extras (``needed_mb``) ride along."""
    if dialect == "anthropic":
        # Anthropic clients know a fixed set of types, chosen by status.
        body = anthropic_error_body(error.status, _anthropic_message(error))
    else:
        kind = error.type or openai_error_type(error.status)
        body = openai_error_body(error.message, type=kind, code=error.code, param=error.param)
    body["error"].update({k: v for k, v in error.extra.items() if k not in body["error"]})
    return body


class WireError(ApiError):
    """A client mistake (or an unsupported feature) found while reading or mapping a request.

    ``param`` names the offending field as a dotted path (``messages.0.content.1``) so the
    caller can find it without reading our code. Its type is left to the dialect.
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, param=param)


# Segments pydantic inserts into ``loc`` for union branches ("str", "list[...]",
# "function-after[...]"); they name our types, not the caller's fields.
_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}


def _is_type_label(segment: str) -> bool:
    return "[" in segment or segment in _TYPE_LABELS


def _is_tag(node: Any, seg: int | str, nxt: int | str | None) -> bool:
    """Whether ``seg`` is the union tag pydantic put in the path for object ``node``.

    A tag equals the object's ``type``/``role``. When it is also a key (``{"type": "text",
    "text": ...}``) it is the tag if the path goes on inside this same object.
    """
    if not isinstance(node, dict) or seg not in (node.get("type"), node.get("role")):
        return False
    return seg not in node or nxt is None or (isinstance(nxt, str) and nxt in node)


def _clean_loc(loc: tuple[int | str, ...], body: Any, missing: bool) -> list[int | str]:
    """Drop the segments of ``loc`` that are not in the caller's JSON.

    pydantic adds union tags (``messages.0.user.content``) and type labels
    (``content.str``) to the path. With the body at hand we walk it: tags go (see
    :func:`_is_tag`), keys and indexes stay, anything else is a label, except a final
    missing field. Without the body only type labels can go.
    """
    if body is None:
        return [s for s in loc if not (isinstance(s, str) and _is_type_label(s))]
    out: list[int | str] = []
    node: Any = body
    tag_seen = False  # a node has at most one tag; ``text.text`` is tag then field
    for i, seg in enumerate(loc):
        nxt = loc[i + 1] if i + 1 < len(loc) else None
        if not tag_seen and _is_tag(node, seg, nxt):
            tag_seen = True
            continue
        tag_seen = False
        in_dict = isinstance(node, dict) and isinstance(seg, str) and seg in node
        in_list = isinstance(node, list) and isinstance(seg, int) and 0 <= seg < len(node)
        if in_dict or in_list:
            node = node[seg]
            out.append(seg)
        elif isinstance(seg, int) or (missing and i == len(loc) - 1):
            out.append(seg)
    return out


# A non-object where an object belongs, in pydantic's words ("a valid dictionary or instance
# of StreamOptions" names our class); JSON calls them objects.
_OBJECT_TYPE_ERRORS = {"model_type", "model_attributes_type", "dict_type"}


def _error_text(err: ErrorDetails) -> tuple[str, str | None]:
    """Message and an extra trailing path segment for one pydantic error."""
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "union_tag_invalid":
        field = str(ctx.get("discriminator", "")).strip("'")
        return f"{ctx.get('tag')!r} is not one of {ctx.get('expected_tags')}", field or None
    if kind == "union_tag_not_found":
        field = str(ctx.get("discriminator", "")).strip("'")
        return "Field required", field or None
    if kind in _OBJECT_TYPE_ERRORS:
        return "Input should be an object", None
    return str(err["msg"]), None


def validation_message(exc: ValidationError, body: Any = None) -> str:
    """One readable line for a pydantic error: ``messages.0.role: 'bogus' is not one of ...``.

    Of several errors we report the most relevant (see :func:`_relevance`): with unions,
    the branch that got furthest is the one the caller meant. Pass the request body to
    drop the union tags pydantic adds to the path.
    """
    path, text, _ = _describe(exc, body)
    return f"{path}: {text}" if path else text


def wire_error_from_validation(exc: ValidationError, body: Any = None) -> WireError:
    """The 400 a parser raises for a body that does not fit the envelope."""
    path, text, kind = _describe(exc, body)
    return WireError(
        400,
        f"{path}: {text}" if path else text,
        code=kind if kind in ("unsupported_content", "unsupported_parameter") else None,
        param=path or None,
    )


def _relevance(err: ErrorDetails) -> tuple[int, bool]:
    """Deeper errors first; at equal depth, a broken constraint beats a type mismatch
    (``input: List should have at least 1 item`` over ``Input should be a valid string``)
    because it comes from the union branch whose type the caller did send. ``max`` keeps
    the first of equals.
    """
    return len(err["loc"]), not err["type"].endswith("_type")


def _describe(exc: ValidationError, body: Any) -> tuple[str, str, str]:
    """Path, message and pydantic error type of the error worth reporting."""
    errors = exc.errors()
    if not errors:
        return "", str(exc), ""
    err = max(errors, key=_relevance)
    text, extra = _error_text(err)
    loc = _clean_loc(tuple(err["loc"]), body, err["type"] == "missing")
    if extra:
        loc.append(extra)
    return ".".join(str(s) for s in loc), text, err["type"]
