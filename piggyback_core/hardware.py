"""What the hardware computes natively, to choose the compute dtype (``dtype="auto"``).

On a CPU, bfloat16 is worth it only where the processor executes it: AMX tiles (Sapphire Rapids
and later) or AVX-512-BF16 (Cooper Lake, Zen 4). Elsewhere oneDNN emulates it and it runs slower
than float32. PyTorch's own probes are asked first; on Linux the kernel's CPU flags are the
fallback (``amx_bf16``, ``avx512_bf16``). On CUDA, bfloat16 needs compute capability 8.0 (Ampere)
or later; float16 runs everywhere.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch

from . import device as _device
from .backbones import get_backbone_spec

__all__ = [
    "LAYOUTS",
    "auto_dtype",
    "auto_workers",
    "available_memory_bytes",
    "cgroup_cpu_limit",
    "cpu_bf16_isa",
    "dtype_name",
    "native_bf16",
    "parse_dtype",
    "parse_layout",
    "physical_cores",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU_BF16_FLAGS = {"amx_bf16", "avx512_bf16"}
LAYOUTS = ("auto", "channels_last", "contiguous")
_CGROUP_ROOT = Path("/sys/fs/cgroup")  # the container's own cgroup, in a cgroup namespace


def native_bf16() -> bool:
    """Whether this machine's CPU executes bfloat16 arithmetic natively (AMX or AVX-512-BF16)."""
    return cpu_bf16_isa() != "no native bf16"


@functools.cache
def cpu_bf16_isa() -> str:
    """The CPU's bfloat16 matrix instructions, as benchmarks record them beside their figures:
    ``"AMX"`` (Xeon Sapphire Rapids and later), ``"AVX-512-BF16"`` (e.g. AMD Zen 4), or
    ``"no native bf16"``."""
    found = set()
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX-512-BF16", "_is_avx512_bf16_supported")):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                found.add(name)
        except RuntimeError:
            pass
    if not found:
        try:
            flags = {
                flag
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
                for flag in line.partition(":")[2].split()
            }
        except OSError:
            flags = set()
        found = {name for name, flag in (("AMX", "amx_bf16"), ("AVX-512-BF16", "avx512_bf16")) if flag in flags}
    return "AMX" if "AMX" in found else "AVX-512-BF16" if found else "no native bf16"


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on a CPU that executes it natively, float32 on one that does not; on CUDA bfloat16
    where the GPU has it (Ampere and later: same range as float32, no overflow), else float16."""
    device = torch.device(device)
    if device.type == "cuda":
        # the capability, not torch.cuda.is_bf16_supported(): that counts emulated bfloat16 (a T4
        # or a V100 would run it slower than float16)
        return torch.bfloat16 if _device.capability(device) >= (8, 0) else torch.float16
    return torch.bfloat16 if native_bf16() else torch.float32


def parse_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto``, ``float32``, ``bfloat16`` or ``float16`` as a torch dtype for ``device``."""
    if name == "auto":
        return auto_dtype(device)
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use auto, {', '.join(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``float32``, ``bfloat16``, ``float16``: the name the settings, flags and /readyz use."""
    return str(dtype).removeprefix("torch.")


def parse_layout(name: str, arch: str) -> bool:
    """Whether ``arch`` runs on channels_last activations for layout ``name`` (``auto``: the
    layout measured faster for that backbone, :attr:`BackboneSpec.channels_last`)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; use {', '.join(LAYOUTS)}")
    return get_backbone_spec(arch).channels_last if name == "auto" else name == "channels_last"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    """The whole number a file holds, or None: absent, unreadable, or anything else ("max", "-1")."""
    return _to_int(_read_text(path))


def _to_int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isascii() and text.isdigit() else None


def cgroup_cpu_limit(root: Path = _CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the container's CPU quota gives each period (quota / period: 1.5 for
    150 ms of every 100 ms), or None where there is no quota: cgroup v2 ``cpu.max`` (``max 100000``:
    none), else v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota ``-1``: none) under ``cpu/``
    or ``cpu,cpuacct/``. A file absent, unreadable or malformed counts as no quota."""
    fields = (_read_text(root / "cpu.max") or "").split()
    quotas = [fields] if len(fields) == 2 else []
    for controller in ("cpu", "cpu,cpuacct"):
        quotas.append([_read_text(root / controller / f"cpu.cfs_{f}_us") or "" for f in ("quota", "period")])
    for quota, period in ((_to_int(q), _to_int(p)) for q, p in quotas):
        if quota and period:  # neither None nor 0
            return quota / period
    return None


def available_memory_bytes(*, cgroup_root: Path = _CGROUP_ROOT) -> int:
    """Memory this process can still take: the kernel's MemAvailable, or the container's headroom
    (cgroup v2 ``memory.max - memory.current``, or v1's limit minus usage) where that is lower."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 0
    for limit_name, usage_name in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(cgroup_root / limit_name), _read_int(cgroup_root / usage_name)
        if limit is not None and usage is not None and limit < 1 << 60:
            available = min(available, max(0, limit - usage))
            break
    return available


def physical_cores(*, cgroup_root: Path = _CGROUP_ROOT) -> int:
    """CPU cores this process may run on: its affinity mask (hyper-threads count as cores), or fewer
    where the container's CPU quota gives less time (:func:`cgroup_cpu_limit`, rounded up): in a
    4-CPU container on a 128-core node, 4, not 128 threads that the quota would throttle."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    return cores if limit is None else max(1, min(cores, math.ceil(limit)))


def auto_workers(device: torch.device | str, workers: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """``(workers, intra-op threads per worker)``. On CUDA: one worker (the GPU runs the batches
    in order anyway) with every core. On a CPU: ``min(cores, 8)`` workers and the cores shared
    among them: independent single-threaded workers beat one worker whose every operation is
    split across the cores at the small batches of mixed traffic (2 cores: 2 x 1 against 1 x 2,
    resnet18 bf16: 1.4-1.6x; fp32 1.1-1.3x). When ``threads`` is not given, the server's batcher
    lends every core to a batch that is all the work there is (server/batcher.py, ``BatchPolicy.cores``)."""
    cores = physical_cores()
    if torch.device(device).type == "cuda":
        return workers or 1, threads or cores
    if workers is None:
        workers = min(cores, 8) if threads is None else max(1, cores // threads)
    return workers, threads or max(1, cores // workers)
