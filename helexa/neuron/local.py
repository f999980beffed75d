"""The in-process neuron: this host's devices, driven by helexa's own engine.

cortex talks to it through the same :class:`~helexa.neuron.interface.Neuron` protocol as
to a remote node, minus the HTTP hop. Each device gets one :class:`DeviceWorker` thread
that runs every torch call for it, so the event loop never waits on a forward pass.

Models it can serve: the catalogue's profiles, what was pulled into the sources' caches,
and files under ``[local] model_dirs`` loaded by path (an absolute path or a ``file:``
id); ids resolve to files on this host through neuron.sources. No other path is opened:
the neuron API is a client's, and must not read any file on the host for it.
Loading is single-flight per model, preflighted (neuron.preflight picks the device and
refuses what cannot load) before any device memory is touched, and a failed load fails
without harming the worker or other models: a catalogue model is marked failed with its
reason, anything else is forgotten (the caller and the log have the reason), so a path
that did not load is never listed as a model.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event
from typing import TYPE_CHECKING, Any

from helexa.config import Settings
from helexa.engine.boot import Phases, import_engine, import_for_cuda
from helexa.engine.checkpoint.errors import CheckpointError
from helexa.errors import ApiError
from helexa.neuron import preflight
from helexa.neuron.discovery import discover, read_health
from helexa.neuron.interface import (
    Discovery,
    Health,
    LoadRequest,
    ModelState,
    ModelStatus,
    NeuronError,
)
from helexa.neuron.sources import ModelRef, downloaded, path_allowed, ref_for, resolve_local

if TYPE_CHECKING:
    # The engine (torch, triton, llguidance, the tokenizers) is imported on the first
    # load, not here: the gateway embeds this neuron and answers /health and /v1/models
    # before any model is loaded, and importing torch alone takes seconds on a GPU host.
    import torch

    from helexa.engine.checkpoint.gguf_header import GGUFHeader
    from helexa.engine.checkpoint.types import Progress
    from helexa.engine.generate import LoadedModel
    from helexa.engine.request import RequestError
    from helexa.engine.worker import DeviceWorker

MB = 1 << 20
log = logging.getLogger("helexa.neuron")


@dataclass
class _Entry:
    """One model's lifecycle on this node."""

    model_id: str
    status: ModelStatus = "unloaded"
    loaded: LoadedModel | None = None
    device: torch.device | None = None  # where its worker runs: the first of ``devices``
    devices: list[torch.device] = field(default_factory=list)  # several: a layer split
    error: str | None = None
    task: asyncio.Future[None] | None = None  # the load in flight, shared by its callers
    progress: float = 0.0  # weight bytes placed, 0..1, written by the loading worker thread

    def state(self) -> ModelState:
        loaded, devices = self.loaded, self.devices if self.device is not None else []
        held = loaded.device_memory_bytes() if loaded and len(devices) > 1 else {}
        return ModelState(
            id=self.model_id,
            status=self.status,
            devices=[d.index or 0 for d in devices],
            vram_used_mb=loaded.memory_bytes // MB if loaded else 0,
            device_vram_mb=[held.get(str(d), 0) // MB for d in devices] if held else [],
            prompt_cache_mb=loaded.prompt_cache_bytes // MB if loaded else 0,
            context_length=loaded.context_length if loaded else None,
            progress=self.progress if self.status == "loading" else None,
            error=self.error,
        )

    def report(self, fraction: float) -> None:
        self.progress = fraction


def _load_error(model_id: str, exc: Exception) -> NeuronError:
    """A failed load in the neuron API's terms: a bad file is the caller's 422, running
    out of device memory despite preflight a 507 like preflight's own, the rest a 500."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return NeuronError(
            f"loading {model_id!r} ran out of device memory: {exc}",
            status=507,
            type="preflight",
            code="insufficient_vram",
        )
    bad_input = isinstance(exc, CheckpointError | FileNotFoundError)
    return NeuronError(
        f"loading {model_id!r} failed: {exc}",
        status=422 if bad_input else 500,
        type="invalid_request_error" if bad_input else "server_error",
        code="load_failed",
    )


def _refused(exc: RequestError) -> NeuronError:
    """The engine's refusal of a request as the neuron API's 400, its structured fields
    (a context overflow's token counts) riding along as error extras."""
    return NeuronError(
        exc.message, status=400, type="invalid_request_error", code=exc.code, extra=exc.extra
    )


def _ref(model_id: str, settings: Settings) -> ModelRef | None:
    """What ``model_id`` names on disk, to tell two spellings of one model apart."""
    try:
        return ref_for(model_id, settings)
    except ValueError:
        return None


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark a load's failure as seen: its callers may all have been cancelled."""
    if not task.cancelled():
        task.exception()


def _free_memory(device: torch.device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class LocalNeuron:
    def __init__(self, settings: Settings, *, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or settings.local.name
        self._started = time.time()
        self._entries: dict[str, _Entry] = {p.id: _Entry(p.id) for p in settings.models}
        self._workers: dict[torch.device, DeviceWorker] = {}
        self._discovery: Discovery | None = None

    # -- node facts -------------------------------------------------------------------------

    async def discovery(self) -> Discovery:
        if self._discovery is None:  # static facts: read once
            self._discovery = await asyncio.to_thread(discover)
        return self._discovery

    async def health(self) -> Health:
        return await asyncio.to_thread(read_health, self._started)

    async def models(self) -> list[ModelState]:
        """Every model this node has an entry for, then what was pulled into its caches
        and is not one of them (listed unloaded, so cortex can route to it by name)."""
        states = [entry.state() for entry in self._entries.values()]
        on_disk = await asyncio.to_thread(downloaded, self.settings)
        refs = {_ref(model_id, self.settings) for model_id in self._entries}
        for model_id in on_disk:
            if model_id not in self._entries and _ref(model_id, self.settings) not in refs:
                states.append(ModelState(id=model_id, status="unloaded"))
        return states

    # -- lifecycle --------------------------------------------------------------------------

    def _resolve(self, model_id: str) -> Path:
        """The file or directory ``model_id`` names here; a path outside the catalogue and
        ``[local] model_dirs`` is refused before it is looked at (not even whether it
        exists is told)."""
        ref = _ref(model_id, self.settings)
        if ref is not None and ref.path is not None and not path_allowed(ref.path, self.settings):
            where = "outside them" if self.settings.local.model_dirs else "none are set"
            raise NeuronError(
                f"model {model_id!r} is a path, and node {self.name!r} loads by path only "
                f"the catalogue's own and those in [local] model_dirs ({where})",
                status=403,
                type="permission_error",
                code="path_not_allowed",
            )
        path = resolve_local(model_id, self.settings)
        if path is None:
            raise NeuronError(
                f"model {model_id!r} is not available on node {self.name!r} "
                f"(not a local path and not downloaded; try `helexa pull {model_id}`)",
                status=404,
                type="not_found_error",
                code="model_not_available",
            )
        return path

    async def _place(
        self,
        path: Path,
        request: LoadRequest,
        context: int | None,
        min_devices: int,
        phases: Phases,
    ) -> tuple[list[torch.device], GGUFHeader | None]:
        """The device preflight picks (most free memory among the allowed ones), or the
        GPUs of a layer split when none holds the model alone or the catalogue asks for
        ``min_devices``; it refuses, with a structured error, a model that is
        unsupported, incomplete or does not fit. With it, a GGUF's header as preflight
        parsed it, for the load to use instead of parsing it again."""
        discovery, health = await asyncio.gather(self.discovery(), self.health())
        phases.done("discovery")
        readings = {d.index: d for d in health.devices}
        devices = [(d, readings[d.index]) for d in discovery.devices if d.index in readings]
        plan = await asyncio.to_thread(
            preflight.check,
            path,
            devices=devices,
            context_length=context,
            requested_devices=request.devices or self.settings.local.devices,
            min_devices=min_devices,
        )
        phases.done("preflight")
        import torch

        kinds = {d.index: d.kind for d, _ in devices}
        chosen = [
            torch.device("cuda", i) if kinds[i] == "cuda" else torch.device("cpu")
            for i in plan.devices
        ]
        return chosen, plan.facts.header if plan.facts else None

    def _worker(self, device: torch.device) -> DeviceWorker:
        if device not in self._workers:
            from helexa.engine.worker import DeviceWorker

            self._workers[device] = DeviceWorker(device)
        return self._workers[device]

    async def load(self, request: LoadRequest) -> ModelState:
        """Load once however many callers ask at the same time; a caller that gives up
        (is cancelled) leaves the load running for the others and for the next request."""
        model_id = request.model_id
        path = self._resolve(model_id)  # unknown ids fail here and leave no trace
        if (request.tensor_parallel or 1) > 1:
            raise NeuronError(
                "tensor_parallel > 1 is not supported by the local engine yet",
                status=422,
                type="invalid_request_error",
                code="unsupported_parameter",
            )
        entry = self._entries.setdefault(model_id, _Entry(model_id))
        if entry.task is None or entry.task.done():
            if entry.status == "loaded":
                return entry.state()
            entry.task = asyncio.ensure_future(self._load(entry, path, request))
            entry.task.add_done_callback(_retrieve)
        await asyncio.shield(entry.task)
        return entry.state()

    async def _load(self, entry: _Entry, path: Path, request: LoadRequest) -> None:
        profile = self.settings.profile(entry.model_id)
        context = request.context_length or (profile.context_length if profile else None)
        sampling = profile.sampling.model_dump(exclude_none=True) if profile else {}
        cache_mb = self.settings.local.prompt_cache_mb
        entry.status, entry.error, entry.progress = "loading", None, 0.0
        phases = Phases()  # every step from here to the model answering, in one log line
        try:
            await asyncio.to_thread(import_engine, phases)
            devices, header = await self._place(
                path, request, context, profile.min_devices if profile else 1, phases
            )
            entry.device, entry.devices = devices[0], devices
            if any(d.type == "cuda" for d in devices):
                import_for_cuda()  # beside the device's context and the weights read
            # A split runs on its first device's worker (its steps go device to device).
            worker = self._worker(devices[0])
            from helexa.engine.worker import open_devices

            await worker.submit(open_devices, devices)
            phases.done("device init")
            entry.loaded = await worker.submit(
                _load,
                path,
                devices,
                context,
                sampling,
                entry.model_id,
                cache_mb,
                header,
                phases,
                entry.report,
            )
        except Exception as exc:
            failed_on, entry.device, entry.devices = entry.device, None, []
            entry.status = "failed"
            entry.error = exc.message if isinstance(exc, NeuronError) else str(exc)
            log.warning("loading %s failed: %s", entry.model_id, entry.error)
            if self.settings.profile(entry.model_id) is None and (
                self._entries.get(entry.model_id) is entry
            ):
                del self._entries[entry.model_id]  # not a model here, so not listed as one
            if failed_on is not None and self._worker(failed_on).hung is None:
                # free what the failed load had allocated
                await self._worker(failed_on).submit(_free_memory, failed_on)
            if isinstance(exc, NeuronError):
                raise
            if isinstance(exc, ApiError):  # the engine's own refusal (a layer split's)
                raise NeuronError(
                    exc.message, status=exc.status, type=exc.type, code=exc.code, extra=exc.extra
                ) from exc
            raise _load_error(entry.model_id, exc) from exc
        entry.status = "loaded"

    async def unload(self, model_id: str) -> None:
        entry = self._entries.get(model_id)
        if entry is None:
            return
        if entry.task is not None and not entry.task.done():
            await asyncio.wait([entry.task])  # let a load in flight finish, then undo it
        device, entry.loaded, entry.devices = entry.device, None, []
        entry.status, entry.device, entry.error = "unloaded", None, None
        if device is not None:
            # Queued behind any generation still using the model on that device.
            await self._worker(device).submit(_free_memory, device)

    # -- generation -------------------------------------------------------------------------

    def _serving(self, request: dict[str, Any]) -> tuple[LoadedModel, DeviceWorker]:
        model_id = request.get("model")
        entry = self._entries.get(model_id) if isinstance(model_id, str) else None
        if entry is None or entry.loaded is None or entry.device is None:
            status = entry.status if entry else "unloaded"
            raise NeuronError(
                f"model {model_id!r} is not loaded on node {self.name!r} (status: {status})",
                status=409,
                type="invalid_request_error",
                code="model_not_loaded",
            )
        return entry.loaded, self._worker(entry.device)

    async def _stream(
        self,
        request: dict[str, Any],
        pick: Callable[[LoadedModel], Callable[[dict[str, Any], Event], Iterator[dict[str, Any]]]],
    ) -> AsyncIterator[dict[str, Any]]:
        loaded, worker = self._serving(request)
        from helexa.engine.request import RequestError  # imported: the model is loaded
        from helexa.engine.worker import StepTimeout, StreamStalled

        local = self.settings.local
        stream = worker.stream(
            pick(loaded),
            request,
            buffer=local.stream_buffer,
            stall_s=local.stream_stall_s,
            step_s=local.step_timeout(worker.device.type),
        )
        try:
            async with aclosing(stream) as chunks:
                async for chunk in chunks:
                    yield chunk
        except RequestError as exc:
            raise _refused(exc) from exc
        except StepTimeout as exc:
            self._fail_device(worker.device, str(exc))
            raise NeuronError(
                str(exc), status=504, type="timeout_error", code="step_timeout"
            ) from exc
        except StreamStalled as exc:
            raise NeuronError(
                str(exc), status=408, type="timeout_error", code="stream_stalled"
            ) from exc
        except NeuronError:
            raise
        except Exception as exc:
            raise NeuronError(
                f"generation failed: {exc}",
                status=500,
                type="server_error",
                code="generation_failed",
            ) from exc

    def _fail_device(self, device: torch.device, reason: str) -> None:
        """Every model served from ``device``'s worker marked failed with ``reason``: its
        thread is stuck in a step, so none of them can run again until the node restarts.
        The references are dropped; the memory the stuck call holds stays held."""
        for entry in self._entries.values():
            if entry.device == device and entry.loaded is not None:
                log.error("model %s failed: %s", entry.model_id, reason)
                entry.status, entry.error, entry.loaded = "failed", reason, None
                entry.device, entry.devices = None, []

    def chat(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(request, lambda m: m.stream_chat)

    def complete(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(request, lambda m: m.stream_completion)

    async def count_tokens(self, request: dict[str, Any]) -> int:
        loaded, _ = self._serving(request)
        from helexa.engine.request import RequestError  # imported: the model is loaded

        try:  # tokenizing needs no device: do not queue behind a running generation
            return await asyncio.to_thread(loaded.count_tokens, request)
        except RequestError as exc:
            raise _refused(exc) from exc

    async def close(self) -> None:
        for model_id in [m for m, e in self._entries.items() if e.loaded is not None]:
            await self.unload(model_id)
        workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            await worker.close()


def _load(
    path: Path,
    devices: list[torch.device],
    context: int | None,
    sampling: dict[str, Any],
    name: str,
    prompt_cache_mb: int | None,
    header: GGUFHeader | None,
    phases: Phases,
    progress: Progress,
) -> LoadedModel:
    from helexa.engine.generate import LoadedModel

    return LoadedModel.load(
        path,
        devices[0],
        None,
        context,
        devices=devices if len(devices) > 1 else None,
        sampling_defaults=sampling,
        name=name,
        progress=progress,
        prompt_cache_mb=prompt_cache_mb,
        header=header,
        phases=phases,
    )
