"""The serving benchmarks of issue 6, each a ratio against a baseline measured in the same run.

    python -m benchmarks.serving [--arch resnet50] [--quick] [--out benchmarks/results]

1. mask overhead: the engine running one task against the plain torchvision model (same weights
   times the mask, same head, dtype, device, batch), at batch 1 and 8 on CPU (1, 8, 32 on CUDA),
   with weights built per batch and with the server's default weight cache;
2. mixed-task batches: B requests over T = 1, 2, 4, 8 tasks against the same B for one task;
3. task density: memory per resident task with 1, 10 and 100 tasks, against one fp32 and one
   fp16 torchvision model per task;
4. cold task: a task file's bytes arriving at registration (validate, store with fsync, load) to
   its first prediction, against a warm request;
5. end to end over HTTP: a real ``piggyback serve`` process on loopback and a closed-loop load
   generator in another process (1 to 64 clients, JPEG photos at 500x375, 8 tasks mixed), against
   the plain decode + transform + forward loop in batches of 8, the engine alone on the decoded
   images, and a one-model-per-task FastAPI server on the same load;
6. startup time to ready and peak memory of every server.

Writes ``serving.json``, ``serving.md`` and ``serving.png`` under ``--out``. Timings interleave the
compared paths and report medians, so drift on a noisy machine hits both sides alike. Weights are
seeded random (same architecture, bytes and FLOPs as the pretrained ones). Needs the ``bench``
extra (matplotlib, and the photos shipped with scikit-learn/scikit-image).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision

from piggyback_core import (
    Backbone,
    Engine,
    FileSystemStore,
    TaskFile,
    cpu_bf16_isa,
    get_backbone_spec,
    load_backbone,
)
from piggyback_core.bitpack import unpack_mask

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE_BYTES = 1 << 30  # the server's default (Settings.cache_bytes)


# --- helpers ----------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def make_task(backbone: Backbone, name: str, seed: int, keep: float = 0.6, labels: int = 100) -> TaskFile:
    g = torch.Generator().manual_seed(seed)
    masks = {k: torch.rand(s, generator=g) < keep for k, s in backbone.mask_shapes.items()}
    return TaskFile.create(
        name=name,
        labels=[f"c{i}" for i in range(labels)],
        backbone=backbone,
        masks=masks,
        head_weight=0.01 * torch.randn(labels, backbone.feature_dim, generator=g),
        head_bias=torch.zeros(labels),
    )


def plain_model(backbone: Backbone, task: TaskFile, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """torchvision's own model with the task's weights (backbone x mask) and head: the baseline."""
    spec = get_backbone_spec(backbone.arch)
    model = torchvision.models.get_model(backbone.arch, weights=None)
    parent, _, attr = spec.head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, torch.nn.Linear(backbone.feature_dim, 100))
    state = {k: v for k, v in backbone.model.state_dict().items() if "scores" not in k}
    for key, mask in task.masks.items():
        state[key] = state[key] * unpack_mask(mask, state[key].numel(), task.mask_kind).view(state[key].shape)
    state[f"{spec.head}.weight"], state[f"{spec.head}.bias"] = task.head_weight, task.head_bias
    model.load_state_dict(state, strict=False)
    return model.to(device, dtype).eval()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes(pid: int | None = None) -> int:
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- 1. mask overhead -------------------------------------------------------------------------


def bench_overhead(backbone: Backbone, device: torch.device, dtype: torch.dtype, batches: list[int], repeats: int):
    task = make_task(backbone, "bench", seed=1)
    plain = plain_model(backbone, task, device, dtype)
    built = Engine(backbone, device=device, dtype=dtype, cache_bytes=0)
    cached = Engine(backbone, device=device, dtype=dtype, cache_bytes=DEFAULT_CACHE_BYTES)
    for e in (built, cached):
        e.add_task(task)
    rows = []
    for b in batches:
        x = torch.randn(b, 3, 224, 224).to(device, dtype)

        def run_plain(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                plain(x)
            sync(device)

        def engine_fn(e: Engine, x: torch.Tensor = x) -> Callable[[], None]:
            def fn() -> None:
                e.run("bench", x)
                sync(device)

            return fn

        t = interleaved({"plain": run_plain, "built": engine_fn(built), "cached": engine_fn(cached)}, repeats)
        rows.append(
            {
                "batch": b,
                "plain_s": t["plain"],
                "built_s": t["built"],
                "cached_s": t["cached"],
                "ratio_built": t["plain"] / t["built"],
                "ratio_cached": t["plain"] / t["cached"],
            }
        )
        print(f"  overhead batch {b}: {rows[-1]}", flush=True)
    return rows


# --- 2. mixed-task batches ----------------------------------------------------------------------


def bench_mixed(backbone: Backbone, device: torch.device, dtype: torch.dtype, batch: int, repeats: int):
    tasks = [make_task(backbone, f"t{i}", seed=10 + i) for i in range(8)]
    rows = []
    for cache_bytes in (DEFAULT_CACHE_BYTES, 0):
        engine = Engine(backbone, device=device, dtype=dtype, cache_bytes=cache_bytes)
        for t in tasks:
            engine.add_task(t)
        x = torch.randn(batch, 3, 224, 224).to(device, dtype)
        fns: dict[str, Callable[[], object]] = {}
        for n in (1, 2, 4, 8):
            names = [f"t{i % n}" for i in range(batch)]

            def fn(names: list[str] = names, engine: Engine = engine, x: torch.Tensor = x) -> None:
                engine.run_mixed(x, names)
                sync(device)

            fns[f"T={n}"] = fn
        t = interleaved(fns, repeats)
        for n in (1, 2, 4, 8):
            rows.append(
                {
                    "weights": "cached" if cache_bytes else "built per batch",
                    "tasks": n,
                    "batch": batch,
                    "s": t[f"T={n}"],
                    "ratio": t["T=1"] / t[f"T={n}"],
                }
            )
            print(f"  mixed: {rows[-1]}", flush=True)
    return rows


# --- 3. task density --------------------------------------------------------------------------


def bench_density(backbone: Backbone, device: torch.device, dtype: torch.dtype, counts: list[int]):
    total_params = sum(p.numel() for n, p in backbone.model.state_dict().items() if "num_batches" not in n)
    spec_model = torchvision.models.get_model(backbone.arch, weights=None, num_classes=100)
    model_params = sum(t.numel() for k, t in spec_model.state_dict().items() if "num_batches" not in k)
    fp32_model, fp16_model = model_params * 4, model_params * 2
    del spec_model
    template = make_task(backbone, "x", seed=99)
    rows = []
    for n in counts:
        engine = Engine(backbone, device=device, dtype=dtype, cache_bytes=0)
        gc.collect()
        before = torch.cuda.memory_allocated() if device.type == "cuda" else rss_bytes()
        for i in range(n):
            # Distinct tasks without paying mask generation n times: same masks, own copies.
            task = dataclasses.replace(
                template,
                name=f"t{i:03d}",
                masks={k: v.clone() for k, v in template.masks.items()},
                head_weight=template.head_weight.clone(),
                head_bias=template.head_bias.clone(),
            )
            engine.add_task(task)
        gc.collect()
        after = torch.cuda.memory_allocated() if device.type == "cuda" else rss_bytes()
        resident = engine.resident_mask_bytes / n
        measured = (after - before) / n
        head = template.head_nbytes
        rows.append(
            {
                "tasks": n,
                "resident_bytes_per_task": resident,
                "measured_bytes_per_task": measured,
                "mask_bits_per_backbone_param": (resident - head) * 8 / total_params,
                "bits_per_backbone_param_with_head": resident * 8 / total_params,
                "fp32_model_bytes": fp32_model,
                "fp16_model_bytes": fp16_model,
                "tasks_per_gib": (1 << 30) / resident,
                "fp32_models_per_gib": (1 << 30) / fp32_model,
                "fp16_models_per_gib": (1 << 30) / fp16_model,
            }
        )
        print(f"  density: {rows[-1]}", flush=True)
        del engine
    return rows


# --- 4. cold task -----------------------------------------------------------------------------


def bench_cold(backbone: Backbone, device: torch.device, dtype: torch.dtype, repeats: int):
    from server.registry import TaskRegistry

    blobs = [make_task(backbone, f"cold{i}", seed=200 + i).to_bytes() for i in range(repeats)]
    x = torch.randn(1, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(backbone, device=device, dtype=dtype, cache_bytes=DEFAULT_CACHE_BYTES)
        registry = TaskRegistry(engine, FileSystemStore(tmp))
        registry.register("warmup", make_task(backbone, "warmup", seed=7).to_bytes())
        engine.run("warmup", x)
        cold, warm = [], []
        for i, data in enumerate(blobs):
            t0 = time.perf_counter()
            registry.register(f"cold{i}", data)
            engine.run(f"cold{i}", x)
            sync(device)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.run(f"cold{i}", x)
            sync(device)
            warm.append(time.perf_counter() - t0)
    row = {
        "cold_s": statistics.median(cold),
        "cold_max_s": max(cold),
        "warm_s": statistics.median(warm),
        "file_bytes": len(blobs[0]),
    }
    print(f"  cold: {row}", flush=True)
    return row


# --- 5. end to end over HTTP -----------------------------------------------------------------


def make_photos(out: Path, count: int = 16) -> list[Path]:
    """Real photos (shipped with scikit-learn and scikit-image) as 500x375 JPEGs, quality 90."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    arrays = list(load_sample_images().images)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"):
        try:
            arrays.append(getattr(skdata, name)())
        except Exception:  # a dataset that needs a download (pooch) is skipped
            continue
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        arr = np.asarray(arrays[i % len(arrays)])
        img = Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr).convert("RGB")
        if i >= len(arrays):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # distinct bytes per file
        img = img.resize((500, 375), Image.Resampling.BICUBIC)
        path = out / f"photo{i:02d}.jpg"
        img.save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def start_server(cmd: list[str], url: str, env: dict[str, str], log: Path, timeout_s: float = 600) -> tuple:
    t0 = time.perf_counter()
    handle = open(log, "w")  # noqa: SIM115 - closed in stop_server
    proc = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {' '.join(cmd)}; see {log}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, handle, time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout_s} s: {log}")


def stop_server(proc: subprocess.Popen, handle: Any) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    handle.close()


def load(
    url: str,
    photos: Path,
    tasks: list[str],
    concurrency: int,
    duration: float,
    warmup: float,
    traffic: str = "cycle",
    urls: list[str] | None = None,
    protocol: str = "classify",
) -> dict:
    """One benchmarks.loadgen run in its own process (see there for ``traffic``, ``urls`` and
    ``protocol``)."""
    cmd = [sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--images", str(photos)]
    cmd += ["--tasks", ",".join(tasks), "--concurrency", str(concurrency)]
    cmd += ["--duration", str(duration), "--warmup", str(warmup), "--traffic", traffic, "--protocol", protocol]
    if urls:
        cmd += ["--urls", ",".join(urls)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def bench_offline_loops(backbone: Backbone, tasks: list[TaskFile], photos: list[Path], seconds: float) -> dict:
    """In-process references on the same JPEGs: plain decode + transform + torchvision forward in
    batches of 8, and the engine alone on already decoded images (8 tasks mixed)."""
    from piggyback_core import decode_image

    plain = plain_model(backbone, tasks[0], torch.device("cpu"), torch.float32)
    pre = backbone.preprocessing
    blobs = [p.read_bytes() for p in photos]
    engine = Engine(backbone, cache_bytes=DEFAULT_CACHE_BYTES)
    for t in tasks:
        engine.add_task(t)
    decoded = torch.stack([pre(decode_image(b)) for b in blobs])
    names = [t.name for t in tasks]

    def plain_batch(i: int) -> None:
        x = torch.stack([pre(decode_image(blobs[(i + j) % len(blobs)])) for j in range(8)])
        with torch.inference_mode():
            plain(x)

    def engine_batch(i: int) -> None:
        idx = [(i + j) % len(blobs) for j in range(8)]
        engine.run_mixed(decoded[idx], [names[(i + j) % len(names)] for j in range(8)])

    out = {}
    for label, fn in (("plain_decode_forward_b8", plain_batch), ("engine_only_b8_mixed8", engine_batch)):
        fn(0)
        n, t0, i = 0, time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            fn(i)
            n += 8
            i += 8
        out[label] = n / (time.perf_counter() - t0)
        print(f"  {label}: {out[label]:.2f} img/s", flush=True)
    return out


def bench_http(
    backbone: Backbone,
    arch: str,
    concurrencies: list[int],
    duration: float,
    warmup: float,
    work: Path,
    server_args: list[str],
    baseline: bool = True,
):
    photos_dir = work / "photos"
    photos = make_photos(photos_dir)
    tasks = [make_task(backbone, f"task{i}", seed=300 + i) for i in range(8)]
    names = [t.name for t in tasks]
    offline = bench_offline_loops(backbone, tasks, photos, seconds=max(10.0, duration))

    results: dict[str, Any] = {"offline": offline, "servers": {}}
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    fs = FileSystemStore(store)
    for t in tasks:
        fs.put(t.name, t.to_bytes())
    token = secrets.token_hex(16)
    env = {**os.environ, "PIGGYBACK_TOKEN": token}
    servers = {
        "piggyback": (
            [sys.executable, "-m", "server.cli", "serve", "--backbone", arch, "--weights", "random",
             "--store", str(store), "--port", "8701", "--log-level", "warning", *server_args],
            "http://127.0.0.1:8701",
        ),
        "model_per_task": (
            [sys.executable, "-m", "benchmarks.model_per_task_server", "--arch", arch, "--tasks", "8",
             "--port", "8702"],
            "http://127.0.0.1:8702",
        ),
    }  # fmt: skip
    baseline_names = [f"task{i}" for i in range(8)]
    if not baseline:
        del servers["model_per_task"]
    for label, (cmd, url) in servers.items():
        proc, handle, ready_s = start_server(cmd, url, env, work / f"{label}.log")
        rows = []
        try:
            for c in concurrencies:
                row = load(url, photos_dir, names if label == "piggyback" else baseline_names, c, duration, warmup)
                rows.append(row)
                print(f"  {label} c={c}: {row}", flush=True)
            peak = peak_rss_bytes(proc.pid)
        finally:
            stop_server(proc, handle)
        results["servers"][label] = {"startup_s": ready_s, "peak_rss_bytes": peak, "load": rows}
    return results


# --- report -----------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu} ({cpu_bf16_isa()}), {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{gpu}")  # fmt: skip


def write_results(name: str, lines: list[str], record: dict[str, Any]) -> None:
    """``benchmarks/results/NAME.md`` (the table ``lines``) and ``NAME.json`` (``record`` and the
    machine), and the table on stdout."""
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    (results / f"{name}.json").write_text(json.dumps({"machine": machine(), **record}, indent=2))
    print("\n".join(lines))


def to_markdown(r: dict[str, Any]) -> str:
    mb = 1e6
    lines = [f"# Serving benchmarks ({r['arch']}, {r['device']}, {r['dtype']})", "", f"Machine: {r['machine']}.", ""]
    lines += ["## 1. Mask overhead (throughput ratio masked / plain torchvision; target >= 0.95 CPU, 0.98 GPU)", ""]
    lines += ["| batch | plain s | built per batch s | ratio | cached s | ratio |", "|---|---|---|---|---|---|"]
    for o in r["overhead"]:
        lines.append(
            f"| {o['batch']} | {o['plain_s']:.4f} | {o['built_s']:.4f} | {o['ratio_built']:.3f} "
            f"| {o['cached_s']:.4f} | {o['ratio_cached']:.3f} |"
        )
    lines += ["", "## 2. Mixed-task batches (ratio to the same batch for one task; target >= 0.9 at T = 8)", ""]
    lines += ["| weights | batch | tasks T | s/batch | ratio |", "| --- | --- | --- | --- | --- |"]
    for m in r["mixed"]:
        lines.append(f"| {m['weights']} | {m['batch']} | {m['tasks']} | {m['s']:.4f} | {m['ratio']:.3f} |")
    lines += ["", "## 3. Task density (target <= 1.05 bits per backbone parameter plus the head)", ""]
    lines += [
        "| tasks resident | bytes per task (held) | measured per task | mask bits / backbone param "
        "| with head | tasks per GiB | fp32 models per GiB | fp16 models per GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in r["density"]:
        lines.append(
            f"| {d['tasks']} | {d['resident_bytes_per_task'] / mb:.2f} MB | {d['measured_bytes_per_task'] / mb:.2f} MB "
            f"| {d['mask_bits_per_backbone_param']:.3f} | {d['bits_per_backbone_param_with_head']:.3f} "
            f"| {d['tasks_per_gib']:.0f} | {d['fp32_models_per_gib']:.1f} | {d['fp16_models_per_gib']:.1f} |"
        )
    c = r["cold"]
    lines += ["", "## 4. Cold task (PUT bytes to first prediction; target < 1 s for resnet50 on CPU)", ""]
    lines += [
        f"Cold (validate, store with fsync, load, first batch-1 prediction with weights built): "
        f"median {c['cold_s']:.3f} s, worst {c['cold_max_s']:.3f} s; warm request {c['warm_s']:.3f} s "
        f"(cold / warm = {c['cold_s'] / c['warm_s']:.1f}); task file {c['file_bytes'] / mb:.2f} MB.",
    ]
    if "http" in r:
        h = r["http"]
        off = h["offline"]
        lines += ["", "## 5. End to end over HTTP (8 tasks mixed, 500x375 JPEGs, closed loop)", ""]
        lines += [
            f"In-process references on the same JPEGs: plain decode + transform + torchvision forward, batches "
            f"of 8: **{off['plain_decode_forward_b8']:.2f} img/s**; engine alone on decoded images, 8 tasks mixed, "
            f"batches of 8: {off['engine_only_b8_mixed8']:.2f} img/s.",
            "",
            "| server | clients | img/s | vs plain loop | p50 ms | p95 ms | p99 ms | statuses |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for label, s in h["servers"].items():
            for row in s["load"]:
                lines.append(
                    f"| {label} | {row['concurrency']} | {row['throughput']:.2f} "
                    f"| {row['throughput'] / off['plain_decode_forward_b8']:.3f} | {row['p50_ms']:.0f} "
                    f"| {row['p95_ms']:.0f} | {row['p99_ms']:.0f} | {row['statuses']} |"
                )
        lines += ["", "## 6. Startup and peak memory", "", "| server | startup to ready | peak RSS |", "|---|---|---|"]
        for label, s in h["servers"].items():
            lines.append(f"| {label} | {s['startup_s']:.1f} s | {s['peak_rss_bytes'] / 2**20:.0f} MiB |")
    peak = r["peak_rss_bytes"] / 2**20
    lines += ["", f"Benchmark process peak RSS: {peak:.0f} MiB; total time {r['total_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    if "http" in r:
        h = r["http"]
        for label, s in h["servers"].items():
            cs = [row["concurrency"] for row in s["load"]]
            axes[0].plot(cs, [row["throughput"] for row in s["load"]], marker="o", label=label)
            axes[1].plot(cs, [row["p50_ms"] for row in s["load"]], marker="o", label=f"{label} p50")
            axes[1].plot(cs, [row["p99_ms"] for row in s["load"]], marker="x", linestyle="--", label=f"{label} p99")
        axes[0].axhline(h["offline"]["plain_decode_forward_b8"], color="grey", linestyle=":", label="plain loop, b8")
        for ax, title, ylabel in ((axes[0], "throughput", "images/s"), (axes[1], "latency", "ms")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title} ({r['arch']}, {r['device']}, 8 tasks)")
            ax.legend(fontsize=8)
        axes[1].set_yscale("log")
    counts = [d["tasks"] for d in r["density"]]
    per_task = r["density"][0]["resident_bytes_per_task"]
    axes[2].plot(counts, [n * per_task / 2**30 for n in counts], marker="o", label="piggyback (masks + heads)")
    for key, label in (("fp32_model_bytes", "fp32 model per task"), ("fp16_model_bytes", "fp16 model per task")):
        axes[2].plot(counts, [n * r["density"][0][key] / 2**30 for n in counts], marker="o", label=label)
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("tasks resident")
    axes[2].set_ylabel("GiB (beyond one shared backbone)")
    axes[2].set_title("memory against number of tasks")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per concurrency level")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--http-only", action="store_true", help="only part 5 (and 6)")
    parser.add_argument("--server-args", default="", help="extra 'piggyback serve' flags for part 5")
    parser.add_argument("--quick", action="store_true", help="few repeats, short loads (a smoke run)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.duration, args.concurrency = 2, 3.0, "1,8"
    t0 = time.perf_counter()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backbone = load_backbone(args.arch, weights="random", seed=0)
    r: dict[str, Any] = {"arch": args.arch, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
                         "machine": machine()}  # fmt: skip
    batches = [1, 8, 32] if device.type == "cuda" else [1, 8]
    if not args.http_only:
        # Density first, on a fresh heap: its RSS deltas would otherwise hide in memory freed earlier.
        print("3. task density", flush=True)
        r["density"] = bench_density(backbone, device, dtype, [1, 10, 100] if not args.quick else [1, 10])
        print("1. mask overhead", flush=True)
        r["overhead"] = bench_overhead(backbone, device, dtype, batches, args.repeats)
        print("2. mixed-task batches", flush=True)
        r["mixed"] = bench_mixed(backbone, device, dtype, 32 if device.type == "cuda" else 8, args.repeats)
        print("4. cold task", flush=True)
        r["cold"] = bench_cold(backbone, device, dtype, 5 if not args.quick else 2)
    if not args.skip_http:
        print("5. end to end over HTTP", flush=True)
        with tempfile.TemporaryDirectory() as work:
            concurrencies = [int(c) for c in args.concurrency.split(",")]
            r["http"] = bench_http(
                backbone, args.arch, concurrencies, args.duration, 3.0, Path(work),
                # the server in the dtype of the baselines (benchmarks.compute compares dtypes)
                ["--dtype", r["dtype"], "--layout", "contiguous", *args.server_args.split()],
                baseline=not args.http_only,
            )  # fmt: skip
    if args.http_only:
        print(json.dumps(r.get("http"), indent=1))
        return
    r["peak_rss_bytes"] = peak_rss_bytes()
    r["total_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    (out / f"serving{suffix}.json").write_text(json.dumps(r, indent=2))
    markdown = to_markdown(r)
    (out / f"serving{suffix}.md").write_text(markdown)
    plot(r, out / f"serving{suffix}.png")
    print(markdown)


if __name__ == "__main__":
    main()
