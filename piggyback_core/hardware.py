"""What the hardware computes natively, to choose the compute dtype (``dtype="auto"``).

On a CPU, bfloat16 is worth it only where the processor executes it: AMX tiles (Sapphire Rapids
and later) or AVX-512-BF16 (Cooper Lake, Zen 4). Elsewhere oneDNN emulates it and it runs slower
than float32. PyTorch's own probes are asked first; on Linux the kernel's CPU flags are the
fallback (``amx_bf16``, ``avx512_bf16``). On CUDA, bfloat16 needs compute capability 8.0 (Ampere)
or later; float16 runs everywhere.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .backbones import get_backbone_spec

__all__ = ["LAYOUTS", "auto_dtype", "dtype_name", "native_bf16", "parse_dtype", "parse_layout"]

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
