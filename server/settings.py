"""All configuration: one pydantic-settings class, ``PIGGYBACK_*`` environment variables, each
also a ``piggyback serve`` flag. Validated when built: a bad value stops the process at start."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from piggyback_core import list_backbones, validate_task_name

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIGGYBACK_", extra="ignore", frozen=True)

    backbone: str = Field("resnet50", description="backbone architecture")
    weights: str = Field("IMAGENET1K_V1", description="torchvision weights name, a local file, or 'random'")
    seed: int = Field(0, description="seed for --weights random")
    store: str = Field(
        "store", description="task files: a directory (shared by replicas over RWX/NFS) or s3://bucket[/prefix]"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="compute dtype; auto: bfloat16 on a CPU that has it natively (AMX, AVX-512-BF16), else "
        "float32; on CUDA bfloat16 where the GPU has it, else float16",
    )
    layout: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto", description="activation memory layout; auto: channels_last for the backbones where it is faster"
    )
    mixed_path: Literal["auto", "segments", "stacked"] = Field(
        "auto",
        description="how a batch that mixes tasks runs: segments (each layer once per task), stacked (the tasks "
        "stacked along channels, one grouped convolution per layer whatever their number; ResNet, VGG, "
        "MobileNetV3 and EfficientNet only); auto: segments (on CUDA too, until a GPU measurement says stacked "
        "is faster)",
    )
    cpu_path: Literal["auto", "packed", "reference"] = Field(
        "auto",
        description="how a CPU runs a batch: packed (BatchNorm folded, post-ops fused, each task's weights "
        "prepacked for oneDNN), reference (weight * mask in the torchvision modules); auto: packed where the CPU "
        "has AVX-512 or AMX and the backbone traces",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="port of the Open Inference Protocol over gRPC on host (Triton's is 8001); 0: off. Needs the "
        "grpc extra: pip install 'piggyback-server[grpc]'",
    )
    token: SecretStr | None = Field(None, description="bearer token for PUT/DELETE /tasks")
    token_file: Path | None = Field(None, description="read the token from this file (a Docker or Kubernetes secret)")
    allow_unauthenticated: bool = Field(False, description="accept management calls without a token (dev only)")
    classify_token: SecretStr | None = Field(None, description="if set, /classify needs this bearer token")
    classify_token_file: Path | None = Field(None, description="read the classify token from this file")
    ops_need_token: bool = Field(
        False,
        description="with a classify token, /metrics, /healthz, /readyz and the /v2 server and health routes need "
        "it too (probes and scrapers then send it); without one they stay open",
    )
    max_batch_size: int | None = Field(
        None, ge=1, le=4096, description="requests per batch at most; default: 8 on CPU, 32 on CUDA"
    )
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long a batch waits to fill")
    queue_size: int = Field(256, ge=1, description="requests waiting at most; beyond it: 503")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of a classify request")
    body_timeout_s: float = Field(
        30.0, gt=0, description="the whole body must arrive within this time, else 408 and the connection closes"
    )
    max_connections: int = Field(
        1000, ge=1, description="concurrent connections at most; past it, new requests get 503 and are closed"
    )
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_task_bytes: int = Field(512 * 1024 * 1024, ge=1)
    max_body_bytes_in_flight: int = Field(
        1024 * 1024 * 1024,
        ge=1,
        description="request-body bytes held at once, over every connection; past it, a request gets 503 with "
        "Retry-After and its connection closes (at least max_task_bytes and max_image_bytes + 64 KiB)",
    )
    max_images_per_request: int = Field(
        16, ge=1, le=1024, description="images in one classify or v2 infer request at most"
    )
    max_tasks_per_request: int = Field(16, ge=1, le=256, description="tasks in one POST /classify?tasks= at most")
    store_poll_s: float = Field(2.0, gt=0, description="how often the store is checked for other replicas' changes")
    store_removal_guard: float = Field(
        1.0,
        gt=0,
        le=1,
        description="a store poll that would remove this share of the served tasks or more at once is applied only "
        "when the next poll lists exactly the same (1.0: only a listing that removes every task waits)",
    )
    cache_bytes: int | Literal["auto"] = Field(
        "auto",
        description="budget of the LRU of built task weights, in bytes (0: build them every batch); auto: half of "
        "the memory available at start on a CPU (the container's limit if lower), 80% of the free GPU memory "
        "after the backbone and a warm-up of the largest batch on CUDA",
    )
    task_cache_bytes: int | Literal["auto"] = Field(
        "auto",
        description="loaded tasks (their packed masks, heads and BatchNorm) held at most, in bytes; past it the least "
        "recently used are let go and read again at their next use; auto: an eighth of the weight cache budget, at "
        "least 512 MiB",
    )
    s3_cache_dir: Path | None = Field(
        None, description="an s3:// store's local disk cache of task files; default: piggyback-s3-cache in the temp dir"
    )
    s3_cache_bytes: int = Field(
        512 * 1024**2,
        ge=0,
        description="bytes of the S3 disk cache at most, least recently used first out (0: none); within the temp "
        "dir's volume (the Kubernetes manifest gives /tmp 1 GiB)",
    )
    prefill: bool = Field(
        True,
        description="after start, build tasks' weights into the cache's free room in the background (evicts nothing)",
    )
    pin_tasks: str = Field(
        "",
        description="comma-separated tasks to build, warm up and pin in the weight cache at start (and whenever "
        "they are registered)",
    )
    model_control: Literal["lazy", "explicit"] = Field(
        "lazy",
        description="lazy: every stored task answers, and POST /v2/repository/models/{task}/load and /unload pin and "
        "unpin its built weights; explicit (Triton's EXPLICIT mode): only loaded tasks answer (pin_tasks are loaded "
        "at start), the others 404",
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="batches computed at once, each on its own thread; default: on a CPU min(cores, 8), on CUDA 1",
    )
    worker_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="intra-op threads of each worker, fixed; default on a CPU: the batches in flight share the "
        "cores (a batch that is all the work gets them all, others cores // workers each)",
    )
    spread_batches: bool = Field(
        True,
        description="on a CPU with several workers, split the requests in sight over the idle workers (batches "
        "side by side) instead of one batch taking them all; false: every batch takes what it can",
    )
    load_threads: int | None = Field(
        None,
        ge=1,
        le=64,
        description="threads that read and check the task files' headers at start; default: min(cores, 4)",
    )
    ready_after: Literal["tasks", "backbone"] = Field(
        "tasks",
        description="when /readyz turns ready: tasks (every stored task's header checked: each is listed and served, "
        "its file read and checked in full at its first use) or backbone (the backbone loaded and warmed up; the "
        "headers are checked in the background, and a request for a task not checked yet checks it at once)",
    )
    metrics_top_tasks: int = Field(
        50,
        ge=0,
        le=10_000,
        description="per-task metric series for at most this many tasks (the first to get traffic, and "
        '--metrics-tasks); every other task is counted under task="_other"',
    )
    metrics_tasks: str = Field("", description="comma-separated tasks that always get their own metric series")
    decode_threads: int | None = Field(
        None,
        ge=0,
        le=64,
        description="image decoding threads; 0: decode on the device thread; default: 0 on CPU, 4 on CUDA",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="text: key=value lines; json: one object a line")

    @field_validator("store", mode="before")
    @classmethod
    def _store_location(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value

    @model_validator(mode="after")
    def _tokens_from_files(self) -> Settings:
        for field in ("token", "classify_token"):
            path = getattr(self, f"{field}_file")
            if path is None:
                continue
            if getattr(self, field) is not None:
                raise ValueError(f"set {field} or {field}_file, not both")
            try:
                secret = Path(path).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read {field}_file {str(path)!r}: {exc}") from None
            if not secret:
                raise ValueError(f"{field}_file {str(path)!r} is empty")
            object.__setattr__(self, field, SecretStr(secret))  # frozen model: set once, while validating
        return self

    @model_validator(mode="after")
    def _limits_that_can_be_met(self) -> Settings:
        if self.queue_size < self.max_images_per_request:
            raise ValueError(
                f"queue_size ({self.queue_size}) is below max_images_per_request ({self.max_images_per_request}): "
                "a request with that many images could never be queued"
            )
        if self.queue_size < self.max_tasks_per_request:
            raise ValueError(
                f"queue_size ({self.queue_size}) is below max_tasks_per_request ({self.max_tasks_per_request}): "
                "a request for that many tasks could never be queued"
            )
        largest = max(self.max_task_bytes, self.max_image_bytes + 64 * 1024)
        if self.max_body_bytes_in_flight < largest:
            raise ValueError(
                f"max_body_bytes_in_flight ({self.max_body_bytes_in_flight}) is below the largest body a request may "
                f"send ({largest} bytes: max_task_bytes, or max_image_bytes and the multipart framing)"
            )
        if self.ops_need_token and self.classify_token is None:
            raise ValueError("ops_need_token needs a classify token (classify_token or classify_token_file)")
        return self

    @field_validator("pin_tasks", "metrics_tasks")
    @classmethod
    def _task_list(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        for name in names:
            validate_task_name(name)
        return ",".join(names)

    @property
    def pinned(self) -> list[str]:
        return [n for n in self.pin_tasks.split(",") if n]

    @property
    def metric_task_names(self) -> list[str]:
        return [n for n in self.metrics_tasks.split(",") if n]

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in list_backbones():
            raise ValueError(f"unknown backbone {value!r}; available: {', '.join(list_backbones())}")
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()
