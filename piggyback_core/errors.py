"""Domain errors of piggyback_core, one tree under one base.

    PiggybackError
    ├── InvalidTaskNameError          a task name outside ^[a-z0-9][a-z0-9_-]{0,63}$
    ├── BackboneError
    │   ├── UnknownBackboneError      (also a ValueError) an architecture not in the registry
    │   └── WeightsError              weights that cannot be found, read or matched to the network
    ├── TaskFileError                 a task file that cannot be served; nothing of it is loaded
    │   ├── TaskFileFormatError       not safetensors, truncated, trailing bytes, bad header/metadata
    │   ├── TaskFileVersionError      a format version this release does not read
    │   ├── BackboneMismatchError     trained for another architecture
    │   ├── FingerprintMismatchError  trained on other weights of the same architecture
    │   ├── MissingTensorError        a masked layer or head tensor is absent
    │   ├── UnexpectedTensorError     a tensor the backbone has no place for
    │   ├── TensorDtypeError          a tensor of the wrong dtype
    │   ├── TensorShapeError          a tensor of the wrong shape or byte count, or invalid packed bits
    │   └── LabelsError               labels that are not a list of strings matching the head's rows
    ├── ImageError                    an image that cannot be classified
    │   ├── ImageDecodeError          not an image, or a corrupt or unsupported one
    │   └── ImageTooLargeError        more pixels than allowed (a decompression bomb)
    ├── DatasetError                  a training or evaluation folder that cannot be used
    ├── StoreError                    the store could not complete an operation
    │   ├── TaskNotFoundError         no such task (in the store or in the engine)
    │   └── TaskUnavailableError      a stored task whose file cannot be served (found at its first use)
    └── EngineError                   a batch the engine cannot run (bad input shape, empty batch)
        └── WeightBudgetError         a task to pin whose built weights do not fit the cache budget

Context is keyword-only and kept on the exception, so callers (the server) can map an error to a
response without parsing its message: ``FingerprintMismatchError(expected=..., actual=...)``.
"""

from __future__ import annotations

__all__ = [
    "BackboneError",
    "BackboneMismatchError",
    "DatasetError",
    "EngineError",
    "FingerprintMismatchError",
    "ImageDecodeError",
    "ImageError",
    "ImageTooLargeError",
    "InvalidTaskNameError",
    "LabelsError",
    "MissingTensorError",
    "PiggybackError",
    "StoreError",
    "TaskFileError",
    "TaskFileFormatError",
    "TaskFileVersionError",
    "TaskNotFoundError",
    "TaskUnavailableError",
    "TensorDtypeError",
    "TensorShapeError",
    "UnexpectedTensorError",
    "UnknownBackboneError",
    "WeightBudgetError",
    "WeightsError",
]


class PiggybackError(Exception):
    """Base of every error raised on purpose by piggyback_core."""


class InvalidTaskNameError(PiggybackError, ValueError):
    def __init__(self, *, name: object) -> None:
        self.name = name
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        super().__init__(
            f"invalid task name {shown}: use 1-64 characters from a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )


class BackboneError(PiggybackError):
    pass


class UnknownBackboneError(BackboneError, ValueError):
    def __init__(self, *, name: str, available: list[str]) -> None:
        self.name = name
        self.available = available
        super().__init__(f"unknown backbone {name!r}; available: {', '.join(available)}")


class WeightsError(BackboneError):
    def __init__(self, message: str, *, weights: str) -> None:
        self.weights = weights
        super().__init__(message)


class TaskFileError(PiggybackError):
    """A task file that cannot be served. ``task`` is its name when known."""

    def __init__(self, message: str, *, task: str | None = None) -> None:
        self.task = task
        super().__init__(message)


class TaskFileFormatError(TaskFileError):
    pass


class TaskFileVersionError(TaskFileError):
    def __init__(self, *, found: str, supported: str, task: str | None = None) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            f"task file format version {found!r} is not supported (this release reads {supported})",
            task=task,
        )


class BackboneMismatchError(TaskFileError):
    def __init__(self, *, expected: str, actual: str, task: str | None = None) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"task file was trained for backbone {actual!r}, but the serving backbone is {expected!r}",
            task=task,
        )


class FingerprintMismatchError(TaskFileError):
    def __init__(self, *, expected: str, actual: str, task: str | None = None) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"task file was trained on backbone weights with fingerprint {actual}, but the serving "
            f"backbone's fingerprint is {expected}; retrain the task on these weights or serve the "
            "weights it was trained on",
            task=task,
        )


class MissingTensorError(TaskFileError):
    def __init__(self, *, names: list[str], task: str | None = None) -> None:
        self.names = names
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        super().__init__(f"task file lacks {len(names)} tensor(s): {shown}", task=task)


class UnexpectedTensorError(TaskFileError):
    def __init__(self, *, names: list[str], task: str | None = None) -> None:
        self.names = names
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        super().__init__(f"task file holds {len(names)} tensor(s) the backbone has no place for: {shown}", task=task)


class TensorDtypeError(TaskFileError):
    def __init__(self, *, name: str, expected: str, actual: str, task: str | None = None) -> None:
        self.name = name
        self.expected = expected
        self.actual = actual
        super().__init__(f"tensor {name!r} has dtype {actual}, expected {expected}", task=task)


class TensorShapeError(TaskFileError):
    def __init__(self, message: str, *, name: str, task: str | None = None) -> None:
        self.name = name
        super().__init__(message, task=task)


class LabelsError(TaskFileError):
    pass


class ImageError(PiggybackError):
    pass


class ImageDecodeError(ImageError):
    pass


class ImageTooLargeError(ImageError):
    def __init__(self, *, pixels: int, limit: int) -> None:
        self.pixels = pixels
        self.limit = limit
        super().__init__(f"image has {pixels:,} pixels, more than the limit of {limit:,}")


class DatasetError(PiggybackError):
    pass


class StoreError(PiggybackError):
    pass


class TaskNotFoundError(StoreError, KeyError):
    def __init__(self, *, task: str) -> None:
        self.task = task
        super().__init__(f"no task named {task!r}")

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0])


class TaskUnavailableError(StoreError):
    """Task ``task`` is in the store, but its file cannot be served (``reason``): it was found
    corrupt, hostile or foreign when it was first loaded. It stays so until the file changes."""

    def __init__(self, *, task: str, reason: str) -> None:
        self.task = task
        self.reason = reason
        super().__init__(f"task {task!r} is in the store but cannot be served: {reason}")


class EngineError(PiggybackError):
    pass


class WeightBudgetError(EngineError):
    """Pinning ``task`` needs ``needed`` bytes of built weights beside ``pinned`` bytes of pinned
    tasks (``pinned_tasks`` of them) in a cache budget of ``budget`` bytes."""

    def __init__(self, *, task: str, needed: int, pinned: int, pinned_tasks: int, budget: int) -> None:
        self.task, self.needed, self.pinned, self.pinned_tasks, self.budget = task, needed, pinned, pinned_tasks, budget
        super().__init__(
            f"task {task!r} cannot be pinned: its built weights ({needed} bytes) do not fit beside the "
            f"{pinned_tasks} pinned task(s) ({pinned} bytes) in the weight cache budget ({budget} bytes); unpin "
            "(unload) another task or give the cache a larger budget"
        )
