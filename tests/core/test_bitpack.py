import numpy as np
import pytest
import torch

from piggyback_core.bitpack import (
    count_nonzero_packed,
    pack_binary,
    pack_ternary,
    packed_nbytes,
    unpack_binary,
    unpack_ternary,
    validate_packed,
)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 1000, 4097])
def test_binary_packing_matches_numpy_little_bit_order_and_round_trips(n: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    packed = pack_binary(mask)
    expected = np.packbits(mask.numpy().astype(np.uint8), bitorder="little")
    assert packed.dtype == torch.uint8
    assert packed.numel() == (n + 7) // 8 == packed_nbytes(n, "binary")
    assert np.array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_binary(packed, n).bool(), mask)
    assert count_nonzero_packed(packed, "binary") == int(mask.sum())
    assert validate_packed(packed, n, "binary") is None


def test_binary_bit_order_on_a_hand_example() -> None:
    # elements 0 and 3 set -> bits 0 and 3 of byte 0 -> 0b00001001; element 8 -> byte 1 bit 0
    mask = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert pack_binary(mask).tolist() == [0b00001001, 0b00000001]


def test_ternary_codes_on_a_hand_example_and_round_trip() -> None:
    values = torch.tensor([1, -1, 0, 1, -1], dtype=torch.int8)
    packed = pack_ternary(values)
    # element0=+1 (01), element1=-1 (10 << 2), element2=0, element3=+1 (01 << 6); element4=-1 in byte 1
    assert packed.tolist() == [0b01_00_10_01, 0b10]
    assert torch.equal(unpack_ternary(packed, 5), values)
    assert count_nonzero_packed(packed, "ternary") == 4


@pytest.mark.parametrize("n", [1, 3, 4, 5, 1001])
def test_ternary_round_trip(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    values = torch.randint(-1, 2, (n,), generator=g, dtype=torch.int8)
    packed = pack_ternary(values)
    assert packed.numel() == (n + 3) // 4 == packed_nbytes(n, "ternary")
    assert torch.equal(unpack_ternary(packed, n), values)
    assert validate_packed(packed, n, "ternary") is None


def test_packing_refuses_values_outside_its_kind() -> None:
    with pytest.raises(ValueError, match="only 0 and 1"):
        pack_binary(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="-1, 0 and 1"):
        pack_ternary(torch.tensor([0, 2]))


def test_validate_packed_names_each_problem() -> None:
    assert "expected torch.uint8" in validate_packed(torch.zeros(2, dtype=torch.int16), 9, "binary")
    assert "flat" in validate_packed(torch.zeros(1, 2, dtype=torch.uint8), 9, "binary")
    assert "exactly 2" in validate_packed(torch.zeros(3, dtype=torch.uint8), 9, "binary")
    assert "padding" in validate_packed(torch.tensor([0, 0b10], dtype=torch.uint8), 9, "binary")
    assert "0b11" in validate_packed(torch.tensor([0b11], dtype=torch.uint8), 4, "ternary")
    assert "padding" in validate_packed(torch.tensor([0b0100], dtype=torch.uint8), 1, "ternary")
    # a binary layer's bytes read as ternary are the wrong size
    assert "exactly" in validate_packed(pack_binary(torch.ones(64, dtype=torch.bool)), 64, "ternary")
