"""LocalNeuron through the Neuron protocol: the lifecycle and the streams cortex relies on."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from helexa.config import LocalSettings, ModelProfile, SamplingDefaults, Settings
from helexa.demo import demo_model_path
from helexa.engine.boot import Phases
from helexa.engine.checkpoint import gguf_header
from helexa.engine.generate import LoadedModel
from helexa.neuron import local
from helexa.neuron.interface import LoadRequest, Neuron, NeuronError
from helexa.neuron.local import LocalNeuron
from tests.engine.factories import make_tiny_model_dir

CHAT = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=31)


@pytest.fixture
async def neuron(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LocalNeuron]:
    profile = ModelProfile(
        id=str(model_dir), context_length=128, sampling=SamplingDefaults(temperature=0.0)
    )
    # Every test's tmp_path may be loaded by path.
    local = LocalSettings(model_dirs=[str(tmp_path_factory.getbasetemp())])
    n = LocalNeuron(Settings(models=[profile], local=local))
    yield n
    await n.close()


async def collect(stream: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [chunk async for chunk in stream]


async def test_is_a_neuron_with_host_facts(neuron: LocalNeuron) -> None:
    assert isinstance(neuron, Neuron)
    assert neuron.name == "local"
    discovery = await neuron.discovery()
    assert discovery.hostname and discovery.devices
    health = await neuron.health()
    assert health.uptime_secs >= 0 and health.devices


async def test_catalogue_models_are_listed_unloaded(neuron: LocalNeuron, model_dir: Path) -> None:
    (state,) = await neuron.models()
    assert (state.id, state.status, state.vram_used_mb) == (str(model_dir), "unloaded", 0)


async def test_load_chat_complete_count_unload(neuron: LocalNeuron, model_dir: Path) -> None:
    model_id = str(model_dir)
    state = await neuron.load(LoadRequest(model_id=model_id))
    assert state.status == "loaded"
    assert state.context_length == 128  # from the catalogue profile
    assert [m.status for m in await neuron.models()] == ["loaded"]

    chunks = await collect(neuron.chat({**CHAT, "model": model_id}))
    assert chunks[0]["object"] == "chat.completion.chunk"
    usage = chunks[-1]["usage"]
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["prompt_tokens"] == await neuron.count_tokens({**CHAT, "model": model_id})

    text = await collect(neuron.complete({"model": model_id, "prompt": "def add", "max_tokens": 4}))
    assert text[0]["object"] == "text_completion"
    assert text[-1]["usage"]["prompt_tokens"] > 0

    await neuron.unload(model_id)
    assert [m.status for m in await neuron.models()] == ["unloaded"]
    with pytest.raises(NeuronError) as err:
        await collect(neuron.chat({**CHAT, "model": model_id}))
    assert (err.value.status, err.value.code) == (409, "model_not_loaded")


async def test_load_by_file_id_adds_the_model(neuron: LocalNeuron, model_dir: Path) -> None:
    model_id = f"file:{model_dir}"
    await neuron.load(LoadRequest(model_id=model_id, context_length=64))
    states = {m.id: m for m in await neuron.models()}
    assert states[model_id].status == "loaded"
    assert states[model_id].context_length == 64
    assert states[str(model_dir)].status == "unloaded"


async def test_a_load_logs_every_step_from_the_request_to_the_model_answering(
    neuron: LocalNeuron, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The one "loaded" line splits the whole load by step, the neuron's own before the
    engine's, so a slow restart says whether it was the imports, preflight, the device's
    context or the weights."""
    caplog.set_level(logging.INFO, logger="helexa.engine.generate")
    await neuron.load(LoadRequest(model_id=str(model_dir)))
    (record,) = [r for r in caplog.records if r.getMessage().startswith("loaded ")]
    phases = record.args[1]
    assert isinstance(phases, Phases)
    steps = ["import torch", "import engine", "discovery", "preflight", "device init"]
    steps += ["weights read", "tokenizer", "model built", "cache"]
    if torch.cuda.is_available():  # discovery lists the GPUs, so preflight picks one
        steps += ["cuda imports", "warm-up"]
    steps += ["grammar index"]
    assert list(phases.seconds) == steps
    assert all(f"{step} " in record.getMessage() for step in steps)


async def test_a_gguf_load_parses_its_header_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Preflight parses the header and the load takes it from there: a real tokenizer's
    metadata (152k tokens, 151k merges) is a tenth of a second a parse."""
    parsed: list[str] = []
    parse = gguf_header.parse_gguf_header

    def counted(buf: Any, source: str = "<buffer>") -> gguf_header.GGUFHeader:
        parsed.append(source)
        return parse(buf, source)

    monkeypatch.setattr(gguf_header, "parse_gguf_header", counted)
    demo = demo_model_path()
    assert demo is not None
    n = LocalNeuron(Settings(models=[ModelProfile(id="demo", path=str(demo))]))
    try:
        assert (await n.load(LoadRequest(model_id="demo"))).status == "loaded"
    finally:
        await n.close()
    assert parsed == [str(demo)]


async def test_a_gguf_loads_line_splits_the_weights_read_after_the_steps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The weights read's parts come after the steps' parenthesis, so the line's
    ``loaded X in N s (step N s, ...)`` reads as it did, step for step."""
    caplog.set_level(logging.INFO, logger="helexa.engine.generate")
    demo = demo_model_path()
    assert demo is not None
    n = LocalNeuron(Settings(models=[ModelProfile(id="demo", path=str(demo))]))
    try:
        await n.load(LoadRequest(model_id="demo"))
    finally:
        await n.close()
    (record,) = [r for r in caplog.records if r.getMessage().startswith("loaded ")]
    line = re.fullmatch(
        r"loaded (\S+) in ([\d.]+) s \(([^)]*)\); weights read: (.*)", record.getMessage()
    )
    assert line is not None, record.getMessage()
    steps = [re.fullmatch(r"(.+) [\d.]+ s", step) for step in line[3].split(", ")]
    assert [step and step[1] for step in steps] == list(record.args[1].seconds)
    parts = [re.fullmatch(r"(.+) [\d.]+ s", part) for part in line[4].split(", ")]
    assert [part and part[1] for part in parts] == ["copies from the map", "header and views"]


async def test_requests_for_unloaded_models_are_409(neuron: LocalNeuron, model_dir: Path) -> None:
    for call in (
        lambda: collect(neuron.chat({**CHAT, "model": str(model_dir)})),
        lambda: collect(neuron.complete({"model": str(model_dir), "prompt": "x"})),
        lambda: neuron.count_tokens({**CHAT, "model": "nope"}),
    ):
        with pytest.raises(NeuronError) as err:
            await call()
        assert (err.value.status, err.value.code) == (409, "model_not_loaded")


async def test_concurrent_loads_load_once(
    neuron: LocalNeuron, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real_load = local._load

    def counting_load(path: Path, *args: Any) -> LoadedModel:
        calls.append(path)
        return real_load(path, *args)

    monkeypatch.setattr(local, "_load", counting_load)
    states = await asyncio.gather(
        *(neuron.load(LoadRequest(model_id=str(model_dir))) for _ in range(4))
    )
    assert [s.status for s in states] == ["loaded"] * 4
    assert calls == [model_dir]


async def test_a_load_reports_its_progress_until_it_is_loaded(
    neuron: LocalNeuron, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    halfway, release = threading.Event(), threading.Event()
    real_load = local._load

    def paused_load(path: Path, *args: Any) -> LoadedModel:
        report = args[-1]
        report(0.5)  # as the loader does after placing half the weight bytes
        halfway.set()
        release.wait(timeout=30)
        return real_load(path, *args)

    monkeypatch.setattr(local, "_load", paused_load)
    load = asyncio.ensure_future(neuron.load(LoadRequest(model_id=str(model_dir))))
    assert await asyncio.to_thread(halfway.wait, 30)
    (state,) = await neuron.models()
    assert (state.status, state.progress) == ("loading", 0.5)
    release.set()
    assert (await load).status == "loaded"
    (state,) = await neuron.models()
    assert (state.status, state.progress) == ("loaded", None)


async def test_a_cancelled_load_request_still_loads_once(
    neuron: LocalNeuron, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    started, cancelled = threading.Event(), threading.Event()
    real_load = local._load

    def counting_load(path: Path, *args: Any) -> LoadedModel:
        calls.append(path)
        started.set()
        # Held until the caller has given up, so a fast load cannot finish first.
        assert cancelled.wait(30)
        return real_load(path, *args)

    monkeypatch.setattr(local, "_load", counting_load)
    impatient = asyncio.create_task(neuron.load(LoadRequest(model_id=str(model_dir))))
    assert await asyncio.to_thread(started.wait, 30)  # the load runs on the device thread
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    cancelled.set()
    state = await neuron.load(LoadRequest(model_id=str(model_dir)))
    assert state.status == "loaded"
    assert calls == [model_dir]


def broken_model_dir(path: Path, model_dir: Path) -> Path:
    """The tiny model's config over weights that are not a safetensors file."""
    path.mkdir()
    (path / "config.json").write_text((model_dir / "config.json").read_text())
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    return path


async def test_failed_load_by_path_is_forgotten_and_the_worker_survives(
    neuron: LocalNeuron, model_dir: Path, tmp_path: Path
) -> None:
    broken = broken_model_dir(tmp_path / "broken", model_dir)
    with pytest.raises(NeuronError) as err:
        await neuron.load(LoadRequest(model_id=str(broken)))
    assert (err.value.status, err.value.code) == (422, "load_failed")
    assert err.value.message  # the caller is told why; the path is no model to list
    assert str(broken) not in {m.id for m in await neuron.models()}

    # The same device worker still loads and serves.
    await neuron.load(LoadRequest(model_id=str(model_dir)))
    chunks = await collect(neuron.chat({**CHAT, "model": str(model_dir)}))
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


async def test_preflight_refusals_keep_their_structure(
    neuron: LocalNeuron, model_dir: Path, tmp_path: Path
) -> None:
    foreign = tmp_path / "llama"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (foreign / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    with pytest.raises(NeuronError) as err:
        await neuron.load(LoadRequest(model_id=str(foreign)))
    assert (err.value.status, err.value.type, err.value.code) == (
        422,
        "preflight",
        "unsupported_architecture",
    )
    assert str(foreign) not in {m.id for m in await neuron.models()}

    with pytest.raises(NeuronError) as err:  # a KV cache for 10^9 tokens fits nowhere
        await neuron.load(LoadRequest(model_id=f"file:{model_dir}", context_length=10**9))
    assert (err.value.status, err.value.code) == (507, "insufficient_vram")
    assert err.value.to_body()["error"]["needed_mb"] > err.value.to_body()["error"]["free_mb"]


async def test_a_model_the_catalogue_splits_is_refused_without_the_gpus(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # min_devices 2 asks for a layer split over two GPUs; this host's only device is its
    # CPU, so the load is refused before any memory is touched, naming why.
    split = ModelProfile(id="split", path=str(model_dir), min_devices=2)
    local_settings = LocalSettings(model_dirs=[str(tmp_path_factory.getbasetemp())])
    n = LocalNeuron(Settings(models=[split], local=local_settings))
    try:
        with pytest.raises(NeuronError) as err:
            await n.load(LoadRequest(model_id="split"))
        assert (err.value.status, err.value.type, err.value.code) == (
            507,
            "preflight",
            "insufficient_vram",
        )
        assert "the catalogue asks for 2 devices, 0 are allowed" in err.value.message
        (state,) = await n.models()
        assert (state.status, state.devices, state.device_vram_mb) == ("failed", [], [])
        # The same model loads whole on the CPU, reported on one device.
        state = await n.load(LoadRequest(model_id=f"file:{model_dir}"))
        assert (state.status, state.devices, state.device_vram_mb) == ("loaded", [0], [])
    finally:
        await n.close()


async def test_a_hung_step_fails_the_request_and_the_model_not_the_node(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generation whose step never returns (the double below blocks where a forward
    pass would) is aborted after step_timeout_s with a 504 in the neuron's error shape;
    the model is listed failed with why, and asking again is answered at once."""
    release = threading.Event()

    def hung_chat(self: LoadedModel, request: dict[str, Any], cancel: threading.Event) -> Any:
        yield {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
        release.wait()

    monkeypatch.setattr(LoadedModel, "stream_chat", hung_chat)
    local_settings = LocalSettings(
        model_dirs=[str(tmp_path_factory.getbasetemp())], step_timeout_s=0.3
    )
    n = LocalNeuron(Settings(local=local_settings))
    model_id = f"file:{model_dir}"
    try:
        await n.load(LoadRequest(model_id=model_id))
        with pytest.raises(NeuronError) as err:
            await collect(n.chat({**CHAT, "model": model_id}))
        assert (err.value.status, err.value.type, err.value.code) == (
            504,
            "timeout_error",
            "step_timeout",
        )
        assert "did not finish in 0.3 s" in err.value.message
        (state,) = await n.models()
        assert (state.status, state.error) == ("failed", err.value.message)
        with pytest.raises(NeuronError) as again:
            await collect(n.chat({**CHAT, "model": model_id}))
        assert (again.value.status, again.value.code) == (409, "model_not_loaded")
        assert (await n.health()).uptime_secs >= 0  # the node itself still answers
    finally:
        release.set()
        await n.close()


async def test_unknown_model_is_404_and_leaves_no_entry(
    neuron: LocalNeuron, tmp_path: Path
) -> None:
    with pytest.raises(NeuronError) as err:
        await neuron.load(LoadRequest(model_id=f"file:{tmp_path / 'missing'}"))
    assert (err.value.status, err.value.code) == (404, "model_not_available")
    assert [m.id for m in await neuron.models()] == [m.id for m in neuron.settings.models]


async def test_bad_requests_are_400_in_the_neuron_error_shape(
    neuron: LocalNeuron, model_dir: Path
) -> None:
    await neuron.load(LoadRequest(model_id=str(model_dir)))
    with pytest.raises(NeuronError) as err:
        await collect(neuron.chat({**CHAT, "model": str(model_dir), "max_tokens": 10_000}))
    assert (err.value.status, err.value.code) == (400, "context_length_exceeded")
    assert err.value.to_body()["error"]["type"] == "invalid_request_error"
    with pytest.raises(NeuronError) as err:
        await neuron.count_tokens({"model": str(model_dir), "messages": "hi"})
    assert err.value.status == 400


async def test_closing_a_stream_cancels_generation(
    neuron: LocalNeuron, model_dir: Path, stream_chat_cancels: list[threading.Event]
) -> None:
    cancels = stream_chat_cancels
    await neuron.load(LoadRequest(model_id=str(model_dir)))
    request = {"model": str(model_dir), "messages": CHAT["messages"], "temperature": 0}
    stream = neuron.chat(request)  # no max_tokens: would fill the context
    await anext(stream)
    await stream.aclose()
    assert cancels and cancels[0].is_set()
    # The device thread is free again: the next request is served.
    chunks = await collect(neuron.chat({**CHAT, "model": str(model_dir)}))
    assert "usage" in chunks[-1]


async def test_unload_of_an_unloaded_model_is_a_no_op(neuron: LocalNeuron, model_dir: Path) -> None:
    await neuron.unload(str(model_dir))
    await neuron.unload("never-heard-of-it")
    assert [m.status for m in await neuron.models()] == ["unloaded"]


async def test_pulled_models_are_listed_once_beside_the_catalogue(tmp_path: Path) -> None:
    from helexa.config import SourceSettings
    from tests.unit.test_sources import write_snapshot

    cache = tmp_path / "hf"
    write_snapshot(cache, "Qwen/Q-GGUF", {"Q-Q4_K_M.gguf": b"4", "Q-Q8_0.gguf": b"8"})
    settings = Settings(
        sources=[SourceSettings(name="huggingface", cache_dir=str(cache))],
        models=[ModelProfile(id="Qwen/Q-GGUF", quant="Q8_0", aliases=["q"])],  # the Q8_0 one
    )
    n = LocalNeuron(settings)
    try:
        states = {s.id: s.status for s in await n.models()}
        assert states == {"Qwen/Q-GGUF": "unloaded", "Qwen/Q-GGUF:Q4_K_M": "unloaded"}
    finally:
        await n.close()


async def test_the_prompt_cache_setting_reaches_the_model_and_models_reports_its_use(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    budgets: list[int] = []
    real_load = LoadedModel.load

    def recording_load(*args: Any, **kw: Any) -> LoadedModel:
        loaded = real_load(*args, **kw)
        budgets.append(loaded.prompt_cache.budget_bytes)
        loaded.prompt_cache.snapshot_bytes = 3 << 20  # as if three MiB of snapshots were kept
        return loaded

    monkeypatch.setattr(LoadedModel, "load", recording_load)
    n = LocalNeuron(
        Settings.model_validate(
            {"local": {"prompt_cache_mb": 2, "model_dirs": [str(model_dir.parent)]}}
        )
    )
    try:
        state = await n.load(LoadRequest(model_id=str(model_dir)))
        assert budgets == [2 << 20]
        assert state.prompt_cache_mb == 3
    finally:
        await n.close()


async def test_a_catalogue_model_that_fails_to_load_is_listed_failed(
    model_dir: Path, tmp_path: Path
) -> None:
    broken = broken_model_dir(tmp_path / "broken", model_dir)
    n = LocalNeuron(Settings(models=[ModelProfile(id="broken", path=str(broken))]))
    try:
        with pytest.raises(NeuronError):
            await n.load(LoadRequest(model_id="broken"))
        (state,) = await n.models()
        assert (state.id, state.status) == ("broken", "failed")
        assert state.error
    finally:
        await n.close()
