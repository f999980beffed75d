"""Reading the OpenAI chunk stream every neuron sends: the state a dialect's stream
translator keeps across chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StreamState:
    """What both translators track across chunks."""

    started: bool = False
    finished: bool = False
    finish_reason: str | None = None
    stop_sequence: str | None = None
    usage: dict[str, Any] | None = None
    deltas: int = 0  # chunks that carried content: the output-token fallback

    def absorb(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """Record usage and finish; return the choice-0 entries that carry a delta."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        choices = [c for c in chunk.get("choices") or [] if c.get("index", 0) == 0]
        for choice in choices:
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                self.deltas += 1
        return choices
