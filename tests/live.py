"""Real ``piggyback serve`` processes on loopback for the tests (resnet18, seeded random weights)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import encode
from tests.server.conftest import TOKEN

IMAGE = encode("PNG", size=(40, 40))  # a request body for /classify
HEADERS = {"Content-Type": "image/png"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """One server process. Its log goes to a file: an unread pipe fills up (64 KiB of access-log
    lines) and blocks the server."""

    def __init__(
        self, store: Path | str, *, port: int | None = None, weights: str = "random", **settings: object
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PIGGYBACK_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
        args = ["--backbone", "resnet18", "--weights", weights, "--store", str(store), "--port", str(self.port)]
        for key, value in settings.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", *args], env=env, stdout=self._log, stderr=self._log
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def wait_ready(self, timeout_s: float = 90.0) -> LiveServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"server did not become ready:\n{self.log()}")

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server did not exit within {timeout_s} s:\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no drain, as a crash or the OOM killer would."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


@contextmanager
def serve(store: Path | str, **settings: object) -> Iterator[str]:
    server = LiveServer(store, **settings)
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


@contextmanager
def live_server(store: Path | str, **settings: object) -> Iterator[LiveServer]:
    server = LiveServer(store, **settings)
    try:
        yield server.wait_ready()
    finally:
        server.stop()
