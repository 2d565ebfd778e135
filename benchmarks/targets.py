"""The CPU targets, met or not: read from the results that ``benchmarks.packed`` and
``benchmarks.http`` wrote (``benchmarks/results/{packed,http}.json``), with the machine each came
from. ``make cpu-check`` runs both and then this; run it on the machine the targets are for (a
2-core Xeon with AMX) and paste its table.

    python -m benchmarks.targets [--results benchmarks/results]

The targets (engine, one task, against OpenVINO bf16 in the same run; a fully mixed batch of 8
tasks against a single-task batch; HTTP with wrk against the plain fp32 decode+forward loop of the
same run):

* engine / OpenVINO >= 0.8 at batch 8 and >= 0.7 at batch 1 (resnet50 and resnet18);
* mixed 8 / single 8 cost <= 1.5;
* HTTP, one task, 8 clients: >= 3x the plain fp32 loop;
* HTTP, 512 tasks, 16 clients: Zipf >= 0.65 of one task; uniform >= 1.8x the plain fp32 loop.

Exits 0 when every target found is met, 1 when one is not, 2 when results are missing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Check:
    target: str
    value: float
    goal: float
    at_least: bool  # else at most
    machine: str

    @property
    def met(self) -> bool:
        return self.value >= self.goal if self.at_least else self.value <= self.goal


def _engine(packed: dict[str, Any]) -> list[Check]:
    out = []
    for row in packed["rows"]:
        ov = row.get("openvino")
        if isinstance(ov, (int, float)) and ov > 0:
            goal = 0.8 if row["batch"] >= 8 else 0.7
            out.append(Check(f"engine / OpenVINO, {row['arch']} batch {row['batch']} {row['dtype']}",
                             row["packed"] / ov, goal, True, packed["machine"]))  # fmt: skip
        if row.get("mixed8"):
            out.append(Check(f"mixed 8 tasks / single task, {row['arch']} batch 8 (cost)",
                             row["packed"] / row["mixed8"], 1.5, False, packed["machine"]))  # fmt: skip
    return out


def _http(http: dict[str, Any]) -> list[Check]:
    rows = [r for r in http["rows"] if r.get("server", "defaults") == "defaults"]
    plain = http["plain_fp32"]
    one = {r["clients"]: r["img_s"] for r in rows if r["tasks"] == 1}
    out = []
    for r in rows:
        if r["tasks"] == 1 and r["clients"] == 8:
            out.append(Check("HTTP one task, 8 clients / plain fp32 loop", r["img_s"] / plain, 3.0, True,
                             http["machine"]))  # fmt: skip
        if r["tasks"] == 512 and r["clients"] == 16 and r["traffic"] == "zipf" and 16 in one:
            out.append(Check("HTTP 512 tasks Zipf, 16 clients / one task", r["img_s"] / one[16], 0.65, True,
                             http["machine"]))  # fmt: skip
        if r["tasks"] == 512 and r["clients"] == 16 and r["traffic"] == "uniform":
            out.append(Check("HTTP 512 tasks uniform, 16 clients / plain fp32 loop", r["img_s"] / plain, 1.8, True,
                             http["machine"]))  # fmt: skip
    return out


def checks(results: Path = RESULTS) -> tuple[list[Check], list[str]]:
    """The checks found, and the result files that were missing."""
    found: list[Check] = []
    missing = []
    for name, read in (("packed", _engine), ("http", _http)):
        path = results / f"{name}.json"
        if not path.exists():
            missing.append(str(path))
            continue
        found += read(json.loads(path.read_text()))
    return found, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    found, missing = checks(args.results)
    machines = sorted({c.machine for c in found})
    print("| target | measured | goal | met |")
    print("| --- | --- | --- | --- |")
    for c in found:
        sign = ">=" if c.at_least else "<="
        tag = f" [{machines.index(c.machine) + 1}]" if len(machines) > 1 else ""
        print(f"| {c.target}{tag} | {c.value:.2f} | {sign} {c.goal} | {'yes' if c.met else '**no**'} |")
    for i, m in enumerate(machines, 1):
        print(f"\n[{i}] {m}" if len(machines) > 1 else f"\nMachine: {m}")
    for path in missing:
        print(f"missing: {path} (run its benchmark first)")
    if missing or not found:
        return 2
    return 0 if all(c.met for c in found) else 1


if __name__ == "__main__":
    raise SystemExit(main())
