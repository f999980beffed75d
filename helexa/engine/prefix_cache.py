"""Which part of a new prompt a model's KV cache already holds, and the earlier
conversations kept in host memory for when they come back.

An agent re-sends its whole conversation every turn (system prompt, tools, every earlier
message), so the next prompt usually starts with what the last one left in the KV cache:
its prompt, then the tokens generated for it. Those positions stay valid; only the rest
needs a prefill (llama.cpp's server and vLLM do the same). A side request (a title, a
sub-agent) diverges early and would throw the long conversation away, so the positions it
is about to overwrite are first copied to host memory as a :class:`Snapshot`, and a later
prompt that shares more with a snapshot than with the device gets it copied back instead
of recomputed. Snapshots are an LRU bounded in bytes.

A hybrid model's linear-attention layers keep a recurrent state instead of per-position
K/V: it describes exactly one length, the end of what was run, and cannot be cut back. Its
cache is ``exact``: a prefix is reused only whole, at a length whose state is held (all of
``held``, all of a snapshot, which saves the state with the KV, or the end of the last
prompt, whose state the store marks when its prefill ends); any other prompt is prefilled
from 0.

This module is the bookkeeping only, in token ids, with no torch: the copies between the
device and the host are the :class:`KVStore`'s (helexa.engine.models.kv_cache). It is run
from the one worker thread that owns the model (helexa.engine.worker runs one job at a
time per device), so a cache is never shared by two running requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# Positions a snapshot must save from being overwritten to be worth a device->host copy:
# below this, prefilling them again on a GPU costs about what copying them back would.
MIN_SNAPSHOT_TOKENS = 512
# Tokens compared per step by common_prefix: list slices compare in C, so a 32k-token
# prompt is a few hundred comparisons, not 32k Python steps.
_STRIDE = 128


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i : i + _STRIDE] == b[i : i + _STRIDE]:
        i += _STRIDE
    i = min(i, n)
    end = min(i + _STRIDE, n)
    while i < end and a[i] == b[i]:
        i += 1
    return i


class KVStore(Protocol):
    """Copies KV positions between the device cache and host memory."""

    @property
    def bytes_per_token(self) -> int: ...

    def save(self, length: int) -> Any:
        """Host copies of positions ``0..length``, restorable by :meth:`restore`."""
        ...

    def restore(self, saved: Any, start: int, end: int) -> None:
        """Write positions ``start..end`` of ``saved`` back into the device cache."""
        ...


@dataclass(eq=False)  # one snapshot is one copy: compared by identity, never by tensors
class Snapshot:
    """An earlier conversation's KV, positions 0..len(tokens), in host memory."""

    tokens: list[int]
    saved: Any  # what KVStore.save returned
    nbytes: int


class PrefixCache:
    """What the device's KV cache holds (``held``), and the host snapshots.

    The generation loop calls :meth:`begin` with each prompt before it prefills, then
    :meth:`extend` with every token it feeds the model (prompt chunks, then each sampled
    token fed back), so ``held`` is always exactly the positions whose K/V are valid.
    ``store`` None (or a ``budget_bytes`` of 0) keeps no snapshots: only what the device
    still holds is reused. ``exact`` (a model with recurrent state) reuses a prefix only
    at its full length; such a store says how much its per-snapshot state takes
    (``state_bytes``), counted against the budget beside the per-token KV.
    """

    def __init__(
        self,
        store: KVStore | None = None,
        budget_bytes: int = 0,
        *,
        min_snapshot_tokens: int = MIN_SNAPSHOT_TOKENS,
        exact: bool = False,
    ) -> None:
        self.store = store
        self.exact = exact
        self.budget_bytes = budget_bytes if store is not None else 0
        self.min_snapshot_tokens = min_snapshot_tokens
        self.held: list[int] = []
        self.reused = 0  # prompt tokens the latest begin() found cached
        self.snapshot_bytes = 0  # host memory the snapshots hold now
        self._prompt_len = 0  # where the prompt part of ``held`` ends (generation starts)
        self._mark = 0  # exact: the length whose state the store has marked (0: none)
        self._snapshots: list[Snapshot] = []  # least recently used first

    @property
    def snapshots(self) -> list[Snapshot]:
        return list(self._snapshots)

    def clear(self) -> None:
        """The device cache holds nothing worth reusing (new, or written by a warm-up)."""
        self.held, self._prompt_len, self.reused, self._mark = [], 0, 0, 0

    def begin(self, prompt: Sequence[int]) -> int:
        """Make the device hold the longest cached prefix of ``prompt`` and return its
        length: the position prefill starts at. At least the last prompt token is always
        left to prefill, since its logits pick the first new token."""
        limit = max(len(prompt) - 1, 0)
        reuse = self._reusable(self.held, prompt, limit)  # the device, as it is
        mark = self._mark if self._mark <= limit else 0
        rewind = reuse < mark == common_prefix(self.held[:mark], prompt)
        reuse = mark if rewind else reuse
        best = None
        for snap in self._snapshots:
            shared = self._reusable(snap.tokens, prompt, limit)
            if shared > reuse:
                best, reuse = snap, shared
        # The first position about to be overwritten (by the restore, then the prefill);
        # the device already holds the prompt's tokens before it.
        keep = reuse if best is None else min(common_prefix(self.held, best.tokens), reuse)
        self._save_before_overwrite(keep, best)
        del self.held[keep:]
        if best is not None:
            assert self.store is not None
            self._touch(best)
            self.store.restore(best.saved, keep, reuse)
        elif rewind:
            self.store.rewind()  # type: ignore[union-attr]
        if self._mark > keep:
            self._mark = 0  # positions before it are about to be overwritten
        self.held = list(prompt[:reuse])
        self._prompt_len = len(prompt)
        self.reused = reuse
        return reuse

    def _reusable(self, tokens: Sequence[int], prompt: Sequence[int], limit: int) -> int:
        """How much of ``prompt`` the cached ``tokens`` can stand for: their common prefix
        (at most ``limit``), or, when ``exact``, all of them or nothing."""
        shared = min(common_prefix(tokens, prompt), limit)
        return 0 if self.exact and shared < len(tokens) else shared

    def extend(self, tokens: Sequence[int]) -> None:
        """``tokens`` were just written to the cache, at the positions after ``held``.
        When they complete the prompt, an exact cache has the store mark the state."""
        self.held.extend(tokens)
        mark = getattr(self.store, "mark", None) if self.exact else None
        if mark is not None and len(self.held) == self._prompt_len:
            mark()
            self._mark = len(self.held)

    # -- snapshots ----------------------------------------------------------------------

    def _save_before_overwrite(self, keep: int, restoring: Snapshot | None) -> None:
        """Snapshot ``held`` when the new prompt leaves the previous one's *prompt* at
        ``keep``: a different conversation, which the previous may come back after. A
        new turn that only renders the previous answer differently (Qwen3's template
        drops earlier turns' thinking) loses just generated tokens it never sends again,
        so nothing is saved for it. A conversation longer than the budget keeps its
        start; the snapshot about to be restored is never evicted to make room."""
        if self.store is None or not self.budget_bytes:
            return
        lost = min(self._prompt_len, len(self.held)) - keep
        per_token = max(self.store.bytes_per_token, 1)
        state = getattr(self.store, "state_bytes", 0) if self.exact else 0
        tokens = self.held[: max(self.budget_bytes - state, 0) // per_token]
        if self.exact and len(tokens) < len(self.held):
            return  # the state is at the end of held: a cut-down copy could never be reused
        if min(lost, len(tokens) - keep) < self.min_snapshot_tokens:
            return
        for snap in self._snapshots:
            shared = common_prefix(snap.tokens, tokens)
            if shared == len(tokens) and (not self.exact or shared == len(snap.tokens)):
                self._touch(snap)  # already saved, as part of a longer one (or exactly)
                return
        # Earlier snapshots of this same conversation (prefixes of it) are superseded;
        # then the least recently used make room.
        nbytes = len(tokens) * per_token + state
        superseded = [
            s for s in self._snapshots if common_prefix(s.tokens, tokens) == len(s.tokens)
        ]
        others = [s for s in self._snapshots if s is not restoring and s not in superseded]
        evictable = sum(s.nbytes for s in superseded + others)
        if self.snapshot_bytes - evictable + nbytes > self.budget_bytes:
            return
        for snap in superseded:
            self._drop(snap)
        while self.snapshot_bytes + nbytes > self.budget_bytes:
            self._drop(others.pop(0))
        self._snapshots.append(Snapshot(tokens, self.store.save(len(tokens)), nbytes))
        self.snapshot_bytes += nbytes

    def _touch(self, snap: Snapshot) -> None:
        self._snapshots.remove(snap)
        self._snapshots.append(snap)

    def _drop(self, snap: Snapshot) -> None:
        self._snapshots.remove(snap)
        self.snapshot_bytes -= snap.nbytes
