"""The model repository (Triton's model-repository extension): which stored tasks are loaded.

* **load** = fetch the task from the store (a version the engine does not serve yet is read,
  validated and registered, as a store poll would), then build its weights and **pin** them in the
  weight cache: they stay built, never evicted by other tasks' traffic, until unloaded. Pinned
  weights count against the cache budget; a load that would pass it is refused
  (WeightBudgetError) and pins nothing.
* **unload** = unpin and evict its built weights (the task's masks stay: they are the store's).
* ``model_control``: ``lazy`` (the default) serves every stored task, loaded or not (load and
  unload only pin and unpin); ``explicit``, as Triton's EXPLICIT mode, serves only loaded tasks
  (``pin_tasks`` are loaded at start): the others answer TaskNotLoadedError (404). What is loaded
  is this process's state: a restart loads ``pin_tasks`` only, and each replica has its own.
* A task removed from the store (a deletion, or a store poll) is unloaded with it: registered
  again, it must be loaded again.

Blocking (store reads, validation, building weights): the app calls ``load`` and ``unload`` on
its management thread, which also serialises them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from piggyback_core import TASK_NAME_PATTERN, Engine, LoadedTask, TaskNotFoundError, validate_task_name

from .errors import BadRequestError, TaskNotLoadedError
from .registry import TaskRegistry

__all__ = ["IndexEntry", "ModelRepository", "ModelState", "check_load_parameters", "task_name"]

# Triton's model states (those that apply here)
ModelState = Literal["READY", "LOADING", "UNAVAILABLE"]


def task_name(name: str) -> str:
    """A load's or unload's model name as a task name; a name with a version gets a message naming
    the task (REST and gRPC)."""
    base = re.split(r"[/:@]", name, maxsplit=1)[0]
    if base != name and TASK_NAME_PATTERN.fullmatch(base):
        raise BadRequestError(
            f"{name!r}: load and unload take a task name without a version: a task serves one version, the "
            f"store's (load {base!r}; GET /v2/models/{base} names its version)"
        )
    validate_task_name(name)
    return name


def check_load_parameters(task: str, keys: Iterable[str]) -> None:
    """Load's ``config`` and ``file:...`` parameters (a configuration or files to load instead of the
    repository's) are refused: the store is the repository."""
    refused = [k for k in keys if k == "config" or k.startswith("file:")]
    if refused:
        raise BadRequestError(
            f"load parameters {refused} are not supported: the store is the model repository (a task file "
            f"is added with PUT /tasks/{task})"
        )


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str | None  # None while the task is still being read from the store
    state: ModelState
    reason: str


class ModelRepository:
    def __init__(self, engine: Engine, registry: TaskRegistry, *, explicit: bool, loaded: list[str]) -> None:
        self.engine = engine
        self.registry = registry
        self.explicit = explicit
        self._loaded = set(loaded)
        self._lock = threading.Lock()
        registry.on_removed = self._forget

    @property
    def loaded(self) -> set[str]:
        with self._lock:
            return set(self._loaded)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._loaded.discard(name)

    def _known(self, name: str) -> bool:
        """Whether this replica has ``name`` (served, still being read, or broken in the store)."""
        registry = self.registry
        return name in registry or name in self.engine.tasks or registry.is_pending(name) or name in registry.failed

    def check_served(self, name: str) -> None:
        """With ``explicit``: TaskNotLoadedError (404) for a stored task that is not loaded,
        TaskNotFoundError for one this replica does not have at all."""
        if not self.explicit or name in self._loaded:
            return
        if self._known(name):
            raise TaskNotLoadedError(task=name)
        raise TaskNotFoundError(task=name)

    def load(self, name: str) -> LoadedTask:
        """Fetch ``name`` from the store (registering a version not served yet), build and pin its
        weights, and serve it. Raises, and loads nothing, when the store has no such task
        (TaskNotFoundError), its file cannot be served (TaskFileError) or its weights do not fit
        beside the pinned ones (WeightBudgetError)."""
        task = self.registry.fetch(name)
        self.engine.pin(name)
        with self._lock:
            self._loaded.add(name)
        return task

    def unload(self, name: str) -> None:
        """Unpin ``name`` and drop its built weights; with ``explicit`` it stops answering. A task
        that is known but not loaded is a no-op; one unknown here and in the store is
        TaskNotFoundError."""
        validate_task_name(name)
        with self._lock:
            was_loaded = name in self._loaded
            self._loaded.discard(name)
        if not was_loaded and not self._known(name) and name not in self.registry.store:
            raise TaskNotFoundError(task=name)
        self.engine.unpin(name)
        self.engine.cache.evict(name)

    def index(self, *, ready_only: bool = False) -> list[IndexEntry]:
        """Every task this replica has (as its last store poll saw the store), sorted by name."""
        tasks = self.engine.tasks
        loaded = self.loaded
        registry = self.registry
        names = sorted({*registry.names(), *tasks, *registry.failed, *registry.pending_names()})
        entries = [self._entry(name, tasks.get(name), name in loaded) for name in names]
        return [e for e in entries if e.state == "READY" or not ready_only]

    def _entry(self, name: str, task: LoadedTask | None, loaded: bool) -> IndexEntry:
        not_loaded = f"not loaded (model_control=explicit): POST /v2/repository/models/{name}/load"
        if task is None and name in self.registry.failed:
            return IndexEntry(name, None, "UNAVAILABLE", "its file in the store cannot be served: load it to see why")
        if self.explicit and not loaded:
            return IndexEntry(name, task.version if task else None, "UNAVAILABLE", not_loaded)
        if task is None and self.registry.is_pending(name):  # ready_after=backbone: its header is being checked
            return IndexEntry(name, None, "LOADING", "being checked in the store; a request for it reads it at once")
        if task is None:  # servable, its file read at its first use: its version from its header
            return IndexEntry(name, self.registry.file_version(name), "READY", "")
        return IndexEntry(name, task.version, "READY", "")
