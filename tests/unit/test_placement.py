"""Placement rules: pure table tests of placement.place over NodeView snapshots."""

from __future__ import annotations

from helexa.config import ModelProfile
from helexa.cortex.catalogue import Catalogue
from helexa.cortex.placement import DeviceView, ModelView, NodeView, Placement, candidates, place

CATALOGUE = Catalogue(
    [
        ModelProfile(id="small", vram_mb=4000),
        ModelProfile(id="big", vram_mb=20000),
        ModelProfile(id="tp", vram_mb=30000, min_devices=2, min_device_vram_mb=16000),
        ModelProfile(id="home", vram_mb=4000, pinned_on=["beast"]),
        ModelProfile(id="resident", vram_mb=8000, pinned_on=["benjy"]),
    ]
)


def gpu(index: int, free: int, total: int = 24000) -> DeviceView:
    return DeviceView(index, total, free)


def model(id: str, status: str = "loaded", vram: int = 0, **kw: object) -> ModelView:
    return ModelView(id, status, (0,), vram, **kw)  # type: ignore[arg-type]


def node(
    name: str, *devices: DeviceView, models: tuple[ModelView, ...] = (), up: bool = True
) -> NodeView:
    return NodeView(name, up, devices, models)


def test_routes_to_a_loaded_copy_least_busy_first() -> None:
    nodes = [
        node("a", gpu(0, 20000), models=(model("small", in_flight=3),)),
        node("b", gpu(0, 1000), models=(model("small", in_flight=1),)),
        node("c", gpu(0, 24000)),
    ]
    assert place("small", nodes, CATALOGUE) == Placement("b", loaded=True)


def test_a_down_node_is_never_chosen() -> None:
    nodes = [
        node("a", gpu(0, 20000), models=(model("small"),), up=False),
        node("b", gpu(0, 8000)),
    ]
    assert place("small", nodes, CATALOGUE) == Placement("b", (0,))


def test_joins_a_load_in_progress() -> None:
    nodes = [node("a", gpu(0, 24000)), node("b", gpu(0, 0), models=(model("big", "loading"),))]
    assert place("big", nodes, CATALOGUE) == Placement("b", loading=True)


def test_cold_load_prefers_most_free_memory() -> None:
    nodes = [node("a", gpu(0, 6000)), node("b", gpu(0, 9000)), node("c", gpu(0, 1000))]
    assert place("small", nodes, CATALOGUE) == Placement("b", (0,))


def test_cold_load_picks_the_device_with_room() -> None:
    nodes = [node("a", gpu(0, 1000), gpu(1, 21000))]
    assert place("big", nodes, CATALOGUE) == Placement("a", (1,))


def test_pinned_node_preferred_when_it_has_room() -> None:
    nodes = [node("benjy", gpu(0, 20000)), node("beast", gpu(0, 5000))]
    assert place("home", nodes, CATALOGUE) == Placement("beast", (0,))


def test_min_devices_and_min_device_vram() -> None:
    nodes = [
        node("one-big", gpu(0, 80000, total=80000)),  # one device: min_devices=2 rules it out
        node("small-cards", gpu(0, 12000, 12000), gpu(1, 12000, 12000)),  # under 16000 each
        node("pair", gpu(0, 20000), gpu(1, 16000)),
    ]
    assert place("tp", nodes, CATALOGUE) == Placement("pair", (0, 1))
    assert [n.name for n in candidates("tp", nodes, CATALOGUE)] == ["pair"]


def test_a_model_no_card_holds_is_placed_across_mismatched_cards() -> None:
    # A 12 GB card beside a 24 GB one: "big" (20000) fits neither alone once the 24 GB
    # card has 15000 free, but fits across both; a single card that holds it still wins.
    mixed = node("mixed", gpu(0, 11000, total=12000), gpu(1, 15000))
    assert place("big", [mixed], CATALOGUE) == Placement("mixed", (1, 0))
    roomy = node("roomy", gpu(0, 24000))
    assert place("big", [mixed, roomy], CATALOGUE) == Placement("roomy", (0,))


def test_eviction_plan_when_nothing_fits() -> None:
    nodes = [
        node(
            "a",
            gpu(0, 2000),
            models=(model("x", vram=10000, last_used=5.0), model("y", vram=10000, last_used=1.0)),
        ),
    ]
    assert place("small", nodes, CATALOGUE) == Placement("a", (0,), evict=("y",))


def test_eviction_prefers_the_node_that_frees_least() -> None:
    nodes = [
        node("a", gpu(0, 0), models=(model("x", vram=24000),)),
        node("b", gpu(0, 0), models=(model("y", vram=6000), model("z", vram=18000, last_used=9.0))),
    ]
    assert place("small", nodes, CATALOGUE) == Placement("b", (0,), evict=("y",))


def test_pinned_model_blocks_eviction() -> None:
    nodes = [node("benjy", gpu(0, 0), models=(model("resident", vram=24000),))]
    assert place("small", nodes, CATALOGUE) is None


def test_busy_models_block_eviction() -> None:
    nodes = [node("a", gpu(0, 0), models=(model("x", vram=24000, in_flight=1),))]
    assert place("small", nodes, CATALOGUE) is None


def test_unknown_model_only_on_nodes_that_list_it() -> None:
    nodes = [
        node("a", gpu(0, 24000)),
        node("b", gpu(0, 4000), models=(model("adhoc/model", "unloaded"),)),
    ]
    assert place("adhoc/model", nodes, CATALOGUE) == Placement("b", (0,))
    assert place("other/model", nodes, CATALOGUE) is None


def test_nodes_listing_a_catalogue_model_are_preferred() -> None:
    nodes = [
        node("a", gpu(0, 24000)),
        node("b", gpu(0, 8000), models=(model("small", "unloaded"),)),
    ]
    assert place("small", nodes, CATALOGUE) == Placement("b", (0,))


def test_excluded_nodes_are_skipped() -> None:
    nodes = [node("a", gpu(0, 24000)), node("b", gpu(0, 8000))]
    assert place("small", nodes, CATALOGUE, exclude={"a"}) == Placement("b", (0,))
    assert place("small", nodes, CATALOGUE, exclude={"a", "b"}) is None


def test_a_node_evicting_the_model_is_no_place_to_load_it() -> None:
    """It has room for a second copy while the first unloads, but a load there would race
    the unload: another node, else None (the fleet waits for the unload and asks again)."""
    evicting = node("a", gpu(0, 20000), models=(model("small", "evicting", vram=4000),))
    assert place("small", [evicting, node("b", gpu(0, 6000))], CATALOGUE) == Placement("b", (0,))
    assert place("small", [evicting], CATALOGUE) is None


def test_too_big_everywhere_is_none() -> None:
    assert place("big", [node("a", gpu(0, 16000, total=16000))], CATALOGUE) is None
