"""The prompt cache's bookkeeping, in token ids: what a prompt may reuse, when an earlier
conversation is saved to host memory, and when it is copied back."""

from __future__ import annotations

from typing import Any

import pytest

from helexa.engine.prefix_cache import PrefixCache, common_prefix


class FakeStore:
    """A KVStore over a list standing for the device's cache positions."""

    bytes_per_token = 10

    def __init__(self) -> None:
        self.device: list[int | None] = [None] * 4096
        self.saves: list[int] = []
        self.restores: list[tuple[int, int]] = []

    def save(self, length: int) -> Any:
        self.saves.append(length)
        return list(self.device[:length])

    def restore(self, saved: Any, start: int, end: int) -> None:
        self.restores.append((start, end))
        self.device[start:end] = saved[start:end]


def run(cache: PrefixCache, store: FakeStore, prompt: list[int], generated: list[int]) -> int:
    """One request as the generation loop makes it: begin, prefill, feed back all but the
    last generated token. Writes each token id into the fake device at its position."""
    start = cache.begin(prompt)
    assert store.device[:start] == prompt[:start], "reused positions must hold the prompt"
    store.device[start : len(prompt)] = prompt[start:]
    cache.extend(prompt[start:])  # the prefill
    store.device[len(prompt) : len(prompt) + len(generated) - 1] = generated[:-1]
    cache.extend(generated[:-1])  # the decode steps
    assert cache.held == store.device[: len(cache.held)]
    return start


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        ([], [1], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2], 2),
        ([1, 2, 3], [1, 9, 3], 1),
        (list(range(1000)), [*range(700), -1, *range(701, 1000)], 700),
        (list(range(256)), list(range(300)), 256),
    ],
)
def test_common_prefix(a: list[int], b: list[int], n: int) -> None:
    assert common_prefix(a, b) == common_prefix(b, a) == n


def test_reuse_follows_the_device_cache() -> None:
    cache = PrefixCache()
    assert cache.begin([1, 2, 3]) == 0
    cache.extend([1, 2, 3, 7, 8])  # the prompt, then two generated tokens fed back
    assert cache.begin([1, 2, 3, 7, 8, 9, 4]) == 5  # a new turn re-sending the answer
    assert cache.held == [1, 2, 3, 7, 8]
    cache.extend([9, 4])
    assert cache.begin([1, 2, 3, 5]) == 3  # diverges mid-way
    cache.extend([5])
    assert cache.begin([1, 2, 3, 5]) == 3  # repeated: the last token is prefilled again
    cache.extend([5])
    assert cache.begin([1, 2]) == 1  # shorter than what is cached
    assert cache.reused == 1 and cache.held == [1]
    cache.clear()
    assert cache.begin([1, 2]) == 0


def test_a_side_request_saves_the_conversation_and_its_return_restores_it() -> None:
    store = FakeStore()
    cache = PrefixCache(store, budget_bytes=10_000, min_snapshot_tokens=8)
    system = list(range(100, 110))
    main = [*system, *range(20)]
    assert run(cache, store, main, [50, 51, 52]) == 0
    side = [*system, 900, 901]
    assert run(cache, store, side, [60, 61]) == len(system)
    # Saved before the side request overwrote it: the prompt and the answer fed back.
    assert store.saves == [len(main) + 2]
    assert cache.snapshot_bytes == (len(main) + 2) * store.bytes_per_token
    back = [*main, 50, 51, 52, 7, 8]
    assert run(cache, store, back, [70]) == len(main) + 3 - 1  # 52 was never fed back
    # Only what the side request had overwritten is copied back.
    assert store.restores == [(len(system), len(main) + 2)]


def test_a_new_turn_that_re_renders_the_answer_saves_nothing() -> None:
    """Qwen3 drops earlier turns' thinking: the next turn diverges where the previous
    answer began, and what it loses is generated tokens it will never send again."""
    store = FakeStore()
    cache = PrefixCache(store, budget_bytes=10_000, min_snapshot_tokens=4)
    prompt = list(range(40))
    run(cache, store, prompt, list(range(500, 530)))
    assert run(cache, store, [*prompt, 600, 601, 602], [1]) == len(prompt)
    assert store.saves == [] and cache.snapshots == []


def test_small_divergences_and_no_budget_save_nothing() -> None:
    store = FakeStore()
    cache = PrefixCache(store, budget_bytes=10_000, min_snapshot_tokens=16)
    run(cache, store, list(range(30)), [1, 2])
    run(cache, store, [*range(20), 99], [1])  # loses 10 prompt tokens: under 16
    none = PrefixCache(store, budget_bytes=0, min_snapshot_tokens=1)
    run(none, store, list(range(30)), [1, 2])
    run(none, store, [99], [1])
    assert store.saves == [] and cache.snapshots == none.snapshots == []


def test_a_conversation_past_the_budget_keeps_its_start() -> None:
    store = FakeStore()
    cache = PrefixCache(store, budget_bytes=100, min_snapshot_tokens=4)
    run(cache, store, list(range(30)), [1, 2])
    run(cache, store, [99], [1])  # 31 tokens * 10 bytes: only the first 10 fit
    assert [s.tokens for s in cache.snapshots] == [list(range(10))]
    assert run(cache, store, [*range(30), 5], [1]) == 10  # the start comes back, the rest
    assert store.restores == [(0, 10)]  # is prefilled
    short = PrefixCache(store, budget_bytes=100, min_snapshot_tokens=4)
    run(short, store, [*range(8), *range(100, 120)], [1])
    run(short, store, [*range(8), 99], [1])  # shares 8: the 10 that fit add only 2
    assert short.snapshots == []


def test_snapshots_are_an_lru_within_the_budget() -> None:
    store = FakeStore()
    cache = PrefixCache(store, budget_bytes=25 * 10, min_snapshot_tokens=5)
    conversations = [[k, *range(10)] for k in (1000, 2000, 3000)]
    for prompt in conversations:
        run(cache, store, prompt, [5, 6])  # each one saves the one before it
    # 12 tokens each: two fit in 25, so the first one went.
    assert [s.tokens[0] for s in cache.snapshots] == [1000, 2000]
    run(cache, store, [1, 2, 3], [4])  # saves 3000, evicting the oldest (1000)
    assert [s.tokens[0] for s in cache.snapshots] == [2000, 3000]
    assert cache.snapshot_bytes == 24 * 10
    # Coming back to 2000 restores it and makes it the most recent ([1, 2, 3] is too
    # short to be worth a snapshot).
    assert run(cache, store, [*conversations[1], 5, 7], [1]) == 12
    assert [s.tokens[0] for s in cache.snapshots] == [3000, 2000]


def test_a_longer_save_of_the_same_conversation_replaces_the_shorter() -> None:
    store = FakeStore()
    cache = PrefixCache(store, budget_bytes=10_000, min_snapshot_tokens=1)
    a = list(range(10))
    run(cache, store, a, [50, 51])
    run(cache, store, [99, 98], [1])  # saves a + [50]
    run(cache, store, [*a, 50, 51, 52], [53, 54])  # restores it, extends it
    run(cache, store, [97, 96], [1])  # saves the longer one: the shorter is superseded
    assert [len(s.tokens) for s in cache.snapshots if s.tokens[0] == 0] == [14]
    run(cache, store, [*a, 50, 51], [1])  # a prefix of a snapshot: restored from it
    run(cache, store, [95], [1])  # held is inside the snapshot already: no new copy
    assert store.saves.count(14) == 1
    assert len([s for s in cache.snapshots if s.tokens[0] == 0]) == 1


def test_the_snapshot_being_restored_is_not_evicted_to_save_another() -> None:
    store = FakeStore()
    cache = PrefixCache(store, budget_bytes=15 * 10, min_snapshot_tokens=1)  # room for one
    a, b = [1, *range(10)], [2, *range(10)]
    run(cache, store, a, [5])
    run(cache, store, b, [5])  # saves a
    assert run(cache, store, [*a, 7], [5]) == len(a)  # b would only fit in a's place
    assert store.saves == [len(a)] and [s.tokens for s in cache.snapshots] == [a]


class FakeStateStore(FakeStore):
    """A store for a model with recurrent state: the device's "state" is the length of
    the sequence it has run, which a mark/rewind or a restore sets back."""

    state_bytes = 500

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[int] = []
        self.rewinds = 0

    def mark(self) -> None:
        self.marks.append(sum(t is not None for t in self.device))

    def rewind(self) -> None:
        self.rewinds += 1


def test_exact_reuses_all_of_what_is_held_or_nothing() -> None:
    """A recurrent state stands for exactly the sequence run: a prompt that extends it
    continues, one that diverges anywhere inside it starts again from 0."""
    cache = PrefixCache(exact=True)
    assert cache.begin([1, 2, 3]) == 0
    cache.extend([1, 2, 3, 7, 8])
    assert cache.begin([1, 2, 3, 7, 8, 9, 4]) == 5  # extends: continues
    cache.extend([9, 4])
    assert cache.begin([1, 2, 3, 7, 8, 9, 5]) == 0  # shares 6 of 7: from the start
    cache.extend([1, 2, 3, 7, 8, 9, 5])
    assert cache.begin([1, 2, 3, 7, 8, 9, 5]) == 0  # repeated: its last token is needed


def test_exact_rewinds_to_the_marked_end_of_the_last_prompt() -> None:
    store = FakeStateStore()
    cache = PrefixCache(store, exact=True)
    prompt = list(range(40))
    run(cache, store, prompt, [500, 501, 502])
    assert store.marks == [len(prompt)]  # marked when the prompt's prefill ended
    # The answer re-rendered differently: back to the prompt's end, not to 0.
    assert run(cache, store, [*prompt, 600, 601], [1]) == len(prompt) and store.rewinds == 1
    # Diverging inside the prompt: nothing marked fits, from 0.
    assert run(cache, store, [*prompt[:30], 9], [1]) == 0 and store.rewinds == 1


def test_exact_snapshots_are_whole_and_carry_the_state() -> None:
    store = FakeStateStore()
    cache = PrefixCache(store, budget_bytes=1000, min_snapshot_tokens=8, exact=True)
    main = list(range(30))
    run(cache, store, main, [50, 51, 52])
    run(cache, store, [900, 901], [1])  # a side request from 0: the conversation is saved
    (snapshot,) = cache.snapshots
    assert snapshot.tokens == [*main, 50, 51]
    assert snapshot.nbytes == 32 * store.bytes_per_token + store.state_bytes
    assert run(cache, store, [*main, 50, 51, 52, 7], [1]) == 32  # restored whole
    assert store.restores == [(0, 32)]
    # A conversation whose KV and state do not fit whole is not saved at all.
    small = PrefixCache(FakeStateStore(), budget_bytes=700, min_snapshot_tokens=8, exact=True)
    run(small, small.store, main, [50, 51])  # type: ignore[arg-type]
    run(small, small.store, [900], [1])  # type: ignore[arg-type]
    assert small.snapshots == []
