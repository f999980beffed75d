"""Sessions on disk and in memory, and fitting a long conversation into the model's context
window.

A session is one JSON file under ``data_dir()/acp/sessions`` holding the whole history,
written after every model turn and tool round, so ``session/load`` works after the agent
(or the editor) restarts. Compaction never edits that history: it derives the view sent
upstream, so a reloaded session still replays everything the user saw. A
:class:`LiveSession` is what the agent holds besides the record while it serves one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from helexa.acp.config import Selection, answer_reserve
from helexa.acp.providers.base import Message

log = logging.getLogger("helexa.acp.session")

_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
ELIDED = "[tool output elided to fit the context window]"
DROPPED = "[Earlier conversation was dropped to fit the context window.]"


@dataclass
class SessionRecord:
    id: str
    cwd: str
    selector: str  # endpoint:model, re-resolved against the config on load
    messages: list[Message] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


_RECORD = TypeAdapter(SessionRecord)


@dataclass
class LiveSession:
    """A session the agent serves: its record, and what is not saved with it (permissions
    granted for the session, the running prompt, the window learned this run)."""

    record: SessionRecord
    selection: Selection
    always_allowed: set[str] = field(default_factory=set)
    cancel: asyncio.Event | None = None  # set while a prompt runs
    # What the endpoint said of the model's window: the selection it is for, the window
    # (None: it gave none), and until when (monotonic) a None stands before asking again.
    learned: tuple[Selection, int | None, float] | None = None

    @property
    def id(self) -> str:
        return self.record.id


def new_session_id() -> str:
    return f"sess_{uuid.uuid4().hex}"


class SessionStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, session_id: str) -> Path | None:
        # Ids come from the client: never let one name a path outside the store.
        return self.root / f"{session_id}.json" if _ID.match(session_id) else None

    def save(self, record: SessionRecord) -> None:
        path = self._path(record.id)
        assert path is not None, record.id
        record.updated_at = time.time()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(_RECORD.dump_json(record, indent=1))
        os.replace(tmp, path)  # a crash mid-write leaves the previous version intact

    def load(self, session_id: str) -> SessionRecord | None:
        path = self._path(session_id)
        if path is None or not path.is_file():
            return None
        try:
            return _RECORD.validate_json(path.read_bytes())
        except (OSError, ValidationError) as exc:
            log.warning("session file %s is unreadable: %s", path, exc)
            return None


# -- compaction ----------------------------------------------------------------------------


def estimate_tokens(messages: list[Message]) -> int:
    """About four characters a token, plus framing; close enough to decide when to trim."""
    total = 0
    for m in messages:
        chars = len(m.content) + sum(len(c.name) + len(c.arguments) for c in m.tool_calls)
        total += chars // 4 + 8
    return total


def compact(messages: list[Message], budget: int) -> list[Message]:
    """The conversation as it should be sent to fit ``budget`` estimated tokens.

    First the oldest tool outputs are elided (they are large and usually re-readable), then
    whole old turns are dropped. The last message and the last user turn are never touched:
    if they alone exceed the budget the upstream gets to say so.
    """
    if estimate_tokens(messages) <= budget:
        return messages
    out = list(messages)
    for i, m in enumerate(out[:-1]):
        if m.role == "tool" and m.content != ELIDED:
            out[i] = replace(m, content=ELIDED)
            if estimate_tokens(out) <= budget:
                return out
    turns = [i for i, m in enumerate(out) if m.role == "user"]
    dropped = False
    while len(turns) > 1 and estimate_tokens(out) > budget:
        cut = turns[1] - turns[0]
        out = out[cut:]
        turns = [t - cut for t in turns[1:]]
        dropped = True
    if dropped:
        out[0] = replace(out[0], content=f"{DROPPED}\n\n{out[0].content}")
    return out


def request_budget(context_window: int, max_tokens: int | None) -> int:
    """Tokens the conversation may take: the window less room for the answer."""
    return max(context_window - answer_reserve(context_window, max_tokens), context_window // 4)
