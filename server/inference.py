"""The one inference service under every protocol: decode -> submit -> compute -> postprocess.

``/classify``, ``/classify?tasks=`` and the Open Inference Protocol (``/v2``) are thin adapters
over it: they parse their request, call one method here and shape the :class:`ImageResult` list it
returns into their answer. Everything between happens here and on the worker threads:

* **decode**: encoded images to ``uint8 [3, H, W]`` with the task's resize and crop, on the
  decoding threads (the workers on a CPU); normalisation waits for the device (a quarter of the
  bytes to copy, and the task's mean and std applied there);
* **submit**: into the batcher (queue bound, deadlines, fairness, mixed batches);
* **compute and postprocess**, on a worker: the batch in a pinned staging buffer, the forward,
  the logits back in one device-to-host copy, softmax and top-k on the host.

So what comes back is plain host data (numpy logits and Python predictions): no route holds a
tensor, and the event loop never waits for a device.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch

from piggyback_core import LoadedTask, Preprocessing, decode_image

from .batcher import Batcher, ImageResult

__all__ = ["ImageResult", "InferenceService"]


@dataclass
class InferenceService:
    batcher: Batcher
    decoder: Executor
    max_image_pixels: int

    def input_size(self, task: LoadedTask) -> int:
        """The side of the square images ``task`` takes (its crop size)."""
        return task.preprocessing.crop_size

    async def classify(
        self, task: LoadedTask, images: Sequence[bytes], *, top_k: int, timeout_s: float | None = None
    ) -> list[ImageResult]:
        """Encoded images of one task: decoded, then queued together."""
        pixels = await self._decode(task.preprocessing, images)
        return await self.batcher.submit_many([(task, p) for p in pixels], top_k=top_k, timeout_s=timeout_s)

    async def classify_pixels(
        self, task: LoadedTask, pixels: np.ndarray, *, top_k: int, timeout_s: float | None = None
    ) -> list[ImageResult]:
        """Images already preprocessed the task's way: ``float32 [N, 3, H, W]``, normalised."""
        batch = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        return await self.batcher.submit_many([(task, p) for p in batch], top_k=top_k, timeout_s=timeout_s)

    async def classify_tasks(self, tasks: Sequence[LoadedTask], image: bytes, *, top_k: int) -> list[ImageResult]:
        """One image through several tasks in one mixed batch (one decode per distinct
        preprocessing among them); the results in the order of ``tasks``."""
        decoded: dict[Preprocessing, torch.Tensor] = {}
        for task in tasks:
            p = task.preprocessing
            if p not in decoded:
                decoded[p] = (await self._decode(p, [image]))[0]
        items = [(t, decoded[t.preprocessing]) for t in tasks]
        return await self.batcher.submit_many(items, top_k=top_k)

    def _prepare(self, preprocessing: Preprocessing, data: bytes) -> torch.Tensor:
        image = decode_image(data, max_pixels=self.max_image_pixels, draft_min_side=preprocessing.decode_min_side)
        return preprocessing.to_uint8(image)

    async def _decode(self, preprocessing: Preprocessing, images: Sequence[bytes]) -> list[torch.Tensor]:
        """Each image decoded, resized and cropped (``uint8``), on the decoding threads."""
        loop = asyncio.get_running_loop()
        for _ in images:
            self.batcher.expect()  # a batch closing now waits for these images (see batcher.py)
        try:
            return list(
                await asyncio.gather(
                    *(loop.run_in_executor(self.decoder, self._prepare, preprocessing, d) for d in images)
                )
            )
        finally:
            for _ in images:
                self.batcher.arrived()
