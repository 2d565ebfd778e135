"""What the hardware computes natively, to choose the compute dtype (``dtype="auto"``).

On a CPU, bfloat16 is worth it only where the processor executes it: AMX tiles (Sapphire Rapids
and later) or AVX-512-BF16 (Cooper Lake, Zen 4). Elsewhere oneDNN emulates it and it runs slower
than float32. PyTorch's own probes are asked first; on Linux the kernel's CPU flags are the
fallback (``amx_bf16``, ``avx512_bf16``). On CUDA, bfloat16 needs compute capability 8.0 (Ampere)
or later; float16 runs everywhere.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from .backbones import get_backbone_spec

__all__ = [
    "LAYOUTS",
    "auto_dtype",
    "auto_workers",
    "available_memory_bytes",
    "dtype_name",
    "native_bf16",
    "parse_dtype",
    "parse_layout",
    "physical_cores",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU_BF16_FLAGS = {"amx_bf16", "avx512_bf16"}
LAYOUTS = ("auto", "channels_last", "contiguous")


@functools.cache
def native_bf16() -> bool:
    """Whether this machine's CPU executes bfloat16 arithmetic natively."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:
                pass
    try:
        flags = {
            flag
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
            for flag in line.partition(":")[2].split()
        }
    except OSError:
        return False
    return bool(flags & _CPU_BF16_FLAGS)


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on a CPU that executes it natively, float32 on one that does not; on CUDA bfloat16
    where the GPU has it (Ampere and later: same range as float32, no overflow), else float16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
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


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) and the like: None


def available_memory_bytes() -> int:
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
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 1 << 60:
            available = min(available, max(0, limit - usage))
            break
    return available


def physical_cores() -> int:
    """CPU cores this process may run on (its affinity mask; hyper-threads count as cores)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def auto_workers(device: torch.device | str, workers: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """``(workers, intra-op threads per worker)``. On CUDA: one worker (the GPU runs the batches
    in order anyway) with every core. On a CPU: ``min(cores, 8)`` workers and the cores shared
    among them: independent single-threaded workers beat one worker whose every operation is
    split across the cores at the small batches of mixed traffic (2 cores: 2 x 1 against 1 x 2,
    resnet18 bf16: 1.4-1.6x; fp32 1.1-1.3x). When ``threads`` is not given, the server's batcher
    lends a lone batch every core (server/batcher.py, ``BatchPolicy.cores``)."""
    cores = physical_cores()
    if torch.device(device).type == "cuda":
        return workers or 1, threads or cores
    if workers is None:
        workers = min(cores, 8) if threads is None else max(1, cores // threads)
    return workers, threads or max(1, cores // workers)
