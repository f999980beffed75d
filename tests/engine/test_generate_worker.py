"""DeviceWorker: one thread owns the device; jobs and streams bridge to asyncio."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from helexa.engine.worker import DeviceWorker, StepTimeout, StreamStalled


@pytest.fixture
async def worker() -> AsyncIterator[DeviceWorker]:
    w = DeviceWorker("cpu")
    yield w
    await w.close()


async def test_submit_runs_on_the_named_device_thread(worker: DeviceWorker) -> None:
    name = await worker.submit(lambda: threading.current_thread().name)
    assert name == "helexa-cpu"
    assert await worker.submit(pow, 2, 10) == 1024


async def test_a_failing_job_fails_alone(worker: DeviceWorker) -> None:
    def boom() -> None:
        raise ValueError("bad weights")

    with pytest.raises(ValueError, match="bad weights"):
        await worker.submit(boom)

    def exits() -> None:
        raise SystemExit(3)

    with pytest.raises(RuntimeError, match="SystemExit"):
        await worker.submit(exits)
    assert await worker.submit(lambda: "still alive") == "still alive"


async def test_stream_yields_in_order_from_the_device_thread(worker: DeviceWorker) -> None:
    def gen(n: int, cancel: threading.Event) -> Iterator[tuple[int, str]]:
        for i in range(n):
            yield i, threading.current_thread().name

    got = [item async for item in worker.stream(gen, 50)]
    assert got == [(i, "helexa-cpu") for i in range(50)]


async def test_stream_error_after_items_reaches_the_consumer(worker: DeviceWorker) -> None:
    def gen(cancel: threading.Event) -> Iterator[int]:
        yield 1
        yield 2
        raise RuntimeError("CUDA fell over")

    got: list[int] = []
    with pytest.raises(RuntimeError, match="CUDA fell over"):
        async for item in worker.stream(gen):
            got.append(item)
    assert got == [1, 2]

    def refuses(cancel: threading.Event) -> Iterator[int]:
        raise ValueError("prompt too long")

    with pytest.raises(ValueError, match="prompt too long"):
        await anext(worker.stream(refuses))
    assert await worker.submit(lambda: 7) == 7


async def test_closing_the_stream_cancels_the_generator(worker: DeviceWorker) -> None:
    saw_cancel = threading.Event()
    closed = threading.Event()

    def endless(cancel: threading.Event) -> Iterator[int]:
        i = 0
        try:
            while not cancel.is_set():
                yield i
                i += 1
            saw_cancel.set()
        finally:
            closed.set()

    stream = worker.stream(endless)
    got = [await anext(stream) for _ in range(3)]
    await stream.aclose()
    assert got == [0, 1, 2]
    # The worker runs one job at a time: this returns only once the generation job ended.
    assert await worker.submit(lambda: "next") == "next"
    assert closed.is_set()


async def test_bounded_buffer_holds_the_producer_back(worker: DeviceWorker) -> None:
    consumed = 0
    lags: list[int] = []

    def gen(cancel: threading.Event) -> Iterator[int]:
        for i in range(40):
            lags.append(i - consumed)
            yield i

    async for _ in worker.stream(gen, buffer=3):
        await asyncio.to_thread(lambda: None)  # a slow client
        consumed += 1
    assert len(lags) == 40
    # Item i is produced only once fewer than buffer + 1 items are waiting.
    assert max(lags) <= 4


async def test_a_stream_nobody_reads_is_cancelled_and_the_device_goes_on(
    worker: DeviceWorker,
) -> None:
    cancels: list[threading.Event] = []
    closed = threading.Event()

    def endless(cancel: threading.Event) -> Iterator[int]:
        cancels.append(cancel)
        i = 0
        try:
            while not cancel.is_set():
                yield i
                i += 1
        finally:
            closed.set()

    stream = worker.stream(endless, buffer=2, stall_s=0.05)
    assert await anext(stream) == 0  # then the reader stops reading
    # The device serves the next job without the stalled reader taking anything more.
    assert await worker.submit(lambda: "next") == "next"
    assert cancels[0].is_set() and closed.is_set()
    # Reading on gets what was waiting, then why the stream ended.
    with pytest.raises(StreamStalled, match="2 chunks waiting"):
        assert [await anext(stream) for _ in range(3)] == [1, 2]
    await stream.aclose()


async def test_a_step_that_never_finishes_ends_its_stream_and_the_worker_takes_no_more() -> None:
    release = threading.Event()  # the "hung step": set only when the test is done
    queued_ran = threading.Event()
    w = DeviceWorker("cpu")

    def hangs(cancel: threading.Event) -> Iterator[int]:
        yield 1
        release.wait()  # a forward pass that does not return

    def after(cancel: threading.Event) -> Iterator[int]:
        queued_ran.set()
        yield 2

    try:
        got: list[int] = []
        # A second stream queued behind the hung one is not on the clock while it waits;
        # it ends with the same error once the first has marked the worker hung.
        queued = w.stream(after, step_s=0.2)
        with pytest.raises(StepTimeout, match="did not finish in 0.2 s"):
            async for item in w.stream(hangs, step_s=0.2):
                got.append(item)
                first = asyncio.ensure_future(anext(queued))
        assert got == [1]
        assert w.hung is not None and "helexa-cpu" in w.hung
        with pytest.raises(StepTimeout):
            await first
        with pytest.raises(StepTimeout):
            await w.submit(pow, 2, 2)
        assert not queued_ran.is_set()
    finally:
        release.set()
        await w.close()


async def test_submit_after_close_is_refused() -> None:
    w = DeviceWorker("cpu")
    await w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.submit(lambda: None)
