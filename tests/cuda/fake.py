"""The CUDA path on a machine without CUDA: fake CUDA tensors and a faked device seam.

``FakeTensorMode`` makes tensors on ``device="cuda"`` (metadata only: shape, dtype, device) and
raises on any device or dtype mismatch, as a GPU would; the functions of ``piggyback_core.device``
(availability, capability, free memory, pinning, synchronisation) are replaced for the test. What
cannot be checked this way: kernels' numerics and speed (``make gpu-check`` on a GPU does).

``count_transfers`` counts what costs a GPU its pipelining: device-to-host copies, host-to-device
copies, and host syncs (``aten._local_scalar_dense``: ``.item()``, ``bool(tensor)``, ``.tolist()``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from piggyback_core import device as seam

GIB = 1 << 30


@dataclass
class FakeGPU:
    """What the faked seam reports and records."""

    capability: tuple[int, int] = (9, 0)  # an H100
    free_bytes: int = 80 * GIB
    total_bytes: int = 80 * GIB
    cached_unused: int = 0  # held by the caching allocator, used by no tensor
    syncs: list[str] = field(default_factory=list)  # synchronize() calls, in order
    pinned: int = 0  # pin() calls


@contextmanager
def fake_cuda(monkeypatch: pytest.MonkeyPatch, gpu: FakeGPU | None = None) -> Iterator[FakeGPU]:
    """Fake CUDA tensors (FakeTensorMode) and the device seam faked, for the block."""
    gpu = gpu or FakeGPU()

    def pin(tensor: torch.Tensor) -> torch.Tensor:
        gpu.pinned += 1
        return tensor  # fake tensors have no memory to page-lock

    def synchronize(device: torch.device) -> None:
        gpu.syncs.append(str(device))

    monkeypatch.setattr(seam, "cuda_available", lambda: True)
    monkeypatch.setattr(seam, "capability", lambda device: gpu.capability)
    monkeypatch.setattr(seam, "mem_get_info", lambda device: (gpu.free_bytes, gpu.total_bytes))
    monkeypatch.setattr(seam, "cached_unused", lambda device: gpu.cached_unused)
    monkeypatch.setattr(seam, "pin", pin)
    monkeypatch.setattr(seam, "synchronize", synchronize)
    monkeypatch.setattr(seam, "empty_cache", lambda device: None)
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield gpu


@dataclass
class Transfers:
    events: list[str] = field(default_factory=list)  # "d2h", "h2d", "h2d-blocking", "sync", in order

    def count(self, kind: str) -> int:
        return self.events.count(kind)


def _device_of(value: Any) -> str | None:
    return value.device.type if isinstance(value, torch.Tensor) else None


class _Counter(TorchDispatchMode):
    def __init__(self, transfers: Transfers) -> None:
        super().__init__()
        self.transfers = transfers

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.transfers.events.append("sync")
        elif name in ("_to_copy", "to", "copy_"):
            if name == "copy_":
                dst, src = _device_of(args[0]), _device_of(args[1])
            else:
                target = kwargs.get("device") or next(
                    (a for a in args[1:] if isinstance(a, torch.device | str)), args[0].device
                )
                src, dst = _device_of(args[0]), torch.device(target).type
            if src == "cuda" and dst == "cpu":
                self.transfers.events.append("d2h")
            elif src == "cpu" and dst == "cuda":
                blocking = not (kwargs.get("non_blocking") or (name == "copy_" and len(args) > 2 and args[2]))
                self.transfers.events.append("h2d-blocking" if blocking else "h2d")
        return func(*args, **kwargs)


@contextmanager
def count_transfers() -> Iterator[Transfers]:
    """Inside :func:`fake_cuda`: the transfers and host syncs of the block, in order."""
    transfers = Transfers()
    with _Counter(transfers):
        yield transfers


def count_kernels(fn: Any) -> int:
    """The tensor operations ``fn`` runs that would launch work on a device: views (no kernel) and
    metadata queries (``prim::device``) are left out."""
    counted = [0]

    class _Kernels(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            counted[0] += not func.is_view and func.namespace != "prim"
            return func(*args, **(kwargs or {}))

    with _Kernels():
        fn()
    return counted[0]
