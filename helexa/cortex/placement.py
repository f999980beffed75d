"""Placement: which node serves a model, and what must be unloaded there first.

Pure: it reads :class:`NodeView` snapshots (plain dataclasses the fleet builds from its
state) and the catalogue, and returns a :class:`Placement` or model ids, so every rule is
a table test; the fleet performs what it decides. The placement rules, in order:

1. Loaded on an up node: route there (the least busy one when several have it).
2. Loading on an up node: wait for that load rather than start a second copy.
3. An up node that offers the model, or could hold a catalogue model, with room now:
   a node the model is pinned on first, then the most free memory.
4. Otherwise the node where the smallest eviction (per :func:`select_victims`) makes room.
5. Nowhere: None.

Two eviction rules are never broken: a model pinned on a node is never evicted from it,
and a model serving a request (``in_flight > 0``) or still loading is never evicted at
all. Memory is accounted per device: unloading a model frees its share on the devices it
sits on, and a placement fits only when enough devices have enough free memory, so
evicting a model from the wrong GPU never counts as making room.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from helexa.cortex.catalogue import Catalogue, Requirements

Strategy = Literal["lru", "priority"]


@dataclass(frozen=True)
class DeviceView:
    index: int
    total_mb: int
    free_mb: int


@dataclass(frozen=True)
class ModelView:
    """One model on one node: ``id`` is the catalogue's canonical name."""

    id: str
    status: str  # loaded | loading | unloaded | failed | evicting (being unloaded)
    devices: tuple[int, ...] = ()
    vram_mb: int = 0
    in_flight: int = 0
    last_used: float = 0.0  # monotonic seconds; 0 = never used through this gateway
    device_vram_mb: tuple[int, ...] = ()  # a split's MiB on each of ``devices``, as reported


@dataclass(frozen=True)
class NodeView:
    """What placement and eviction know about one node, frozen at one instant."""

    name: str
    up: bool
    devices: tuple[DeviceView, ...] = ()
    models: tuple[ModelView, ...] = ()

    def model(self, model_id: str) -> ModelView | None:
        return next((m for m in self.models if m.id == model_id), None)


# -- fit arithmetic --------------------------------------------------------------------------


def fits(
    devices: Sequence[DeviceView], need: Requirements, *, split: bool = True
) -> list[int] | None:
    """The devices a model would use (most free first), or None when it does not fit now.

    One device with room, when ``min_devices`` is 1; else, or when no one device has
    room, a layer split over the fewest devices (at least ``min_devices``, most free
    first) whose free memory holds it together: the engine gives each device a share in
    proportion to its free memory (helexa.engine.models.layer_split), so mismatched
    cards are used whole. Every device must have ``min_device_vram_mb`` in total.
    ``split`` False: one device or nothing.
    """
    k = max(1, need.min_devices)
    eligible = sorted(
        (d for d in devices if d.total_mb >= need.min_device_vram_mb),
        key=lambda d: (-d.free_mb, d.index),
    )
    if k == 1 and eligible and eligible[0].free_mb >= need.vram_mb:
        return [eligible[0].index]
    for count in range(max(2, k), len(eligible) + 1 if split else 0):
        chosen = eligible[:count]
        if sum(d.free_mb for d in chosen) >= need.vram_mb:
            return [d.index for d in chosen]
    return None


def can_host(devices: Sequence[DeviceView], need: Requirements) -> bool:
    """Whether the node could hold the model were it empty (a catalogue model it could serve)."""
    return fits([replace(d, free_mb=d.total_mb) for d in devices], need) is not None


def free_after(
    devices: Sequence[DeviceView], victims: Iterable[ModelView]
) -> tuple[DeviceView, ...]:
    """Device free memory once ``victims`` are unloaded (each frees its share per device)."""
    free = {d.index: d.free_mb for d in devices}
    for m in victims:
        on = m.devices or (tuple(free) if len(free) == 1 else ())
        shares = m.device_vram_mb
        if len(shares) != len(on):  # not reported per device: an even share each
            shares = tuple(m.vram_mb // len(on) for _ in on)
        for index, share in zip(on, shares, strict=True):
            if index in free:
                free[index] += share
    return tuple(replace(d, free_mb=min(d.total_mb, free[d.index])) for d in devices)


# -- victim selection ------------------------------------------------------------------------


def evictable(model: ModelView, node: str, catalogue: Catalogue) -> bool:
    return (
        model.status == "loaded"
        and model.in_flight == 0
        and not catalogue.is_pinned(model.id, node)
    )


def eviction_order(node: NodeView, strategy: Strategy, catalogue: Catalogue) -> list[ModelView]:
    """Evictable models, first to go first: least recently used, or lowest priority then LRU."""

    def key(m: ModelView) -> tuple[int, float, str]:
        return (catalogue.priority(m.id) if strategy == "priority" else 0, m.last_used, m.id)

    return sorted((m for m in node.models if evictable(m, node.name, catalogue)), key=key)


def select_victims(
    node: NodeView, need: Requirements, strategy: Strategy, catalogue: Catalogue
) -> list[str] | None:
    """The models to unload from ``node`` so ``need`` fits, in order; None if it never can.

    Victims are taken in eviction order until the model fits, then any victim the fit
    does not actually depend on (it freed the wrong device) is spared, newest first.
    Evictions that make room on one device are looked for before those that make room
    for a layer split, whose decode steps run without CUDA graphs.
    """
    if fits(node.devices, need) is not None:
        return []
    for split in (False, True):
        victims = _victims(node, need, strategy, catalogue, split)
        if victims is not None:
            return victims
    return None


def _victims(
    node: NodeView, need: Requirements, strategy: Strategy, catalogue: Catalogue, split: bool
) -> list[str] | None:
    victims: list[ModelView] = []
    for model in eviction_order(node, strategy, catalogue):
        victims.append(model)
        if fits(free_after(node.devices, victims), need, split=split) is not None:
            break
    else:
        return None
    for model in reversed(victims[:-1]):
        trial = [v for v in victims if v is not model]
        if fits(free_after(node.devices, trial), need, split=split) is not None:
            victims = trial
    return [v.id for v in victims]


def idle_victims(node: NodeView, ttl_s: float, catalogue: Catalogue, now: float) -> list[str]:
    """Loaded models unused for ``ttl_s`` seconds (never pinned or busy ones); 0 disables."""
    if ttl_s <= 0:
        return []
    return [m.id for m in eviction_order(node, "lru", catalogue) if now - m.last_used >= ttl_s]


# -- placement -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    node: str
    devices: tuple[int, ...] = ()  # where it will fit (empty when already loaded/loading)
    evict: tuple[str, ...] = ()  # canonical ids to unload from ``node`` first
    loaded: bool = False  # already loaded there: route, do not load
    loading: bool = False  # already loading there: join that load


def candidates(model_id: str, nodes: Sequence[NodeView], catalogue: Catalogue) -> list[NodeView]:
    """Up nodes that could serve ``model_id``: they list it, or it is a catalogue model
    and their devices are big enough to hold it. A catalogue model served from a ``path``
    is only where that file is, on the nodes that list it."""
    need = catalogue.requirements(model_id)
    profile = catalogue.profile(model_id)
    known = profile is not None and not profile.path
    return [
        n
        for n in nodes
        if n.up and (n.model(model_id) is not None or known and can_host(n.devices, need))
    ]


def place(
    model_id: str,
    nodes: Sequence[NodeView],
    catalogue: Catalogue,
    strategy: Strategy = "lru",
    exclude: Collection[str] = (),
) -> Placement | None:
    """Where ``model_id`` (canonical) should run; ``exclude`` names nodes that just failed.

    A node where the model is being evicted is no place to load it again: the load would
    race the unload. The caller waits for that unload, then asks again."""
    usable = [
        n
        for n in candidates(model_id, nodes, catalogue)
        if n.name not in exclude and getattr(n.model(model_id), "status", None) != "evicting"
    ]

    listed = {n.name: m for n in usable if (m := n.model(model_id)) is not None}
    loaded = sorted((m.in_flight, name) for name, m in listed.items() if m.status == "loaded")
    if loaded:
        return Placement(loaded[0][1], loaded=True)
    loading = sorted(name for name, m in listed.items() if m.status == "loading")
    if loading:
        return Placement(loading[0], loading=True)

    need = catalogue.requirements(model_id)
    pinned = catalogue.pinned_nodes(model_id)

    def rank(n: NodeView, cost: int) -> tuple[bool, bool, int, str]:
        # Pinned there first, then nodes that list the model (they know where its files are).
        return (n.name not in pinned, n.name not in listed, cost, n.name)

    room = [
        (rank(n, -max(d.free_mb for d in n.devices)), Placement(n.name, tuple(devices)))
        for n in usable
        if (devices := fits(n.devices, need)) is not None
    ]
    if room:
        return min(room, key=lambda r: r[0])[1]

    plans = []
    for n in usable:
        victims = select_victims(n, need, strategy, catalogue)
        if not victims:  # None: cannot fit even after eviction
            continue
        gone = [m for m in n.models if m.id in victims]
        devices = fits(free_after(n.devices, gone), need) or []
        freed = sum(m.vram_mb for m in gone)
        plans.append((rank(n, freed), Placement(n.name, tuple(devices), tuple(victims))))
    return min(plans, key=lambda p: p[0])[1] if plans else None
