"""Fixtures for the server: real apps over a real resnet18 (random weights) and a real store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from piggyback_core import Backbone, TaskFile
from server.app import create_app
from server.settings import Settings
from tests.conftest import SMALL, make_task

TOKEN = "test-token-0123456789"


def settings_for(store: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "backbone": "resnet18", "weights": "random", "store": store, "token": TOKEN,
        "max_wait_ms": 2.0, "store_poll_s": 0.2, "decode_threads": 2,
    }  # fmt: skip
    return Settings(**{**base, **overrides})


def wait_ready(client: TestClient, timeout_s: float = 60.0, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz", headers=headers).status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("server did not become ready")


AppFactory = Callable[..., Any]


@pytest.fixture
def app_client(tmp_path: Path) -> Iterator[AppFactory]:
    """``with app_client(**settings) as client:`` a ready TestClient over a store in tmp_path."""

    @contextmanager
    def factory(**overrides: Any) -> Iterator[TestClient]:
        settings = settings_for(overrides.pop("store", tmp_path / "store"), **overrides)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            token = settings.classify_token
            wait_ready(client, headers={"Authorization": f"Bearer {token.get_secret_value()}"} if token else None)
            yield client

    yield factory


def small_task(backbone: Backbone, name: str, **kwargs: Any) -> TaskFile:
    return make_task(backbone, name, preprocessing=SMALL, **kwargs)


AUTH = {"Authorization": f"Bearer {TOKEN}"}
