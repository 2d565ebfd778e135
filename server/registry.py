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

All methods are blocking (disk, validation); the app calls them from a worker thread. One lock
serialises them, so a sync never races a registration on this replica.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from piggyback_core import (
    Engine,
    LoadedTask,
    MaskStore,
    PiggybackError,
    TaskFile,
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


class TaskRegistry:
    def __init__(self, engine: Engine, store: MaskStore) -> None:
        self.engine = engine
        self.store = store
        self._lock = threading.Lock()
        self._versions: dict[str, str] = {}  # store version of what the engine holds, per task
        self.failed: dict[str, str] = {}  # tasks in the store that could not be loaded, and why

    def _load_from_store(self, name: str) -> LoadedTask:
        blob = self.store.get(name)
        task = TaskFile.from_bytes(blob.data).renamed(name)
        loaded = self.engine.add_task(task)
        self._versions[name] = blob.version
        return loaded

    def sync(self) -> SyncReport:
        """Load what the store has and the engine lacks (or holds in another version); drop what
        the store no longer has. Also the start-up load."""
        with self._lock:
            snapshot = self.store.snapshot()
            changes = diff_snapshots(self._versions, snapshot)
            loaded, failed = [], {}
            for name in [*changes.added, *changes.changed]:
                if self.failed.get(name) == snapshot[name]:
                    continue  # the same broken version: reported once
                try:
                    self._load_from_store(name)
                    loaded.append(name)
                    self.failed.pop(name, None)
                except TaskNotFoundError:
                    continue  # deleted meanwhile; the next sync sees it gone
                except PiggybackError as exc:
                    failed[name] = str(exc)
                    self.failed[name] = snapshot[name]
                    log.error("task %r in the store cannot be served: %s", name, exc)
            for name in changes.removed:
                self._versions.pop(name, None)
                self.failed.pop(name, None)
                try:
                    self.engine.remove_task(name)
                except TaskNotFoundError:
                    pass
            # a broken file that was deleted from the store, or repaired, stops being reported
            for name in [n for n in self.failed if n not in snapshot]:
                del self.failed[name]
            return SyncReport(loaded=loaded, removed=changes.removed, failed=failed)

    def register(self, name: str, data: bytes) -> Registration:
        """Validate ``data`` as task ``name`` for this backbone, store it, serve it."""
        validate_task_name(name)
        task = TaskFile.from_bytes(data)
        if task.name != name:
            task = task.renamed(name)
            data = task.to_bytes()  # the stored file carries the name it is served under
        task.check_compatible(self.engine.backbone)
        with self._lock:
            created = name not in self.engine.tasks
            stored = self.store.put(name, data)
            loaded = self.engine.add_task(task)
            self._versions[name] = stored.version
            self.failed.pop(name, None)
        return Registration(task=loaded, created=created)

    def delete(self, name: str) -> None:
        validate_task_name(name)
        with self._lock:
            in_engine = name in self.engine.tasks
            try:
                self.store.delete(name)
            except TaskNotFoundError:
                if not in_engine:
                    raise
            self._versions.pop(name, None)
            if in_engine:
                self.engine.remove_task(name)
