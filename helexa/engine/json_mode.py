"""JSON mode: generation constrained so the answer is one JSON value (``response_format``).

:class:`JsonPrefix` is a byte-level pushdown automaton that accepts exactly the prefixes of
valid JSON (RFC 8259; an object at the top when ``object_only``). :class:`JsonConstraint`
uses it to pick tokens: the sampler proposes a token as usual, and a token whose bytes would
leave the text unable to become valid JSON is masked and the sampler asked again, so the
model's own preferences decide among the valid continuations. Generation stops when the
value is complete. Runs of whitespace outside strings are capped, so a model cannot stall
in "valid" blank space forever.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

WHITESPACE = frozenset(b" \t\n\r")
MAX_WHITESPACE_RUN = 32
_ESCAPES = frozenset(b'"\\/bfnrt')
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")


def _utf8_leads() -> dict[int, tuple[int, tuple[int, int]]]:
    """Lead byte -> (continuation bytes, range of the first one), per RFC 3629."""
    leads = {b: (1, (0x80, 0xBF)) for b in range(0xC2, 0xE0)}
    leads |= {b: (2, (0x80, 0xBF)) for b in range(0xE1, 0xF0)}
    leads |= {0xE0: (2, (0xA0, 0xBF)), 0xED: (2, (0x80, 0x9F))}
    leads |= {b: (3, (0x80, 0xBF)) for b in range(0xF1, 0xF4)}
    leads |= {0xF0: (3, (0x90, 0xBF)), 0xF4: (3, (0x80, 0x8F))}
    return leads


_UTF8_LEADS = _utf8_leads()


class _S(Enum):
    VALUE = auto()  # a value must start here
    FIRST_VALUE = auto()  # after '[': a value or ']'
    FIRST_KEY = auto()  # after '{': a key or '}'
    KEY = auto()  # after ',' in an object: a key
    COLON = auto()
    AFTER = auto()  # a value ended: ',' / closer, or the end at top level
    STRING = auto()
    ESCAPE = auto()
    UNICODE = auto()  # inside \uXXXX
    LITERAL = auto()  # inside true / false / null
    NUMBER = auto()
    DONE = auto()  # the top-level value is complete: whitespace only


# Number sub-states along -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
_START, _MINUS, _ZERO, _INT, _DOT, _FRAC, _E, _ESIGN, _EXP = range(9)
_NUMBER_ENDS = frozenset({_ZERO, _INT, _FRAC, _EXP})


@dataclass
class JsonPrefix:
    """State after the bytes fed so far; ``feed`` returns False (and leaves the state
    undefined: use :meth:`copy` to try bytes) when they cannot begin valid JSON."""

    object_only: bool = True
    state: _S = _S.VALUE
    stack: list[int] = field(default_factory=list)  # b"{" / b"[" of the open containers
    is_key: bool = False  # the open string is an object key
    pending: bytes = b""  # the rest of a literal, or hex digits left in \u
    number: int = _START
    utf8_left: int = 0  # continuation bytes the current character still needs
    utf8_next: tuple[int, int] = (0x80, 0xBF)  # the range the next one must be in
    blank: int = 0  # whitespace bytes in a row outside strings

    def copy(self) -> JsonPrefix:
        return JsonPrefix(
            self.object_only,
            self.state,
            list(self.stack),
            self.is_key,
            self.pending,
            self.number,
            self.utf8_left,
            self.utf8_next,
            self.blank,
        )

    @property
    def complete(self) -> bool:
        """The bytes so far are a whole JSON value (more whitespace may follow)."""
        return self.state is _S.DONE or (
            self.state is _S.NUMBER and not self.stack and self.number in _NUMBER_ENDS
        )

    def feed_bytes(self, data: bytes) -> bool:
        return all(self.feed(b) for b in data)

    def feed(self, b: int) -> bool:
        s = self.state
        if s is _S.STRING:
            return self._string(b)
        if s is _S.ESCAPE:
            if b == ord("u"):
                self.state, self.pending = _S.UNICODE, b"xxxx"
                return True
            self.state = _S.STRING
            return b in _ESCAPES
        if s is _S.UNICODE:
            if b not in _HEX:
                return False
            self.pending = self.pending[1:]
            if not self.pending:
                self.state = _S.STRING
            return True
        if s is _S.LITERAL:
            if b != self.pending[0]:
                return False
            self.pending = self.pending[1:]
            if not self.pending:
                self._value_ended()
            return True
        if s is _S.NUMBER:
            if self._number(b):
                return True
            if self.number not in _NUMBER_ENDS:
                return False
            self._value_ended()  # the number ended at a byte that belongs to what follows
            return self.feed(b)
        if b in WHITESPACE:
            self.blank += 1
            return self.blank <= MAX_WHITESPACE_RUN
        self.blank = 0
        if s is _S.DONE:
            return False
        if s is _S.COLON:
            self.state = _S.VALUE
            return b == ord(":")
        if s is _S.AFTER:
            return self._after(b)
        if s in (_S.FIRST_KEY, _S.KEY):
            if b == ord("}") and s is _S.FIRST_KEY:
                self.stack.pop()
                self._value_ended()
                return True
            self.state, self.is_key = _S.STRING, True
            return b == ord('"')
        if s is _S.FIRST_VALUE and b == ord("]"):
            self.stack.pop()
            self._value_ended()
            return True
        return self._value(b)

    # -- pieces ---------------------------------------------------------------------------

    def _value(self, b: int) -> bool:
        if self.object_only and not self.stack and b != ord("{"):
            return False
        if b in b"{[":
            self.stack.append(b)
            self.state = _S.FIRST_KEY if b == ord("{") else _S.FIRST_VALUE
        elif b == ord('"'):
            self.state, self.is_key = _S.STRING, False
        elif b == ord("-") or b in _DIGITS:
            self.state, self.number = _S.NUMBER, _START
            return self._number(b)
        elif b in b"tfn":
            self.state = _S.LITERAL
            self.pending = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}[b]
        else:
            return False
        return True

    def _value_ended(self) -> None:
        self.state = _S.AFTER if self.stack else _S.DONE

    def _after(self, b: int) -> bool:
        if not self.stack:
            return False
        top = self.stack[-1]
        if b == ord(","):
            self.state = _S.KEY if top == ord("{") else _S.VALUE
            return True
        if b == (ord("}") if top == ord("{") else ord("]")):
            self.stack.pop()
            self._value_ended()
            return True
        return False

    def _string(self, b: int) -> bool:
        if self.utf8_left:
            low, high = self.utf8_next
            if not low <= b <= high:
                return False
            self.utf8_left, self.utf8_next = self.utf8_left - 1, (0x80, 0xBF)
            return True
        if b == ord('"'):
            if self.is_key:
                self.state = _S.COLON
            else:
                self._value_ended()
            return True
        if b == ord("\\"):
            self.state = _S.ESCAPE
            return True
        if b < 0x20:
            return False  # control characters must be escaped
        if b >= 0x80:  # a UTF-8 lead byte: what must follow (no overlongs, no surrogates)
            lead = _UTF8_LEADS.get(b)
            if lead is None:
                return False
            self.utf8_left, self.utf8_next = lead
        return True

    def _number(self, b: int) -> bool:
        """Advance the number by ``b``; False when ``b`` cannot extend it."""
        n, digit = self.number, b in _DIGITS
        if n == _START and b == ord("-"):
            self.number = _MINUS
        elif n in (_START, _MINUS) and digit:
            self.number = _ZERO if b == ord("0") else _INT
        elif n == _INT and digit:
            pass
        elif n in (_ZERO, _INT) and b == ord("."):
            self.number = _DOT
        elif n in (_DOT, _FRAC) and digit:
            self.number = _FRAC
        elif n in (_ZERO, _INT, _FRAC) and b in b"eE":
            self.number = _E
        elif n == _E and b in b"+-":
            self.number = _ESIGN
        elif n in (_E, _ESIGN, _EXP) and digit:
            self.number = _EXP
        else:
            return False
        return True


class JsonConstraint:
    """Token choice for JSON mode over one generation.

    ``token_bytes(id)`` gives a token's bytes, or None for special/added tokens (never valid
    inside JSON). End-of-sequence tokens are valid only once the value is complete.
    ``tail``: text that must follow the value (a forced tool call's closing ``}`` and tag);
    the token that completes the value may go on into it (a tokenizer's ``"}}``), and
    :attr:`rest` is what of it is still to write once the value is closed.
    """

    def __init__(
        self,
        token_bytes: Callable[[int], bytes | None],
        eos_ids: frozenset[int],
        *,
        object_only: bool = True,
        tail: bytes = b"",
        tries: int = 8,
    ) -> None:
        self.prefix = JsonPrefix(object_only=object_only)
        self._bytes = token_bytes
        self._eos = eos_ids
        self._tail = tail
        self._tail_written = 0
        self._tries = tries

    @property
    def complete(self) -> bool:
        return self.prefix.complete

    @property
    def closed(self) -> bool:
        """Nothing but whitespace can follow: stop generating."""
        return self.prefix.state is _S.DONE

    @property
    def rest(self) -> str:
        """The part of the tail not yet written (all of it until the value is closed)."""
        return self._tail[self._tail_written :].decode()

    def _feed(self, prefix: JsonPrefix, data: bytes) -> int | None:
        """Feed ``data`` to ``prefix``: how many bytes of the tail it wrote after the value,
        or None when it cannot continue the value (and then the tail)."""
        written = 0
        for b in data:
            if self._tail and prefix.state is _S.DONE and (written or b not in WHITESPACE):
                # After the value (and any blank, which JSON allows there): the tail, as is.
                at = self._tail_written + written
                if at >= len(self._tail) or self._tail[at] != b:
                    return None
                written += 1
            elif not prefix.feed(b):
                return None
        return written

    def allows(self, token: int) -> bool:
        if token in self._eos:
            return self.prefix.complete
        data = self._bytes(token)
        return bool(data) and self._feed(self.prefix.copy(), data) is not None

    def advance(self, token: int) -> None:
        if token not in self._eos:
            data = self._bytes(token)
            written = None if data is None else self._feed(self.prefix, data)
            if written is None:
                raise ValueError(f"token {token} is not valid JSON here")
            self._tail_written += written

    def pick(
        self,
        sample: Callable[[torch.Tensor, Sequence[int]], int],
        logits: torch.Tensor,
        generated: Sequence[int],
    ) -> int:
        """The sampler's choice among the valid tokens: propose, mask what is invalid,
        propose again; after ``tries`` misses, the most likely valid token."""
        logits = logits.clone()
        for _ in range(self._tries):
            token = sample(logits, generated)
            if self.allows(token):
                return token
            logits[token] = float("-inf")
        for token in torch.argsort(logits, descending=True).tolist():
            if logits[token] == float("-inf"):
                break
            if self.allows(token):
                return token
        raise ValueError("no token continues the JSON")  # unreachable with a byte-level vocab
