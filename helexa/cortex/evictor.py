"""Eviction: which models to unload to make room, and which have sat idle too long.

The choice is pure: it reads :class:`NodeView` snapshots (plain dataclasses built from the
fleet's state) and returns model ids, so every rule is a table test. Two rules are never
broken: a model pinned on a node is never evicted from it, and a model serving a request
(``in_flight > 0``) or still loading is never evicted at all.

Memory is accounted per device: unloading a model frees its share on the devices it sits
on, and a placement fits only when enough devices have enough free memory, so evicting a
model from the wrong GPU never counts as making room. :class:`Evictor` is the background
task that unloads idle models past ``eviction.idle_ttl_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from helexa.config import Settings
from helexa.cortex.catalogue import Catalogue, Requirements

if TYPE_CHECKING:
    from helexa.cortex.fleet import Fleet

log = logging.getLogger(__name__)
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


def fits(devices: Sequence[DeviceView], need: Requirements) -> list[int] | None:
    """The devices a model would use (most free first), or None when it does not fit now.

    The model is split evenly over ``min_devices`` devices, each of which must have at
    least ``min_device_vram_mb`` in total and its share free.
    """
    k = max(1, need.min_devices)
    eligible = [d for d in devices if d.total_mb >= need.min_device_vram_mb]
    chosen = sorted(eligible, key=lambda d: (-d.free_mb, d.index))[:k]
    share = math.ceil(need.vram_mb / k)
    if len(chosen) < k or any(d.free_mb < share for d in chosen):
        return None
    return [d.index for d in chosen]


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
        for index in on:
            if index in free:
                free[index] += m.vram_mb // len(on)
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
    """
    if fits(node.devices, need) is not None:
        return []
    victims: list[ModelView] = []
    for model in eviction_order(node, strategy, catalogue):
        victims.append(model)
        if fits(free_after(node.devices, victims), need) is not None:
            break
    else:
        return None
    for model in reversed(victims[:-1]):
        trial = [v for v in victims if v is not model]
        if fits(free_after(node.devices, trial), need) is not None:
            victims = trial
    return [v.id for v in victims]


def idle_victims(node: NodeView, ttl_s: float, catalogue: Catalogue, now: float) -> list[str]:
    """Loaded models unused for ``ttl_s`` seconds (never pinned or busy ones); 0 disables."""
    if ttl_s <= 0:
        return []
    return [m.id for m in eviction_order(node, "lru", catalogue) if now - m.last_used >= ttl_s]


# -- the background task ---------------------------------------------------------------------


class Evictor:
    """Unloads models idle past ``eviction.idle_ttl_s``; does nothing when that is 0."""

    def __init__(self, fleet: Fleet, settings: Settings) -> None:
        self.fleet = fleet
        self.ttl_s = settings.eviction.idle_ttl_s
        # Check often enough that a model outlives its TTL by at most a quarter of it.
        self.interval_s = min(30.0, max(0.5, self.ttl_s / 4))
        self._task: asyncio.Task[None] | None = None

    async def run_once(self, now: float | None = None) -> list[tuple[str, str]]:
        """Unload every idle model now; returns the (node, model) pairs unloaded."""
        return await self.fleet.evict_idle(self.ttl_s, time.monotonic() if now is None else now)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                for node, model in await self.run_once():
                    log.info("evicted idle model %s from %s", model, node)
            except Exception:  # keep evicting next round; the fleet marks bad nodes down
                log.exception("idle eviction failed")

    def start(self) -> None:
        if self.ttl_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="helexa-evictor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
