"""The Open Inference Protocol over gRPC against the real client: ``tritonclient.grpc`` (tensors as
``raw_input_contents``, its default) talking to a real ``piggyback serve`` process with its gRPC port
on, and answers equal to REST's ``/v2`` for the same input."""

from __future__ import annotations

import base64
import signal
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from piggyback_core import FileSystemStore, PiggybackError
from server.errors import (
    BadRequestError,
    BodyBudgetError,
    DeadlineExceededError,
    DrainingError,
    NotReadyError,
    QueueFullError,
)
from tests.live import LiveServer, free_port, live_server
from tests.server.conftest import settings_for, small_task
from tests.server.test_v2 import JPEGS, _pixels

CLASSIFY_TOKEN = "grpc-classify-token"
MANAGEMENT_TOKEN = "grpc-management-token"
AUTH = {"authorization": f"Bearer {CLASSIFY_TOKEN}"}  # gRPC metadata keys are lower case
REST_AUTH = {"Authorization": f"Bearer {CLASSIFY_TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, resnet18) -> Iterator[LiveServer]:  # noqa: ANN001
    store = tmp_path_factory.mktemp("grpc-store")
    fs = FileSystemStore(store)
    fs.put("flowers", small_task(resnet18, "flowers", num_labels=5, seed=1).to_bytes())
    fs.put("birds", small_task(resnet18, "birds", num_labels=7, kind="ternary", seed=2).to_bytes())
    # float32: the comparisons below are between batches of different sizes
    with live_server(store, dtype="float32", max_wait_ms=1, grpc_port=free_port(), classify_token=CLASSIFY_TOKEN,
                     token=MANAGEMENT_TOKEN) as s:  # fmt: skip
        yield s


def _grpc_port(server: LiveServer) -> int:
    return int(server.proc.args[server.proc.args.index("--grpc-port") + 1])


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[tgrpc.InferenceServerClient]:
    c = tgrpc.InferenceServerClient(url=f"127.0.0.1:{_grpc_port(server)}")
    yield c
    c.close()


def _image_input(jpegs: list[bytes]) -> tgrpc.InferInput:
    tensor = tgrpc.InferInput("image", [len(jpegs), 1], "BYTES")
    return tensor.set_data_from_numpy(np.array(jpegs, dtype=np.object_).reshape(-1, 1))


def _pixels_input(jpegs: list[bytes]) -> tgrpc.InferInput:
    pixels = np.stack([_pixels(j) for j in jpegs]).astype(np.float32)
    return tgrpc.InferInput("pixels", list(pixels.shape), "FP32").set_data_from_numpy(pixels)


def _rest_infer(server: LiveServer, task: str, body: dict) -> dict:
    r = httpx.post(f"{server.url}/v2/models/{task}/infer", json=body, headers=REST_AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _rest_images(jpegs: list[bytes], **output: object) -> dict:
    data = [base64.b64encode(j).decode() for j in jpegs]
    body: dict = {"inputs": [{"name": "image", "shape": [len(jpegs)], "datatype": "BYTES", "data": data}]}
    if output:
        body["outputs"] = [{"name": "logits", "parameters": output}]
    return body


def test_the_client_sees_a_live_ready_server_and_its_models_as_rest_describes_them(
    client: tgrpc.InferenceServerClient, server: LiveServer
) -> None:
    assert client.is_server_live() and client.is_server_ready()  # ops calls: open without ops_need_token
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "piggyback-server" and "classification" in meta["extensions"]
    rest = httpx.get(f"{server.url}/v2/models/flowers", headers=REST_AUTH).json()
    model = client.get_model_metadata("flowers", headers=AUTH, as_json=True)
    assert model["name"] == rest["name"] and model["versions"] == rest["versions"]
    assert model["platform"] == rest["platform"] == "piggyback_resnet18"
    for kind in ("inputs", "outputs"):  # the JSON form of int64 shapes is strings
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in model[kind]] == [
            (t["name"], t["datatype"], t["shape"]) for t in rest[kind]
        ]
    version = rest["versions"][0]
    assert client.get_model_metadata("flowers", model_version=version, headers=AUTH).versions == [version]
    assert client.is_model_ready("flowers", headers=AUTH) and client.is_model_ready("flowers", version, headers=AUTH)
    assert not client.is_model_ready("flowers", model_version="0000000000000000", headers=AUTH)
    assert not client.is_model_ready("nope", headers=AUTH)
    assert not client.is_model_ready("Not A Name", headers=AUTH)


def test_the_model_configuration_is_the_one_rest_prints(
    client: tgrpc.InferenceServerClient, server: LiveServer
) -> None:
    rest = httpx.get(f"{server.url}/v2/models/birds/config", headers=REST_AUTH).json()
    config = client.get_model_config("birds", headers=AUTH).config
    assert config.name == "birds" and config.max_batch_size == rest["max_batch_size"] == 16
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        (i["name"], tgrpc.model_config_pb2.DataType.Value(i["data_type"]), i["dims"], i["optional"])
        for i in rest["input"]
    ]
    assert list(config.output[0].dims) == [7]
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000


@pytest.mark.parametrize("count", [1, 3])
def test_jpegs_as_bytes_give_the_logits_that_rest_gives(
    client: tgrpc.InferenceServerClient, server: LiveServer, count: int
) -> None:
    result = client.infer("birds", [_image_input(JPEGS[:count])], headers=AUTH, request_id="g-1")
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (count, 7)
    response = result.get_response()
    assert response.id == "g-1" and response.model_name == "birds" and len(response.raw_output_contents) == 1
    rest = _rest_infer(server, "birds", _rest_images(JPEGS[:count]))["outputs"][0]
    assert rest["shape"] == [count, 7] and response.model_version
    np.testing.assert_allclose(logits, np.array(rest["data"], dtype=np.float32).reshape(count, 7), rtol=0, atol=1e-5)


def test_fp32_pixels_give_the_logits_of_the_encoded_images(client: tgrpc.InferenceServerClient) -> None:
    from_pixels = client.infer("flowers", [_pixels_input(JPEGS)], headers=AUTH).as_numpy("logits")
    from_images = client.infer("flowers", [_image_input(JPEGS)], headers=AUTH).as_numpy("logits")
    assert from_pixels.shape == (3, 5)
    np.testing.assert_allclose(from_pixels, from_images, rtol=0, atol=1e-5)


def test_the_classification_extension_gives_the_strings_rest_gives(
    client: tgrpc.InferenceServerClient, server: LiveServer
) -> None:
    output = tgrpc.InferRequestedOutput("logits", class_count=3)
    classes = client.infer("flowers", [_image_input(JPEGS)], outputs=[output], headers=AUTH).as_numpy("logits")
    assert classes.shape == (3, 3)
    rest = _rest_infer(server, "flowers", _rest_images(JPEGS, classification=3))["outputs"][0]
    assert rest["datatype"] == "BYTES" and rest["shape"] == [3, 3]
    assert [c.decode() for c in classes.reshape(-1)] == rest["data"]
    score, index, label = rest["data"][0].split(":")
    assert 0 < float(score) <= 1 and label == f"class-{index}"


def _stub(server: LiveServer) -> tuple[grpc.Channel, service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{_grpc_port(server)}")
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_typed_contents_are_accepted_as_well_as_raw_input_contents(
    client: tgrpc.InferenceServerClient, server: LiveServer
) -> None:
    """KServe's and Seldon's clients may send ``contents`` (bytes_contents, fp32_contents)."""
    pixels = np.stack([_pixels(j) for j in JPEGS[:2]]).astype(np.float32)
    expected = client.infer("flowers", [_pixels_input(JPEGS[:2])], headers=AUTH).as_numpy("logits")
    contents = service_pb2.InferTensorContents
    channel, stub = _stub(server)
    with channel:
        for name, datatype, shape, data in (
            ("pixels", "FP32", list(pixels.shape), contents(fp32_contents=pixels.reshape(-1).tolist())),
            ("image", "BYTES", [2], contents(bytes_contents=JPEGS[:2])),
        ):
            tensor = service_pb2.ModelInferRequest.InferInputTensor(
                name=name, datatype=datatype, shape=shape, contents=data
            )
            request = service_pb2.ModelInferRequest(model_name="flowers", inputs=[tensor])
            response = stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=30)
            logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 5)
            np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
        with pytest.raises(grpc.RpcError) as info:  # both forms at once
            both = service_pb2.ModelInferRequest.InferInputTensor(
                name="image", datatype="BYTES", shape=[1], contents=contents(bytes_contents=[b"x"])
            )
            request = service_pb2.ModelInferRequest(model_name="flowers", inputs=[both], raw_input_contents=[b"x"])
            stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "contents and raw_input_contents" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # statistics are not served over gRPC
            stub.ModelStatistics(service_pb2.ModelStatisticsRequest(), metadata=tuple(AUTH.items()), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_model_repository_rpcs_load_unload_and_index_as_rest_does(
    server: LiveServer, client: tgrpc.InferenceServerClient
) -> None:
    management = {"authorization": f"Bearer {MANAGEMENT_TOKEN}"}
    index = client.get_model_repository_index(headers=AUTH, as_json=True)["models"]
    rest = httpx.post(f"{server.url}/v2/repository/index", headers=REST_AUTH, timeout=30).json()
    assert sorted((m["name"], m["state"]) for m in index) == sorted((m["name"], m["state"]) for m in rest)
    assert {m["name"] for m in index} == {"flowers", "birds"}
    for headers in ({}, AUTH):  # load is management: the classify token is not enough
        with pytest.raises(InferenceServerException, match="bearer token") as info:
            client.load_model("birds", headers=headers)
        assert _status(info) == "StatusCode.UNAUTHENTICATED"
    client.load_model("birds", headers=management)
    assert httpx.get(f"{server.url}/tasks/birds", headers=REST_AUTH, timeout=30).json()["residency"]["pinned"]
    with pytest.raises(InferenceServerException) as info:
        client.load_model("nope", headers=management)
    assert _status(info) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="without a version") as info:
        client.load_model("birds/1", headers=management)
    assert _status(info) == "StatusCode.INVALID_ARGUMENT"
    client.unload_model("birds", headers=management)
    assert not httpx.get(f"{server.url}/tasks/birds", headers=REST_AUTH, timeout=30).json()["residency"]["pinned"]
    assert client.is_model_ready("birds", headers=AUTH)  # lazy model control: unloaded tasks still answer


def _status(info: pytest.ExceptionInfo[InferenceServerException]) -> str | None:
    return info.value.status()


def test_errors_carry_the_status_codes_triton_uses_and_our_message(client: tgrpc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="no task named 'nope'") as info:
        client.infer("nope", [_image_input(JPEGS[:1])], headers=AUTH)
    assert _status(info) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="has no version '7'") as info:
        client.infer("flowers", [_image_input(JPEGS[:1])], model_version="7", headers=AUTH)
    assert _status(info) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="not an image in a supported format") as info:
        client.infer("flowers", [_image_input([JPEGS[0], b"this is not an image"])], headers=AUTH)
    assert _status(info) == "StatusCode.INVALID_ARGUMENT"
    wrong = tgrpc.InferInput("pixels", [1, 3, 8, 8], "FP32").set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InferenceServerException, match=r"this task takes \[N, 3, 32, 32\]") as info:
        client.infer("flowers", [wrong], headers=AUTH)
    assert _status(info) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="send exactly one input") as info:
        client.infer("flowers", [_image_input(JPEGS[:1]), _pixels_input(JPEGS[:1])], headers=AUTH)
    assert _status(info) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="unknown output 'probs'") as info:
        client.infer("flowers", [_image_input(JPEGS[:1])], outputs=[tgrpc.InferRequestedOutput("probs")], headers=AUTH)
    assert _status(info) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="17 images in one request") as info:
        client.infer("flowers", [_image_input(JPEGS[:1] * 17)], headers=AUTH)
    assert _status(info) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="deadline") as info:  # parameters.timeout: 1 us
        client.infer("flowers", [_image_input(JPEGS[:1])], timeout=1, headers=AUTH)
    assert _status(info) == "StatusCode.DEADLINE_EXCEEDED"
    assert "Traceback" not in str(info.value)


def test_model_calls_need_the_classify_token_in_the_authorization_metadata(
    client: tgrpc.InferenceServerClient,
) -> None:
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": CLASSIFY_TOKEN}):
        for call in (
            lambda h: client.infer("flowers", [_image_input(JPEGS[:1])], headers=h),
            lambda h: client.get_model_metadata("flowers", headers=h),
            lambda h: client.is_model_ready("flowers", headers=h),
        ):
            with pytest.raises(InferenceServerException, match="bearer token") as info:
                call(headers)
            assert _status(info) == "StatusCode.UNAUTHENTICATED"
    assert client.is_server_ready()  # the server calls stay open (ops_need_token is off)


def test_grpc_requests_count_in_the_metrics_and_the_access_log_as_rest_ones_do(
    client: tgrpc.InferenceServerClient, server: LiveServer
) -> None:
    def counted(prefix: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(prefix))

    served, infers = 'piggyback_requests_total{status="200",task="birds"}', 'piggyback_grpc_requests_total{code="OK"'
    before, before_grpc = counted(served), counted(infers)
    client.infer("birds", [_image_input(JPEGS[:2])], headers=AUTH)
    assert counted(served) == before + 1 and counted(infers) == before_grpc + 1
    missing = counted('piggyback_requests_total{status="404",task="_unknown"}')
    with pytest.raises(InferenceServerException):
        client.infer("nope", [_image_input(JPEGS[:1])], headers=AUTH)
    assert counted('piggyback_requests_total{status="404",task="_unknown"}') == missing + 1
    assert counted('piggyback_grpc_requests_total{code="NOT_FOUND",method="ModelInfer"}') >= 1
    log = server.log()
    assert "grpc-infer task=birds status=200" in log and "grpc-infer task=nope status=404" in log


def test_domain_errors_map_to_grpc_codes_and_an_internal_error_says_no_more() -> None:
    from server.deps import STATUS_BY_ERROR
    from server.grpc_server import status_of

    assert status_of(QueueFullError(limit=4))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(BodyBudgetError(limit=4))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(DrainingError())[0] == status_of(NotReadyError())[0] == grpc.StatusCode.UNAVAILABLE
    assert status_of(DeadlineExceededError(timeout_s=1))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_of(BadRequestError("x")) == (grpc.StatusCode.INVALID_ARGUMENT, "x")
    assert status_of(PiggybackError("a secret path")) == (grpc.StatusCode.INTERNAL, "internal error")
    # every status REST answers with has its code: only what REST answers 500 is INTERNAL
    for cls, status in STATUS_BY_ERROR.items():
        if status != 500:
            exc = cls.__new__(cls)  # no constructor's keywords needed: the class is what is mapped
            exc.args = ("message",)
            assert status_of(exc)[0] != grpc.StatusCode.INTERNAL, cls


def test_without_grpc_installed_the_server_starts_with_the_port_off_and_says_what_to_install(
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    from server.app import create_app

    for name in ("grpc", "tritonclient.grpc", "server.grpc_server"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it fails, as when it is not installed
    create_app(settings_for(tmp_path / "store"))
    with pytest.raises(PiggybackError, match=r"pip install 'piggyback-server\[grpc\]'"):
        create_app(settings_for(tmp_path / "store", grpc_port=free_port()))


def test_a_full_queue_is_resource_exhausted_and_a_drain_finishes_grpc_calls_in_flight(
    tmp_path,
    resnet18,  # noqa: ANN001
) -> None:
    """A 2-image request waits in the queue (a batch of 8 waits up to 5 s to fill): the next one
    finds the queue full. SIGTERM: new calls are refused UNAVAILABLE, the waiting one is answered,
    and the process exits 0."""
    FileSystemStore(tmp_path / "store").put("flowers", small_task(resnet18, "flowers", seed=1).to_bytes())
    port = free_port()
    # one worker: with idle workers to spread the work over, a CPU would run the 2 images at once
    settings = {"grpc_port": port, "queue_size": 2, "max_images_per_request": 2, "max_tasks_per_request": 2,
                "max_batch_size": 8, "max_wait_ms": 5000, "workers": 1}  # fmt: skip
    with live_server(tmp_path / "store", **settings) as live:
        c = tgrpc.InferenceServerClient(url=f"127.0.0.1:{port}")
        answers: list[np.ndarray] = []
        waiting = threading.Thread(
            target=lambda: answers.append(c.infer("flowers", [_pixels_input(JPEGS[:2])]).as_numpy("logits"))
        )
        waiting.start()
        deadline = time.monotonic() + 20
        while "piggyback_queue_depth 2.0" not in httpx.get(f"{live.url}/metrics").text:
            assert time.monotonic() < deadline, "the first request never reached the queue"
            time.sleep(0.02)
        with pytest.raises(InferenceServerException, match="at capacity") as info:
            c.infer("flowers", [_pixels_input(JPEGS[:1])])
        assert _status(info) == "StatusCode.RESOURCE_EXHAUSTED"
        live.proc.send_signal(signal.SIGTERM)
        while True:  # the drain begins within the loop's next turn
            assert time.monotonic() < deadline, "no call was refused while draining"
            try:
                c.infer("flowers", [_pixels_input(JPEGS[:1])])
            except InferenceServerException as exc:
                if exc.status() == "StatusCode.UNAVAILABLE":
                    assert "shutting down" in str(exc)
                    break
            time.sleep(0.02)
        waiting.join(timeout=20)
        assert len(answers) == 1 and answers[0].shape == (2, 5)
        assert live.wait_exit() == 0
        c.close()
