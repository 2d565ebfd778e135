import json
import subprocess
import sys
from pathlib import Path

import pytest

from piggyback_core import Backbone
from server.cli import main
from tests.conftest import TaskFactory


@pytest.fixture
def task_path(tmp_path: Path, task_factory: TaskFactory) -> Path:
    path = tmp_path / "flowers.safetensors"
    task_factory("flowers", num_labels=3).save(path)
    return path


def test_inspect_json_prints_the_contract_fields(
    task_path: Path, resnet18: Backbone, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(task_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["task"] == "flowers"
    assert info["labels"] == ["class-0", "class-1", "class-2"]
    assert (info["backbone"], info["fingerprint"], info["mask_kind"]) == (
        "resnet18",
        resnet18.fingerprint,
        "binary",
    )
    assert 1.0 <= info["bits_per_parameter"] < 1.0001
    assert 0.75 < info["density"] < 0.85  # the factory keeps 80%
    assert info["file_bytes"] == task_path.stat().st_size
    assert len(info["layers"]) == 20 and info["layers"]["conv1.weight"]["shape"] == [64, 3, 7, 7]


def test_inspect_prints_bits_per_parameter_and_per_layer_density(
    task_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(task_path)]) == 0
    out = capsys.readouterr().out
    assert "bits/param:    1.0000" in out
    assert "masked out" in out
    assert "layer4.1.conv2.weight" in out and "2,359,296" in out


def test_a_failing_command_exits_non_zero_with_one_line_on_stderr(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    for target in (bad, tmp_path / "missing.safetensors"):
        result = subprocess.run(
            [sys.executable, "-m", "server.cli", "inspect", str(target)], capture_output=True, text=True
        )
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("piggyback inspect: error:")
        assert "Traceback" not in result.stderr


def test_every_command_has_help() -> None:
    result = subprocess.run([sys.executable, "-m", "server.cli", "inspect", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "TASK_FILE" in result.stdout
