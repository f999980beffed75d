"""What this host has to serve with (``GET /discovery``) and how busy it is (``GET /health``).

NVML (nvidia-ml-py) is the first choice: it reports every device's memory as the driver
sees it, other processes included, plus utilization and temperature, without creating a
CUDA context. Without NVML, torch.cuda answers what it can. Without any GPU the report is
an honest CPU-only one: one ``cpu`` device whose "VRAM" is system RAM, so placement and
preflight work unchanged on a laptop.

Device indices are the ones torch uses (CUDA_VISIBLE_DEVICES applied), because the engine
places models with ``torch.device("cuda", index)``. The parsing helpers are pure so they
are tested without a GPU; an absent or broken NVML never raises, it falls through.

torch is imported only when NVML is absent and the installed torch is a CUDA or ROCm
build: the gateway polls its local node as soon as it listens, and importing torch takes
seconds, which a CPU-only wheel (whose torch.cuda never finds a device) need not cost.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import platform
import socket
import time
from collections.abc import Callable
from typing import Any, Literal

from helexa.neuron.interface import DeviceHealth, DeviceInfo, Discovery, Health

MB = 1024 * 1024
Backend = Literal["nvml", "torch", "cpu"]

# -- pure helpers ----------------------------------------------------------------------------


def parse_cpu_model(cpuinfo: str) -> str | None:
    """The CPU's marketing name from /proc/cpuinfo (x86 ``model name``, ARM ``Model``)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "model", "hardware", "cpu model", "processor"):
        value = fields.get(key)
        if value and not value.isdigit():
            return value
    return None


def parse_meminfo(meminfo: str) -> dict[str, int]:
    """/proc/meminfo as bytes per field (the file says kB, meaning KiB)."""
    out: dict[str, int] = {}
    for line in meminfo.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and parts and parts[0].isdigit():
            scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            out[key.strip()] = int(parts[0]) * scale
    return out


def parse_os_release(text: str) -> str | None:
    """``PRETTY_NAME`` from /etc/os-release (``Fedora Linux 43``)."""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "PRETTY_NAME":
            return value.strip().strip("\"'") or None
    return None


def cuda_version(driver_int: int) -> str:
    """NVML's CUDA driver version integer as text: 12040 -> ``12.4``."""
    return f"{driver_int // 1000}.{driver_int % 1000 // 10}"


def cpu_utilization(load1: float, cpus: int) -> float:
    """One-minute load average as a percentage of the cores, capped at 100."""
    return round(min(100.0, 100.0 * load1 / max(1, cpus)), 1)


def visible_devices(env: str | None, uuids: list[str]) -> list[int]:
    """Physical NVML indices in the order CUDA numbers them under CUDA_VISIBLE_DEVICES.

    Entries are indices or (prefixes of) ``GPU-`` UUIDs; like CUDA, parsing stops at the
    first entry that names no device. Raises ValueError for what cannot be mapped to NVML
    (MIG instances), so the caller falls back to torch, which applies the variable itself.
    """
    if env is None:
        return list(range(len(uuids)))
    out: list[int] = []
    for raw in env.split(","):
        entry = raw.strip()
        if entry.startswith("MIG-"):
            raise ValueError("MIG devices are numbered by CUDA only")
        if entry.isdigit() and int(entry) < len(uuids):
            index = int(entry)
        else:
            matches = [i for i, u in enumerate(uuids) if entry and u.startswith(entry)]
            if len(matches) != 1:
                break
            index = matches[0]
        if index in out:
            break
        out.append(index)
    return out


def gpu_build(version_py: str) -> bool | None:
    """Whether torch's ``version.py`` describes a build with a GPU runtime for torch.cuda
    (its ``cuda`` or ``hip`` set); None when the text does not say both, so torch is asked."""
    try:
        tree = ast.parse(version_py)
    except SyntaxError:
        return None
    runtimes: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("cuda", "hip"):
            runtimes[target.id] = value.value if isinstance(value, ast.Constant) else value
    if runtimes.keys() != {"cuda", "hip"}:
        return None
    return any(runtime is not None for runtime in runtimes.values())


# -- CPU -------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _memory() -> tuple[int, int]:
    """(total, available) system RAM in bytes."""
    info = parse_meminfo(_read("/proc/meminfo"))
    if "MemTotal" in info:
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    page = os.sysconf("SC_PAGE_SIZE")
    return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")


def _host() -> dict[str, str]:
    return {
        "hostname": socket.gethostname(),
        "os": parse_os_release(_read("/etc/os-release")) or platform.system(),
        "kernel": platform.release(),
    }


def cpu_discovery() -> Discovery:
    name = parse_cpu_model(_read("/proc/cpuinfo")) or platform.processor() or platform.machine()
    total, _ = _memory()
    device = DeviceInfo(index=0, name=name or "cpu", kind="cpu", vram_total_mb=total // MB)
    return Discovery(**_host(), devices=[device])


def cpu_health(started: float) -> Health:
    total, available = _memory()
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    util = None if load1 is None else cpu_utilization(load1, os.cpu_count() or 1)
    device = DeviceHealth(
        index=0,
        vram_used_mb=(total - available) // MB,
        vram_free_mb=available // MB,
        utilization_pct=util,
    )
    return Health(uptime_secs=time.time() - started, devices=[device])


# -- NVML ------------------------------------------------------------------------------------


@functools.cache
def _nvml() -> Any | None:
    """pynvml, initialised once per process, or None where there is no usable driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
    except Exception:  # no library, no driver, no devices: all mean "not NVML"
        return None
    return pynvml


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional(read: Callable[[], Any]) -> Any:
    """A reading some devices do not support (utilization on some vGPUs) is None, not fatal."""
    try:
        return read()
    except Exception:
        return None


def _nvml_handles(nv: Any) -> list[Any]:
    """Handles in CUDA order; ValueError when CUDA_VISIBLE_DEVICES cannot be mapped."""
    handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
    uuids = [_text(nv.nvmlDeviceGetUUID(h)) for h in handles]
    return [handles[i] for i in visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)]


def nvml_discovery(nv: Any) -> Discovery:
    """Discovery through an initialised NVML module (pynvml, or a test double of it)."""
    devices = []
    for index, h in enumerate(_nvml_handles(nv)):
        cc = _optional(lambda h=h: nv.nvmlDeviceGetCudaComputeCapability(h))
        devices.append(
            DeviceInfo(
                index=index,
                name=_text(nv.nvmlDeviceGetName(h)),
                vram_total_mb=int(nv.nvmlDeviceGetMemoryInfo(h).total) // MB,
                compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
            )
        )
    cuda = _optional(nv.nvmlSystemGetCudaDriverVersion)
    return Discovery(
        **_host(),
        driver_version=_optional(lambda: _text(nv.nvmlSystemGetDriverVersion())),
        cuda_version=cuda_version(cuda) if cuda else None,
        devices=devices,
    )


def nvml_health(nv: Any, started: float) -> Health:
    """Health through an initialised NVML module (pynvml, or a test double of it)."""
    devices = []
    for index, h in enumerate(_nvml_handles(nv)):
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        util = _optional(lambda h=h: nv.nvmlDeviceGetUtilizationRates(h).gpu)
        temp = _optional(lambda h=h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
        devices.append(
            DeviceHealth(
                index=index,
                vram_used_mb=int(mem.used) // MB,
                vram_free_mb=int(mem.free) // MB,
                utilization_pct=None if util is None else float(util),
                temp_c=None if temp is None else float(temp),
            )
        )
    return Health(uptime_secs=time.time() - started, devices=devices)


# -- torch.cuda ------------------------------------------------------------------------------


def _installed_gpu_build() -> bool | None:
    """:func:`gpu_build` of the installed torch, read without importing it; False when
    torch is not installed, None when its version file cannot be read."""
    try:
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return False
        location = next(iter(spec.submodule_search_locations))
        with open(os.path.join(location, "version.py"), encoding="utf-8") as f:
            return gpu_build(f.read())
    except (OSError, ValueError, ImportError):
        return None


def _torch_cuda_count() -> int:
    if _installed_gpu_build() is False:
        return 0
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _torch_discovery() -> Discovery:
    import torch

    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append(
            DeviceInfo(
                index=i,
                name=p.name,
                vram_total_mb=int(p.total_memory) // MB,
                compute_capability=f"{p.major}.{p.minor}",
            )
        )
    return Discovery(**_host(), cuda_version=torch.version.cuda, devices=devices)


def _torch_health(started: float) -> Health:
    import torch

    devices = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        devices.append(
            DeviceHealth(index=i, vram_used_mb=(total - free) // MB, vram_free_mb=free // MB)
        )
    return Health(uptime_secs=time.time() - started, devices=devices)


# -- entry points ----------------------------------------------------------------------------


@functools.cache
def backend() -> Backend:
    """Which reader this process uses, decided once so discovery and health always agree."""
    nv = _nvml()
    if nv is not None:
        try:
            if _nvml_handles(nv):
                return "nvml"
        except Exception:
            pass
    return "torch" if _torch_cuda_count() > 0 else "cpu"


def discover() -> Discovery:
    """Host and device facts; never raises for a missing driver or library."""
    kind = backend()
    if kind == "nvml":
        return nvml_discovery(_nvml())
    if kind == "torch":
        return _torch_discovery()
    return cpu_discovery()


def read_health(started: float) -> Health:
    """Live memory, utilization and temperature per device; ``started`` is time.time()."""
    kind = backend()
    if kind == "nvml":
        return nvml_health(_nvml(), started)
    if kind == "torch":
        return _torch_health(started)
    return cpu_health(started)
