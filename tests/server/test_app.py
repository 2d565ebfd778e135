import time
from pathlib import Path

import httpx
import pytest
import torch

from piggyback_core import (
    Backbone,
    Engine,
    FileSystemStore,
    S3Store,
    TaskFile,
    evaluate_task,
    get_backbone_spec,
    load_backbone,
)
from tests.conftest import encode, make_image_folder
from tests.server.conftest import AUTH, AppFactory, small_task


@pytest.fixture
def store_with_task(tmp_path: Path, resnet18: Backbone) -> Path:
    store = FileSystemStore(tmp_path / "store")
    store.put("flowers", small_task(resnet18, "flowers", num_labels=4).to_bytes())
    return tmp_path / "store"


@pytest.mark.parametrize(
    "fmt,content_type",
    [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("BMP", "image/bmp"),
        ("GIF", "image/gif"),
    ],
)
def test_classify_accepts_every_supported_format_raw_and_multipart(
    app_client: AppFactory, store_with_task: Path, fmt: str, content_type: str
) -> None:
    data = encode(fmt)
    with app_client() as client:
        raw = client.post("/classify/flowers?top_k=2", content=data, headers={"Content-Type": content_type})
        form = client.post("/classify/flowers?top_k=2", files={"image": ("x", data, content_type)})
    for r in (raw, form):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == "flowers" and len(body["predictions"]) == 2 and body["version"]
        assert body["predictions"][0]["score"] >= body["predictions"][1]["score"]
        assert {p["label"] for p in body["predictions"]} <= {f"class-{i}" for i in range(4)}
    assert raw.json()["predictions"] == form.json()["predictions"]


def test_every_contract_error_status_has_a_json_detail(app_client: AppFactory, store_with_task: Path) -> None:
    png = encode("PNG")
    with app_client(max_image_bytes=10_000) as client:

        def post(task: str, body: bytes, content_type: str) -> httpx.Response:
            return client.post(f"/classify/{task}", content=body, headers={"Content-Type": content_type})

        cases = {
            404: post("unknown", png, "image/png"),
            413: post("flowers", b"\x89PNG" + b"0" * 20_000, "image/png"),
            415: post("flowers", png, "application/pdf"),
            422: post("flowers", b"%PDF-1.4 not an image", "image/jpeg"),
        }
        bad_top_k = client.post("/classify/flowers?top_k=0", content=png, headers={"Content-Type": "image/png"})
        bad_name = client.post("/classify/..%2Fetc", content=png, headers={"Content-Type": "image/png"})
        no_field = client.post("/classify/flowers", files={"picture": ("x", png, "image/png")})
    for status, r in cases.items():
        assert r.status_code == status, (status, r.text)
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    assert bad_top_k.status_code == 422 and "top_k" in bad_top_k.json()["detail"]
    assert bad_name.status_code in (404, 422)
    assert no_field.status_code == 422 and "'image'" in no_field.json()["detail"]


def test_a_request_that_waits_past_its_deadline_is_answered_504(app_client: AppFactory, store_with_task: Path) -> None:
    with app_client(request_timeout_s=0.05, max_wait_ms=400, max_batch_size=8) as client:
        r = client.post("/classify/flowers", content=encode("PNG"), headers={"Content-Type": "image/png"})
    assert r.status_code == 504 and "deadline" in r.json()["detail"]


# Served scores against eval's, same dtype and layout: float32 agrees to rounding; bfloat16 batches
# of another size may take other kernel paths, so its scores agree within bf16's resolution.
SCORE_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_put_registers_a_task_that_is_classifiable_at_once_and_matches_eval(
    app_client: AppFactory, resnet18: Backbone, tmp_path: Path, dtype: str
) -> None:
    task = small_task(resnet18, "colours", num_labels=3, labels=["blue", "green", "red"])
    data_dir = make_image_folder(tmp_path / "data", n_train=1, n_val=3)
    engine = Engine(
        load_backbone("resnet18", weights="random"),
        dtype=getattr(torch, dtype),
        channels_last=get_backbone_spec("resnet18").channels_last,  # the server's layout="auto"
    )
    engine.add_task(task)
    report = evaluate_task(engine, "colours", data_dir / "val")
    with app_client(dtype=dtype) as client:
        ready = client.get("/readyz").json()
        assert (ready["dtype"], ready["layout"]) == (dtype, "channels_last")
        assert f'piggyback_compute_info{{dtype="{dtype}",layout="channels_last"}} 1.0' in client.get("/metrics").text
        assert client.get("/tasks/colours").status_code == 404
        r = client.put("/tasks/colours", content=task.to_bytes(), headers=AUTH)
        assert r.status_code == 201 and r.json()["labels"] == list(task.labels)
        for prediction in report.predictions:
            image = (data_dir / "val" / prediction["path"]).read_bytes()
            served = client.post("/classify/colours", content=image, headers={"Content-Type": "image/png"})
            top = served.json()["predictions"]
            assert [p["label"] for p in top] == [p["label"] for p in prediction["top"]]
            expected = [p["score"] for p in prediction["top"]]
            assert [p["score"] for p in top] == pytest.approx(expected, abs=SCORE_TOLERANCE[dtype])
        replaced = client.put(
            "/tasks/colours", content=small_task(resnet18, "colours", seed=9).to_bytes(), headers=AUTH
        )
        assert replaced.status_code == 200 and replaced.json()["version"] != r.json()["version"]


def test_a_task_registers_under_the_urls_name_and_keeps_the_trained_name_in_its_provenance(
    app_client: AppFactory, resnet18: Backbone, tmp_path: Path
) -> None:
    trained = small_task(resnet18, "colours", num_labels=3)
    image = encode("PNG")
    with app_client() as client:
        assert client.put("/tasks/colours", content=trained.to_bytes(), headers=AUTH).status_code == 201
        r = client.put("/tasks/colours2", content=trained.to_bytes(), headers=AUTH)
        assert r.status_code == 201, r.text
        assert r.json()["task"] == "colours2" and r.json()["provenance"]["trained_as"] == "colours"
        assert {t["task"] for t in client.get("/tasks").json()["tasks"]} == {"colours", "colours2"}
        first, second = (
            client.post(f"/classify/{name}", content=image, headers={"Content-Type": "image/png"}).json()
            for name in ("colours", "colours2")
        )
        assert second["task"] == "colours2" and second["predictions"] == first["predictions"]
    stored = FileSystemStore(tmp_path / "store").get("colours2").data
    assert TaskFile.from_bytes(stored).name == "colours2"  # the stored file carries the name it serves under
    # a file copied into the store under another key is served under its key too
    FileSystemStore(tmp_path / "store").put("colours3", trained.to_bytes())
    with app_client() as client:
        assert client.get("/tasks/colours3").json()["provenance"]["trained_as"] == "colours"


def test_management_needs_the_token_and_is_refused_without_one_configured(
    app_client: AppFactory, resnet18: Backbone, tmp_path: Path
) -> None:
    data = small_task(resnet18, "flowers").to_bytes()
    with app_client() as client:
        assert client.put("/tasks/flowers", content=data).status_code == 401
        assert client.put("/tasks/flowers", content=data, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.put("/tasks/flowers", content=data, headers={"Authorization": "Basic x"}).status_code == 401
        assert client.delete("/tasks/flowers").status_code == 401
        assert client.get("/tasks").json()["tasks"] == []
    with app_client(token=None, store=tmp_path / "other") as client:
        r = client.put("/tasks/flowers", content=data)
        assert r.status_code == 403 and "PIGGYBACK_TOKEN" in r.json()["detail"]
    with app_client(token=None, allow_unauthenticated=True, store=tmp_path / "dev") as client:
        assert client.put("/tasks/flowers", content=data).status_code == 201


def test_bad_task_uploads_are_refused_and_change_nothing(
    app_client: AppFactory, store_with_task: Path, resnet18: Backbone
) -> None:
    foreign = small_task(load_backbone("resnet18", weights="random", seed=1), "flowers")
    good = small_task(resnet18, "flowers", seed=3).to_bytes()
    with app_client(max_task_bytes=len(good) + 10) as client:
        before = client.get("/tasks/flowers").json()
        r = client.put("/tasks/flowers", content=foreign.to_bytes(), headers=AUTH)
        assert r.status_code == 409 and foreign.fingerprint in r.json()["detail"]
        assert client.put("/tasks/flowers", content=good[:-100], headers=AUTH).status_code == 422
        assert client.put("/tasks/flowers", content=good + b"x" * 100, headers=AUTH).status_code == 413
        assert client.put("/tasks/Bad%20Name", content=good, headers=AUTH).status_code == 422
        assert client.get("/tasks/flowers").json() == before
    assert [t.name for t in FileSystemStore(store_with_task).list()] == ["flowers"]


def test_delete_unregisters_and_a_restart_serves_what_the_store_holds(
    app_client: AppFactory, store_with_task: Path, resnet18: Backbone
) -> None:
    with app_client() as client:
        assert (
            client.put("/tasks/birds", content=small_task(resnet18, "birds").to_bytes(), headers=AUTH).status_code
            == 201
        )
        assert client.delete("/tasks/flowers", headers=AUTH).status_code == 204
        assert client.delete("/tasks/flowers", headers=AUTH).status_code == 404
        assert (
            client.post("/classify/flowers", content=encode("PNG"), headers={"Content-Type": "image/png"}).status_code
            == 404
        )
    with app_client() as client:  # a restart over the same store
        assert [t["task"] for t in client.get("/tasks").json()["tasks"]] == ["birds"]
        assert (
            client.post("/classify/birds", content=encode("PNG"), headers={"Content-Type": "image/png"}).status_code
            == 200
        )


def test_an_s3_store_serves_registrations_across_restarts(
    app_client: AppFactory, s3_url: str, resnet18: Backbone
) -> None:
    with app_client(store=s3_url) as client:
        body = small_task(resnet18, "birds").to_bytes()
        assert client.put("/tasks/birds", content=body, headers=AUTH).status_code == 201
    with app_client(store=s3_url) as client:  # a restart: the bucket is the source of truth
        assert [t["task"] for t in client.get("/tasks").json()["tasks"]] == ["birds"]
        response = client.post("/classify/birds", content=encode("PNG"), headers={"Content-Type": "image/png"})
        assert response.status_code == 200
        assert client.delete("/tasks/birds", headers=AUTH).status_code == 204
    assert S3Store(s3_url).list() == []


def test_a_broken_file_in_the_store_is_reported_and_the_server_still_starts(
    app_client: AppFactory, store_with_task: Path
) -> None:
    (store_with_task / "broken.safetensors").write_bytes(b"\x00" * 100)
    with app_client() as client:
        listing = client.get("/tasks").json()
        assert [t["task"] for t in listing["tasks"]] == ["flowers"] and "broken" in listing["failed"]


def test_health_readiness_metrics_and_openapi(app_client: AppFactory, store_with_task: Path) -> None:
    with app_client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["tasks"] == 1 and ready["fingerprint"].startswith("sha256:")
        client.post("/classify/flowers", content=encode("PNG"), headers={"Content-Type": "image/png"})
        text = client.get("/metrics").text
        for name in (
            'piggyback_requests_total{status="200",task="flowers"} 1.0', "piggyback_request_duration_seconds_bucket",
            "piggyback_queue_wait_seconds_bucket", "piggyback_batch_compute_seconds_bucket",
            "piggyback_batch_size_bucket", "piggyback_batch_tasks_bucket", "piggyback_queue_depth",
            "piggyback_tasks_loaded 1.0", "piggyback_mask_resident_bytes", "piggyback_task_registrations_total",
        ):  # fmt: skip
            assert name in text, name
        schema = client.get("/openapi.json").json()
        classify = schema["paths"]["/classify/{task}"]["post"]
        assert {"404", "413", "415", "422", "503", "504"} <= set(classify["responses"])
        assert {"401", "403", "409", "413", "422"} <= set(schema["paths"]["/tasks/{task}"]["put"]["responses"])


def test_classification_needs_a_token_only_when_one_is_configured(
    app_client: AppFactory, store_with_task: Path
) -> None:
    png, headers = encode("PNG"), {"Content-Type": "image/png"}
    with app_client(classify_token="reader-token") as client:
        assert client.post("/classify/flowers", content=png, headers=headers).status_code == 401
        ok = client.post("/classify/flowers", content=png, headers={**headers, "Authorization": "Bearer reader-token"})
        assert ok.status_code == 200


def test_a_failed_start_keeps_readyz_and_healthz_at_503_with_the_reason(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.server.conftest import settings_for

    app = create_app(settings_for(tmp_path / "store", weights=str(tmp_path / "missing.pth")))
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(100):
            r = client.get("/readyz")
            if "start-up failed" in r.json()["detail"]:
                break
            time.sleep(0.05)
        assert r.status_code == 503 and "missing.pth" in r.json()["detail"] and r.headers["retry-after"]
        alive = client.get("/healthz")  # a liveness probe that fails gets the container restarted
        assert alive.status_code == 503 and "missing.pth" in alive.json()["detail"]
        assert client.post("/classify/x", content=b"x", headers={"Content-Type": "image/png"}).status_code == 503


def _multipart(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def test_several_images_in_one_request_are_answered_in_order_as_if_sent_alone(
    app_client: AppFactory, tmp_path: Path, resnet18: Backbone
) -> None:
    FileSystemStore(tmp_path / "store").put("flowers", small_task(resnet18, "flowers", num_labels=6).to_bytes())
    images = [encode("PNG"), encode("JPEG", size=(64, 32)), encode("PNG", mode="L")]
    with app_client(dtype="float32") as client:
        r = client.post("/classify/flowers", files=_multipart(images), params={"top_k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["results"]) == 3 and body["predictions"] == body["results"][0]["predictions"]
        for data, result in zip(images, body["results"], strict=True):
            alone = client.post("/classify/flowers", content=data, headers={"Content-Type": "image/png"},
                                params={"top_k": 3}).json()  # fmt: skip
            assert [p["index"] for p in result["predictions"]] == [p["index"] for p in alone["predictions"]]
            for got, want in zip(result["predictions"], alone["predictions"], strict=True):
                assert abs(got["score"] - want["score"]) < 1e-5
        too_many = client.post("/classify/flowers", files=_multipart([images[0]] * 17))
        assert too_many.status_code == 422 and "at most 16" in too_many.json()["detail"]


def test_one_image_with_several_tasks_is_one_mixed_batch_equal_to_each_task_alone(
    app_client: AppFactory, tmp_path: Path, resnet18: Backbone
) -> None:
    store = FileSystemStore(tmp_path / "store")
    for i, name in enumerate(["a", "b", "c"]):
        store.put(name, small_task(resnet18, name, num_labels=3 + i, seed=i).to_bytes())
    image = encode("JPEG", size=(50, 44))
    with app_client(dtype="float32") as client:
        r = client.post("/classify", params={"tasks": "c,a,b,a"}, content=image, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["task"] for x in results] == ["c", "a", "b"]  # named order, each once
        assert all(x["batch_size"] == 3 for x in results)  # one mixed batch
        for x in results:
            alone = client.post(f"/classify/{x['task']}", content=image, headers={"Content-Type": "image/jpeg"}).json()
            assert x["version"] == alone["version"]
            assert [p["index"] for p in x["predictions"]] == [p["index"] for p in alone["predictions"]]
            for got, want in zip(x["predictions"], alone["predictions"], strict=True):
                assert abs(got["score"] - want["score"]) < 1e-5
        missing = client.post(
            "/classify", params={"tasks": "a,zzz"}, content=image, headers={"Content-Type": "image/jpeg"}
        )
        assert missing.status_code == 404 and "zzz" in missing.json()["detail"]
        many = ",".join(f"t{i}" for i in range(17))
        r = client.post("/classify", params={"tasks": many}, content=image, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 422 and "at most 16" in r.json()["detail"]
        two = client.post("/classify", params={"tasks": "a,b"}, files=_multipart([image, image]))
        assert two.status_code == 422


def test_the_docs_page_and_its_assets_are_served_by_the_app_with_no_network(app_client: AppFactory) -> None:
    import re

    with app_client() as client:
        page = client.get("/docs")
        assert page.status_code == 200
        urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
        assert urls and not [u for u in urls if u.startswith(("http:", "https:", "//"))], urls
        for url in urls:
            assert client.get(url).status_code == 200, url
        assert any(u.endswith("swagger-ui-bundle.js") for u in urls)
        assert client.get("/redoc").status_code == 200


def test_a_multipart_image_over_a_mebibyte_is_never_spooled_to_disk(
    app_client: AppFactory, store_with_task: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import tempfile

    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (700, 800, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG", compress_level=0)
    assert buf.tell() > 1024 * 1024  # past Starlette's spooling threshold
    spooled: list[object] = []
    real = tempfile.TemporaryFile

    def on_disk(*args: object, **kwargs: object) -> object:
        spooled.append(args)
        return real(*args, **kwargs)  # type: ignore[call-overload]

    with app_client(store=store_with_task) as client:
        monkeypatch.setattr(tempfile, "TemporaryFile", on_disk)
        r = client.post("/classify/flowers", files={"image": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    assert spooled == []


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"queue_size": 8, "max_images_per_request": 16}, "could never be queued"),
        ({"max_body_bytes_in_flight": 100 * 2**20}, "max_body_bytes_in_flight"),
        ({"max_body_bytes_in_flight": 2**30, "max_image_bytes": 2**30}, "multipart framing"),
    ],
)
def test_limits_that_could_never_be_met_stop_the_process_at_start(
    tmp_path: Path, overrides: dict[str, int], message: str
) -> None:
    from pydantic import ValidationError

    from server.settings import Settings

    with pytest.raises(ValidationError, match=message):
        Settings(store=str(tmp_path), **overrides)
