"""The baseline: how multi-task classification is served today without Piggyback. One FastAPI
process holding one full torchvision model per task, each request decoded, transformed and run on
its own (no batching, so no cross-task batching either), the forward in FastAPI's thread pool.

    python -m benchmarks.model_per_task_server --tasks 8 --arch resnet50 --port 8100

Models are the architecture with seeded random weights (same FLOPs and bytes as pretrained ones).

``--models-dir DIR --lru-bytes N``: what Triton's explicit model control and Ray Serve's model
multiplexing do. Task ``t`` is the full model saved in ``DIR/t.pt``; models are loaded from disk on
first use and kept in an LRU bounded by ``N`` bytes, the least recently used unloaded when a new
one does not fit. ``--offset K`` names the tasks ``taskK...`` (one process per task: the
independent single-threaded workers of a well-configured TorchServe, with OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import io
import threading
from collections import OrderedDict
from pathlib import Path

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


class LruModels:
    """Full models loaded from ``DIR/<task>.pt`` on demand, least recently used unloaded past the
    byte budget."""

    def __init__(self, arch: str, models_dir: Path, budget: int, dtype: torch.dtype) -> None:
        self.arch, self.dir, self.budget, self.dtype = arch, models_dir, budget, dtype
        self.models: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()
        self.loads = 0

    def __contains__(self, task: str) -> bool:
        return (self.dir / f"{task}.pt").exists()

    def get(self, task: str) -> torch.nn.Module:
        with self.lock:
            model = self.models.get(task)
            if model is not None:
                self.models.move_to_end(task)
                return model
            model = torchvision.models.get_model(self.arch, weights=None, num_classes=100)
            model.load_state_dict(torch.load(self.dir / f"{task}.pt", weights_only=True))
            model = model.to(self.dtype).to(memory_format=torch.channels_last).eval()
            size = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
            while self.models and self.bytes + size > self.budget:
                _, old = self.models.popitem(last=False)
                self.bytes -= sum(p.nbytes for p in old.parameters()) + sum(b.nbytes for b in old.buffers())
            self.models[task] = model
            self.bytes += size
            self.loads += 1
            return model


def build_app(
    arch: str,
    num_tasks: int,
    *,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    models_dir: Path | None = None,
    lru_bytes: int = 0,
) -> FastAPI:
    models: dict[str, torch.nn.Module] | LruModels
    if models_dir is not None:
        models = LruModels(arch, models_dir, lru_bytes, dtype)
    else:
        models = {}
        for i in range(offset, offset + num_tasks):
            torch.manual_seed(i)
            model = torchvision.models.get_model(arch, weights=None, num_classes=100)
            models[f"task{i}"] = model.to(dtype).to(memory_format=torch.channels_last).eval()
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
            x = TRANSFORM(image).unsqueeze(0).to(dtype).contiguous(memory_format=torch.channels_last)
            model = models.get(task) if isinstance(models, LruModels) else models[task]
            with torch.inference_mode():
                probs = model(x).float().softmax(-1)[0]
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
    parser.add_argument("--offset", type=int, default=0, help="name the tasks task<offset>...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--models-dir", type=Path, help="load DIR/<task>.pt on demand (LRU)")
    parser.add_argument("--lru-bytes", type=int, default=4 << 30, help="byte budget of the LRU")
    args = parser.parse_args()
    app = build_app(args.arch, args.tasks, offset=args.offset, dtype=getattr(torch, args.dtype),
                    models_dir=args.models_dir, lru_bytes=args.lru_bytes)  # fmt: skip
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
