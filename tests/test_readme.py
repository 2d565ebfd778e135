"""The README's and the documentation's examples run as written: every ```sh block of README.md and
of the pages in mkdocs.yml's nav, in that order, against a live demo server (``python -m
scripts.demo``, what ``make demo`` runs), from a folder laid out as a fresh clone after ``make
demo`` (``.venv/bin/piggyback``, ``python`` and ``pip``, and ``.demo/``). Only the port numbers
are moved to free ones, and curl is made to fail on an HTTP error (``--fail-with-body``) so that a
401 or a 404 fails the block instead of printing a JSON error."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.live import free_port

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
PORT = re.compile(r"(?<=localhost:)800\d|(?<=--port )800\d")
# What a `text` block may need that an offline machine without a GPU lacks, a make target, or a
# server that runs until stopped (the docs' own).
UNRUNNABLE = re.compile(r"IMAGENET|docker|kubectl|\$DATA|torchrun|flowers/|^make |^\w+:|mkdocs serve", re.M)


def pages() -> list[Path]:
    """README.md, then every page of the documentation site in the order of its nav."""

    def walk(nav: object) -> Iterator[str]:
        if isinstance(nav, str):
            yield nav
        elif isinstance(nav, list):
            for item in nav:
                yield from walk(item)
        elif isinstance(nav, dict):
            for value in nav.values():
                yield from walk(value)

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = ROOT / config["docs_dir"]
    found = [docs / page if (docs / page).exists() else ROOT / page for page in walk(config["nav"])]
    return [ROOT / "README.md", *found]


def blocks(kind: str, source: Path | None = None) -> list[tuple[str, str]]:
    """(where, body) of every block of this kind, where as `docs/api/rest.md#2` (1-based)."""
    found = []
    for page in [source] if source else pages():
        bodies = [body for lang, body in FENCE.findall(page.read_text()) if lang == kind]
        found += [(f"{page.relative_to(ROOT)}#{i}", body) for i, body in enumerate(bodies, 1)]
    return found


def test_every_page_of_the_docs_is_in_the_nav_and_exists() -> None:
    listed = set(pages())
    assert all(page.is_file() for page in listed), [str(p) for p in listed if not p.is_file()]
    assert set((ROOT / "docs").rglob("*.md")) <= listed


def test_the_readme_and_docs_have_runnable_examples_and_mark_every_other_command_block() -> None:
    assert blocks("sh", ROOT / "README.md"), "the README shows at least one command that runs"
    assert len(blocks("sh")) >= 8
    for where, body in blocks("text") + blocks(""):
        assert UNRUNNABLE.search(body), f"a command block that could run here is not marked sh ({where}):\n{body}"


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A folder laid out as a clone after `make demo`, with the demo serving on a free port."""
    if shutil.which("curl") is None or shutil.which("openssl") is None:
        pytest.skip("the README's examples use curl and openssl")
    where = tmp_path_factory.mktemp("clone")
    bin_dir = where / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    shims = {
        "piggyback": f'exec "{sys.executable}" -m server.cli "$@"',
        "python": f'exec "{sys.executable}" "$@"',
        # the clone's pip is this environment's, which already has the dev tools: no network
        "pip": f'exec "{sys.executable}" -m pip "$@" --no-index',
    }
    for name, line in shims.items():
        shim = bin_dir / name
        shim.write_text(f"#!/bin/sh\n{line}\n")
        shim.chmod(0o755)
    tools = where / "tools"
    tools.mkdir()
    curl = tools / "curl"
    curl.write_text(f'#!/bin/sh\nexec "{shutil.which("curl")}" --fail-with-body "$@"\n')
    curl.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PIGGYBACK_TOKEN", None)
    ports = {"8000": str(free_port()), "8001": str(free_port())}
    log = (where / "demo.log").open("wb")
    demo = subprocess.Popen(
        [sys.executable, "-m", "scripts.demo", "--dir", str(where / ".demo"), "--port", ports["8000"]],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{ports['8000']}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert demo.poll() is None and time.monotonic() < deadline, (where / "demo.log").read_text()
            time.sleep(0.2)
        yield where, {**env, "README_PORTS": " ".join(f"{k}={v}" for k, v in ports.items())}
    finally:
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(timeout=60)
        log.close()
    assert code == 0, (where / "demo.log").read_text()


@pytest.mark.parametrize(("source", "body"), blocks("sh"), ids=[where for where, _ in blocks("sh")])
def test_readme_example_runs_as_written(clone: tuple[Path, dict[str, str]], source: str, body: str) -> None:
    where, env = clone
    ports = dict(pair.split("=") for pair in env["README_PORTS"].split())
    script = PORT.sub(lambda m: ports[m.group(0)], body)
    run = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=where,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: whatever it leaves running is stopped below
    )
    try:
        out, _ = run.communicate(timeout=300)
    finally:
        kill_group(run.pid)
    assert run.returncode == 0, f"{source} failed ({run.returncode}):\n{script}\n--- output ---\n{out.decode()}"
    assert b'"detail"' not in out, out.decode()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_the_demo_on_a_busy_port_says_so_in_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "scripts.demo", "--dir", str(tmp_path / ".demo"), "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"demo: error: cannot listen on 127.0.0.1:{port}: Address already in use; "
        f"choose another port: make demo PORT={port + 1}"
    ]
    assert not (tmp_path / ".demo").exists()  # nothing trained, nothing written
