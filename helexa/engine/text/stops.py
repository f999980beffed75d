"""Stop strings in streamed text: what to show now and what to hold back.

Decoded text arrives a token at a time, so a stop string (or a tag the output parser
waits for) can be split across chunks; the text that might be the start of one is held
until the next chunk decides it.
"""

from __future__ import annotations

from collections.abc import Sequence


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``: how
    much to hold back because the next chunk may complete ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class StopMatcher:
    """Finds stop strings in streamed text, even when one is split across chunks.

    ``feed`` returns the text that is safe to show and the stop string that matched (the
    text before it is returned; the stop string itself and anything after it are not).
    Text that might be the beginning of a stop string is held until it is decided.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, str | None]:
        if self.matched is not None:
            return "", self.matched
        if not self.stops:
            return text, None
        buf = self._held + text
        found = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            index, stop = min(found, key=lambda hit: hit[0])
            self._held, self.matched = "", stop
            return buf[:index], stop
        keep = max(partial_suffix(buf, s) for s in self.stops)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """The held text, once no more will come (it did not complete a stop string)."""
        held, self._held = self._held, ""
        return held
