"""Decode + preprocess per image, full JPEG decode against DCT-domain reduced decode (draft).

    python -m benchmarks.decode [--repeats 15]

For 500x375, 1920x1080 and 4000x3000 photo-like JPEGs (quality 90): milliseconds per image for
decode_image + Preprocessing (resize 256, crop 224), without and with ``draft_min_side=256``, and
images per second with 1 and 2 decoding threads (Pillow releases the GIL). Writes
benchmarks/results/decode.{md,json}.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from benchmarks.serving import machine, write_results
from piggyback_core import Preprocessing, decode_image

SIZES = [(500, 375), (1920, 1080), (4000, 3000)]


def photo_like(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def per_image_ms(data: bytes, pre: Preprocessing, draft: int | None, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        pre(decode_image(data, draft_min_side=draft))
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def images_per_second(data: bytes, pre: Preprocessing, draft: int | None, threads: int, count: int) -> float:
    def one(_: int) -> None:
        pre(decode_image(data, draft_min_side=draft))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, range(threads)))  # warm
        started = time.perf_counter()
        list(pool.map(one, range(count)))
        return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    pre = Preprocessing()
    rows = []
    for width, height in SIZES:
        data = photo_like(width, height)
        full = per_image_ms(data, pre, None, args.repeats)
        draft = per_image_ms(data, pre, pre.resize_size, args.repeats)
        count = max(8, int(4000 / max(draft, 1)))
        rates = {t: images_per_second(data, pre, pre.resize_size, t, count) for t in (1, 2)}
        rows.append(
            {"size": f"{width}x{height}", "jpeg_bytes": len(data), "full_ms": full, "draft_ms": draft,
             "speedup": full / draft, "img_per_s_1_thread": rates[1], "img_per_s_2_threads": rates[2]}
        )  # fmt: skip
        print(rows[-1], flush=True)
    lines = [
        f"# Decode + preprocess (resize 256, crop 224) per image; {machine()}",
        "",
        "| JPEG | bytes | full decode ms | reduced decode ms | speed-up | img/s, 1 thread | img/s, 2 threads |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r['size']} | {r['jpeg_bytes']:,} | {r['full_ms']:.1f} | {r['draft_ms']:.1f} | {r['speedup']:.1f} | "
            f"{r['img_per_s_1_thread']:.0f} | {r['img_per_s_2_threads']:.0f} |"
            for r in rows
        ),
    ]
    write_results("decode", lines, {"rows": rows})


if __name__ == "__main__":
    main()
