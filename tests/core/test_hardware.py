import os
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from piggyback_core import (
    auto_dtype,
    available_memory_bytes,
    cgroup_cpu_limit,
    cpu_bf16_isa,
    hardware,
    native_bf16,
    parse_dtype,
    parse_layout,
    physical_cores,
)


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_exactly_on_cpus_that_execute_it_natively(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(hardware, "native_bf16", lambda: native)
    assert auto_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    assert parse_dtype("auto", "cpu") == auto_dtype("cpu")


def test_cpu_flags_decide_when_torch_has_no_probe(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    cpu_bf16_isa.cache_clear()
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    real_path = hardware.Path
    monkeypatch.setattr(hardware, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    try:
        for flags, isa in [
            ("fpu sse avx2 avx512f", "no native bf16"),
            ("fpu avx512f avx512_bf16", "AVX-512-BF16"),  # an AMD EPYC (Zen 4)
            ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", "AMX"),  # a Xeon (Sapphire Rapids)
        ]:
            cpu_bf16_isa.cache_clear()
            cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
            assert (cpu_bf16_isa(), native_bf16()) == (isa, isa != "no native bf16")
    finally:
        cpu_bf16_isa.cache_clear()


def test_torch_probes_decide_first(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_bf16_isa.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    try:
        assert cpu_bf16_isa() == "AMX" and native_bf16()
    finally:
        cpu_bf16_isa.cache_clear()


def test_explicit_dtypes_and_a_bad_name() -> None:
    assert parse_dtype("float32", "cpu") == torch.float32
    assert parse_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        parse_dtype("half", "cpu")


def test_layout_auto_follows_the_backbones_measured_choice_and_a_bad_name_is_refused() -> None:
    assert parse_layout("auto", "resnet50") is True and parse_layout("auto", "vit_b_16") is False
    assert parse_layout("contiguous", "resnet50") is False and parse_layout("channels_last", "vit_b_16") is True
    with pytest.raises(ValueError, match="unknown layout 'nhwc'"):
        parse_layout("nhwc", "resnet50")


def fake_cgroup(root: Path, files: Mapping[str, str | bytes]) -> Path:
    """A cgroup directory holding ``files`` (path relative to the root: content)."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def v1(quota: str, period: str | None = "100000", controller: str = "cpu") -> dict[str, str | bytes]:
    files: dict[str, str | bytes] = {f"{controller}/cpu.cfs_quota_us": quota + "\n"}
    if period is not None:
        files[f"{controller}/cpu.cfs_period_us"] = period + "\n"
    return files


QUOTAS = [
    pytest.param({"cpu.max": "max 100000\n"}, None, id="v2 no limit"),
    pytest.param({"cpu.max": "400000 100000\n"}, 4.0, id="v2 4 cpus"),
    pytest.param({"cpu.max": "150000 100000\n"}, 1.5, id="v2 1.5 cpus"),
    pytest.param(v1("200000"), 2.0, id="v1 2 cpus"),
    pytest.param(v1("50000", controller="cpu,cpuacct"), 0.5, id="v1 cpu,cpuacct"),
    pytest.param(v1("-1"), None, id="v1 no limit"),
    pytest.param({}, None, id="no cgroup files"),
    pytest.param({"cpu.max": "banana"}, None, id="v2 garbage"),
    pytest.param({"cpu.max": "400000"}, None, id="v2 one field"),
    pytest.param({"cpu.max": "0 100000"}, None, id="v2 zero quota"),
    pytest.param({"cpu.max": "400000 0"}, None, id="v2 zero period"),
    pytest.param({"cpu.max": "\u00b200000 100000"}, None, id="v2 a digit int() refuses"),
    pytest.param({"cpu.max": b"\xff\xfe\x00"}, None, id="v2 not text"),
    pytest.param(v1("200000", "garbage"), None, id="v1 garbage"),
    pytest.param(v1("200000", None), None, id="v1 no period"),
]


@pytest.mark.parametrize("files,cpus", QUOTAS)
def test_the_cgroup_cpu_quota_is_read_from_v2_or_v1_files(
    tmp_path: Path, files: dict[str, str | bytes], cpus: float | None
) -> None:
    assert cgroup_cpu_limit(fake_cgroup(tmp_path, files)) == cpus


def test_an_unreadable_cgroup_file_means_no_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").mkdir()  # reading it raises IsADirectoryError
    assert cgroup_cpu_limit(tmp_path) is None
    assert cgroup_cpu_limit(tmp_path / "absent") is None


def test_physical_cores_honours_the_containers_cpu_quota(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)))  # a 128-core node
    assert physical_cores(cgroup_root=tmp_path) == 128  # no quota
    for quota, cores in (("400000 100000", 4), ("150000 100000", 2), ("10000 100000", 1), ("max 100000", 128)):
        fake_cgroup(tmp_path, {"cpu.max": quota})
        assert physical_cores(cgroup_root=tmp_path) == cores, quota
    fake_cgroup(tmp_path, {"cpu.max": "51200000 100000"})  # a quota above the affinity mask
    assert physical_cores(cgroup_root=tmp_path) == 128


def test_available_memory_is_the_containers_headroom_where_that_is_lower(tmp_path: Path) -> None:
    fake_cgroup(tmp_path, {"memory.max": str(64 << 20), "memory.current": str(16 << 20)})
    assert available_memory_bytes(cgroup_root=tmp_path) == 48 << 20  # any machine has more free
    for v1 in ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"):
        fake_cgroup(tmp_path, {v1: str(32 << 20)})
    fake_cgroup(tmp_path, {"memory.max": "max"})  # v2 without a limit: v1's files decide
    assert available_memory_bytes(cgroup_root=tmp_path) == 0
    assert available_memory_bytes(cgroup_root=tmp_path / "absent") > 48 << 20
