"""``POST /classify/{task}`` (one image or several) and ``POST /classify?tasks=a,b,c`` (one image,
several tasks, in one mixed batch), and the decode-and-batch pipeline the v2 protocol shares."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from piggyback_core import LoadedTask, Preprocessing, decode_image, predictions_from_logits, validate_task_name

from ..deps import ClassifyAuth, MetricsDep, ServicesDep, SettingsDep, TaskName, errors, observe, read_body
from ..errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from ..schemas import ClassifyResponse, ImageResultPublic, MultiTaskResponse, TaskResultPublic
from ..services import Services
from ..settings import Settings

__all__ = ["classify_images", "preprocessing_of", "router"]

router = APIRouter(dependencies=[ClassifyAuth])

_IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["image"],
                }
            },
        },
    }
}


async def image_parts(request: Request, settings: Settings, *, max_images: int) -> list[bytes]:
    """The request's images: a raw ``image/*`` body, or the multipart fields ``image`` in order (at
    most ``max_images``). ``max_image_bytes`` bounds each image and, with 64 KiB of multipart
    framing, the whole upload."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith("image/"):
        return [await read_body(request, settings.max_image_bytes, "image")]
    if content_type != "multipart/form-data":
        raise UnsupportedMediaTypeError(
            f"content type {content_type or 'missing'!r} is not an image: send image/* or "
            "multipart/form-data with file fields 'image'"
        )
    body = await read_body(request, settings.max_image_bytes + 64 * 1024, "upload")

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(
        Headers(raw=request.headers.raw),
        stream(),
        max_files=max_images + 4,
        max_fields=16,
        max_part_size=1024 * 1024,
    )
    # The parts stay in memory (the body is there already, and counted against the body budget):
    # Starlette would spool a part over 1 MiB to a temporary file, and /tmp is a small emptyDir.
    parser.spool_max_size = len(body) + 1
    try:
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise BadRequestError(f"malformed multipart body: {exc.message}") from exc
        try:
            fields = form.getlist("image")
            if not fields or any(isinstance(f, str) for f in fields):
                raise BadRequestError("multipart body has no file field 'image'")
            if len(fields) > max_images:
                raise BadRequestError(f"{len(fields)} images in one request; at most {max_images}")
            images = [await f.read() for f in fields if isinstance(f, UploadFile)]
        finally:
            await form.close()
    finally:
        # Starlette leaves the temp file of a part cut off by the end of the body open (it is
        # in no form field); found by tests/hardening. Close whatever the parser opened.
        for spooled in getattr(parser, "_files_to_close_on_error", ()):
            spooled.close()
    for data in images:
        if len(data) > settings.max_image_bytes:
            raise PayloadTooLargeError(limit=settings.max_image_bytes, what="image")
    return images


def preprocessing_of(services: Services, task: LoadedTask) -> Preprocessing:
    return task.file.preprocessing or services.backbone.preprocessing


def _prepare(services: Services, preprocessing: Preprocessing, data: bytes) -> torch.Tensor:
    image = decode_image(
        data, max_pixels=services.settings.max_image_pixels, draft_min_side=preprocessing.decode_min_side
    )
    return preprocessing(image)


async def decode(services: Services, preprocessing: Preprocessing, images: list[bytes]) -> list[torch.Tensor]:
    """Each image decoded and preprocessed, on the decoding threads (the workers on a CPU)."""
    loop = asyncio.get_running_loop()
    for _ in images:
        services.batcher.expect()  # a batch closing now waits for these images (see batcher.py)
    try:
        return list(
            await asyncio.gather(
                *(loop.run_in_executor(services.decoder, _prepare, services, preprocessing, d) for d in images)
            )
        )
    finally:
        for _ in images:
            services.batcher.arrived()


async def classify_images(
    services: Services, task: LoadedTask, images: list[bytes], *, timeout_s: float | None = None
) -> list[tuple[torch.Tensor, int]]:
    """Logits and batch size of each image, for one task: decoded, then queued together."""
    tensors = await decode(services, preprocessing_of(services, task), images)
    return await services.batcher.submit_many([(task, t) for t in tensors], timeout_s=timeout_s)


def _image_result(task: LoadedTask, logits: torch.Tensor, batch_size: int, top_k: int) -> ImageResultPublic:
    predictions = predictions_from_logits(logits, task.labels, top_k)
    return ImageResultPublic(predictions=[vars(p) for p in predictions], batch_size=batch_size)


TopK = Annotated[int, Query(ge=1, le=1000, description="number of predictions")]


@router.post(
    "/classify/{task}",
    response_model=ClassifyResponse,
    responses=errors(401, 404, 413, 415, 422, 503, 504),
    openapi_extra=_IMAGE_BODY,
    summary="Classify one image, or several (multipart fields `image`, answered in order), with a task",
)
async def classify(
    task: TaskName, request: Request, services: ServicesDep, settings: SettingsDep, metrics: MetricsDep, top_k: TopK = 5
) -> ClassifyResponse:
    async with observe(request, metrics, "classify", task) as seen:
        loaded = await services.task(task)
        seen.label = metrics.task_label(task)
        images = await image_parts(request, settings, max_images=settings.max_images_per_request)
        outputs = await classify_images(services, loaded, images)
        results = [_image_result(loaded, logits, size, top_k) for logits, size in outputs]
        seen.status, seen.batch_size = 200, max(r.batch_size for r in results)
        return ClassifyResponse(
            task=task,
            version=loaded.version,
            predictions=results[0].predictions,
            batch_size=results[0].batch_size,
            results=results,
        )


@router.post(
    "/classify",
    response_model=MultiTaskResponse,
    responses=errors(401, 404, 413, 415, 422, 503, 504),
    openapi_extra=_IMAGE_BODY,
    summary="Classify one image with several tasks at once (one mixed batch over the shared backbone)",
)
async def classify_tasks(
    request: Request,
    services: ServicesDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    tasks: Annotated[str, Query(min_length=1, max_length=4096, description="comma-separated task names")],
    top_k: TopK = 5,
) -> MultiTaskResponse:
    names = list(dict.fromkeys(n.strip() for n in tasks.split(",") if n.strip()))
    async with observe(request, metrics, "classify-tasks", ",".join(names)) as seen:
        if not names:
            raise BadRequestError("tasks: name at least one task")
        if len(names) > settings.max_tasks_per_request:
            raise BadRequestError(f"tasks: {len(names)} tasks in one request; at most {settings.max_tasks_per_request}")
        for name in names:
            validate_task_name(name)
        loaded = [await services.task(name) for name in names]
        seen.label = "_multi"
        images = await image_parts(request, settings, max_images=1)
        if len(images) != 1:
            raise BadRequestError("send one image to classify with several tasks")
        # one decode per distinct preprocessing among the tasks
        by_preprocessing: dict[Preprocessing, torch.Tensor] = {}
        for t in loaded:
            p = preprocessing_of(services, t)
            if p not in by_preprocessing:
                by_preprocessing[p] = (await decode(services, p, images))[0]
        items = [(t, by_preprocessing[preprocessing_of(services, t)]) for t in loaded]
        outputs = await services.batcher.submit_many(items)
        results = [
            TaskResultPublic(task=t.name, version=t.version, **vars(_image_result(t, logits, size, top_k)))
            for t, (logits, size) in zip(loaded, outputs, strict=True)
        ]
        seen.status, seen.batch_size = 200, max(r.batch_size for r in results)
        return MultiTaskResponse(results=results)
