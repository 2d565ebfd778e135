"""Crash safety: a server SIGKILLed at random moments while it registers and deletes tasks. After
every restart each task is complete and in the state of its last acknowledged operation (or of the
one in flight when the process died), it serves, and no temp file is left behind: no registration
acknowledged with 2xx is ever lost."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from piggyback_core import Backbone, FileSystemStore, TaskFile
from tests.live import HEADERS, IMAGE, LiveServer
from tests.server.conftest import AUTH, small_task

SUITE = "crash safety"
TRIALS = 12
TASKS = ("a", "b", "c")


@dataclass
class Op:
    task: str
    version: str | None  # None: delete
    acked: bool = False


def expected_states(ops: list[Op], before: dict[str, str | None]) -> dict[str, set[str | None]]:
    """The states each task may be in: after its last acknowledged op, or after the op in flight."""
    allowed: dict[str, set[str | None]] = {}
    for task in TASKS:
        mine = [op for op in ops if op.task == task]
        acked = [i for i, op in enumerate(mine) if op.acked]
        last = mine[acked[-1]].version if acked else before[task]
        states = {last}
        following = mine[acked[-1] + 1 :] if acked else mine
        if following:  # ops are sequential: at most the first un-acknowledged one can have happened
            states.add(following[0].version)
        allowed[task] = states
    return allowed


def test_sigkill_during_put_and_delete_never_loses_an_acknowledged_registration(
    tmp_path: Path, resnet18: Backbone, cases: Callable
) -> None:
    rng = random.Random(7)
    files = {(t, s): small_task(resnet18, t, seed=s) for t in TASKS for s in range(1, 5)}
    store = FileSystemStore(tmp_path)
    for t in TASKS:
        store.put(t, files[(t, 1)].to_bytes())
    state: dict[str, str | None] = {t: files[(t, 1)].version for t in TASKS}
    ops_total = acked_total = 0
    for trial in range(TRIALS + 1):
        server = LiveServer(tmp_path).wait_ready()  # the restart after the previous kill
        try:
            with httpx.Client(timeout=30) as http:
                # 1. it serves exactly what the store holds, which is what the last trial allowed
                listed = {t["task"]: t["version"] for t in http.get(f"{server.url}/tasks").json()["tasks"]}
                assert listed == {t: v for t, v in state.items() if v is not None}, (trial, listed, state)
                for t in listed:
                    r = http.post(f"{server.url}/classify/{t}", content=IMAGE, headers=HEADERS)
                    assert r.status_code == 200 and r.json()["version"] == listed[t]
                assert not list(tmp_path.glob(".tmp-*")), "a temp file survived the restart"
            if trial == TRIALS:
                break
            # 2. operations in a client thread, SIGKILL at a random moment
            ops: list[Op] = []

            def client(ops: list[Op] = ops, server: LiveServer = server) -> None:
                with httpx.Client(timeout=30) as http:
                    while True:
                        task = rng.choice(TASKS)
                        seed = rng.randint(1, 4)
                        op = Op(task, None if rng.random() < 0.25 else files[(task, seed)].version)
                        ops.append(op)
                        try:
                            if op.version is None:
                                r = http.delete(f"{server.url}/tasks/{task}", headers=AUTH)
                                op.acked = r.status_code in (204, 404)  # 404: already absent, also a state
                            else:
                                body = files[(task, seed)].to_bytes()
                                r = http.put(f"{server.url}/tasks/{task}", content=body, headers=AUTH)
                                op.acked = r.status_code in (200, 201)
                                assert op.acked, r.text
                        except httpx.TransportError:
                            return  # the server died under us

            worker = threading.Thread(target=client, daemon=True)
            worker.start()
            time.sleep(rng.uniform(0.05, 1.0))
            server.kill()
            worker.join(timeout=30)
        finally:
            server.kill()
        # 3. the store: every file complete, every task in an allowed state
        allowed = expected_states(ops, state)
        for t in TASKS:
            path = tmp_path / f"{t}.safetensors"
            actual = TaskFile.from_bytes(path.read_bytes()).version if path.exists() else None
            assert actual in allowed[t], (trial, t, actual, allowed[t], ops)
            state[t] = actual
        ops_total += len(ops)
        acked_total += sum(op.acked for op in ops)
    cases(SUITE, TRIALS, note=f"{TRIALS} SIGKILLs during {ops_total} operations ({acked_total} acknowledged)")
