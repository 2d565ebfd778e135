"""The baseline: how multi-task classification is served today without Piggyback. One FastAPI
process holding one full torchvision model per task, each request decoded, transformed and run on
its own (no batching, so no cross-task batching either), the forward in FastAPI's thread pool.

    python -m benchmarks.model_per_task_server --tasks 8 --arch resnet50 --port 8100

Models are the architecture with seeded random weights (same FLOPs and bytes as pretrained ones).
"""

from __future__ import annotations

import argparse
import io

import torch
import torchvision
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from PIL import Image
from torchvision.transforms import v2

TRANSFORM = v2.Compose(
    [
        v2.PILToTensor(),
        v2.Resize(256, antialias=True),
        v2.CenterCrop(224),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ]
)


def build_app(arch: str, num_tasks: int) -> FastAPI:
    models = {}
    for i in range(num_tasks):
        torch.manual_seed(i)
        models[f"task{i}"] = torchvision.models.get_model(arch, weights=None, num_classes=100).eval()
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/classify/{task}")
    async def classify(task: str, request: Request) -> dict[str, object]:
        if task not in models:
            raise HTTPException(404, "unknown task")
        body = await request.body()
        from starlette.concurrency import run_in_threadpool

        def work() -> tuple[int, float]:
            image = Image.open(io.BytesIO(body)).convert("RGB")
            x = TRANSFORM(image).unsqueeze(0)
            with torch.inference_mode():
                probs = models[task](x).softmax(-1)[0]
            score, index = probs.max(0)
            return int(index), float(score)

        index, score = await run_in_threadpool(work)
        return {"task": task, "predictions": [{"index": index, "score": score}]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    uvicorn.run(build_app(args.arch, args.tasks), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
