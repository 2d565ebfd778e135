import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import piggyback_core
from piggyback_core import (
    FileSystemStore,
    InvalidTaskNameError,
    StoreError,
    diff_snapshots,
)


def test_every_put_changes_the_version_even_with_identical_bytes(tmp_path: Path) -> None:
    store = FileSystemStore(tmp_path)
    first = store.put("a", b"same").version
    assert store.put("a", b"same").version != first  # a new inode every time


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "", "UPPER", "x" * 65, "a\x00b"])
def test_invalid_names_never_touch_the_disk(tmp_path: Path, name: str) -> None:
    root = tmp_path / "store"
    store = FileSystemStore(root)
    for op in (lambda: store.put(name, b"x"), lambda: store.get(name), lambda: store.delete(name)):
        with pytest.raises(InvalidTaskNameError):
            op()
    assert list(root.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_foreign_and_temp_files_are_not_listed(tmp_path: Path) -> None:
    store = FileSystemStore(tmp_path)
    store.put("a", b"1")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "Bad Name.safetensors").write_bytes(b"x")
    (tmp_path / ".tmp-a-123").write_bytes(b"partial")
    assert [t.name for t in store.list()] == ["a"]


def test_snapshots_show_what_another_process_changed(tmp_path: Path) -> None:
    mine, theirs = FileSystemStore(tmp_path), FileSystemStore(tmp_path)
    mine.put("a", b"1")
    mine.put("b", b"1")
    before = mine.snapshot()
    theirs.put("b", b"2")
    theirs.put("c", b"1")
    theirs.delete("a")
    changes = diff_snapshots(before, mine.snapshot())
    assert (changes.added, changes.changed, changes.removed) == (["c"], ["b"], ["a"])
    assert not diff_snapshots(mine.snapshot(), mine.snapshot())


def test_stale_temp_files_are_removed_when_the_store_opens(tmp_path: Path) -> None:
    FileSystemStore(tmp_path).put("a", b"1")
    stale, fresh = tmp_path / ".tmp-a-old", tmp_path / ".tmp-a-new"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    store = FileSystemStore(tmp_path)  # default: older than an hour
    assert store.temp_files() == [fresh]
    assert FileSystemStore(tmp_path, stale_temp_after_s=0).temp_files() == []
    assert store.get("a").data == b"1"


def test_temp_files_of_dead_writers_on_this_host_are_removed_at_once(tmp_path: Path) -> None:
    from piggyback_core.store import _HOST

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    dead_writer = tmp_path / f".tmp-a.{_HOST}.{dead_pid}.0123abcd"
    live_writer = tmp_path / f".tmp-a.{_HOST}.{os.getppid()}.0123abcd"  # our parent: alive
    other_host = tmp_path / f".tmp-a.some-other-host.{dead_pid}.0123abcd"
    for p in (dead_writer, live_writer, other_host):
        p.write_bytes(b"partial")
    store = FileSystemStore(tmp_path)
    assert store.temp_files() == sorted([live_writer, other_host])


def test_a_store_on_a_missing_directory_without_create_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        FileSystemStore(tmp_path / "nope", create=False)


# The writer loads piggyback_core.store without the package's __init__ (which imports torch), so
# that a process starts in milliseconds and many kill trials fit in a few seconds.
_WRITER = textwrap.dedent(
    """
    import hashlib, os, sys, types
    package = types.ModuleType("piggyback_core")
    package.__path__ = [sys.argv[3]]
    sys.modules["piggyback_core"] = package
    from piggyback_core.store import FileSystemStore
    assert "torch" not in sys.modules
    store = FileSystemStore(sys.argv[1])
    i = int(sys.argv[2])
    while True:
        i += 1
        body = os.urandom(200_000 + (i * 7919) % 300_000)
        store.put("task", i.to_bytes(8, "little") + hashlib.sha256(body).digest() + body)
        print(i, flush=True)
    """
)


def _check(data: bytes) -> int:
    """The version number of a self-verifying payload; fails on a torn file."""
    version, digest, body = int.from_bytes(data[:8], "little"), data[8:40], data[40:]
    assert hashlib.sha256(body).digest() == digest, f"torn file at version {version}"
    return version


def test_a_writer_killed_at_random_moments_leaves_the_old_or_the_new_version(tmp_path: Path) -> None:
    rng = random.Random(0)
    acknowledged = 0
    package_dir = str(Path(piggyback_core.__file__).parent)
    for _trial in range(100):
        with subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), str(acknowledged), package_dir],
            stdout=subprocess.PIPE,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            proc.stdout.readline()  # at least one put completed in this trial
            time.sleep(rng.uniform(0.0, 0.03))
            proc.send_signal(signal.SIGKILL)
            acked = [int(line) for line in proc.stdout.read().split()]
        acknowledged = max([acknowledged + 1, *acked])
        stored = _check(FileSystemStore(tmp_path).get("task").data)
        # every acknowledged put is there; at most the one in flight went further
        assert acknowledged <= stored <= acknowledged + 1
        acknowledged = stored
    # temp files of killed writers are left for the next open to clean (they are never listed)
    FileSystemStore(tmp_path, stale_temp_after_s=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.safetensors"]
