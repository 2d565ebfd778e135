"""The inference service and what surrounds it: host results, management off the inference path,
a batch that runs out of device memory, a device that is lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from piggyback_core import Backbone, FileSystemStore
from server.batcher import Batcher
from tests.conftest import encode
from tests.server.conftest import AUTH, AppFactory, small_task

PNG = {"Content-Type": "image/png"}


@pytest.fixture
def store(tmp_path: Path, resnet18: Backbone) -> Path:
    FileSystemStore(tmp_path / "store").put("a", small_task(resnet18, "a").to_bytes())
    return tmp_path / "store"


def test_an_inference_completes_while_an_upload_is_held_mid_write(
    app_client: AppFactory, store: Path, resnet18: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    writing, release = threading.Event(), threading.Event()
    put = FileSystemStore.put

    def held_put(self: FileSystemStore, name: str, data: bytes) -> Any:
        writing.set()
        assert release.wait(30), "never released"
        return put(self, name, data)

    monkeypatch.setattr(FileSystemStore, "put", held_put)
    upload: list[int] = []
    with app_client(store=store, workers=1, decode_threads=0) as client:  # one worker: it must stay free
        data = small_task(resnet18, "b", seed=1).to_bytes()
        uploader = threading.Thread(target=lambda: upload.append(client.put("/tasks/b", content=data,
                                                                            headers=AUTH).status_code))  # fmt: skip
        uploader.start()
        try:
            assert writing.wait(30), "the upload never reached the store"
            started = time.monotonic()
            r = client.post("/classify/a", content=encode("PNG"), headers=PNG)
            took = time.monotonic() - started
            assert r.status_code == 200 and not upload, (r.status_code, upload)  # the upload is still held
            assert took < 10
        finally:
            release.set()
            uploader.join(30)
        assert upload == [201]
        assert client.post("/classify/b", content=encode("PNG"), headers=PNG).status_code == 200


def test_a_batch_out_of_device_memory_is_split_and_retried_once(
    app_client: AppFactory, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = Batcher.device_part

    def short_of_memory(self: Batcher, reqs: list[Any]) -> Any:
        calls.append(len(reqs))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, reqs)

    monkeypatch.setattr(Batcher, "device_part", short_of_memory)
    with app_client(store=store, max_wait_ms=200) as client:
        r = client.post("/classify/a", files=[("image", ("x.png", encode("PNG"), "image/png"))] * 4)
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 4
        assert calls[0] == 4 and sorted(calls[1:]) == [2, 2]
        metrics = client.get("/metrics").text
        assert "piggyback_device_oom_total 1.0" in metrics


def test_a_batch_that_runs_out_of_memory_twice_is_a_503_and_the_server_lives_on(
    app_client: AppFactory, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never_enough(self: Batcher, reqs: list[Any]) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with app_client(store=store) as client:
        monkeypatch.setattr(Batcher, "device_part", never_enough)
        r = client.post("/classify/a", content=encode("PNG"), headers=PNG)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "out of memory" in r.json()["detail"]
        assert client.get("/healthz").status_code == 200


def test_a_sticky_cuda_error_fails_liveness_so_that_the_process_is_restarted(
    app_client: AppFactory, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def lost(self: Batcher, reqs: list[Any]) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with app_client(store=store) as client:
        monkeypatch.setattr(Batcher, "device_part", lost)
        assert client.post("/classify/a", content=encode("PNG"), headers=PNG).status_code == 500
        for path in ("/healthz", "/v2/health/live", "/readyz", "/v2/health/ready", "/v2/models/a/ready"):
            r = client.get(path)
            assert r.status_code == 503 and "device is unusable" in r.text, path


def test_a_lost_device_fails_grpc_readiness_and_liveness_as_rest_does(
    app_client: AppFactory, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tgrpc = pytest.importorskip("tritonclient.grpc")
    from tests.live import free_port

    def lost(self: Batcher, reqs: list[Any]) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    port = free_port()
    with app_client(store=store, grpc_port=port) as client:
        grpc_client = tgrpc.InferenceServerClient(url=f"127.0.0.1:{port}")
        assert grpc_client.is_server_ready() and grpc_client.is_server_live() and grpc_client.is_model_ready("a")
        monkeypatch.setattr(Batcher, "device_part", lost)
        assert client.post("/classify/a", content=encode("PNG"), headers=PNG).status_code == 500
        assert not grpc_client.is_server_ready() and not grpc_client.is_server_live()
        assert not grpc_client.is_model_ready("a")
        grpc_client.close()


def test_results_reach_the_routes_as_host_data(app_client: AppFactory, store: Path) -> None:
    seen: list[Any] = []
    with app_client(store=store) as client:
        service = client.app.state.services.inference  # type: ignore[attr-defined]
        classify = service.classify

        async def recording(*args: Any, **kwargs: Any) -> Any:
            out = await classify(*args, **kwargs)
            seen.extend(out)
            return out

        service.classify = recording
        assert client.post("/classify/a?top_k=2", content=encode("PNG"), headers=PNG).status_code == 200
    (result,) = seen
    assert isinstance(result.logits, np.ndarray) and result.logits.dtype == np.float32
    assert len(result.predictions) == 2 and result.batch_size == 1


def test_when_one_half_of_a_split_batch_runs_out_of_memory_again_the_other_half_is_answered(
    app_client: AppFactory, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = Batcher.device_part

    def second_half_never_fits(self: Batcher, reqs: list[Any]) -> Any:
        calls.append(len(reqs))
        if len(calls) == 1 or len(calls) == 3:  # the whole batch, then its second half
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(self, reqs)

    monkeypatch.setattr(Batcher, "device_part", second_half_never_fits)
    results: list[int] = []
    # one worker, as on a GPU (where running out of memory happens): the 4 requests make one batch
    with app_client(store=store, max_wait_ms=300, workers=1) as client:
        threads = [threading.Thread(target=lambda: results.append(
            client.post("/classify/a", content=encode("PNG"), headers=PNG).status_code)) for _ in range(4)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert calls[0] == 4 and calls[1:] == [2, 2], calls
    assert sorted(results) == [200, 200, 503, 503]
