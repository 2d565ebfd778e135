"""The server as a process, as Docker or Kubernetes runs it, and as hostile clients meet it: failed
starts, busy ports, signals, and raw-socket clients that hang up or stall mid-upload."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from piggyback_core import Backbone, FileSystemStore, load_backbone
from tests.live import HEADERS, IMAGE, LiveServer, live_server
from tests.server.conftest import small_task


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone("resnet18", weights="random")


@pytest.fixture
def store(tmp_path: Path, backbone: Backbone) -> Path:
    FileSystemStore(tmp_path / "store").put("a", small_task(backbone, "a").to_bytes())
    return tmp_path / "store"


def partial_upload(port: int, *, declared: int = 100_000, sent: int = 100, task: str = "a") -> socket.socket:
    """A raw connection that sends a classify request's headers and the first ``sent`` bytes of a
    body of ``declared`` bytes, then stops."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"POST /classify/{task} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {declared}\r\n\r\n"
    sock.sendall(head.encode() + IMAGE[:sent])
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, closed by the server) of one HTTP/1.1 response on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    sock.settimeout(3)
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    except ConnectionResetError:  # closed with the client's bytes unread: a reset
        closed = True
    return status, headers, body, closed


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.partition("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_server_whose_backbone_cannot_load_exits_non_zero_with_a_one_line_reason(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "store", weights=str(tmp_path / "missing.safetensors"))
    try:
        code = server.wait_exit(timeout_s=90)
        log = server.log()
    finally:
        server.stop()
    assert code != 0
    assert "Traceback" not in log, log
    assert log.strip().splitlines()[-1] == (
        f"piggyback serve: error: start-up failed: weights file '{tmp_path / 'missing.safetensors'}' does not exist"
    )


def test_a_busy_port_is_one_line_and_a_non_zero_exit_before_anything_loads(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--weights", "random", "--backbone", "resnet18",
             "--store", str(tmp_path), "--port", str(port), "--token", "t"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"piggyback serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert time.monotonic() - started < 15  # refused before loading a backbone


def test_a_client_that_hangs_up_mid_upload_is_a_499_in_one_log_line_not_a_server_error(store: Path) -> None:
    with live_server(store) as server:
        for _ in range(3):
            partial_upload(server.port).close()
        deadline = time.monotonic() + 10
        while metric(server.url, "piggyback_requests_total", task="a", status="499") < 3:
            assert time.monotonic() < deadline, httpx.get(f"{server.url}/metrics").text
            time.sleep(0.05)
        assert metric(server.url, "piggyback_requests_total", status="500") == 0
        assert httpx.post(f"{server.url}/classify/a", content=IMAGE, headers=HEADERS).status_code == 200
        log = server.log()
    assert "Traceback" not in log and "unhandled" not in log, log
    assert len(re.findall(r"classify task=a status=499 ", log)) == 3, log


def test_stalled_uploads_get_408_and_are_closed_at_the_body_deadline(store: Path) -> None:
    with live_server(store, body_timeout_s=1.5) as server:
        stalled = [partial_upload(server.port) for _ in range(40)]
        started = time.monotonic()
        answers = [read_response(sock) for sock in stalled]
        elapsed = time.monotonic() - started
        for sock in stalled:
            sock.close()
        healthy = httpx.post(f"{server.url}/classify/a", content=IMAGE, headers=HEADERS)
    assert elapsed < 10
    for status, headers, body, closed in answers:
        assert status == 408 and closed, (status, headers, body)
        assert "1.5 s" in json.loads(body)["detail"]
    assert healthy.status_code == 200


def test_connections_past_the_bound_get_503_and_the_server_recovers(store: Path) -> None:
    with live_server(store, max_connections=8, body_timeout_s=3) as server:
        time.sleep(0.5)  # the readiness probes' connections are gone
        stalled = []
        for _ in range(8):  # one at a time: each is within the bound when it arrives
            stalled.append(partial_upload(server.port))
            time.sleep(0.05)
        over = [partial_upload(server.port, declared=len(IMAGE), sent=len(IMAGE)) for _ in range(5)]
        statuses = [read_response(sock)[0] for sock in over]
        assert statuses == [503] * 5
        for sock in stalled:
            sock.close()
        deadline = time.monotonic() + 10
        while True:  # the bound frees up as the hung-up connections are reaped
            status = httpx.post(f"{server.url}/classify/a", content=IMAGE, headers=HEADERS).status_code
            if status == 200:
                break
            assert status == 503 and time.monotonic() < deadline
            time.sleep(0.1)
        for sock in over:
            sock.close()


def test_sigterm_drains_admitted_requests_refuses_new_ones_and_exits_zero(store: Path) -> None:
    server = LiveServer(store, body_timeout_s=20).wait_ready()
    try:
        admitted = partial_upload(server.port, declared=len(IMAGE), sent=10)  # admitted, body still coming
        burst: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: burst.append(
                    httpx.post(f"{server.url}/classify/a", content=IMAGE, headers=HEADERS, timeout=30).status_code
                )
            )
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while True:  # every request of the burst answered or admitted (its body held) before SIGTERM
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
            held = float(re.search(r"^piggyback_request_body_bytes_in_flight (\S+)$", metrics, re.M).group(1))
            if len(burst) + (held - 10) // len(IMAGE) >= 8:
                break
            assert time.monotonic() < deadline, (burst, held)
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        late = httpx.post(
            f"{server.url}/classify/a", content=IMAGE, headers={**HEADERS, "X-Request-ID": "late-1"}, timeout=10
        )
        ready = httpx.get(f"{server.url}/readyz", timeout=10)
        alive = httpx.get(f"{server.url}/healthz", timeout=10)
        assert server.proc.poll() is None, "exited before its admitted request was answered"
        admitted.sendall(IMAGE[10:])
        status, _, body, _ = read_response(admitted)
        admitted.close()
        for t in threads:
            t.join()
        code = server.wait_exit(timeout_s=30)
        log = server.log()
    finally:
        server.stop()
    assert status == 200, body
    assert burst == [200] * 8
    assert late.status_code == 503 and late.headers["retry-after"] and "shutting down" in late.json()["detail"]
    assert ready.status_code == 503 and alive.status_code == 200
    assert code == 0, log
    assert "draining" in log and "drained" in log
    # the request refused while draining has its access line, with its request id
    assert re.search(r"piggyback\.access /classify/a task= status=503 .*request_id=late-1$", log, re.M), log


def test_json_logs_are_one_object_a_line_with_the_request_id_echoed(store: Path) -> None:
    with live_server(store, log_format="json") as server:
        given = httpx.post(f"{server.url}/classify/a", content=IMAGE, headers={**HEADERS, "X-Request-ID": "abc-123"})
        fresh = httpx.post(f"{server.url}/classify/a", content=IMAGE, headers=HEADERS)
        hostile = httpx.post(
            f"{server.url}/classify/a", content=IMAGE, headers={**HEADERS, "X-Request-ID": b"x\xe9;" * 100}
        )
        log = server.log()
    assert given.headers["x-request-id"] == "abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["x-request-id"])
    records = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is JSON
    access = [r for r in records if r["logger"] == "piggyback.access"]
    assert [r["request_id"] for r in access] == ["abc-123", fresh.headers["x-request-id"],
                                                 hostile.headers["x-request-id"]]  # fmt: skip
    for r in access:
        assert r["task"] == "a" and r["status"] == 200 and r["batch_size"] >= 1 and r["latency_ms"] > 0
    assert any(r["logger"].startswith("uvicorn") for r in records)


def test_text_logs_stay_key_value_lines(store: Path) -> None:
    with live_server(store) as server:
        r = httpx.post(f"{server.url}/classify/a", content=IMAGE, headers=HEADERS)
        log = server.log()
    line = next(x for x in log.splitlines() if "piggyback.access" in x)
    assert re.search(
        rf"classify task=a status=200 latency_ms=\S+ batch_size=\d+ request_id={r.headers['x-request-id']}$", line
    )


def _held_upload(port: int, *, declared: int, sent: int) -> socket.socket:
    """A classify request whose body of ``declared`` bytes stops after ``sent`` bytes (an image,
    then padding)."""
    sock = partial_upload(port, declared=declared, sent=len(IMAGE))
    sock.sendall(b"\0" * (sent - len(IMAGE)))
    return sock


def test_body_bytes_in_flight_have_one_budget_past_which_requests_get_503_and_are_closed(store: Path) -> None:
    budget = 2 * 1024 * 1024
    with live_server(store, max_image_bytes=1024 * 1024, max_task_bytes=1024 * 1024,
                     max_body_bytes_in_flight=budget) as server:  # fmt: skip
        held = [_held_upload(server.port, declared=1_000_000, sent=800_000) for _ in range(2)]
        deadline = time.monotonic() + 10
        while metric(server.url, "piggyback_request_body_bytes_in_flight") < 1_600_000:
            assert time.monotonic() < deadline, "the server never read the held bodies"
            time.sleep(0.05)
        over = _held_upload(server.port, declared=1_000_000, sent=600_000)  # 2.2 MB > 2 MiB
        status, headers, body, closed = read_response(over)
        over.close()
        assert status == 503 and headers["retry-after"] and closed, (status, headers, body)
        assert "bytes of request bodies" in json.loads(body)["detail"]
        assert metric(server.url, "piggyback_request_body_budget_refusals_total") == 1
        for sock in held:
            sock.close()  # the client hangs up: its bytes are given back
        while metric(server.url, "piggyback_request_body_bytes_in_flight") > 0:
            assert time.monotonic() < deadline, "the held bodies' bytes were never given back"
            time.sleep(0.05)
        assert httpx.post(f"{server.url}/classify/a", content=IMAGE, headers=HEADERS).status_code == 200


def test_task_names_from_the_query_cannot_forge_a_log_line_or_a_field(store: Path) -> None:
    with live_server(store) as server:
        r = httpx.post(f"{server.url}/classify?tasks=a%0A2026-01-01 INFO forged status=200", content=IMAGE,
                       headers=HEADERS)  # fmt: skip
        log = server.log()
    assert r.status_code == 422
    assert "forged" not in "".join(line for line in log.splitlines() if "piggyback.access" not in line)
    line = next(x for x in log.splitlines() if "piggyback.access" in x)
    assert "task=a%0A2026-01-01%20INFO%20forged%20status%3D200 status=422 " in line, line
