import json
import os
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


def test_tokens_can_come_from_secret_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from server.settings import Settings

    secret = tmp_path / "token"
    secret.write_text("s3cret-from-a-file\n")
    monkeypatch.setenv("PIGGYBACK_TOKEN_FILE", str(secret))
    settings = Settings()
    assert settings.token is not None and settings.token.get_secret_value() == "s3cret-from-a-file"
    assert "s3cret" not in repr(settings)
    with pytest.raises(ValidationError, match="not both"):
        Settings(token="inline")
    secret.write_text("  \n")
    with pytest.raises(ValidationError, match="is empty"):
        Settings()
    monkeypatch.setenv("PIGGYBACK_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="cannot read token_file"):
        Settings()


def test_fingerprint_prints_what_task_files_must_carry(capsys: pytest.CaptureFixture[str], resnet18: Backbone) -> None:
    assert main(["fingerprint", "--backbone", "resnet18", "--weights", "random", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"backbone": "resnet18", "weights": "random:0", "fingerprint": resnet18.fingerprint}


def test_inspect_into_a_closed_pipe_exits_quietly(task_path: Path) -> None:
    """`piggyback inspect --json f | head`: the reader is gone before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", "inspect", "--json", str(task_path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 0 and done.stderr == ""


def test_a_text_file_is_not_a_task_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.safetensors"
    text.write_text("These are my notes, not a task.\n" * 20)
    done = subprocess.run([sys.executable, "-m", "server.cli", "inspect", str(text)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "piggyback inspect: error: not a task file (not safetensors)\n"
