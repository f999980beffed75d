"""One thread per device runs every torch call for that device.

The asyncio loop (gateway, TUI, neuron server) must never block on a forward pass, and a
CUDA context is happiest driven from one thread. So each device gets a ``DeviceWorker``:
a thread draining a job queue. ``submit`` runs one call and resolves an asyncio future;
``stream`` runs a blocking iterator (a generation) and hands its items to the loop one
by one, with a bounded buffer so a slow client slows generation instead of piling up
chunks. The device thread serves every stream in turn, so it never waits on one reader
for long: a stream that has kept it waiting ``stall_s`` in all (its client stopped
reading, or trickles) is cancelled and the thread goes on to the next job. Closing the async iterator sets the
generation's cancel event, which the generation loop checks between tokens. An exception
fails only its own job.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_ITEM, _ERROR, _DONE = "item", "error", "done"


def thread_name(device: torch.device) -> str:
    return "helexa-cpu" if device.type == "cpu" else f"helexa-dev-{device.index or 0}"


def open_devices(devices: Iterable[torch.device]) -> None:
    """Create each CUDA device's context now, as a step a load's log line times: a
    thread's ``torch.cuda.set_device`` only picks the device (for the one already current,
    cuda:0, it does not reach the driver at all), so the context, from a fraction of a
    second to a couple on a large GPU, would otherwise come with the load's first
    allocation, unseen inside its weights read. Nothing to do for a CPU, or once the
    context exists."""
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _as_exception(exc: BaseException) -> Exception:
    """Futures must not carry SystemExit/KeyboardInterrupt out of a job: the worker thread
    and the process keep running, the caller sees an ordinary error."""
    return exc if isinstance(exc, Exception) else RuntimeError(f"job aborted: {exc!r}")


def _stalled(buffer: int, stall_s: float) -> str:
    return (
        f"the stream was cancelled: its reader left {buffer} chunks waiting while the "
        f"device waited {stall_s:g} s for it"
    )


class StreamStalled(RuntimeError):
    """A stream's reader kept the device waiting, its buffer full, for the stall timeout
    in all; the generation was cancelled so the device could serve the others."""


class StepTimeout(RuntimeError):
    """A stream's job produced nothing for the step timeout: a forward pass (or a
    collective) that does not finish. The device thread is stuck in it, so the worker
    refuses all further jobs (:attr:`DeviceWorker.hung`) instead of queueing them behind
    it; what the stuck call holds cannot be freed from Python."""


class DeviceWorker:
    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.name = thread_name(self.device)
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._closed = False
        self.hung: str | None = None  # why, once a step outlived the step timeout
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while (job := self._jobs.get()) is not None:
            with torch.inference_mode():
                job()  # jobs report their own errors; nothing escapes to here

    def _put(self, job: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} worker is closed")
        if self.hung is not None:
            raise StepTimeout(self.hung)
        self._jobs.put(job)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on the device thread; cancelling the future before it starts
        skips it."""
        result: Future[T] = Future()

        def job() -> None:
            if not result.set_running_or_notify_cancel():
                return
            try:
                result.set_result(fn(*args))
            except BaseException as exc:
                result.set_exception(_as_exception(exc))

        self._put(job)
        return asyncio.wrap_future(result)

    async def stream(
        self,
        gen_fn: Callable[..., Iterable[T]],
        *args: Any,
        buffer: int = 32,
        stall_s: float | None = None,
        step_s: float | None = None,
    ) -> AsyncIterator[T]:
        """Iterate ``gen_fn(*args, cancel)`` on the device thread, yielding here.

        ``cancel`` (a ``threading.Event``) is appended to the arguments; it is set when
        this async iterator is closed or abandoned, and the generator should stop soon
        after. At most ``buffer`` items wait for the consumer before the producer blocks;
        once it has been blocked ``stall_s`` in all (None: no limit; a reader that trickles
        holds the device as surely as one that stopped) it gives up: ``cancel`` is set and
        the consumer, should it read on, gets the waiting items and then
        :class:`StreamStalled`.

        ``step_s`` bounds, once the job has started, how long the consumer waits for the
        next item (a prefill, a decode step): past it the stream ends with
        :class:`StepTimeout` and the worker is marked hung. It is watched here, on the
        loop, so the device thread's token loop pays nothing for it.
        """
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        slots = threading.Semaphore(buffer)
        patience = stall_s  # seconds the producer may still wait for a slot, in all

        def slot() -> bool:
            """Take a buffer slot, waiting within what patience is left; False: none left."""
            nonlocal patience
            if slots.acquire(blocking=False):
                return True
            if patience is None:
                return slots.acquire()
            began = time.monotonic()
            taken = slots.acquire(timeout=max(patience, 0.0))
            patience -= time.monotonic() - began
            return taken

        def send(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, (kind, value))
            except RuntimeError:  # the loop is gone: nobody is listening any more
                cancel.set()

        started = threading.Event()  # the step timeout runs from the job's start

        def job() -> None:
            if cancel.is_set():
                return
            started.set()
            iterator = None
            try:
                iterator = iter(gen_fn(*args, cancel))
                for item in iterator:
                    if not slot():
                        assert stall_s is not None
                        cancel.set()
                        send(_ERROR, StreamStalled(_stalled(buffer, stall_s)))
                        return
                    if cancel.is_set():
                        break
                    send(_ITEM, item)
            except BaseException as exc:
                send(_ERROR, _as_exception(exc))
            else:
                send(_DONE, None)
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()

        self._put(job)
        try:
            while True:
                kind, value = await self._next(items, started, step_s)
                if kind == _ITEM:
                    slots.release()
                    yield value
                elif kind == _ERROR:
                    raise value
                else:
                    return
        finally:
            cancel.set()
            slots.release()  # wake a producer blocked on a full buffer so it sees cancel

    async def _next(
        self, items: asyncio.Queue[tuple[str, Any]], started: threading.Event, step_s: float | None
    ) -> tuple[str, Any]:
        """The stream's next message, waited for at most ``step_s`` once its job runs
        (a job queued behind another stream's is not yet on the clock)."""
        if step_s is None or not items.empty():
            return await items.get()
        while not started.is_set():
            try:
                async with asyncio.timeout(step_s):
                    return await items.get()
            except TimeoutError:
                if self.hung is not None:  # the job ahead of ours is stuck: ours never runs
                    raise StepTimeout(self.hung) from None
        try:
            async with asyncio.timeout(step_s):
                return await items.get()
        except TimeoutError:
            self.hung = (
                f"a step on {self.name} did not finish in {step_s:g} s; the device is "
                "stuck in it and takes no more work until the node restarts"
            )
            raise StepTimeout(self.hung) from None

    async def close(self) -> None:
        """Stop after the queued jobs; running generations stop when their streams close."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
