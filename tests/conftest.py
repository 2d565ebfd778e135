"""Shared fixtures: small real things (a real resnet18 with random weights, real task files)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from piggyback_core import Backbone, MaskKind, Preprocessing, TaskFile, load_backbone
from scripts.demo import make_colour_dataset

SMALL = Preprocessing(resize_size=36, crop_size=32)  # fast inputs for tests


def encode(fmt: str, mode: str = "RGB", size: tuple[int, int] = (48, 40), **save: object) -> bytes:
    """A solid-colour image of ``mode`` and ``size``, encoded as ``fmt`` by PIL."""
    buf = io.BytesIO()
    color: object = (200, 30, 30) if mode in ("RGB", "RGBA") else (10, 200, 30, 0) if mode == "CMYK" else 120
    Image.new(mode, size, color=color).save(buf, format=fmt, **save)
    return buf.getvalue()


def random_masks(
    backbone: Backbone, *, kind: str = "binary", keep: float = 0.8, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random masks over every masked weight of ``backbone`` (kept with probability ``keep``)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in backbone.mask_shapes.items():
        u = torch.rand(shape, generator=g)
        if kind == "binary":
            out[key] = u < keep
        else:  # ternary: keep/2 each of +1 and -1 beyond... mostly +1, some -1, some 0
            m = torch.zeros(shape, dtype=torch.int8)
            m[u < keep] = 1
            m[u < 0.1] = -1
            out[key] = m
    return out


def make_task(
    backbone: Backbone,
    name: str = "demo",
    *,
    num_labels: int = 5,
    kind: MaskKind = "binary",
    seed: int = 0,
    keep: float = 0.8,
    norms: bool = False,
    preprocessing: Preprocessing | None = None,
    labels: list[str] | None = None,
    head_scale: float = 0.05,
) -> TaskFile:
    """A real task file for ``backbone`` with random masks, head and (optionally) BatchNorm."""
    from piggyback_core import NormParams

    g = torch.Generator().manual_seed(1000 + seed)
    norm_params = {}
    if norms:
        for module, c in backbone.norm_sizes.items():
            norm_params[module] = NormParams(
                weight=1 + 0.1 * torch.randn(c, generator=g),
                bias=0.1 * torch.randn(c, generator=g),
                running_mean=0.1 * torch.randn(c, generator=g),
                running_var=1 + torch.rand(c, generator=g),
            )
    return TaskFile.create(
        name=name,
        labels=labels or [f"class-{i}" for i in range(num_labels)],
        backbone=backbone,
        masks=random_masks(backbone, kind=kind, keep=keep, seed=seed),
        head_weight=head_scale * torch.randn(num_labels, backbone.feature_dim, generator=g),
        head_bias=0.05 * torch.randn(num_labels, generator=g),
        mask_kind=kind,
        norms=norm_params,
        provenance={"dataset": "synthetic", "method": "test"},
        preprocessing=preprocessing,
    )


TaskFactory = Callable[..., TaskFile]


@pytest.fixture(scope="session")
def resnet18() -> Backbone:
    return load_backbone("resnet18", weights="random", seed=0)


@pytest.fixture
def task_factory(resnet18: Backbone) -> TaskFactory:
    def factory(name: str = "demo", **kwargs: Any) -> TaskFile:
        return make_task(resnet18, name, **kwargs)

    return factory


def make_image_folder(root: Path, **kwargs: Any) -> Path:
    """The demo's small separable dataset (noisy images of three colours), in ImageFolder layout."""
    return make_colour_dataset(root, **kwargs)


@pytest.fixture(scope="session")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("colours"))


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata endpoint for credentials
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3-compatible endpoint (moto's server, real HTTP on loopback) for the whole run."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """``s3://<fresh bucket>/tasks``, with the environment pointing boto3 (in this process and in
    any server process a test starts) at the local endpoint."""
    import re
    import uuid

    import boto3

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/tasks"
