"""Hostile images: every one is answered 4xx with a clear ``detail`` (or 200 where it is a real
image after all), never 5xx; the server stays healthy and its memory bounded."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from piggyback_core import Backbone, FileSystemStore
from tests.conftest import encode
from tests.live import live_server
from tests.server.conftest import small_task

SUITE = "hostile images"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny, well-formed PNG that declares width x height pixels (7.5 GB decoded at 50k x 50k)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.new("P", (32, 32), color=i * 40) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


@pytest.fixture
def client(app_client, tmp_path: Path, resnet18: Backbone) -> Iterator[TestClient]:
    FileSystemStore(tmp_path / "store").put("flowers", small_task(resnet18, "flowers", num_labels=4).to_bytes())
    with app_client(max_image_bytes=2_000_000, max_image_pixels=4_000_000) as c:
        yield c


def post(client: TestClient, body: bytes, content_type: str | None = "image/jpeg") -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return client.post("/classify/flowers", content=body, headers=headers)


def assert_refused(response: httpx.Response, statuses: set[int]) -> None:
    assert response.status_code in statuses, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and 8 <= len(detail) <= 500 and "Traceback" not in detail


def assert_healthy(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert post(client, encode("PNG"), "image/png").status_code == 200


def test_broken_and_foreign_bodies_are_refused_with_a_clear_detail(client: TestClient, cases: Callable) -> None:
    jpeg, png = encode("JPEG", size=(64, 48)), encode("PNG", size=(64, 48))
    bodies: list[tuple[str, bytes, str | None, set[int]]] = [
        ("zero bytes", b"", "image/jpeg", {422}),
        ("text as jpeg", b"hello, I am not an image\n" * 20, "image/jpeg", {422}),
        ("pdf as jpeg", PDF, "image/jpeg", {422}),
        ("pdf as pdf", PDF, "application/pdf", {415}),
        ("jpeg as json", jpeg, "application/json", {415}),
        ("jpeg as text", jpeg, "text/plain", {415}),
        ("no content type", jpeg, None, {415}),
        ("only the jpeg magic", b"\xff\xd8\xff\xe0", "image/jpeg", {422}),
        ("only the png signature", png[:8], "image/png", {422}),
        ("png header, no data", png[:33], "image/png", {422}),
        ("decompression bomb png", png_bomb(), "image/png", {413}),
        ("bomb declared as jpeg", png_bomb(), "image/jpeg", {413}),
        ("wide bomb", png_bomb(200_000, 30), "image/png", {413}),
    ]
    for cut in (0.1, 0.25, 0.5, 0.75, 0.9):  # truncated files
        bodies.append((f"jpeg cut at {cut}", jpeg[: int(len(jpeg) * cut)], "image/jpeg", {422}))
        bodies.append((f"png cut at {cut}", png[: int(len(png) * cut)], "image/png", {422}))
    rng = random.Random(0)
    for i in range(20):  # random garbage
        bodies.append((f"garbage {i}", rng.randbytes(rng.randint(1, 5000)), "image/jpeg", {422}))
    for name, body, content_type, statuses in bodies:
        response = post(client, body, content_type)
        assert response.status_code in statuses, (name, response.status_code, response.text)
        assert_refused(response, statuses)
    cases(SUITE, len(bodies))
    assert_healthy(client)


def test_unusual_but_real_images_are_classified(client: TestClient, cases: Callable) -> None:
    real = {
        "animated gif": (animated_gif(), "image/gif"),
        "16-bit png": (encode("PNG", mode="I;16"), "image/png"),
        "cmyk jpeg": (encode("JPEG", mode="CMYK"), "image/jpeg"),
        "1x1 png": (encode("PNG", size=(1, 1)), "image/png"),
        "1x1 jpeg": (encode("JPEG", size=(1, 1)), "image/jpeg"),
        "1000x1 png": (encode("PNG", size=(1000, 1)), "image/png"),
        "png that says jpeg": (encode("PNG"), "image/jpeg"),  # decoded by content, not by label
        "grey webp": (encode("WEBP", mode="L"), "image/webp"),
        "rgba png": (encode("PNG", mode="RGBA"), "image/png"),
    }
    for name, (body, content_type) in real.items():
        response = post(client, body, content_type)
        assert response.status_code == 200, (name, response.text)
        assert len(response.json()["predictions"]) == 4
    cases(SUITE, len(real))


def test_mutated_images_never_cause_a_server_error(client: TestClient, cases: Callable) -> None:
    """Random byte flips, insertions and deletions in valid JPEG/PNG/GIF files."""
    rng = random.Random(1)
    seeds = [encode("JPEG", size=(40, 30)), encode("PNG", size=(40, 30)), encode("GIF", mode="L", size=(40, 30))]
    outcomes = {200: 0, 4: 0}
    n = 150
    for _ in range(n):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(data))
            op = rng.random()
            if op < 0.6:
                data[pos] = rng.randrange(256)
            elif op < 0.8:
                data[pos:pos] = rng.randbytes(rng.randint(1, 16))
            else:
                del data[pos : pos + rng.randint(1, 16)]
        response = post(client, bytes(data), "image/jpeg")
        if response.status_code == 200:
            outcomes[200] += 1
        else:
            assert_refused(response, {413, 422})
            outcomes[4] += 1
    cases(SUITE, n, note=f"mutated files: {outcomes[200]} still decodable (200), {outcomes[4]} refused (4xx)")
    assert_healthy(client)


def test_bodies_over_the_limit_are_refused_with_or_without_a_length(client: TestClient, cases: Callable) -> None:
    big = b"\xff\xd8" + b"\x00" * 2_100_000

    def chunked() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    assert_refused(post(client, big), {413})
    response = client.post("/classify/flowers", content=chunked(), headers={"Content-Type": "image/jpeg"})
    assert_refused(response, {413})
    multipart = client.post("/classify/flowers", files={"image": ("x.jpg", big, "image/jpeg")})
    assert_refused(multipart, {413})
    cases(SUITE, 3)
    assert_healthy(client)


def test_malformed_multipart_is_refused(client: TestClient, cases: Callable) -> None:
    jpeg = encode("JPEG")
    good_part = b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
    good_part += b"Content-Type: image/jpeg\r\n\r\n" + jpeg + b"\r\n--XyZ--\r\n"
    attempts = [
        ("no boundary parameter", good_part, "multipart/form-data"),
        ("wrong boundary", good_part, "multipart/form-data; boundary=AbC"),
        ("never closed", good_part[: len(good_part) // 2], "multipart/form-data; boundary=XyZ"),
        ("no image field", good_part.replace(b'name="image"', b'name="picture"'), "multipart/form-data; boundary=XyZ"),
        ("empty image field", good_part.replace(jpeg, b""), "multipart/form-data; boundary=XyZ"),
        ("text in the image field", good_part.replace(jpeg, b"plain text"), "multipart/form-data; boundary=XyZ"),
        ("garbage", b"--XyZ\r\n\r\n\r\n--", "multipart/form-data; boundary=XyZ"),
        ("headers without end", b"--XyZ\r\nContent-Disposition: form-data", "multipart/form-data; boundary=XyZ"),
    ]
    for name, body, content_type in attempts:
        response = post(client, body, content_type)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        assert_refused(response, {400, 413, 415, 422})
    cases(SUITE, len(attempts))
    assert_healthy(client)


def test_a_live_server_stays_healthy_and_bounded_in_memory_under_hostile_images(
    tmp_path: Path, resnet18: Backbone, cases: Callable
) -> None:
    FileSystemStore(tmp_path).put("flowers", small_task(resnet18, "flowers").to_bytes())
    hostile = [png_bomb(), png_bomb(60_000, 60_000), encode("JPEG")[:100], PDF, b"\x00" * 1000]
    big = b"\xff\xd8" + b"\x00" * 3_000_000
    with live_server(tmp_path, max_image_bytes=2_000_000) as server, httpx.Client(timeout=30) as http:
        url = f"{server.url}/classify/flowers"
        http.post(url, content=encode("PNG"), headers={"Content-Type": "image/png"})
        before = server.rss_bytes()
        n = 0
        for round_ in range(40):
            for body in hostile:
                assert http.post(url, content=body, headers={"Content-Type": "image/png"}).status_code in (413, 422)
                n += 1
            chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
            assert http.post(url, content=chunks, headers={"Content-Type": "image/jpeg"}).status_code == 413
            n += 1
            if round_ == 0:
                before = server.rss_bytes()  # after the first round's one-off allocations
        growth = server.rss_bytes() - before
        assert http.post(url, content=encode("PNG"), headers={"Content-Type": "image/png"}).status_code == 200
        assert http.get(f"{server.url}/healthz").status_code == 200
    cases(SUITE, n, note=f"live server: RSS grew {growth / 2**20:.1f} MiB over {n} hostile requests")
    assert growth < 64 * 2**20
