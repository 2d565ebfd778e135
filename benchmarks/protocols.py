"""The protocol's cost: the same server, task and JPEGs over ``/classify`` and over the Open
Inference Protocol (``/v2``, binary tensor data as tritonclient sends it, and JSON with base64).

    python -m benchmarks.protocols [--arch resnet18] [--clients 8] [--duration 10] [--rounds 2]

One server (``piggyback serve``, seeded random weights, its default dtype), one task, 500x375
photos; closed-loop HTTP clients (``benchmarks.loadgen``), the protocols interleaved round by round.
Writes ``benchmarks/results/protocols.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.serving import load, machine, make_photos, make_task, start_server, stop_server, write_results
from piggyback_core import FileSystemStore, load_backbone

PROTOCOLS = ["classify", "v2", "v2-json"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = work / "photos"
        make_photos(photos)
        backbone = load_backbone(args.arch, weights="random", seed=0)
        FileSystemStore(work / "store").put("t", make_task(backbone, "t", seed=1).to_bytes())
        url = "http://127.0.0.1:8741"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--backbone", args.arch, "--weights", "random",
               "--store", str(work / "store"), "--port", "8741", "--log-level", "warning"]  # fmt: skip
        env = {**os.environ, "PIGGYBACK_TOKEN": secrets.token_hex(16)}
        proc, handle, _ = start_server(cmd, url, env, work / "server.log")
        runs: dict[str, list[dict]] = {p: [] for p in PROTOCOLS}
        try:
            for _ in range(args.rounds):
                for protocol in PROTOCOLS:
                    r = load(url, photos, ["t"], args.clients, args.duration, 3.0, protocol=protocol)
                    assert set(r["statuses"]) == {"200"}, (protocol, r["statuses"])
                    runs[protocol].append(r)
                    print(protocol, f"{r['throughput']:.1f} img/s", flush=True)
        finally:
            stop_server(proc, handle)
    base = statistics.median(r["throughput"] for r in runs["classify"])
    lines = [
        f"# Protocols: {args.arch}, one task, {args.clients} clients, 500x375 JPEGs; {machine()}",
        "",
        f"Median of {args.rounds} interleaved rounds of {args.duration:g} s each; `ratio`: img/s against `/classify`.",
        "",
        "| protocol | img/s | ratio | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for protocol, rs in runs.items():
        tput = statistics.median(r["throughput"] for r in rs)
        p50 = statistics.median(r["p50_ms"] for r in rs)
        p99 = statistics.median(r["p99_ms"] for r in rs)
        lines.append(f"| {protocol} | {tput:.1f} | {tput / base:.2f} | {p50:.0f} | {p99:.0f} |")
    write_results("protocols", lines, {"machine": machine(), "args": vars(args), "runs": runs})


if __name__ == "__main__":
    main()
