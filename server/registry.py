"""The task registry: the store is the source of truth, the engine serves what the store holds.

* **Known, then loaded.** At start every task's *header* is read and checked (name, backbone,
  fingerprint against the serving backbone, dtypes, shapes, offsets against the file's size): a few
  KiB a task, never its tensor data. A task whose header checks out is *known*: listed, and never
  answered 404. Its body is read (mapped), checksummed and checked in full at its **first use**
  (:meth:`load`), and only then does the engine hold it. A file found broken then is that task's
  error (:class:`~piggyback_core.TaskUnavailableError`, reported in ``failed``), never another's.
* **Loaded tasks are bounded.** The engine holds the tasks last used, ``max_loaded_bytes`` of
  their packed state at most (masks, heads, BatchNorm): past it the least recently used go
  (first those without built weights in the cache; never a pinned one), and come back at their
  next use. So memory follows what is used, not what is stored.
* ``register`` validates the upload completely (format, name, backbone, fingerprint, labels)
  before anything is written; then the store's atomic put, then the engine's atomic swap.
* **The operator's name wins**, as in TorchServe (``model_name``) and Triton (the directory name):
  a file trained as ``colours`` uploaded as ``colours2`` is stored and served as ``colours2``, and
  its provenance keeps ``trained_as: colours``. A file placed in the store under another key is
  served under its key the same way.
* ``delete`` removes a task from the store and the engine. Requests already admitted hold their
  task object and finish with it.
* ``sync`` compares the store's snapshot with what this replica knows and applies the difference:
  what another replica registered, replaced or deleted is known here within one poll interval (a
  changed file is checked again; a loaded task is reloaded at once).
* **An empty listing is not an empty store.** A sync that would remove ``removal_guard`` of the
  tasks or more at once (default 1.0: every task) is held until the next sync lists exactly the
  same: a listing that flaps (a volume remounting, a transient permission error that lists
  nothing) costs nothing, and is logged loudly and counted; a mass deletion, or an outage that
  lasts two polls, is applied one poll later. Additions and changes in the same listing are
  applied at once.
* **One file is never the process's problem.** Any failure to read one task file (a hostile
  header, a bug in a parser) is that file's error: logged, reported in ``failed``, skipped.
* ``start_background`` is the start-up scan of ``ready_after=backbone``: the headers are read on a
  pool while the server already serves; :meth:`load` checks a task still pending at once.
* :meth:`fetch` (the model-repository API, ``server.repository``) asks the store about one task at
  once, ahead of the next poll (a task not known yet, or another version), and loads it.

All methods are blocking (disk, validation); the app calls them from a worker thread. One lock
serialises the changes, so a sync never races a registration on this replica; body reads run
outside it, one per task at a time.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

from piggyback_core import (
    Engine,
    LoadedTask,
    MaskStore,
    PiggybackError,
    TaskFile,
    TaskFileError,
    TaskHeader,
    TaskNotFoundError,
    TaskUnavailableError,
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
    loaded: list[str]  # known now (header checked): added or changed in the store
    removed: list[str]
    failed: dict[str, str]
    held: list[str] = field(default_factory=list)  # removals held for a second identical listing


@dataclass
class _Pending:
    """A task of the start-up snapshot whose header is not checked yet: by whoever claims it first."""

    future: Future[None] | None
    version: str
    claimed: bool = False
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Load:
    """One body load in flight: the other requests for the task wait for it."""

    done: threading.Event = field(default_factory=threading.Event)
    error: PiggybackError | None = None


def _guarded(what: str, name: str, read: Any) -> Any:
    """``read()``, or the PiggybackError that says why task ``name`` cannot be served."""
    try:
        return read()
    except PiggybackError as exc:
        return exc
    except Exception as exc:  # a bug meeting a hostile file: that file's error, never the process's
        log.exception("task %r: unexpected error while reading its %s", name, what)
        return TaskFileError(f"task {name!r} cannot be read: {type(exc).__name__}: {exc}")


class TaskRegistry:
    def __init__(
        self, engine: Engine, store: MaskStore, *, removal_guard: float = 1.0, max_loaded_bytes: int | None = None
    ) -> None:
        if not 0 < removal_guard <= 1:
            raise ValueError(f"removal_guard must be in (0, 1], got {removal_guard}")
        if max_loaded_bytes is not None and max_loaded_bytes < 0:
            raise ValueError(f"max_loaded_bytes must be >= 0, got {max_loaded_bytes}")
        self.engine = engine
        self.store = store
        self.removal_guard = removal_guard
        self.max_loaded_bytes = max_loaded_bytes  # None: no bound
        self._lock = threading.Lock()
        self._claim_lock = threading.Lock()
        self._lru_lock = threading.Lock()
        self._known: dict[str, str] = {}  # store version of every servable task (its header checked)
        # the version inside each known task's file, from its header: the repository index lists
        # 10,000 tasks without reading 10,000 headers (set with _known; read only for names in it)
        self._file_versions: dict[str, str] = {}
        # tasks the registry put in the engine, least recently used first: (store version, bytes)
        self._loaded: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self.failed: dict[str, str] = {}  # tasks in the store that cannot be served: the version
        self._reasons: dict[str, str] = {}  # ... and why
        self._pending: dict[str, _Pending] = {}  # start-up header checks not yet applied
        self._loads: dict[str, _Load] = {}
        self._held: dict[str, str] | None = None  # the listing whose mass removal waits for a second one
        self.on_removed: Callable[[str], None] = lambda name: None  # told of each task the store drops
        self.loads = 0  # bodies read (first uses, reloads)
        self.evictions = 0  # loaded tasks let go to stay within max_loaded_bytes

    # --- what is known ----------------------------------------------------------------------------

    @property
    def loading(self) -> int:
        """Tasks of the start-up snapshot whose header is still being checked in the background."""
        return len(self._pending)

    def is_pending(self, name: str) -> bool:
        return name in self._pending

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def pending_names(self) -> list[str]:
        return list(self._pending)

    def __len__(self) -> int:
        return len(self._known)

    def names(self) -> list[str]:
        """Every servable task, sorted."""
        return sorted(self._known)

    def reason(self, name: str) -> str | None:
        """Why a failed task cannot be served."""
        return self._reasons.get(name)

    @property
    def loaded_bytes(self) -> int:
        with self._lru_lock:
            return sum(n for _, n in self._loaded.values())

    def has_room(self) -> bool:
        """Whether one more task (as large as the largest loaded) fits without an eviction."""
        if self.max_loaded_bytes is None:
            return True
        with self._lru_lock:
            largest = max((n for _, n in self._loaded.values()), default=0)
            return sum(n for _, n in self._loaded.values()) + largest <= self.max_loaded_bytes

    def summary(self, name: str) -> dict[str, Any] | None:
        """What ``GET /tasks`` shows of ``name``: from the engine when it is loaded, else from its
        header (read again: nothing of it is kept); None if it cannot be read now."""
        try:
            return self.engine.get_task(name).file.summary() | {"task": name}
        except TaskNotFoundError:
            pass
        version = self._known.get(name)
        if version is None:
            return None
        outcome = _guarded("header", name, lambda: self._check_header(name, version)[0])
        return outcome.summary() | {"task": name} if isinstance(outcome, TaskHeader) else None

    def _check_header(self, name: str, listed: str | None) -> tuple[TaskHeader, str]:
        head = self.store.head(name, listed)
        header = TaskHeader.parse(head.prefix, head.size)
        header.check_compatible(self.engine.backbone)
        return header, head.version

    def _read(self, name: str, version: str | None) -> tuple[TaskFile, str] | PiggybackError:
        """Task ``name``'s whole file from the store, checked in full and against the backbone
        (thread-safe), or the reason it cannot be served."""

        def read() -> tuple[TaskFile, str]:
            blob = self.store.map(name, version)
            task = TaskFile.from_bytes(blob.data).renamed(name)
            task.check_compatible(self.engine.backbone)
            return task, blob.version

        return _guarded("file", name, read)

    def _fail(self, name: str, version: str, error: BaseException) -> None:
        """Under the lock: ``name`` (store version ``version``) cannot be served; reported once."""
        self.failed[name] = version
        self._reasons[name] = str(error)
        log.error("task %r in the store cannot be served: %s", name, error)

    def _forget(self, name: str) -> None:
        """Under the lock: ``name`` is no longer known to be servable."""
        self._known.pop(name, None)
        self._file_versions.pop(name, None)

    def file_version(self, name: str) -> str | None:
        """The version of servable task ``name`` as it is (or would be) served, from its last check
        (no store access); None for a task that is not servable, or one stored under another name
        than its file's until it is first read (its version changes with the name)."""
        return self._file_versions.get(name) if name in self._known else None

    def _known_outcome(self, name: str, outcome: TaskHeader | PiggybackError, listed: str) -> bool:
        """Under the lock: apply a header check of ``name`` (listed as ``listed``); True when it
        is servable."""
        if isinstance(outcome, TaskNotFoundError):
            return False  # deleted meanwhile; the next sync sees it gone
        if isinstance(outcome, PiggybackError):
            if name not in self._loaded:  # a loaded task keeps serving the version it has
                self._forget(name)
            self._fail(name, listed, outcome)
            return False
        if outcome.name == name:
            self._file_versions[name] = outcome.version  # first: file_version reads without the lock
        else:  # stored under another name: served renamed, whose version only its whole file gives
            self._file_versions.pop(name, None)
        self._known[name] = listed
        self.failed.pop(name, None)
        self._reasons.pop(name, None)
        return True

    # --- start ------------------------------------------------------------------------------------

    def start_background(self, pool: Executor) -> int:
        """Check every stored task's header on ``pool``, in the background; returns how many."""
        with self._lock:
            snapshot = self.store.snapshot()
            for name, version in snapshot.items():
                if name not in self._known:
                    entry = self._pending[name] = _Pending(None, version)
                    entry.future = pool.submit(self._check_pending, name, entry)
            return len(snapshot)

    def _check_pending(self, name: str, entry: _Pending) -> None:
        with self._claim_lock:
            if entry.claimed:
                return  # another thread checks it
            entry.claimed = True
        try:
            outcome = _guarded("header", name, lambda: self._check_header(name, entry.version)[0])
            with self._lock:
                if self._pending.get(name) is entry:  # else a registration or deletion came first, and wins
                    try:
                        self._known_outcome(name, outcome, entry.version)
                    finally:
                        del self._pending[name]  # only now: a reader sees it pending or known, never neither
        finally:
            entry.done.set()

    def _settle(self, name: str) -> None:
        """If ``name``'s header is still pending, check it now in this thread (or wait for the
        thread that checks it already)."""
        entry = self._pending.get(name)
        if entry is None:
            return
        if entry.future is not None:
            entry.future.cancel()  # the background scan need not start it
        self._check_pending(name, entry)
        entry.done.wait()
        with self._lock:  # a registration or deletion that won over the check has finished too
            pass

    # --- first use --------------------------------------------------------------------------------

    def lookup(self, name: str) -> LoadedTask | None:
        """``name`` as the engine holds it now (counted as a use), or None."""
        try:
            task = self.engine.get_task(name)
        except TaskNotFoundError:
            return None
        with self._lru_lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
        return task

    def load(self, name: str) -> LoadedTask:
        """``name`` as the engine serves it, its file read and checked in full now if this is its
        first use (or its first since it was let go). TaskNotFoundError if the store has no such
        task; TaskUnavailableError (and ``name`` in ``failed``) if its file cannot be served."""
        for _ in range(3):  # again if a registration, deletion or change came while reading
            task = self.lookup(name)
            if task is not None:
                return task
            self._settle(name)
            version = self._known.get(name)
            if version is None:
                if name in self.failed:
                    raise TaskUnavailableError(task=name, reason=self._reasons.get(name, "see the server log"))
                raise TaskNotFoundError(task=name)
            with self._claim_lock:
                flight = self._loads.get(name)
                mine = flight is None
                if flight is None:
                    flight = self._loads[name] = _Load()
            if not mine:
                flight.done.wait()
                if flight.error is not None:
                    raise flight.error
                continue
            try:
                outcome = self._read(name, version)
                with self._lock:
                    if self._known.get(name) != version:
                        continue  # registered, replaced or deleted meanwhile: what it is now wins
                    if isinstance(outcome, PiggybackError):
                        if isinstance(outcome, TaskNotFoundError):
                            self._forget(name)  # gone from the store; the next sync agrees
                            flight.error = outcome
                            raise outcome
                        self._forget(name)
                        self._fail(name, version, outcome)
                        flight.error = TaskUnavailableError(task=name, reason=str(outcome))
                        raise flight.error from outcome
                    task_file, stored = outcome
                    try:
                        loaded = self._serve(name, task_file, stored)
                    except Exception as exc:  # the engine could not take it (e.g. out of device memory)
                        self._forget(name)
                        self._fail(name, version, exc)
                        flight.error = TaskUnavailableError(task=name, reason=f"{type(exc).__name__}: {exc}")
                        raise flight.error from exc
                    return loaded
            finally:
                with self._claim_lock:
                    del self._loads[name]
                flight.done.set()
        raise TaskUnavailableError(task=name, reason="it kept changing while it was being loaded; retry")

    def fetch(self, name: str) -> LoadedTask:
        """``name`` as the store holds it now, served: its header read at once (a task no poll has
        listed yet, or another version than the one known), then loaded as a first use would.
        TaskNotFoundError if the store has no such task; the header's error if it cannot be served
        (a version already loaded keeps serving)."""
        validate_task_name(name)
        self._settle(name)
        with self._lock:
            outcome = _guarded("header", name, lambda: self._check_header(name, None))
            if isinstance(outcome, PiggybackError):
                raise outcome
            header, version = outcome
            if self._known.get(name) != version:
                self._known_outcome(name, header, version)
                self._reload_if_loaded(name, version)
        return self.load(name)

    def ensure(self, name: str) -> None:
        """Load ``name`` now if it can be (a failure is recorded in ``failed``, not raised)."""
        try:
            self.load(name)
        except (TaskNotFoundError, TaskUnavailableError):
            pass

    def _serve(self, name: str, task: TaskFile, version: str) -> LoadedTask:
        """Under the lock: ``task`` (store version ``version``) into the engine; the least recently
        used loaded tasks go past the bound."""
        loaded = self.engine.add_task(task)
        self.loads += 1
        self._file_versions[name] = task.version  # renamed to ``name``, as it is served
        self._known[name] = version
        self.failed.pop(name, None)
        self._reasons.pop(name, None)
        with self._lru_lock:
            self._loaded[name] = (version, loaded.resident_bytes)
            self._loaded.move_to_end(name)
        self._evict(keep=name)
        return loaded

    def _evict(self, keep: str) -> None:
        """Under the lock: let loaded tasks go, least recently used first (those without built
        weights before those with), never a pinned one nor ``keep``, until the bound holds."""
        if self.max_loaded_bytes is None:
            return
        cache = self.engine.cache
        while True:
            with self._lru_lock:
                total = sum(n for _, n in self._loaded.values())
                candidates = [n for n in self._loaded if n != keep and not cache.is_pinned(n)]
            if total <= self.max_loaded_bytes or not candidates:
                return
            victim = next((n for n in candidates[:64] if not cache.resident_bytes(n)), candidates[0])
            with self._lru_lock:
                del self._loaded[victim]
            try:
                self.engine.remove_task(victim)
            except TaskNotFoundError:
                pass
            self.evictions += 1

    def _unload(self, name: str) -> None:
        """Under the lock: ``name`` out of the engine (removed from the store)."""
        with self._lru_lock:
            self._loaded.pop(name, None)
        try:
            self.engine.remove_task(name)
        except TaskNotFoundError:
            pass

    # --- changes ----------------------------------------------------------------------------------

    def _drop_pending(self, name: str) -> bool:
        """Under the lock: a registration or deletion of ``name`` wins over its pending check."""
        entry = self._pending.pop(name, None)
        if entry is None:
            return False
        if entry.future is not None:
            entry.future.cancel()
        with self._claim_lock:
            if not entry.claimed:  # nobody will check it: release whoever waits in _settle
                entry.claimed = True
                entry.done.set()
        return True

    def sync(self, pool: Executor | None = None) -> SyncReport:
        """Know what the store has and this replica does not (or knows in another version); drop
        what the store no longer has. Also the start-up scan, where ``pool`` reads and checks the
        headers in parallel. A changed task that is loaded is read and checked in full at once."""
        with self._lock:
            snapshot = self.store.snapshot()
            changes = diff_snapshots(self._known, snapshot)
            held = self._hold_mass_removal(snapshot, changes.removed)
            todo = [
                n
                for n in [*changes.added, *changes.changed]
                if self.failed.get(n) != snapshot[n] and n not in self._pending  # its checker applies it
            ]

            def check(name: str) -> TaskHeader | PiggybackError:
                return _guarded("header", name, lambda: self._check_header(name, snapshot[name])[0])

            read = pool.map(check, todo) if pool is not None and len(todo) > 1 else map(check, todo)
            known, failed = [], {}
            for name, outcome in zip(todo, read, strict=True):
                if self._known_outcome(name, outcome, snapshot[name]):
                    known.append(name)
                    self._reload_if_loaded(name, snapshot[name])
                elif not isinstance(outcome, TaskNotFoundError):
                    failed[name] = str(outcome)
            removed = [] if held else changes.removed
            for name in removed:
                self._forget(name)
                self.failed.pop(name, None)
                self._reasons.pop(name, None)
                self._unload(name)
                self.on_removed(name)
            # a broken file that was deleted from the store, or repaired, stops being reported
            for name in [n for n in self.failed if n not in snapshot]:
                del self.failed[name]
                self._reasons.pop(name, None)
            return SyncReport(loaded=known, removed=removed, failed=failed, held=held)

    def _reload_if_loaded(self, name: str, listed: str) -> None:
        """Under the lock: a loaded task whose file changed is read again now (its requests then
        find the new version); if the new file cannot be served, the old version keeps serving."""
        with self._lru_lock:
            current = self._loaded.get(name)
        if name not in self.engine.tasks or (current is not None and current[0] == listed):
            return
        outcome = self._read(name, listed)
        if isinstance(outcome, PiggybackError):
            if not isinstance(outcome, TaskNotFoundError):
                self._fail(name, listed, outcome)
            return
        try:
            self._serve(name, *outcome)
        except Exception as exc:
            self._fail(name, listed, exc)

    def _hold_mass_removal(self, snapshot: dict[str, str], removed: list[str]) -> list[str]:
        """The removals to hold back (under the lock): all of them when they are ``removal_guard``
        of the tasks or more and the previous sync did not list exactly the same; else none."""
        served = len(self._known)
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
            created = not self._drop_pending(name) and name not in self._known and name not in self.engine.tasks
            stored = self.store.put(name, data)
            loaded = self._serve(name, task, stored.version)
        return Registration(task=loaded, created=created)

    def delete(self, name: str) -> None:
        validate_task_name(name)
        with self._lock:
            known = name in self._known or name in self.engine.tasks
            was_pending = self._drop_pending(name)
            try:
                self.store.delete(name)
            except TaskNotFoundError:
                if not known and not was_pending:
                    raise
            self._forget(name)
            self.failed.pop(name, None)
            self._reasons.pop(name, None)
            self._unload(name)
            self.on_removed(name)
