"""Placement: which node serves a model, and what must be unloaded first.

Pure: it reads :class:`NodeView` snapshots and the catalogue and returns a
:class:`Placement`; the fleet performs it. The rules, in order:

1. Loaded on an up node: route there (the least busy one when several have it).
2. Loading on an up node: wait for that load rather than start a second copy.
3. An up node that offers the model, or could hold a catalogue model, with room now:
   a node the model is pinned on first, then the most free memory.
4. Otherwise the node where the smallest eviction (per :func:`select_victims`) makes room.
5. Nowhere: None.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from helexa.cortex.catalogue import Catalogue
from helexa.cortex.evictor import (
    DeviceView,
    ModelView,
    NodeView,
    Strategy,
    can_host,
    fits,
    free_after,
    select_victims,
)

__all__ = ["DeviceView", "ModelView", "NodeView", "Placement", "candidates", "place"]


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
