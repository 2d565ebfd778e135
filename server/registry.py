"""The task registry: the store is the source of truth, the engine serves what the store holds.

* At start every task in the store is loaded; a broken file is reported and skipped.
* ``register`` validates the upload completely (format, name, backbone, fingerprint, labels)
  before anything is written; then the store's atomic put, then the engine's atomic swap.
* **The operator's name wins**, as in TorchServe (``model_name``) and Triton (the directory name):
  a file trained as ``colours`` uploaded as ``colours2`` is stored and served as ``colours2``, and
  its provenance keeps ``trained_as: colours``. A file placed in the store under another key is
  served under its key the same way.
* ``delete`` removes a task from the store and the engine. Requests already admitted hold their
  task object and finish with it.
* ``sync`` compares the store's snapshot with what this replica loaded and applies the difference:
  what another replica registered or deleted is served here within one poll interval.
* **An empty listing is not an empty store.** A sync that would remove ``removal_guard`` of the
  tasks or more at once (default 1.0: every task) is held until the next sync lists exactly the
  same: a listing that flaps (a volume remounting, a transient permission error that lists
  nothing) costs nothing, and is logged loudly and counted; a mass deletion, or an outage that
  lasts two polls, is applied one poll later. Additions and changes in the same listing are
  applied at once.
* **One file is never the process's problem.** Any failure to read one task file (a hostile
  header, a bug in a parser) is that file's error: logged, reported in ``failed``, skipped.
* ``start_background`` is the start-up load of ``ready_after=backbone``: every task of the store is
  read on a pool while the server already serves; ``ensure`` loads a task that is still pending at
  once, in the caller's thread (its first request waits for that task only), and a registration or
  deletion of a pending task wins over its background load. A pending task is read by exactly one
  thread (whoever claims it first), and it leaves ``pending`` only once it is in the engine (or
  known broken), so a request never sees it in neither.
* ``load`` (the model-repository API, ``server.repository``) reads one task from the store at
  once, ahead of the next poll: a task not served yet, or a version the engine does not serve.

All methods are blocking (disk, validation); the app calls them from a worker thread. One lock
serialises them, so a sync never races a registration on this replica.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

from piggyback_core import (
    Engine,
    LoadedTask,
    MaskStore,
    PiggybackError,
    StoreError,
    TaskFile,
    TaskFileError,
    TaskNotFoundError,
    diff_snapshots,
    validate_task_name,
)

__all__ = ["Registration", "SyncReport", "TaskRegistry"]

log = logging.getLogger("piggyback.registry")


@dataclass(frozen=True)
class Registration:
    task: LoadedTask
    created: bool


@dataclass(frozen=True)
class SyncReport:
    loaded: list[str]
    removed: list[str]
    failed: dict[str, str]
    held: list[str] = field(default_factory=list)  # removals held for a second identical listing


@dataclass
class _Pending:
    """A task of the start-up snapshot not yet applied: read by whoever claims it first."""

    future: Future[None] | None
    version: str
    claimed: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class TaskRegistry:
    def __init__(self, engine: Engine, store: MaskStore, *, removal_guard: float = 1.0) -> None:
        if not 0 < removal_guard <= 1:
            raise ValueError(f"removal_guard must be in (0, 1], got {removal_guard}")
        self.engine = engine
        self.store = store
        self.removal_guard = removal_guard
        self._lock = threading.Lock()
        self._claim_lock = threading.Lock()
        self._versions: dict[str, str] = {}  # store version of what the engine holds, per task
        self.failed: dict[str, str] = {}  # tasks in the store that could not be loaded, and why
        self._pending: dict[str, _Pending] = {}  # background loads not yet applied
        self._held: dict[str, str] | None = None  # the listing whose mass removal waits for a second one
        self.on_removed: Callable[[str], None] = lambda name: None  # told of each task the engine drops

    @property
    def loading(self) -> int:
        """Tasks of the start-up snapshot still being loaded in the background."""
        return len(self._pending)

    def is_pending(self, name: str) -> bool:
        return name in self._pending

    def pending_names(self) -> list[str]:
        return list(self._pending)

    def _read(self, name: str) -> tuple[TaskFile, str] | PiggybackError:
        """Task ``name`` from the store, checked against the backbone (thread-safe: parallel at
        start), or the reason it cannot be served."""
        try:
            blob = self.store.get(name)
            task = TaskFile.from_bytes(blob.data).renamed(name)
            task.check_compatible(self.engine.backbone)
        except PiggybackError as exc:
            return exc
        except Exception as exc:  # a bug meeting a hostile file: that file's error, never the process's
            log.exception("task %r: unexpected error while reading it", name)
            return TaskFileError(f"task {name!r} cannot be read: {type(exc).__name__}: {exc}")
        return task, blob.version

    def _apply(self, name: str, outcome: tuple[TaskFile, str] | PiggybackError, listed: str) -> bool:
        """Serve what ``_read`` gave for ``name`` (listed in the store as version ``listed``), or
        record why it cannot be; True when it is served. Under the lock."""
        if isinstance(outcome, TaskNotFoundError):
            return False  # deleted meanwhile; the next sync sees it gone
        if isinstance(outcome, PiggybackError):
            self.failed[name] = listed  # the same broken version is reported once
            log.error("task %r in the store cannot be served: %s", name, outcome)
            return False
        task, version = outcome
        self.engine.add_task(task)
        self._versions[name] = version
        self.failed.pop(name, None)
        return True

    def start_background(self, pool: Executor) -> int:
        """Load every task of the store on ``pool``, in the background; returns how many."""
        with self._lock:
            snapshot = self.store.snapshot()
            for name, version in snapshot.items():
                if name not in self._versions:
                    entry = self._pending[name] = _Pending(None, version)
                    entry.future = pool.submit(self._load_pending, name, entry)
            return len(snapshot)

    def _load_pending(self, name: str, entry: _Pending) -> None:
        with self._claim_lock:
            if entry.claimed:
                return  # another thread reads it
            entry.claimed = True
        try:
            outcome = self._read(name)  # outside the lock: in parallel
            with self._lock:
                if self._pending.get(name) is entry:  # else a registration or deletion came first, and wins
                    try:
                        self._apply(name, outcome, entry.version)
                    except Exception as exc:  # the engine could not take it (e.g. out of device memory)
                        self.failed[name] = entry.version
                        log.error("task %r could not be loaded: %s", name, exc)
                    finally:
                        del self._pending[name]  # only now: a reader sees it pending or applied, never neither
        finally:
            entry.done.set()

    def ensure(self, name: str) -> None:
        """If ``name`` is still pending, load it now in this thread, or wait for the thread that
        reads it already."""
        entry = self._pending.get(name)
        if entry is None:
            return
        if entry.future is not None:
            entry.future.cancel()  # the background loader need not start it
        self._load_pending(name, entry)
        entry.done.wait()
        with self._lock:  # a registration or deletion that won over the load has finished too
            pass

    def _drop_pending(self, name: str) -> bool:
        """Under the lock: a registration or deletion of ``name`` wins over its pending load."""
        entry = self._pending.pop(name, None)
        if entry is None:
            return False
        if entry.future is not None:
            entry.future.cancel()
        with self._claim_lock:
            if not entry.claimed:  # nobody will read it: release whoever waits in ensure
                entry.claimed = True
                entry.done.set()
        return True

    def sync(self, pool: Executor | None = None) -> SyncReport:
        """Load what the store has and the engine lacks (or holds in another version); drop what
        the store no longer has. Also the start-up load, where ``pool`` reads and validates the
        files in parallel (the engine then takes them one by one)."""
        with self._lock:
            snapshot = self.store.snapshot()
            changes = diff_snapshots(self._versions, snapshot)
            held = self._hold_mass_removal(snapshot, changes.removed)
            todo = [
                n
                for n in [*changes.added, *changes.changed]
                if self.failed.get(n) != snapshot[n] and n not in self._pending  # its loader applies it
            ]
            read = pool.map(self._read, todo) if pool is not None and len(todo) > 1 else map(self._read, todo)
            loaded, failed = [], {}
            for name, outcome in zip(todo, read, strict=True):
                if self._apply(name, outcome, snapshot[name]):
                    loaded.append(name)
                elif not isinstance(outcome, TaskNotFoundError):
                    failed[name] = str(outcome)
            removed = [] if held else changes.removed
            for name in removed:
                self._versions.pop(name, None)
                self.failed.pop(name, None)
                try:
                    self.engine.remove_task(name)
                except TaskNotFoundError:
                    pass
                self.on_removed(name)
            # a broken file that was deleted from the store, or repaired, stops being reported
            for name in [n for n in self.failed if n not in snapshot]:
                del self.failed[name]
            return SyncReport(loaded=loaded, removed=removed, failed=failed, held=held)

    def _hold_mass_removal(self, snapshot: dict[str, str], removed: list[str]) -> list[str]:
        """The removals to hold back (under the lock): all of them when they are ``removal_guard``
        of the tasks or more and the previous sync did not list exactly the same; else none."""
        served = len(self._versions)
        if not removed or len(removed) < self.removal_guard * served:
            self._held = None
            return []
        if self._held == snapshot:
            self._held = None
            log.warning("store sync: the store listed the same twice in a row; removing %d of %d task(s)",
                        len(removed), served)  # fmt: skip
            return []
        self._held = dict(snapshot)
        log.error("store sync: the store lists %d task(s) where %d are served; holding the removal of %d until "
                  "the next listing is the same (an unmounted volume or a lost permission looks like this)",
                  len(snapshot), served, len(removed))  # fmt: skip
        return list(removed)

    def register(self, name: str, data: bytes) -> Registration:
        """Validate ``data`` as task ``name`` for this backbone, store it, serve it."""
        validate_task_name(name)
        task = TaskFile.from_bytes(data)
        if task.name != name:
            task = task.renamed(name)
            data = task.to_bytes()  # the stored file carries the name it is served under
        task.check_compatible(self.engine.backbone)
        with self._lock:
            created = not self._drop_pending(name) and name not in self.engine.tasks
            stored = self.store.put(name, data)
            loaded = self.engine.add_task(task)
            self._versions[name] = stored.version
            self.failed.pop(name, None)
        return Registration(task=loaded, created=created)

    def delete(self, name: str) -> None:
        validate_task_name(name)
        with self._lock:
            in_engine = name in self.engine.tasks
            was_pending = self._drop_pending(name)
            try:
                self.store.delete(name)
            except TaskNotFoundError:
                if not in_engine and not was_pending:
                    raise
            self._versions.pop(name, None)
            if in_engine:
                self.engine.remove_task(name)
            self.on_removed(name)

    def load(self, name: str) -> LoadedTask:
        """Task ``name`` as the store holds it now, served: read and validated when the store holds
        another version than the one served (or the engine has none), else the one served.
        TaskNotFoundError if the store has no such task; the file's error if it cannot be served
        (the version served, if any, stays). A store that cannot be reached keeps the version
        served; without one, its StoreError."""
        validate_task_name(name)
        self.ensure(name)
        with self._lock:
            outcome = self._read(name)
            served = self.engine.tasks.get(name)
            if isinstance(outcome, StoreError) and not isinstance(outcome, TaskNotFoundError) and served:
                log.warning("task %r: the store cannot be read (%s); the version served stays", name, outcome)
                return served
            if isinstance(outcome, PiggybackError):
                raise outcome
            task, version = outcome
            if served is None or self._versions.get(name) != version:
                self._apply(name, outcome, version)
            return self.engine.get_task(name)
