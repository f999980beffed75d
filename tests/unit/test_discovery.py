"""Discovery and health: pure parsers, the CPU-only report, NVML through a test double."""

from __future__ import annotations

import os
import time
from collections import namedtuple
from typing import Any

import pytest

from helexa.neuron import discovery
from helexa.neuron.discovery import (
    MB,
    cpu_discovery,
    cpu_health,
    cpu_utilization,
    cuda_version,
    gpu_build,
    nvml_discovery,
    nvml_health,
    parse_cpu_model,
    parse_meminfo,
    parse_os_release,
    visible_devices,
)

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model\t\t: 97
model name\t: AMD Ryzen 9 7950X 16-Core Processor
flags\t\t: fpu vme

processor\t: 1
model name\t: AMD Ryzen 9 7950X 16-Core Processor
"""

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
CPU implementer\t: 0x41

Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""


def test_parse_cpu_model() -> None:
    assert parse_cpu_model(X86_CPUINFO) == "AMD Ryzen 9 7950X 16-Core Processor"
    assert parse_cpu_model(ARM_CPUINFO) == "Raspberry Pi 5 Model B Rev 1.0"
    assert parse_cpu_model("processor\t: 0\n") is None
    assert parse_cpu_model("") is None


def test_parse_meminfo_is_bytes() -> None:
    info = parse_meminfo(
        "MemTotal:       32768 kB\nMemAvailable:    1024 kB\nHugePages_Total:  4\n"
    )
    assert info == {"MemTotal": 32768 * 1024, "MemAvailable": 1024 * 1024, "HugePages_Total": 4}


def test_parse_os_release() -> None:
    text = 'NAME="Fedora Linux"\nPRETTY_NAME="Fedora Linux 43 (Workstation Edition)"\n'
    assert parse_os_release(text) == "Fedora Linux 43 (Workstation Edition)"
    assert parse_os_release("NAME=x\n") is None


@pytest.mark.parametrize(("raw", "text"), [(12040, "12.4"), (13000, "13.0"), (11080, "11.8")])
def test_cuda_version(raw: int, text: str) -> None:
    assert cuda_version(raw) == text


TORCH_VERSION_PY = """from typing import Optional

__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip', 'rocm', 'xpu']
__version__ = '2.13.0+{build}'
debug = False
cuda: Optional[str] = {cuda}
git_version = 'cf30153c4c131c8164ee7798e5022d810682e2cb'
hip: Optional[str] = {hip}
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (TORCH_VERSION_PY.format(build="cpu", cuda=None, hip=None), False),
        (TORCH_VERSION_PY.format(build="cu128", cuda="'12.8'", hip=None), True),
        (TORCH_VERSION_PY.format(build="rocm6.3", cuda=None, hip="'6.3.42131'"), True),
        ("cuda = None\nhip = None\n", False),  # older torch: no annotations
        ("cuda = _cuda()\nhip = None\n", True),  # not a literal: maybe a GPU
        ("cuda = None\n", None),  # hip unsaid: ask torch
        ("cuda = (\n", None),
    ],
)
def test_gpu_build_reads_torch_version_py(text: str, expected: bool | None) -> None:
    assert gpu_build(text) is expected


def test_installed_gpu_build_agrees_with_torch() -> None:
    """The version file read without importing torch says what torch itself says."""
    import torch

    runtime = torch.version.cuda is not None or torch.version.hip is not None
    assert discovery._installed_gpu_build() is runtime


def test_cpu_utilization() -> None:
    assert cpu_utilization(1.0, 4) == 25.0
    assert cpu_utilization(9.0, 4) == 100.0
    assert cpu_utilization(0.5, 0) == 50.0


UUIDS = ["GPU-aaaa-1111", "GPU-bbbb-2222", "GPU-cccc-3333"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (None, [0, 1, 2]),
        ("2,0", [2, 0]),
        ("1", [1]),
        ("", []),
        ("GPU-cccc,GPU-aaaa-1111", [2, 0]),
        ("0,7,1", [0]),  # like CUDA: stop at the first entry that names no device
        ("0,0", [0]),
        ("GPU-", []),  # ambiguous prefix
    ],
)
def test_visible_devices(env: str | None, expected: list[int]) -> None:
    assert visible_devices(env, UUIDS) == expected


def test_visible_devices_refuses_mig() -> None:
    with pytest.raises(ValueError):
        visible_devices("MIG-1234", UUIDS)


# -- CPU-only report -------------------------------------------------------------------------


def test_cpu_discovery_reports_ram_as_the_one_device() -> None:
    found = cpu_discovery()
    assert [(d.index, d.kind) for d in found.devices] == [(0, "cpu")]
    ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MB
    assert abs(found.devices[0].vram_total_mb - ram_mb) <= max(64, ram_mb // 50)
    assert found.devices[0].name
    assert found.hostname and found.os and found.kernel


def test_cpu_health_reads_memory_and_load() -> None:
    started = time.time() - 5
    health = cpu_health(started)
    total = cpu_discovery().devices[0].vram_total_mb
    (device,) = health.devices
    assert device.index == 0
    assert device.vram_free_mb > 0 and device.vram_used_mb > 0
    assert abs(device.vram_used_mb + device.vram_free_mb - total) <= 1
    assert device.utilization_pct is not None and 0 <= device.utilization_pct <= 100
    assert health.uptime_secs >= 5


def test_discover_and_health_agree_on_this_host() -> None:
    found = discovery.discover()
    health = discovery.read_health(time.time())
    assert [d.index for d in found.devices] == [d.index for d in health.devices]
    assert found.devices, "a host always reports at least one device (the CPU)"
    for info, reading in zip(found.devices, health.devices, strict=True):
        assert reading.vram_used_mb + reading.vram_free_mb <= info.vram_total_mb + 1


# -- NVML through a test double ----------------------------------------------------------------

Mem = namedtuple("Mem", "total used free")
Util = namedtuple("Util", "gpu memory")


class FakeNVML:
    """The slice of pynvml discovery uses: two devices, one without utilization support."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.devices: list[dict[str, Any]] = [
            {
                "name": b"NVIDIA GeForce RTX 5090",
                "uuid": "GPU-aaaa",
                "mem": Mem(32 * 1024 * MB, 2 * 1024 * MB, 30 * 1024 * MB),
                "cc": (12, 0),
                "util": Util(37, 5),
                "temp": 61,
            },
            {
                "name": "NVIDIA H100 80GB HBM3",
                "uuid": "GPU-bbbb",
                "mem": Mem(80 * 1024 * MB, 1024 * MB, 79 * 1024 * MB),
                "cc": (9, 0),
                "util": None,
                "temp": 40,
            },
        ]

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        return self.devices[i]

    def nvmlDeviceGetUUID(self, h: dict[str, Any]) -> str:
        return h["uuid"]

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> str | bytes:
        return h["name"]

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any]) -> Mem:
        return h["mem"]

    def nvmlDeviceGetCudaComputeCapability(self, h: dict[str, Any]) -> tuple[int, int]:
        return h["cc"]

    def nvmlDeviceGetUtilizationRates(self, h: dict[str, Any]) -> Util:
        if h["util"] is None:
            raise self.NVMLError("Not Supported")
        return h["util"]

    def nvmlDeviceGetTemperature(self, h: dict[str, Any], sensor: int) -> int:
        return h["temp"]

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.65.06"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000


def test_nvml_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found = nvml_discovery(FakeNVML())
    assert found.driver_version == "580.65.06" and found.cuda_version == "13.0"
    assert [
        (d.index, d.name, d.kind, d.vram_total_mb, d.compute_capability) for d in found.devices
    ] == [
        (0, "NVIDIA GeForce RTX 5090", "cuda", 32 * 1024, "12.0"),
        (1, "NVIDIA H100 80GB HBM3", "cuda", 80 * 1024, "9.0"),
    ]


def test_nvml_health_tolerates_unsupported_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    health = nvml_health(FakeNVML(), time.time())
    first, second = health.devices
    assert (first.vram_used_mb, first.vram_free_mb, first.utilization_pct, first.temp_c) == (
        2 * 1024,
        30 * 1024,
        37.0,
        61.0,
    )
    assert second.utilization_pct is None and second.temp_c == 40.0


def test_nvml_indices_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    found = nvml_discovery(FakeNVML())
    assert [(d.index, d.name) for d in found.devices] == [(0, "NVIDIA H100 80GB HBM3")]
    assert [d.index for d in nvml_health(FakeNVML(), time.time()).devices] == [0]
