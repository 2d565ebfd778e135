"""The fleet simulation (benchmarks.fleet) at toy size with made-up costs: properties of the
routings that a wrong simulation would break."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.fleet import main, parse_args, simulate
from benchmarks.fleet_sim import Costs

QUICK = ["--quick", "--fake-costs"]


@pytest.fixture(scope="module")
def args():
    return parse_args(QUICK)


@pytest.fixture(scope="module")
def costs(args):
    return Costs.of(args.costs_record["archs"]["fake"])


@pytest.fixture(scope="module")
def grid(args, costs):
    """Each plain routing on 8 replicas, Zipf 1.0."""
    return {name: simulate(costs, name, 8, 1.0, args) for name in ("random", "ring hash", "bounded load")}


def test_ring_hash_keeps_each_task_on_one_replica(grid) -> None:
    assert grid["ring hash"]["copies"] <= 1.05


def test_random_routing_copies_hot_tasks_onto_most_replicas(grid) -> None:
    assert grid["random"]["copies"] >= 0.6 * 8


def test_routing_by_task_hits_more_than_random(grid) -> None:
    for name in ("ring hash", "bounded load"):
        assert grid[name]["hit_rate"] > grid["random"]["hit_rate"] + 0.1, name


def test_bounded_load_spreads_a_task_that_takes_30_percent_of_traffic(args, costs) -> None:
    event = parse_args([*QUICK, "--requests", str(args.event_requests), "--warmup", str(args.event_warmup)])
    ring = simulate(costs, "ring hash", 4, 1.0, event, "hot task 30%")
    bounded = simulate(costs, "bounded load", 4, 1.0, event, "hot task 30%")
    assert ring["jumper_copies"] <= 1.05  # one replica takes the 30%
    assert bounded["jumper_copies"] > 1.5  # spilled onto the next replicas on the ring
    assert bounded["max_mean_load"] <= args.balance + 0.1
    assert ring["max_mean_load"] > bounded["max_mean_load"]


def test_a_run_is_deterministic(args, costs, grid) -> None:
    again = simulate(costs, "bounded load", 8, 1.0, args)
    for key in ("hit_rate", "p50_ms", "p99_ms", "failed", "max_mean_load", "copies"):
        assert again[key] == grid["bounded load"][key], key


def test_ray_multiplexed_routing_prefers_replicas_holding_the_task(args, costs, grid) -> None:
    pytest.importorskip("ray.serve")
    ray = simulate(costs, "ray (64)", 8, 1.0, args)
    assert ray["requests"] == args.requests - args.warmup
    assert ray["hit_rate"] > grid["random"]["hit_rate"] + 0.1
    assert ray["copies"] < 0.5 * grid["random"]["copies"]


def test_quick_run_writes_its_table_json_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    main([*QUICK, "--out", str(tmp_path), "--routing", "random", "--routing", "ring hash", "--replicas", "4"])
    table = (tmp_path / "fleet.md").read_text()
    assert "| 1.0 | 4 | ring hash |" in table and "| hot task 30% | random |" in table
    record = json.loads((tmp_path / "fleet.json").read_text())
    assert len(record["grid"]) == 2 and len(record["events"]) == 6
    assert (tmp_path / "fleet.png").stat().st_size > 10_000
