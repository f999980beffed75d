"""Placement's eviction rules (fit arithmetic, victim selection, idle victims): pure
table tests over NodeView snapshots."""

from __future__ import annotations

import pytest

from helexa.config import ModelProfile
from helexa.cortex.catalogue import Catalogue, Requirements
from helexa.cortex.placement import (
    DeviceView,
    ModelView,
    NodeView,
    can_host,
    fits,
    free_after,
    idle_victims,
    select_victims,
)

GPU = DeviceView(0, total_mb=24000, free_mb=0)


def node(*models: ModelView, devices: tuple[DeviceView, ...] = (GPU,), name: str = "n") -> NodeView:
    return NodeView(name, True, devices, models)


def loaded(
    id: str, vram: int, last_used: float, *, on: tuple[int, ...] = (0,), in_flight: int = 0
) -> ModelView:
    return ModelView(id, "loaded", on, vram, in_flight, last_used)


CATALOGUE = Catalogue(
    [
        ModelProfile(id="pinned", pinned_on=["n"]),
        ModelProfile(id="important", priority=10),
        ModelProfile(id="cheap", priority=-5),
    ]
)

# -- fit arithmetic --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("free", "need", "expected"),
    [
        ((10000,), Requirements(8000), [0]),
        ((7000,), Requirements(8000), None),
        ((3000, 9000), Requirements(8000), [1]),
        ((5000, 5000), Requirements(8000, min_devices=2), [0, 1]),
        # A split takes shares by free memory (the engine's layer split): 6000 + 2000 fits.
        ((9000, 3000), Requirements(8000, min_devices=2), [0, 1]),
        ((5000, 2000), Requirements(8000, min_devices=2), None),
        # No one device holds it: split over the fewest that do, most free first.
        ((5000, 4000), Requirements(8000), [0, 1]),
        ((2000, 5000, 4000), Requirements(8000), [1, 2]),
        ((2000, 5000, 4000), Requirements(10000), [1, 2, 0]),
        ((2000, 5000, 4000), Requirements(12000), None),
        ((9000,), Requirements(1000, min_devices=2), None),  # one device only
        ((9000, 9000), Requirements(1000, min_device_vram_mb=30000), None),  # too small
        ((100,), Requirements(0), [0]),  # unknown size: preflight decides
    ],
)
def test_fits(free: tuple[int, ...], need: Requirements, expected: list[int] | None) -> None:
    devices = [DeviceView(i, 24000, f) for i, f in enumerate(free)]
    assert fits(devices, need) == expected


def test_can_host_ignores_what_is_loaded() -> None:
    full = (DeviceView(0, 24000, 0),)
    assert can_host(full, Requirements(20000))
    assert not can_host(full, Requirements(30000))
    assert not can_host(full, Requirements(1000, min_device_vram_mb=32000))


def test_free_after_credits_each_device_its_share() -> None:
    devices = (DeviceView(0, 24000, 1000), DeviceView(1, 24000, 2000))
    split = loaded("tp", 8000, 1, on=(0, 1))
    assert free_after(devices, [split]) == (DeviceView(0, 24000, 5000), DeviceView(1, 24000, 6000))


def test_free_after_credits_a_split_what_it_reported_per_device() -> None:
    devices = (DeviceView(0, 12000, 1000), DeviceView(1, 24000, 2000))
    split = ModelView("big", "loaded", (0, 1), 30000, device_vram_mb=(10000, 20000))
    assert free_after(devices, [split]) == (
        DeviceView(0, 12000, 11000),
        DeviceView(1, 24000, 22000),
    )


# -- select_victims ----------------------------------------------------------------------------

A = loaded("a", 8000, last_used=100)
B = loaded("b", 8000, last_used=200)
C = loaded("c", 8000, last_used=300)


@pytest.mark.parametrize(
    ("models", "need", "strategy", "victims"),
    [
        # LRU: the least recently used goes first, and only as many as needed.
        ((A, B, C), Requirements(8000), "lru", ["a"]),
        ((C, B, A), Requirements(8000), "lru", ["a"]),
        ((A, B, C), Requirements(16000), "lru", ["a", "b"]),
        # Pinned on this node and in-flight models are never chosen.
        ((loaded("pinned", 8000, 1), B, C), Requirements(8000), "lru", ["b"]),
        ((loaded("a", 8000, 1, in_flight=1), B, C), Requirements(8000), "lru", ["b"]),
        # Loading models cannot be evicted either.
        ((ModelView("a", "loading", (0,), 8000), B, C), Requirements(8000), "lru", ["b"]),
        # Priority strategy: lowest priority first, LRU within a priority.
        (
            (loaded("important", 8000, 1), loaded("cheap", 8000, 900), B),
            Requirements(8000),
            "priority",
            ["cheap"],
        ),
        (
            (loaded("important", 8000, 1), loaded("cheap", 8000, 900), B),
            Requirements(8000),
            "lru",
            ["important"],
        ),
        # Not enough evictable memory: None.
        ((loaded("pinned", 16000, 1), A), Requirements(16000), "lru", None),
        ((A,), Requirements(30000), "lru", None),
    ],
)
def test_select_victims(
    models: tuple[ModelView, ...], need: Requirements, strategy: str, victims: list[str] | None
) -> None:
    assert select_victims(node(*models), need, strategy, CATALOGUE) == victims  # type: ignore[arg-type]


def test_select_victims_nothing_when_it_already_fits() -> None:
    roomy = node(A, devices=(DeviceView(0, 24000, 16000),))
    assert select_victims(roomy, Requirements(8000), "lru", CATALOGUE) == []


def test_select_victims_spares_models_on_the_wrong_device() -> None:
    # The LRU model sits on GPU 1, which alone cannot take 12000; evicting b on GPU 0 can.
    devices = (DeviceView(0, 16000, 4000), DeviceView(1, 10000, 0))
    a_on_1 = loaded("a", 10000, 100, on=(1,))
    b_on_0 = loaded("b", 12000, 200, on=(0,))
    assert select_victims(
        node(a_on_1, b_on_0, devices=devices), Requirements(12000), "lru", CATALOGUE
    ) == ["b"]


def test_select_victims_makes_room_for_a_split_when_no_one_device_can_hold_it() -> None:
    # 16000 fits no 12000 card; evicting the LRU model frees enough across both.
    devices = (DeviceView(0, 12000, 4000), DeviceView(1, 12000, 6000))
    old_on_1 = loaded("a", 6000, 100, on=(1,))
    new_on_0 = loaded("b", 4000, 200, on=(0,))
    assert select_victims(
        node(old_on_1, new_on_0, devices=devices), Requirements(16000), "lru", CATALOGUE
    ) == ["a"]


def test_select_victims_prunes_an_unneeded_older_victim() -> None:
    # a (oldest) frees GPU 1, which is too small for the model; b alone on GPU 0 makes room.
    devices = (DeviceView(0, 24000, 0), DeviceView(1, 8000, 0))
    a = loaded("a", 8000, 100, on=(1,))
    b = loaded("b", 24000, 200, on=(0,))
    assert select_victims(node(a, b, devices=devices), Requirements(20000), "lru", CATALOGUE) == [
        "b"
    ]


def test_runtime_pin_protects_a_model() -> None:
    catalogue = Catalogue([])
    catalogue.pin("a", "n")
    assert select_victims(node(A, B), Requirements(8000), "lru", catalogue) == ["b"]


# -- idle_victims ------------------------------------------------------------------------------


def test_idle_victims_past_ttl() -> None:
    models = (
        loaded("a", 1000, last_used=0),
        loaded("b", 1000, last_used=950),
        loaded("pinned", 1000, last_used=0),
        loaded("busy", 1000, last_used=0, in_flight=2),
        ModelView("gone", "unloaded", (), 0, 0, 0),
    )
    assert idle_victims(node(*models), 100, CATALOGUE, now=1000) == ["a"]
    assert idle_victims(node(*models), 30, CATALOGUE, now=1000) == ["a", "b"]
    assert idle_victims(node(*models), 0, CATALOGUE, now=1000) == []  # 0 disables
