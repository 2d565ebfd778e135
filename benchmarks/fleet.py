"""The fleet, simulated: which routing in front of many replicas keeps each task's built weights
in few places, and what it costs in latency and balance.

    python -m benchmarks.fleet --measure   # per-request costs on this machine (about 10 s)
    python -m benchmarks.fleet             # the simulation (minutes, one core)
    python -m benchmarks.fleet --quick     # a small run (the test's)

A plain Kubernetes Service spreads each task's requests over every replica, so every replica keeps
the hot tasks' built weights and the fleet caches no more tasks than one replica does. Routing by
task keeps each task on few replicas. This discrete-event simulation (benchmarks.fleet_sim: the
server's batcher, the engine's WeightCache, costs measured through the engine by
benchmarks.fleet_costs) compares, for 10,000 tasks with Zipf popularity (s = 0.8, 1.0, 1.2) on
10, 30 and 100 replicas, Poisson arrivals at ``--load`` of the fleet's capacity (every request a
hit, in a segment of its own: with thousands of tasks, a batch's requests are mostly of different
tasks):

* ``random``: a Kubernetes Service;
* ``ring hash``: Envoy's ring_hash on the task (1,024 ring points);
* ``ray (N)``: Ray Serve's own router (``serve_multiplexed_model_id``), run in the simulation
  (benchmarks.fleet_ray), with ``max_ongoing_requests = N`` per replica (``--ray-max-ongoing``:
  16 and 64; it decides when a task spills off the replicas that hold it);
* ``bounded load``: consistent hashing with bounded loads, ``c = --balance`` (1.25).

And, on 10 replicas at s = 1.0, three events at the end of the warm-up: a scale-out to 11 replicas,
a rolling restart (each replica in turn out for ``--restart-s``, back with a cold cache), one cold
task jumping to 30% of the traffic.

Reported over the requests after the warm-up: the hit rate (requests whose task's weights were
resident), p50/p99 latency of the served requests, the failed share (503: a full queue; 504: past
the deadline), max/mean requests served per replica, and copies per hot task (replicas holding a
top-1% task's weights, sampled ten times). Writes benchmarks/results/fleet.{md,json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fleet_costs import fake_costs, measure
from benchmarks.fleet_sim import (
    BoundedLoadRouting,
    Costs,
    Fleet,
    RandomRouting,
    Request,
    RingHashRouting,
    Routing,
    VirtualLoop,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COSTS = RESULTS / "fleet-costs.json"
ROUTINGS = ["random", "ring hash", "ray", "bounded load"]
EVENTS = ["scale 10->11", "rolling restart", "hot task 30%"]


def make_routing(name: str, fleet: Fleet, rng: random.Random, args: argparse.Namespace) -> Routing:
    if name == "random":
        return RandomRouting(fleet, rng)
    if name == "ring hash":
        return RingHashRouting(fleet, rng)
    if name == "bounded load":
        return BoundedLoadRouting(fleet, rng, c=args.balance)
    if name.startswith("ray ("):  # "ray (16)": max_ongoing_requests 16
        from benchmarks.fleet_ray import RayMultiplexedRouting  # ray is heavy, and optional

        return RayMultiplexedRouting(fleet, rng, max_ongoing_requests=int(name[5:-1]))
    raise ValueError(f"unknown routing {name!r}; expected one of {', '.join(ROUTINGS)}")


def expand(routings: list[str], ray_max_ongoing: list[int]) -> list[str]:
    """``ray`` as one routing per max_ongoing_requests: ``ray (16)``, ``ray (64)``."""
    out: list[str] = []
    for name in routings:
        out += [f"ray ({n})" for n in ray_max_ongoing] if name == "ray" else [name]
    return out


def workload(
    tasks: int, s: float, rate: float, count: int, seed: int, hot: tuple[int, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times (Poisson at ``rate``) and tasks (Zipf ``s`` over ranks 0..tasks-1); with
    ``hot = (first, share)``, each request from index ``first`` on is task ``tasks // 2`` (a cold
    one) with probability ``share``."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, count))
    p = 1.0 / np.arange(1, tasks + 1) ** s
    picks = np.searchsorted(np.cumsum(p / p.sum()), rng.random(count), side="right").clip(0, tasks - 1)
    if hot is not None:
        first, share = hot
        jump = rng.random(count) < share
        jump[:first] = False
        picks[jump] = tasks // 2
    return times, picks


def simulate(
    costs: Costs, routing: str, replicas: int, s: float, args: argparse.Namespace, event: str | None = None
) -> dict[str, Any]:
    """One run: ``args.requests`` arrivals of which the first ``args.warmup`` warm the caches."""
    count, warmup = args.requests, args.warmup
    capacity = replicas / costs.batch_s[0]  # every request a hit, in a segment of its own
    seed = args.seed
    hot = (warmup, 0.3) if event == "hot task 30%" else None
    times, picks = workload(args.tasks, s, args.load * capacity, count, seed, hot)
    loop = VirtualLoop()
    asyncio.set_event_loop(loop)
    fleet = Fleet(loop, costs, replicas, cache_bytes=args.cache_bytes, timeout_s=args.timeout_s)
    random.seed(seed)  # Ray's router draws from the random module
    fleet.routing = make_routing(routing, fleet, random.Random(seed), args)
    requests: list[Request] = []
    hot_tasks = range(max(1, args.tasks // 100))
    copies: list[float] = []
    jumper: list[int] = []  # replicas holding the task that jumps (hot task event)
    event_s = float(times[warmup])

    def arrive(i: int) -> None:
        req = Request(int(picks[i]), loop.time(), loop.time() + fleet.timeout_s, measured=i >= warmup)
        requests.append(req)
        fleet.arrive(req)
        if i + 1 < count:
            loop.call_at(float(times[i + 1]), arrive, i + 1)
        else:
            fleet.all_arrived = True

    def sample_copies() -> None:
        held = [r.resident() for r in fleet.up]
        copies.append(float(np.mean([sum(t in h for h in held) for t in hot_tasks])))
        jumper.append(sum(args.tasks // 2 in h for h in held))

    def restart(i: int) -> None:
        if i == len(fleet.replicas):
            return
        fleet.replicas[i].up = False
        fleet.refresh_up()

        def back() -> None:
            fleet.replicas[i].restart()
            fleet.refresh_up()
            restart(i + 1)

        loop.call_later(args.restart_s, back)

    async def main() -> None:
        fleet.routing.begin()
        loop.call_at(float(times[0]), arrive, 0)
        for k in range(10):
            loop.call_at(float(times[warmup + (count - warmup) * k // 10]), sample_copies)
        if event == "scale 10->11":
            loop.call_at(event_s, fleet.add_replica)
        elif event == "rolling restart":
            loop.call_at(event_s, restart, 0)
        await fleet.drained

    t0 = time.perf_counter()
    try:
        loop.run_until_complete(main())
    finally:
        fleet.routing.end()
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
        asyncio.set_event_loop(None)
    measured = [r for r in requests if r.measured]
    served = [r for r in measured if r.status == 200]
    latency = np.array([r.done_at - r.arrived for r in served]) * 1e3
    loads = np.array([r.served for r in fleet.replicas], dtype=float)
    row = {
        "routing": routing,
        "replicas": replicas,
        "zipf": s,
        "event": event,
        "requests": len(measured),
        "hit_rate": float(np.mean([r.hit for r in served])) if served else 0.0,
        "p50_ms": float(np.percentile(latency, 50)) if served else float("nan"),
        "p99_ms": float(np.percentile(latency, 99)) if served else float("nan"),
        "failed": 1 - len(served) / len(measured),
        "max_mean_load": float(loads.max() / loads.mean()) if loads.sum() else float("nan"),
        "copies": float(np.mean(copies)),
        "jumper_copies": float(np.mean(jumper)) if hot is not None else None,
        "sim_s": float(times[-1]),
        "wall_s": time.perf_counter() - t0,
    }
    if event is not None:
        row["timeline"] = timeline(requests, event_s, float(times[-1]))
    return row


def timeline(requests: list[Request], event_s: float, end_s: float, bins: int = 30) -> dict[str, list[float]]:
    """Hit rate and p99 of the served requests in equal windows of arrival time from a little
    before the event to the end (time relative to the event)."""
    served = [r for r in requests if r.status == 200]
    arrived = np.array([r.arrived for r in served])
    hit = np.array([r.hit for r in served], dtype=float)
    latency = np.array([r.done_at - r.arrived for r in served]) * 1e3
    edges = np.linspace(max(0.0, event_s - (end_s - event_s) / 4), end_s, bins + 1)
    which = np.digitize(arrived, edges) - 1
    out: dict[str, list[float]] = {"t_s": [], "hit_rate": [], "p99_ms": []}
    for k in range(bins):
        inside = which == k
        out["t_s"].append(float((edges[k] + edges[k + 1]) / 2 - event_s))
        out["hit_rate"].append(float(hit[inside].mean()) if inside.any() else float("nan"))
        out["p99_ms"].append(float(np.percentile(latency[inside], 99)) if inside.any() else float("nan"))
    return out


def to_markdown(record: dict[str, Any]) -> list[str]:
    a = record["costs"]
    per_image = ", ".join(f"{s / b * 1e3:.1f}" for b, s in enumerate(a["batch_s"], 1))
    cfg = record["config"]
    lines = [
        f"# The fleet, simulated: {cfg['tasks']:,} tasks, {a['arch']}",
        "",
        f"Costs measured on {record['costs_machine']} ({a['dtype']}, {a['cpu_path']} path, {a['threads']} threads): "
        f"a hit costs {per_image} ms per image at batch 1..{len(a['batch_s'])}; a miss adds "
        f"{a['build_s'] * 1e3:.1f} ms (the task's weights built) to its segment; "
        f"{a['weights_nbytes'] / 2**20:.0f} MiB per task in a cache of {cfg['cache_bytes'] / 2**30:.1f} GiB "
        f"({cfg['cache_bytes'] // a['weights_nbytes']} tasks) per replica. Poisson arrivals at {cfg['load']} of the "
        f"fleet's capacity (every request a hit at batch 1); {cfg['requests']:,} requests per run, "
        f"the first {cfg['warmup']:,} a warm-up; "
        f"queue {cfg['queue_size']} per replica, deadline {cfg['timeout_s']:.0f} s; Ray: max_ongoing_requests "
        f"{' and '.join(map(str, cfg['ray_max_ongoing']))} (ray (N)); bounded load: c = {cfg['balance']}. "
        f"Seed {cfg['seed']}.",
        "",
        "hit: requests served from resident weights; failed: 503 (queue full) or 504 (deadline); load: requests "
        "served per replica, max / mean; copies: replicas holding a top-1% task's weights (mean).",
        "",
        "| Zipf s | replicas | routing | hit rate | p50 ms | p99 ms | failed | max/mean load | copies per hot task |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in record["grid"]:
        lines.append(
            f"| {r['zipf']} | {r['replicas']} | {r['routing']} | {r['hit_rate']:.3f} | {r['p50_ms']:.0f} "
            f"| {r['p99_ms']:.0f} | {r['failed']:.3f} | {r['max_mean_load']:.2f} | {r['copies']:.1f} |"
        )
    lines += [
        "",
        f"## Events ({cfg['event_replicas']} replicas, Zipf {cfg['event_zipf']}, from the end of the warm-up)",
        "",
        "| event | routing | hit rate | p50 ms | p99 ms | failed | max/mean load | copies per hot task "
        "| jumping task's copies |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in record["events"]:
        jumper = "-" if r["jumper_copies"] is None else f"{r['jumper_copies']:.1f}"
        lines.append(
            f"| {r['event']} | {r['routing']} | {r['hit_rate']:.3f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {r['failed']:.3f} | {r['max_mean_load']:.2f} | {r['copies']:.1f} | {jumper} |"
        )
    return lines


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zipfs = sorted({r["zipf"] for r in record["grid"]})
    routings = list(dict.fromkeys(r["routing"] for r in record["grid"]))
    cols = max(len(zipfs), len(EVENTS))
    fig, axes = plt.subplots(4, cols, figsize=(4.2 * cols, 13), squeeze=False)
    for j, s in enumerate(zipfs):
        for name in routings:
            rows = [r for r in record["grid"] if r["zipf"] == s and r["routing"] == name]
            x = [r["replicas"] for r in rows]
            axes[0][j].plot(x, [r["hit_rate"] for r in rows], marker="o", label=name)
            axes[1][j].plot(x, [r["p99_ms"] for r in rows], marker="o", label=name)
        axes[0][j].set_title(f"Zipf s = {s}: hit rate")
        axes[1][j].set_title(f"Zipf s = {s}: p99 ms (served)")
        for i in (0, 1):
            axes[i][j].set_xscale("log")
            axes[i][j].set_xlabel("replicas")
        axes[1][j].set_yscale("log")
    for j, event in enumerate(EVENTS):
        for name in routings:
            rows = [r for r in record["events"] if r["event"] == event and r["routing"] == name]
            if rows:
                t = rows[0]["timeline"]
                axes[2][j].plot(t["t_s"], t["hit_rate"], label=name)
                axes[3][j].plot(t["t_s"], t["p99_ms"], label=name)
        axes[2][j].set_title(f"{event}: hit rate")
        axes[3][j].set_title(f"{event}: p99 ms (served)")
        axes[3][j].set_yscale("log")
        for i in (2, 3):
            axes[i][j].axvline(0, color="grey", lw=0.8)
            axes[i][j].set_xlabel("seconds from the event")
    for row in axes:
        for ax in row[len(zipfs) :] if row is axes[0] or row is axes[1] else []:
            ax.set_visible(False)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="measure the per-request costs into --costs and stop")
    parser.add_argument("--costs", type=Path, default=COSTS, help="the costs JSON (from --measure)")
    parser.add_argument("--fake-costs", action="store_true", help="round made-up costs (tests)")
    parser.add_argument("--arch", default="resnet50", help="whose costs to simulate")
    parser.add_argument("--quick", action="store_true", help="a small run: 2,000 tasks, 4 and 8 replicas, s = 1.0")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--zipf", type=float, action="append", help="Zipf exponents (default 0.8, 1.0, 1.2)")
    parser.add_argument("--replicas", type=int, action="append", help="fleet sizes (default 10, 30, 100)")
    parser.add_argument("--routing", action="append", choices=ROUTINGS, help="routings (default all)")
    parser.add_argument("--requests", type=int, default=100_000, help="arrivals per run")
    parser.add_argument("--warmup", type=int, default=40_000, help="arrivals that warm the caches, not reported")
    parser.add_argument("--event-requests", type=int, default=150_000, help="arrivals per event run")
    parser.add_argument("--event-warmup", type=int, default=50_000)
    parser.add_argument("--load", type=float, default=0.7, help="arrival rate / capacity (all hits, batch 1)")
    parser.add_argument(
        "--cache-gib",
        type=float,
        default=8.0,
        help="each replica's weight cache: cache_bytes=auto gives half the memory available at "
        "start, 8 GiB of the deployment's 16 GiB limit",
    )
    parser.add_argument("--timeout-s", type=float, default=30.0, help="request deadline (request_timeout_s)")
    parser.add_argument("--restart-s", type=float, default=10.0, help="a replica's time out in a rolling restart")
    parser.add_argument("--balance", type=float, default=1.25, help="bounded load's c")
    parser.add_argument(
        "--ray-max-ongoing",
        type=int,
        action="append",
        help="Ray's max_ongoing_requests per replica, one ray routing each (default 16 and 64; Ray's own default, "
        "5, is under one batch of 8)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.requests, args.warmup = 2_000, 8_000, 3_000
        args.event_requests, args.event_warmup = 10_000, 4_000
        args.zipf, args.replicas = args.zipf or [1.0], args.replicas or [4, 8]
    if args.fake_costs:
        args.costs_record, args.arch = fake_costs(), "fake"
    elif args.costs.exists():
        args.costs_record = json.loads(args.costs.read_text())
    elif not args.measure:
        parser.error(f"no costs at {args.costs}: run python -m benchmarks.fleet --measure first (or --fake-costs)")
    args.cache_bytes = int(args.cache_gib * 2**30)
    args.ray_max_ongoing = args.ray_max_ongoing or [16, 64]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.measure:
        args.costs.parent.mkdir(parents=True, exist_ok=True)
        args.costs.write_text(json.dumps(measure(["resnet18", "resnet50"], repeats=7), indent=2))
        print(f"wrote {args.costs}")
        return
    arch = args.costs_record["archs"][args.arch]
    costs = Costs.of(arch)
    routings = expand(args.routing or ROUTINGS, args.ray_max_ongoing)
    skip = ("routing", "costs_record")
    config = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | list) and k not in skip}
    config |= {"event_replicas": 4 if args.quick else 10, "event_zipf": 1.0, "queue_size": 256}
    record: dict[str, Any] = {"costs_machine": args.costs_record["machine"], "costs": arch, "config": config}
    record["grid"] = []
    for s in args.zipf or [0.8, 1.0, 1.2]:
        for n in args.replicas or [10, 30, 100]:
            for name in routings:
                row = simulate(costs, name, n, s, args)
                record["grid"].append(row)
                print(
                    f"  s={s} replicas={n} {name}: hit {row['hit_rate']:.3f}, p50 {row['p50_ms']:.0f} ms, "
                    f"p99 {row['p99_ms']:.0f} ms, failed {row['failed']:.3f}, load {row['max_mean_load']:.2f}, "
                    f"copies {row['copies']:.1f} ({row['wall_s']:.1f} s)",
                    flush=True,
                )
    record["events"] = []
    event_args = argparse.Namespace(**{**vars(args), "requests": args.event_requests, "warmup": args.event_warmup})
    for event in EVENTS:
        for name in routings:
            row = simulate(costs, name, config["event_replicas"], config["event_zipf"], event_args, event)
            record["events"].append(row)
            print(
                f"  {event} {name}: hit {row['hit_rate']:.3f}, p99 {row['p99_ms']:.0f} ms, failed "
                f"{row['failed']:.3f}, load {row['max_mean_load']:.2f} ({row['wall_s']:.1f} s)",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    lines = to_markdown(record)
    (args.out / "fleet.md").write_text("\n".join(lines) + "\n")
    (args.out / "fleet.json").write_text(json.dumps(record, indent=2))
    print("\n".join(lines))
    try:
        plot(record, args.out / "fleet.png")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
