import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from piggyback_core import FileSystemStore, TaskFile
from server.cli import main

TRAIN = [
    "train", "--task", "colours", "--backbone", "resnet18", "--weights", "random", "--epochs", "4",
    "--batch-size", "8", "--lr-mask", "1e-3", "--lr-head", "1e-2", "--resize-size", "36", "--crop-size", "32",
    "--workers", "0", "--quiet",
]  # fmt: skip


def test_train_to_a_file_then_eval_reports_the_trainers_val_accuracy(
    colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "colours.safetensors"
    assert main([*TRAIN, "--data", str(colours), "--out", str(out), "--workdir", str(tmp_path / "run")]) == 0
    task = TaskFile.load(out)
    assert "wrote task 'colours'" in capsys.readouterr().out
    assert main(["eval", str(out), str(colours), "--weights", "random", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 36 and set(report) >= {"top1", "top5", "n", "per_class"}
    assert report["top1"] == pytest.approx(task.provenance["val_top1"], abs=1e-6)
    assert report["top5"] == 1.0  # three classes
    assert main(["eval", str(out), str(colours / "val"), "--weights", "random"]) == 0
    text = capsys.readouterr().out
    assert "top-1" in text and "blue" in text and "green" in text


def test_train_into_a_store(colours: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = [
        *TRAIN,
        "--epochs",
        "1",
        "--data",
        str(colours),
        "--store",
        str(store),
        "--workdir",
        str(tmp_path / "r"),
    ]
    assert main(args) == 0
    assert [t.name for t in FileSystemStore(store).list()] == ["colours"]


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            ok = self.headers.get("Authorization") == "Bearer s3cret"
            self.send_response(201 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps({} if ok else {"detail": "bad token"}).encode())

        def log_message(self, *args: Any) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", received
    httpd.shutdown()
    httpd.server_close()


def test_train_uploads_to_a_server_with_the_token(
    colours: Path, tmp_path: Path, recording_server: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = recording_server
    base = [
        *TRAIN,
        "--epochs",
        "1",
        "--data",
        str(colours),
        "--server",
        url,
        "--workdir",
        str(tmp_path / "r"),
    ]
    assert main([*base, "--token", "s3cret"]) == 0
    assert received[0]["path"] == "/tasks/colours" and received[0]["auth"] == "Bearer s3cret"
    assert TaskFile.from_bytes(received[0]["body"]).name == "colours"
    assert main([*base, "--token", "wrong"]) == 2  # refused: one line, non-zero


def test_train_failures_are_one_line_errors(tmp_path: Path) -> None:
    cases = [
        [*TRAIN, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
        [*TRAIN, "--data", str(tmp_path), "--method", "finetune", "--store", str(tmp_path / "s")],
    ]
    for args in cases:
        result = subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_eval_without_weights_uses_the_backbone_the_task_file_records(
    colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "colours.safetensors"
    args = [*TRAIN, "--epochs", "1", "--seed", "3", "--data", str(colours), "--out", str(out)]
    assert main([*args, "--workdir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert TaskFile.load(out).provenance["weights"] == "random:3"
    assert main(["eval", str(out), str(colours), "--json"]) == 0  # no --weights: random, seed 3
    captured = capsys.readouterr()
    assert json.loads(captured.out)["top1"] == pytest.approx(TaskFile.load(out).provenance["val_top1"], abs=1e-6)
    assert "weights random:3 (as recorded in the task file" in captured.err
    # --weights overrides; other weights are refused by their fingerprint, naming both
    assert main(["eval", str(out), str(colours), "--weights", "random", "--seed", "4"]) == 2
    assert "fingerprint" in capsys.readouterr().err


def test_a_bad_task_name_fails_at_once_and_creates_nothing(colours: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "runs" / "Bad.Name"
    args = [*TRAIN, "--task", "Bad.Name", "--data", str(colours), "--out", str(tmp_path / "x.safetensors")]
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", *args, "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Bad.Name" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x.safetensors").exists()


def test_every_train_flag_has_help_text() -> None:
    from server.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    undocumented = [a.option_strings for a in train._actions if a.option_strings and not a.help]
    assert undocumented == []
