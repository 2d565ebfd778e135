"""``POST /classify/{task}`` (one image or several) and ``POST /classify?tasks=a,b,c`` (one image,
several tasks, in one mixed batch): a thin adapter over the inference service (server.inference)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from piggyback_core import validate_task_name

from ..deps import ClassifyAuth, MetricsDep, ServicesDep, SettingsDep, TaskName, errors, observe, read_body
from ..errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from ..inference import ImageResult
from ..schemas import ClassifyResponse, ImageResultPublic, MultiTaskResponse, TaskResultPublic
from ..settings import Settings

__all__ = ["image_parts", "router"]

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


def _image_result(result: ImageResult) -> ImageResultPublic:
    return ImageResultPublic(predictions=[vars(p) for p in result.predictions], batch_size=result.batch_size)


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
        results = [_image_result(r) for r in await services.inference.classify(loaded, images, top_k=top_k)]
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
        outputs = await services.inference.classify_tasks(loaded, images[0], top_k=top_k)
        results = [
            TaskResultPublic(task=t.name, version=t.version, **vars(_image_result(r)))
            for t, r in zip(loaded, outputs, strict=True)
        ]
        seen.status, seen.batch_size = 200, max(r.batch_size for r in results)
        return MultiTaskResponse(results=results)
