import json
from pathlib import Path

import pytest

from benchmarks import targets

MACHINE = "Intel Xeon (AMX), 2 cores"


def _write(results: Path, *, ov_ratio: float, mixed_cost: float, one_task: float, zipf: float, uniform: float) -> None:
    packed = {"machine": MACHINE, "rows": [
        {"arch": "resnet50", "batch": 1, "dtype": "bfloat16", "packed": 100.0 * ov_ratio, "openvino": 100.0},
        {"arch": "resnet50", "batch": 8, "dtype": "bfloat16", "packed": 100.0, "openvino": 100.0 / 0.85,
         "mixed8": 100.0 / mixed_cost},
    ]}  # fmt: skip
    plain = 40.0
    http = {"machine": MACHINE, "plain_fp32": plain, "rows": [
        {"server": "defaults", "tasks": 1, "traffic": "one", "clients": 8, "img_s": plain * one_task},
        {"server": "defaults", "tasks": 1, "traffic": "one", "clients": 16, "img_s": 200.0},
        {"server": "defaults", "tasks": 512, "traffic": "zipf", "clients": 16, "img_s": 200.0 * zipf},
        {"server": "defaults", "tasks": 512, "traffic": "uniform", "clients": 16, "img_s": plain * uniform},
        # another server's rows (--server-args) never count
        {"server": "--workers 1", "tasks": 1, "traffic": "one", "clients": 8, "img_s": 1.0},
    ]}  # fmt: skip
    (results / "packed.json").write_text(json.dumps(packed))
    (results / "http.json").write_text(json.dumps(http))


def test_every_target_is_checked_against_its_goal_from_the_results(tmp_path: Path) -> None:
    _write(tmp_path, ov_ratio=0.85, mixed_cost=1.2, one_task=3.1, zipf=0.7, uniform=1.9)
    found, missing = targets.checks(tmp_path)
    assert missing == [] and len(found) == 6 and all(c.met for c in found)
    assert {c.machine for c in found} == {MACHINE}
    assert targets.main(["--results", str(tmp_path)]) == 0


@pytest.mark.parametrize(
    ("field", "value", "which"),
    [
        ("ov_ratio", 0.69, "engine / OpenVINO, resnet50 batch 1 bfloat16"),
        ("mixed_cost", 1.6, "mixed 8 tasks / single task, resnet50 batch 8 (cost)"),
        ("one_task", 2.2, "HTTP one task, 8 clients / plain fp32 loop"),
        ("zipf", 0.6, "HTTP 512 tasks Zipf, 16 clients / one task"),
        ("uniform", 1.7, "HTTP 512 tasks uniform, 16 clients / plain fp32 loop"),
    ],
)
def test_a_target_missed_is_reported_and_fails(tmp_path: Path, field: str, value: float, which: str) -> None:
    values = {"ov_ratio": 0.85, "mixed_cost": 1.2, "one_task": 3.1, "zipf": 0.7, "uniform": 1.9, field: value}
    _write(tmp_path, **values)
    found, _ = targets.checks(tmp_path)
    assert [c.target for c in found if not c.met] == [which]
    assert targets.main(["--results", str(tmp_path)]) == 1


def test_missing_results_say_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert targets.main(["--results", str(tmp_path)]) == 2
    assert "packed.json (run its benchmark first)" in capsys.readouterr().out
