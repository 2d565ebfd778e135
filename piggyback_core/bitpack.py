"""Bit packing of masks: the on-disk and in-memory form of a task's masks.

Bit order (part of the task-file format, version 1):

* A mask is flattened in row-major (C) order of its weight tensor: element ``i`` of
  ``weight.reshape(-1)``.
* **binary** (1 bit per weight): element ``i`` is bit ``i % 8`` of byte ``i // 8``, bit 0 being the
  least significant ("little" bit order, as ``numpy.packbits(..., bitorder="little")``). 1 keeps the
  weight, 0 zeroes it. A layer of ``n`` weights takes exactly ``ceil(n / 8)`` bytes.
* **ternary** (2 bits per weight): element ``i`` is the two bits ``2*(i % 4)`` and ``2*(i % 4) + 1``
  of byte ``i // 4``, holding the code ``0b00`` for 0, ``0b01`` for +1 and ``0b10`` for -1; ``0b11``
  is invalid. A layer of ``n`` weights takes exactly ``ceil(n / 4)`` bytes.
* Padding bits after the last element are 0; a reader refuses anything else.

Every function here works on any device and never leaves torch (no host round trip).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

__all__ = [
    "MaskKind",
    "MASK_KINDS",
    "bits_per_weight",
    "count_nonzero_packed",
    "pack_binary",
    "pack_mask",
    "pack_ternary",
    "packed_nbytes",
    "unpack_binary",
    "unpack_mask",
    "unpack_ternary",
    "validate_packed",
]

MaskKind = Literal["binary", "ternary"]
MASK_KINDS: tuple[MaskKind, ...] = ("binary", "ternary")

_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
_TERNARY_WEIGHTS = torch.tensor([1 << (2 * i) for i in range(4)], dtype=torch.uint8)
_TERNARY_SHIFTS = torch.arange(0, 8, 2, dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def bits_per_weight(kind: MaskKind) -> int:
    if kind == "binary":
        return 1
    if kind == "ternary":
        return 2
    raise ValueError(f"unknown mask kind {kind!r}; expected one of {', '.join(MASK_KINDS)}")


def packed_nbytes(numel: int, kind: MaskKind) -> int:
    """Exact byte count of a packed mask over ``numel`` weights."""
    per_byte = 8 // bits_per_weight(kind)
    return -(-numel // per_byte)


def _on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.device == like.device else t.to(like.device)


def pack_binary(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean (or 0/1) tensor into ``ceil(n/8)`` uint8 bytes, LSB first."""
    flat = mask.reshape(-1).to(torch.uint8)
    if bool((flat > 1).any()):
        raise ValueError("a binary mask holds only 0 and 1")
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return (flat.view(-1, 8) * _on(_BIT_WEIGHTS, flat)).sum(dim=1, dtype=torch.uint8)


def unpack_binary(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_binary`: a flat uint8 tensor of 0/1 of length ``numel``."""
    bits = (packed.unsqueeze(-1) >> _on(_BIT_SHIFTS, packed)) & 1
    return bits.reshape(-1)[:numel]


def pack_ternary(mask: torch.Tensor) -> torch.Tensor:
    """Pack a tensor of values in {-1, 0, 1} into ``ceil(n/4)`` bytes, 2 bits each."""
    flat = mask.reshape(-1)
    if bool(((flat != 0) & (flat != 1) & (flat != -1)).any()):
        raise ValueError("a ternary mask holds only -1, 0 and 1")
    codes = (flat == 1).to(torch.uint8) | ((flat == -1).to(torch.uint8) << 1)
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    return (codes.view(-1, 4) * _on(_TERNARY_WEIGHTS, codes)).sum(dim=1, dtype=torch.uint8)


def unpack_ternary(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: a flat int8 tensor of -1/0/1 of length ``numel``."""
    codes = ((packed.unsqueeze(-1) >> _on(_TERNARY_SHIFTS, packed)) & 3).to(torch.int8)
    return ((codes & 1) - (codes >> 1)).reshape(-1)[:numel]


def pack_mask(mask: torch.Tensor, kind: MaskKind) -> torch.Tensor:
    return pack_binary(mask) if kind == "binary" else pack_ternary(mask)


def unpack_mask(packed: torch.Tensor, numel: int, kind: MaskKind) -> torch.Tensor:
    return unpack_binary(packed, numel) if kind == "binary" else unpack_ternary(packed, numel)


def validate_packed(packed: torch.Tensor, numel: int, kind: MaskKind) -> str | None:
    """Why ``packed`` is not a valid packed mask over ``numel`` weights, or None if it is."""
    if packed.dtype != torch.uint8:
        return f"dtype is {packed.dtype}, expected torch.uint8"
    if packed.dim() != 1:
        return f"shape is {tuple(packed.shape)}, expected a flat byte vector"
    expected = packed_nbytes(numel, kind)
    if packed.numel() != expected:
        return f"holds {packed.numel()} bytes, but a {kind} mask over {numel} weights takes exactly {expected}"
    if expected == 0:
        return None
    used_bits = (numel * bits_per_weight(kind)) % 8
    if used_bits and int(packed[-1]) >> used_bits:
        return "padding bits after the last weight are not zero"
    if kind == "ternary":
        low = packed & 0x55
        high = (packed >> 1) & 0x55
        if bool((low & high).any()):
            return "holds the invalid ternary code 0b11"
    return None


def count_nonzero_packed(packed: torch.Tensor, kind: MaskKind) -> int:
    """Number of weights the mask keeps (binary ones; ternary non-zeros). Padding must be zero."""
    if kind == "ternary":
        packed = (packed & 0x55) | ((packed >> 1) & 0x55)
    if packed.device.type == "cpu":  # numpy's popcount: ~10x the table lookup (task loading time)
        raw = packed.numpy()
        bulk = len(raw) // 8 * 8  # eight bytes a word: 3.6x fewer elements to count and sum
        words = int(np.bitwise_count(raw[:bulk].view(np.uint64)).sum(dtype=np.int64)) if bulk else 0
        return words + int(np.bitwise_count(raw[bulk:]).sum(dtype=np.int64))
    return int(_on(_POPCOUNT, packed)[packed.long()].sum())
