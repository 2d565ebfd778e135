"""The accuracy benchmark end to end at toy size (slow: `make test-slow`; needs the bench extra)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_accuracy_benchmark_runs_end_to_end_and_writes_its_table_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    args = ["--work", str(tmp_path / "work"), "--out", str(out), "--source-epochs", "1", "--epochs", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy", *args, "--targets", "faces"],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "accuracy.md").read_text()
    for method in ("classifier", "piggyback binary", "piggyback ternary", "finetune"):
        assert f"| {method} |" in table
    assert (out / "accuracy.png").stat().st_size > 1000
