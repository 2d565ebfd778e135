"""The Open Inference Protocol (v2) against the real client: ``tritonclient[http]`` (Triton's
reference client, binary tensor data by default) talking to a real ``piggyback serve`` process."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from piggyback_core import FileSystemStore, decode_image
from tests.conftest import SMALL
from tests.live import LiveServer, live_server
from tests.server.conftest import small_task


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], color[1] // 2, 90), (5, 5, size[0] // 2, size[1] // 2))  # not uniform
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


JPEGS = [_jpeg((200, 30, 30)), _jpeg((20, 180, 60)), _jpeg((40, 40, 220), size=(64, 30))]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, resnet18) -> Iterator[LiveServer]:  # noqa: ANN001
    store = tmp_path_factory.mktemp("v2-store")
    fs = FileSystemStore(store)
    fs.put("flowers", small_task(resnet18, "flowers", num_labels=5, seed=1).to_bytes())
    fs.put("birds", small_task(resnet18, "birds", num_labels=7, kind="ternary", seed=2).to_bytes())
    # float32: the comparisons below are between batches of different sizes
    with live_server(store, dtype="float32", max_wait_ms=1) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield c
    c.close()


def _classify(server: LiveServer, task: str, jpeg: bytes, top_k: int = 5) -> list[dict]:
    r = httpx.post(f"{server.url}/classify/{task}", params={"top_k": top_k}, content=jpeg,
                   headers={"Content-Type": "image/jpeg"}, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def _image_input(jpegs: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(jpegs)], "BYTES")
    tensor.set_data_from_numpy(np.array(jpegs, dtype=np.object_))  # binary tensor data: the default
    return tensor


def _softmax_top(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    probs = torch.softmax(torch.tensor(np.array(logits)).float(), dim=-1)
    values, indices = probs.topk(k)
    return list(zip(indices.tolist(), values.tolist(), strict=True))


def _assert_equals_classify(server: LiveServer, task: str, jpeg: bytes, logits: np.ndarray) -> None:
    expected = _classify(server, task, jpeg)
    got = _softmax_top(logits, len(expected))
    assert [i for i, _ in got] == [p["index"] for p in expected]
    np.testing.assert_allclose([s for _, s in got], [p["score"] for p in expected], rtol=0, atol=1e-5)


def test_the_client_sees_a_live_ready_server_and_every_task_as_a_model(
    client: triton.InferenceServerClient, server: LiveServer
) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "piggyback-server"
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    version = httpx.get(f"{server.url}/tasks/flowers").json()["version"]
    model = client.get_model_metadata("flowers")
    assert model["name"] == "flowers" and model["versions"] == [version]
    assert model["platform"] == "piggyback_resnet18"
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in model["inputs"]} == {
        ("image", "BYTES", (-1, 1)),
        ("pixels", "FP32", (-1, 3, 32, 32)),
    }
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 5]}]
    assert client.get_model_metadata("flowers", model_version=version)["versions"] == [version]
    assert client.is_model_ready("flowers") and client.is_model_ready("flowers", model_version=version)
    assert not client.is_model_ready("flowers", model_version="0000000000000000")
    assert not client.is_model_ready("nope")


@pytest.mark.parametrize("count", [1, 3])
def test_jpegs_as_bytes_in_binary_mode_give_the_logits_of_classify(
    client: triton.InferenceServerClient, server: LiveServer, count: int
) -> None:
    jpegs = JPEGS[:count]
    result = client.infer("birds", [_image_input(jpegs)], outputs=[triton.InferRequestedOutput("logits")])
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (count, 7)
    assert result.get_output("logits")["parameters"]["binary_data_size"] == count * 7 * 4  # binary
    for jpeg, row in zip(jpegs, logits, strict=True):
        _assert_equals_classify(server, "birds", jpeg, row)


def test_the_classification_extension_gives_score_index_label_as_classify_does(
    client: triton.InferenceServerClient, server: LiveServer
) -> None:
    for binary in (True, False):
        output = triton.InferRequestedOutput("logits", binary_data=binary, class_count=3)
        result = client.infer("flowers", [_image_input(JPEGS)], outputs=[output])  # JSON can't carry JPEG bytes
        classes = result.as_numpy("logits")
        assert classes.shape == (3, 3)
        for jpeg, row in zip(JPEGS, classes, strict=True):
            expected = _classify(server, "flowers", jpeg, top_k=3)
            parsed = [(item.decode() if isinstance(item, bytes) else item).split(":") for item in row]
            assert [(int(i), label) for _, i, label in parsed] == [(p["index"], p["label"]) for p in expected]
            np.testing.assert_allclose([float(s) for s, _, _ in parsed], [p["score"] for p in expected], atol=1e-6)


def _pixels(jpeg: bytes) -> np.ndarray:
    """The task's own preprocessing, done by the client."""
    return SMALL(decode_image(jpeg, draft_min_side=SMALL.decode_min_side)).numpy()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_preprocessed_fp32_tensors_give_the_same_logits_as_the_encoded_images(
    client: triton.InferenceServerClient, binary: bool
) -> None:
    pixels = np.stack([_pixels(j) for j in JPEGS]).astype(np.float32)
    tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    output = triton.InferRequestedOutput("logits", binary_data=binary)
    from_pixels = client.infer("flowers", [tensor], outputs=[output]).as_numpy("logits")
    from_images = client.infer("flowers", [_image_input(JPEGS)]).as_numpy("logits")
    np.testing.assert_allclose(from_pixels, from_images, rtol=0, atol=1e-5)


def test_the_request_id_is_echoed_and_a_version_that_is_not_loaded_is_404(
    client: triton.InferenceServerClient, server: LiveServer
) -> None:
    version = httpx.get(f"{server.url}/tasks/flowers").json()["version"]
    result = client.infer("flowers", [_image_input(JPEGS[:1])], model_version=version, request_id="req-42")
    assert result.get_response()["id"] == "req-42" and result.get_response()["model_version"] == version
    with pytest.raises(InferenceServerException, match="has no version '7'") as info:
        client.infer("flowers", [_image_input(JPEGS[:1])], model_version="7")
    assert info.value.status() == "404"


def test_bad_input_raises_the_clients_exception_carrying_our_message(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="no task named 'nope'") as info:
        client.infer("nope", [_image_input(JPEGS[:1])])
    assert info.value.status() == "404"
    with pytest.raises(InferenceServerException, match="not an image in a supported format") as info:
        client.infer("flowers", [_image_input([JPEGS[0], b"this is not an image"])])
    assert info.value.status() == "422"
    wrong = triton.InferInput("pixels", [1, 3, 8, 8], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 8, 8), dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"this task takes \[N, 3, 32, 32\]"):
        client.infer("flowers", [wrong])
    with pytest.raises(InferenceServerException, match="unknown output 'probs'"):
        client.infer("flowers", [_image_input(JPEGS[:1])], outputs=[triton.InferRequestedOutput("probs")])
    # the client's own deadline (parameters.timeout, microseconds): 1 us cannot be met
    with pytest.raises(InferenceServerException, match="deadline") as info:
        client.infer("flowers", [_image_input(JPEGS[:1])], timeout=1)
    assert info.value.status() == "504"


def test_v2_requests_count_in_the_same_metrics_as_classify(
    client: triton.InferenceServerClient, server: LiveServer
) -> None:
    def served() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        line = next(x for x in text.splitlines() if x.startswith('piggyback_requests_total{status="200",task="birds"}'))
        return float(line.split()[-1])

    before = served()
    client.infer("birds", [_image_input(JPEGS[:2])])
    assert served() == before + 1


def test_json_bytes_elements_are_base64_and_malformed_binary_framing_is_refused(server: LiveServer) -> None:
    url = f"{server.url}/v2/models/flowers/infer"
    body = {"id": "j", "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                   "data": [base64.b64encode(j).decode() for j in JPEGS[:2]]}]}  # fmt: skip
    r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = r.json()
    assert out["id"] == "j" and out["outputs"][0]["shape"] == [2, 5]
    logits = np.array(out["outputs"][0]["data"], dtype=np.float32).reshape(2, 5)
    for jpeg, row in zip(JPEGS[:2], logits, strict=True):
        _assert_equals_classify(server, "flowers", jpeg, row)
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 4 + len(JPEGS[0])}}]}).encode()  # fmt: skip
    element = len(JPEGS[0]).to_bytes(4, "little") + JPEGS[0]
    cases = {
        "header length past the body": (header + element, str(len(header) + len(element) + 1), "for a body of"),
        "bytes left over": (header + element + b"xx", str(len(header)), "belong to no input"),
        "element overruns": (header + element[:-5], str(len(header)), "overruns"),
        "not json": (b"{nope" + element, "5", "not an inference request"),
    }
    for what, (content, length, message) in cases.items():
        r = httpx.post(url, content=content, headers={"Inference-Header-Content-Length": length}, timeout=30)
        assert r.status_code == 422, what
        assert message in r.json()["error"], (what, r.text)


def test_the_classify_command_prints_labels_and_scores_equal_to_the_api(
    server: LiveServer, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, jpeg in enumerate(JPEGS):
        paths.append(folder / f"img{i}.jpg")
        paths[-1].write_bytes(jpeg)
    files = [str(p) for p in paths]
    assert main(["classify", "--server", server.url, "--task", "flowers", "--top-k", "3", "--json", *files]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert [a["image"] for a in answers] == files
    for a, jpeg in zip(answers, JPEGS, strict=True):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in _classify(server, "flowers", jpeg, 3)]
    assert main(["classify", "--server", server.url, "--task", "flowers,birds", *files[:2]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[f, t] for f in files[:2] for t in ("flowers", "birds")]
    assert all(len(line.split("\t")[2].split("  ")) == 5 for line in lines)  # top 5 "label score" pairs
    assert main(["classify", "--server", server.url, "--task", "nope", files[0]]) == 2
    assert "the server answered 404: no task named 'nope'" in capsys.readouterr().err
    assert main(["classify", "--server", server.url, "--task", "flowers", str(folder / "missing.jpg")]) == 2
    assert "missing.jpg" in capsys.readouterr().err


def test_the_classify_command_sends_the_classify_token_from_the_flag_or_the_environment(
    tmp_path: Path,
    resnet18,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    from server.cli import main

    FileSystemStore(tmp_path / "store").put("flowers", small_task(resnet18, "flowers").to_bytes())
    image = tmp_path / "a.jpg"
    image.write_bytes(JPEGS[0])
    with live_server(tmp_path / "store", classify_token="s3cret") as live:
        args = ["classify", "--server", live.url, "--task", "flowers", str(image)]
        monkeypatch.delenv("PIGGYBACK_CLASSIFY_TOKEN", raising=False)
        assert main(args) == 2 and "401" in capsys.readouterr().err
        assert main([*args, "--token", "s3cret"]) == 0
        monkeypatch.setenv("PIGGYBACK_CLASSIFY_TOKEN", "s3cret")
        assert main(args) == 0


# --- Triton's tools: the model configuration, errors, perf_analyzer ---------------------------------

TRITON_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}


def test_the_model_configuration_is_tritons_and_agrees_with_the_metadata(
    client: triton.InferenceServerClient,
) -> None:
    """What perf_analyzer reads (its model_parser.cc): with max_batch_size > 0 every metadata shape
    starts with the batch dimension and the config's dims leave it out; an input may be left out of
    a request only where the config says it is optional."""
    assert "model_configuration" in client.get_server_metadata()["extensions"]
    model = client.get_model_metadata("flowers")
    config = client.get_model_config("flowers")
    assert config["name"] == "flowers"
    assert config["platform"] == model["platform"] == "piggyback_resnet18" and config["backend"] == "piggyback"
    assert config["max_batch_size"] == 16  # max_images_per_request: the images one request may hold
    for declared, configured in (("inputs", "input"), ("outputs", "output")):
        assert [t["name"] for t in config[configured]] == [t["name"] for t in model[declared]]
        for meta, conf in zip(model[declared], config[configured], strict=True):
            assert conf["data_type"] == TRITON_TYPES[meta["datatype"]]
            assert [-1, *conf["dims"]] == meta["shape"]
    assert [t["optional"] for t in config["input"]] == [True, True]  # send one of them
    assert config["output"][0]["dims"] == [5]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 1000  # max_wait_ms=1
    assert config["instance_group"][0]["kind"] == "KIND_CPU" and config["instance_group"][0]["count"] >= 1
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert client.get_model_config("flowers", model_version=model["versions"][0]) == config
    assert client.get_model_config("birds")["output"][0]["dims"] == [7]
    for task, version, message in (("nope", "", "no task named 'nope'"), ("flowers", "7", "has no version '7'")):
        with pytest.raises(InferenceServerException, match=message) as info:
            client.get_model_config(task, model_version=version)
        assert info.value.status() == "404"


def test_unknown_v2_routes_and_methods_answer_with_the_protocols_error_body(server: LiveServer) -> None:
    r = httpx.get(f"{server.url}/v2/models/flowers/nope", timeout=30)
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = httpx.get(f"{server.url}/v2/models/flowers/infer", timeout=30)
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}
    assert r.headers["allow"] == "POST"
    r = httpx.get(f"{server.url}/nope", timeout=30)  # outside /v2: FastAPI's body, as before
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


def _declared_input(meta: dict, batch: int) -> triton.InferInput:
    """An input as perf_analyzer builds it from the metadata: the batch, then the shape past the
    batch dimension."""
    shape = [batch, *meta["shape"][1:]]
    tensor = triton.InferInput(meta["name"], shape, meta["datatype"])
    if meta["datatype"] == "BYTES":
        tensor.set_data_from_numpy(np.array(JPEGS[:batch], dtype=np.object_).reshape(shape))
    else:
        tensor.set_data_from_numpy(np.stack([_pixels(j) for j in JPEGS[:batch]]).astype(np.float32).reshape(shape))
    return tensor


def test_a_client_sending_the_required_inputs_and_any_one_optional_input_succeeds(
    client: triton.InferenceServerClient,
) -> None:
    """perf_analyzer sends every input it has data for, and refuses to start when it has none for
    an input that the config does not mark optional."""
    model = client.get_model_metadata("flowers")
    optional = {t["name"] for t in client.get_model_config("flowers")["input"] if t["optional"]}
    required = [t for t in model["inputs"] if t["name"] not in optional]
    answers = []
    for extra in [t for t in model["inputs"] if t["name"] in optional]:
        logits = client.infer("flowers", [_declared_input(t, 2) for t in [*required, extra]]).as_numpy("logits")
        assert logits.shape == (2, 5)
        answers.append(logits)
    assert len(answers) == 2
    np.testing.assert_allclose(answers[0], answers[1], rtol=0, atol=1e-5)


def _perf_analyzer() -> str:
    """The perf_analyzer binary, or a skip that says why there is none that runs. The PyPI wheel's
    ``perf_analyzer`` command wraps the binary and drops its exit status: run the binary itself."""
    spec = importlib.util.find_spec("perf_analyzer")
    packaged = Path(spec.origin).parent / "bin" / "perf_analyzer" if spec and spec.origin else None
    exe = str(packaged) if packaged is not None and packaged.is_file() else shutil.which("perf_analyzer")
    if exe is None:
        pytest.skip("perf_analyzer is not installed (PyPI perf-analyzer: its wheels are manylinux_2_38)")
    probe = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    said = (probe.stderr + probe.stdout).strip()
    if "Usage:" not in said:  # e.g. "version `GLIBC_2.38' not found" on an older glibc
        pytest.skip(f"perf_analyzer does not run here: {said.splitlines()[0] if said else probe.returncode}")
    return exe


def _perf_input_data(folder: Path, name: str) -> Path:
    """perf_analyzer's ``--input-data`` file: a step per image holding one input, base64 of its raw
    batch-1 bytes (a BYTES element is its 4-byte little-endian length, then the bytes)."""
    if name == "image":
        raw = [struct.pack("<I", len(j)) + j for j in JPEGS]
    else:
        raw = [_pixels(j).astype("<f4").tobytes() for j in JPEGS]
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"data": [{name: {"b64": base64.b64encode(r).decode()}} for r in raw]}))
    return path


@pytest.mark.parametrize("name", ["image", "pixels"])
def test_perf_analyzer_measures_the_throughput_of_jpegs_and_of_pixels(
    server: LiveServer, tmp_path: Path, name: str
) -> None:
    exe = _perf_analyzer()
    args = [exe, "-m", "flowers", "-u", server.url.removeprefix("http://"), "-i", "http", "-b", "2",
            "--input-data", str(_perf_input_data(tmp_path, name)), "--concurrency-range", "2",
            "--measurement-mode", "count_windows", "--measurement-request-count", "10",
            "--stability-percentage", "100", "--max-trials", "5"]  # fmt: skip
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    throughput = re.search(r"throughput: ([0-9.]+) infer/sec", run.stdout)
    assert throughput is not None and float(throughput.group(1)) > 0, run.stdout
