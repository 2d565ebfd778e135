"""A small HTTP client for ``piggyback classify`` (standard library only): several images in one
multipart request, or one image for several tasks."""

from __future__ import annotations

import json
import mimetypes
import secrets
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from piggyback_core import PiggybackError

__all__ = ["RemoteError", "classify"]


class RemoteError(PiggybackError):
    """The server refused a request: its status and its own message."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        super().__init__(f"the server answered {status}: {detail}")


def _multipart(images: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = secrets.token_hex(16)
    parts = []
    for name, data in images:
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        filename = Path(name).name.replace('"', "")
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        parts.append(head.encode() + f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _post(url: str, body: bytes, content_type: str, token: str | None, timeout_s: float) -> dict[str, Any]:
    headers = {"Content-Type": content_type} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            reply: dict[str, Any] = json.loads(response.read())
            return reply
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            detail = json.loads(raw)["detail"]
        except (ValueError, KeyError, TypeError):
            detail = raw.decode(errors="replace")[:200] or exc.reason
        raise RemoteError(exc.code, str(detail)) from None


def classify(
    server: str,
    tasks: list[str],
    images: list[Path],
    *,
    token: str | None = None,
    top_k: int = 5,
    per_request: int = 16,
    timeout_s: float = 60.0,
) -> list[dict[str, Any]]:
    """One answer per (image, task), images in order: ``{"image", "task", "version", "predictions"}``.

    One task: the images go ``per_request`` at a time to ``POST /classify/{task}``. Several tasks:
    each image once to ``POST /classify?tasks=...`` (one mixed batch on the server)."""
    base = server.rstrip("/")
    data = [(str(path), path.read_bytes()) for path in images]  # unreadable files fail before any request
    out: list[dict[str, Any]] = []
    if len(tasks) == 1:
        url = f"{base}/classify/{urllib.parse.quote(tasks[0])}?top_k={top_k}"
        for start in range(0, len(data), per_request):
            chunk = data[start : start + per_request]
            reply = _post(url, *_multipart(chunk), token, timeout_s)
            for (name, _), result in zip(chunk, reply["results"], strict=True):
                out.append({"image": name, "task": reply["task"], "version": reply["version"], **result})
        return out
    query = urllib.parse.urlencode({"tasks": ",".join(tasks), "top_k": top_k})
    for name, blob in data:
        reply = _post(f"{base}/classify?{query}", *_multipart([(name, blob)]), token, timeout_s)
        out += [{"image": name, **result} for result in reply["results"]]
    return out
