"""``benchmarks.gpu`` (what ``make gpu-check`` runs on a GPU) kept runnable: its CPU smoke form."""

from __future__ import annotations

from pathlib import Path

from benchmarks import gpu


def test_the_gpu_benchmark_runs_and_writes_its_table(tmp_path: Path) -> None:
    code = gpu.main(["--device", "cpu", "--arch", "resnet18", "--batches", "2", "--dtypes", "float32",
                     "--iters", "1", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    table = (tmp_path / "gpu.md").read_text()
    for path in ("plain", "masked, cached", "masked, built", "mixed segments", "mixed stacked"):
        assert f"| float32 | 2 | {path} |" in table
