"""Every question the library asks CUDA, and every CUDA call it makes outside tensor operations, at
one seam: availability, compute capability, free memory, page-locked (pinned) host memory, waiting
for a device, releasing cached blocks, and what a CUDA error means.

Tensor operations themselves need no seam: under ``torch._subclasses.fake_tensor.FakeTensorMode``
tensors on ``device="cuda"`` exist on a machine without CUDA, and every device or dtype mismatch
raises as it would on a GPU. The tests (``fakecuda``) replace the functions of this module to run
the whole CUDA path of the engine and the server on a CPU; nothing else in the code calls
``torch.cuda`` directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "cached_unused",
    "capability",
    "cuda_available",
    "empty_cache",
    "is_oom",
    "is_sticky_error",
    "mem_get_info",
    "pin",
    "synchronize",
]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def capability(device: torch.device | str) -> tuple[int, int]:
    """The GPU's compute capability, e.g. (8, 0) for an A100, (9, 0) for an H100."""
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return int(major), int(minor)


def mem_get_info(device: torch.device | str) -> tuple[int, int]:
    """(free, total) bytes of the GPU's memory."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(free), int(total)


def cached_unused(device: torch.device) -> int:
    """Bytes the caching allocator holds but no tensor uses: free for this process, though the
    driver (``mem_get_info``) counts them as taken."""
    return int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def pin(tensor: Tensor) -> Tensor:
    """``tensor`` in page-locked host memory (a copy unless it is pinned already), so that a copy
    to the GPU with ``non_blocking=True`` is asynchronous instead of a staged, blocking one."""
    return tensor if tensor.is_pinned() else tensor.pin_memory()


def synchronize(device: torch.device) -> None:
    """Wait until the device's current stream has finished (after an asynchronous copy to the host)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def empty_cache(device: torch.device) -> None:
    """Return the caching allocator's unused blocks (after an out-of-memory error)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory (a batch may be split and retried)."""
    return isinstance(exc, torch.OutOfMemoryError)


# Messages of CUDA errors after which the context is unusable: every later call fails the same way
# ("sticky" errors), so the process must be restarted. An out-of-memory error is not one of them.
_STICKY = (
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "device-side assert",
    "an illegal",
    "uncorrectable ECC",
    "CUDA error: unknown error",
    "device not ready",
    "GPU is lost",
    "hardware stack error",
)


def is_sticky_error(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the CUDA context unusable (the process must be restarted)."""
    if is_oom(exc) or not isinstance(exc, RuntimeError):
        return False
    message = str(exc)
    return ("CUDA" in message or "cuda" in message) and any(s.lower() in message.lower() for s in _STICKY)
