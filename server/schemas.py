"""Request and response bodies of the HTTP API (names end in Response / Public, as in the template)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "ClassifyResponse",
    "ErrorResponse",
    "HealthResponse",
    "ImageResultPublic",
    "MultiTaskResponse",
    "PredictionPublic",
    "ReadyResponse",
    "StoreSyncPublic",
    "TaskListResponse",
    "TaskPublic",
    "TaskResultPublic",
    "TaskSummaryPublic",
]


class PredictionPublic(BaseModel):
    label: str
    index: int = Field(description="row of the task head")
    score: float = Field(description="softmax probability")


class ImageResultPublic(BaseModel):
    predictions: list[PredictionPublic]
    batch_size: int = Field(description="images in the batch that computed this answer")


class ClassifyResponse(BaseModel):
    task: str
    version: str = Field(description="version of the task that answered (changes with every upload)")
    predictions: list[PredictionPublic] = Field(description="the first image's predictions")
    batch_size: int = Field(description="images in the batch that computed the first image's answer")
    results: list[ImageResultPublic] = Field(description="every image's answer, in the order sent")


class TaskResultPublic(ImageResultPublic):
    task: str
    version: str


class MultiTaskResponse(BaseModel):
    results: list[TaskResultPublic] = Field(description="each task's answer for the image, in the order named")


class TaskSummaryPublic(BaseModel):
    task: str
    version: str
    num_labels: int
    backbone: str
    fingerprint: str
    mask_kind: str
    bits_per_parameter: float
    density: float
    provenance: dict[str, Any]


class ResidencyPublic(BaseModel):
    packed_bytes: int = Field(description="masks, head and per-task BatchNorm: always resident")
    built_bytes: int = Field(description="built weights held in the cache now (0: built per batch)")
    pinned: bool
    cache_hits: int = Field(description="batches that found this task's weights built")
    cache_misses: int = Field(description="batches that built them")


class TaskPublic(TaskSummaryPublic):
    residency: ResidencyPublic
    labels: list[str]
    threshold: float
    masked_out: float
    mask_bytes: int
    head_bytes: int
    per_task_batchnorm: list[str]
    preprocessing: dict[str, Any] | None
    format_version: str


class TaskListResponse(BaseModel):
    tasks: list[TaskSummaryPublic]
    failed: dict[str, str] = Field(description="tasks in the store that could not be loaded, with the reason")
    total: int = Field(description="tasks loaded in all")
    next: str | None = Field(description="pass as ?after= for the next page; null on the last page")


class HealthResponse(BaseModel):
    status: str


class StoreSyncPublic(BaseModel):
    last_success_unix_s: float | None = Field(description="when a poll last succeeded (Unix time)")
    last_error: str | None = Field(description="the last poll's error; null once a poll succeeds again")
    last_error_unix_s: float | None
    held_removals: int = Field(description="tasks whose removal is held until the store lists the same twice")


class ReadyResponse(BaseModel):
    status: str
    backbone: str
    fingerprint: str
    device: str
    dtype: str = Field(description="compute dtype: float32, bfloat16 or float16")
    layout: str = Field(description="activation layout: channels_last or contiguous")
    mixed_path: str = Field(description="how batches that mix tasks run: segments or stacked")
    cpu_path: str = Field("reference", description="packed (fused, prepacked oneDNN weights) or reference")
    tasks: int = Field(description="stored tasks this replica serves (their headers checked)")
    tasks_loaded: int = Field(0, description="tasks loaded now (read and checked in full at their first use)")
    tasks_loading: int = Field(description="tasks whose headers are still being checked (ready_after=backbone)")
    workers: int = Field(description="batches computed at once")
    worker_threads: int = Field(description="intra-op threads of each worker")
    cache_budget_bytes: int = Field(description="byte budget of the built-weights cache")
    tasks_failed: int = Field(0, description="task files in the store that cannot be served (GET /tasks lists them)")
    store: StoreSyncPublic | None = Field(None, description="the store poll's last outcome")


class ErrorResponse(BaseModel):
    detail: str
