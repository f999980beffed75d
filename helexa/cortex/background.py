"""The gateway's background loops: the poller, which keeps the fleet's picture of every
node fresh, and the evictor, which unloads models idle past ``eviction.idle_ttl_s``.

The poller asks every node for discovery, health and models each interval. A node that
fails to answer within ``timeout_s`` is marked down, so requests reroute to the others;
when it answers again it rejoins with fresh discovery (its devices may have changed while
it was away). Polls run concurrently, so one hung node never delays the picture of the
rest. Both loops only call the fleet; which models are idle is placement's decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from helexa.config import Settings
from helexa.cortex.fleet import Fleet

log = logging.getLogger(__name__)


class _Loop:
    """One background task, started at most once and stopped by cancelling it."""

    name = "helexa-loop"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def _wanted(self) -> bool:
        return True

    def start(self) -> None:
        """Run the loop in the background (idempotent)."""
        if self._wanted() and self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Poller(_Loop):
    """Polls now and then every ``interval_s``."""

    name = "helexa-poller"

    def __init__(self, fleet: Fleet, interval_s: float = 5.0, timeout_s: float = 3.0) -> None:
        super().__init__()
        self.fleet = fleet
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.polled = asyncio.Event()  # set once the first round is done (start-up readiness)

    @classmethod
    def from_settings(cls, fleet: Fleet, settings: Settings) -> Poller:
        return cls(fleet, settings.poller.interval_s, settings.poller.timeout_s)

    async def poll_once(self) -> None:
        try:
            await self.fleet.refresh(self.timeout_s)
        finally:  # even a failed round is a look: start-up must not wait forever
            self.polled.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # a bug in one round must not stop polling for good
                log.exception("fleet poll failed")
            await asyncio.sleep(self.interval_s)


class Evictor(_Loop):
    """Unloads models idle past ``eviction.idle_ttl_s``; does nothing when that is 0."""

    name = "helexa-evictor"

    def __init__(self, fleet: Fleet, settings: Settings) -> None:
        super().__init__()
        self.fleet = fleet
        self.ttl_s = settings.eviction.idle_ttl_s
        # Check often enough that a model outlives its TTL by at most a quarter of it.
        self.interval_s = min(30.0, max(0.5, self.ttl_s / 4))

    async def run_once(self, now: float | None = None) -> list[tuple[str, str]]:
        """Unload every idle model now; returns the (node, model) pairs unloaded."""
        return await self.fleet.evict_idle(self.ttl_s, time.monotonic() if now is None else now)

    def _wanted(self) -> bool:
        return self.ttl_s > 0

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                for node, model in await self.run_once():
                    log.info("evicted idle model %s from %s", model, node)
            except Exception:  # keep evicting next round; the fleet marks bad nodes down
                log.exception("idle eviction failed")
