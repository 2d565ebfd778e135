import pytest
import torch

from piggyback_core import auto_dtype, hardware, native_bf16, parse_dtype, parse_layout


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_exactly_on_cpus_that_execute_it_natively(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(hardware, "native_bf16", lambda: native)
    assert auto_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    assert parse_dtype("auto", "cpu") == auto_dtype("cpu")


def test_cpu_flags_decide_when_torch_has_no_probe(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    native_bf16.cache_clear()
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    real_path = hardware.Path
    monkeypatch.setattr(hardware, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    try:
        cpuinfo.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
        assert native_bf16() is False
        native_bf16.cache_clear()
        cpuinfo.write_text("processor : 0\nflags : fpu avx512f avx512_bf16\n")
        assert native_bf16() is True
    finally:
        native_bf16.cache_clear()


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
