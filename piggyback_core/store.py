"""The mask store: where task files live, the source of truth that replicas share.

:class:`MaskStore` is the interface; :class:`FileSystemStore` the default implementation, one file
``<root>/<task>.safetensors`` per task. It is safe to share between processes and machines over a
POSIX filesystem (a ReadWriteMany volume, NFS):

* ``put`` is atomic: the bytes go to a temp file in the same directory, are fsync'ed, renamed over
  the old file (``os.replace``) and the directory is fsync'ed. A process killed at any point leaves
  the old version or the new one, never a torn file. Two writers of one name: the last rename wins.
* ``snapshot`` costs one ``stat`` per task and returns a version token per task that changes with
  every put (a rename always brings a new inode), so a replica notices another's changes by
  comparing snapshots (:func:`diff_snapshots`) without reading any file.
* Task names are validated before they are joined to any path.
* ``head`` reads a task's header only (a few KiB) and ``map`` maps its file into memory
  (copy-on-write, never written): what a server needs to list a task at start and to load it at its
  first use, without the store's size ever being read into memory. A file is replaced by a rename,
  never rewritten in place, so a mapping keeps the version it was made of. (A tool that truncated a
  stored file in place would make a mapped read fault: write task files with ``put`` or a rename.)
"""

from __future__ import annotations

import builtins
import mmap
import os
import socket
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError, TaskNotFoundError
from .names import TASK_NAME_PATTERN, validate_task_name

__all__ = [
    "FileSystemStore",
    "MaskStore",
    "StoreChanges",
    "StoredTask",
    "TaskBlob",
    "TaskHead",
    "diff_snapshots",
    "open_store",
]

SUFFIX = ".safetensors"
_TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class StoredTask:
    name: str
    version: str  # opaque; changes whenever the stored file changes
    size: int


@dataclass(frozen=True)
class TaskBlob:
    name: str
    version: str
    data: bytes | bytearray | mmap.mmap  # an mmap: copy-on-write, so tensors can be views of it


@dataclass(frozen=True)
class TaskHead:
    """The start of a stored task file: its header at least (``prefix``), and the file's ``size``."""

    name: str
    version: str
    size: int
    prefix: bytes


@dataclass(frozen=True)
class StoreChanges:
    added: list[str]
    changed: list[str]
    removed: list[str]

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def diff_snapshots(old: dict[str, str], new: dict[str, str]) -> StoreChanges:
    """What changed between two :meth:`MaskStore.snapshot` results."""
    return StoreChanges(
        added=sorted(set(new) - set(old)),
        changed=sorted(k for k in new if k in old and new[k] != old[k]),
        removed=sorted(set(old) - set(new)),
    )


class MaskStore(ABC):
    """Where task files live. Implementations must make ``put`` atomic."""

    @abstractmethod
    def put(self, name: str, data: bytes) -> StoredTask:
        """Store ``data`` as task ``name``, replacing any previous version atomically."""

    @abstractmethod
    def get(self, name: str) -> TaskBlob:
        """The bytes of task ``name`` and their version; TaskNotFoundError if absent."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove task ``name``; TaskNotFoundError if absent."""

    @abstractmethod
    def list(self) -> list[StoredTask]:
        """Every stored task, sorted by name."""

    def head(self, name: str, version: str | None = None) -> TaskHead:
        """The header of task ``name`` (:func:`~piggyback_core.taskfile.header_length` bytes) and
        its file's size, without reading the rest where the store can; ``version``: the one the
        caller listed (a store with a local cache may serve it from there)."""
        from .taskfile import header_length  # here: the store alone imports no torch

        blob = self.get(name)
        data = blob.data
        return TaskHead(name, blob.version, len(data), bytes(data[: header_length(data[:8])]))

    def map(self, name: str, version: str | None = None) -> TaskBlob:
        """Task ``name`` as cheaply as the store can hand it over: by default its bytes (:meth:`get`);
        a memory map of a local file where there is one."""
        return self.get(name)

    def snapshot(self) -> dict[str, str]:
        """``{name: version}`` of every stored task; cheap enough to poll."""
        return {t.name: t.version for t in self.list()}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.snapshot()


def _version(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSystemStore(MaskStore):
    """Task files in one directory.

    Temp files left by writers killed mid-put are removed when the store is opened: at once when
    the writer was a process of this host that no longer runs (temp names carry host and pid), and
    after ``stale_temp_after_s`` otherwise (a writer on another machine sharing the volume may
    still be writing it)."""

    def __init__(self, root: str | Path, *, create: bool = True, stale_temp_after_s: float = 3600.0) -> None:
        self.root = Path(root)
        try:
            if create:
                self.root.mkdir(parents=True, exist_ok=True)
            if not self.root.is_dir():
                raise StoreError(f"store directory {str(self.root)!r} does not exist")
        except OSError as exc:
            raise StoreError(f"cannot open store directory {str(self.root)!r}: {exc.strerror}") from exc
        self.remove_stale_temps(older_than_s=stale_temp_after_s)

    def __repr__(self) -> str:
        return f"FileSystemStore({str(self.root)!r})"

    def _path(self, name: str) -> Path:
        return self.root / f"{validate_task_name(name)}{SUFFIX}"

    def put(self, name: str, data: bytes) -> StoredTask:
        final = self._path(name)
        tmp = self.root / f"{_TEMP_PREFIX}{name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                # The version of *our* bytes: a rename keeps inode and mtime, and a stat of the
                # final path after the rename could already see another writer's file.
                version = _version(os.fstat(fd))
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            return StoredTask(name=name, version=version, size=len(data))
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot store task {name!r}: {exc.strerror}") from exc

    def get(self, name: str) -> TaskBlob:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                version = _version(st)
                # a bytearray: TaskFile.from_bytes takes its tensors as views of it, with no copy
                data = bytearray(st.st_size)
                if f.readinto(data) != st.st_size or f.read(1):
                    raise StoreError(f"task {name!r} changed size while being read")
        except FileNotFoundError:
            raise TaskNotFoundError(task=name) from None
        except OSError as exc:
            raise StoreError(f"cannot read task {name!r}: {exc.strerror}") from exc
        return TaskBlob(name=name, version=version, data=data)

    def head(self, name: str, version: str | None = None) -> TaskHead:
        from .taskfile import header_length

        path = self._path(name)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                prefix = f.read(8)
                if len(prefix) == 8:
                    prefix += f.read(header_length(prefix) - 8)
        except FileNotFoundError:
            raise TaskNotFoundError(task=name) from None
        except OSError as exc:
            raise StoreError(f"cannot read task {name!r}: {exc.strerror}") from exc
        return TaskHead(name=name, version=_version(st), size=st.st_size, prefix=prefix)

    def map(self, name: str, version: str | None = None) -> TaskBlob:
        """The file mapped copy-on-write (tensors are views of it; nothing is ever written to it):
        its pages are read at first touch, shared with every process that maps the same file, and
        the kernel may drop them again under memory pressure."""
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size == 0:
                    return TaskBlob(name=name, version=_version(st), data=bytearray())
                data = mmap.mmap(f.fileno(), st.st_size, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise TaskNotFoundError(task=name) from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot map task {name!r}: {getattr(exc, 'strerror', None) or exc}") from exc
        return TaskBlob(name=name, version=_version(st), data=data)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
            _fsync_dir(self.root)
        except FileNotFoundError:
            raise TaskNotFoundError(task=name) from None
        except OSError as exc:
            raise StoreError(f"cannot delete task {name!r}: {exc.strerror}") from exc

    def list(self) -> list[StoredTask]:
        out: list[StoredTask] = []
        try:
            entries = list(os.scandir(self.root))
        except OSError as exc:
            raise StoreError(f"cannot list store {str(self.root)!r}: {exc.strerror}") from exc
        for entry in entries:
            stem = entry.name.removesuffix(SUFFIX)
            if stem == entry.name or TASK_NAME_PATTERN.fullmatch(stem) is None:
                continue  # temp files and anything foreign
            try:
                st = entry.stat()
            except FileNotFoundError:  # deleted between scandir and stat
                continue
            out.append(StoredTask(name=stem, version=_version(st), size=st.st_size))
        return sorted(out, key=lambda t: t.name)

    def temp_files(self) -> builtins.list[Path]:
        return sorted(p for p in self.root.iterdir() if p.name.startswith(_TEMP_PREFIX))

    def remove_stale_temps(self, *, older_than_s: float) -> int:
        """Remove temp files left by killed writers; returns how many were removed."""
        removed = 0
        now = time.time()
        for p in self.temp_files():
            try:
                if _writer_is_dead(p.name) or now - p.stat().st_mtime >= older_than_s:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


_HOST = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname()) or "host"


def _writer_is_dead(temp_name: str) -> bool:
    """True when ``temp_name`` was written by a process of this host that has exited."""
    parts = temp_name[len(_TEMP_PREFIX) :].split(".")
    if len(parts) != 4 or parts[1] != _HOST or not parts[2].isdigit():
        return False  # another host's writer, or an old-style name: only age decides
    pid = int(parts[2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by someone else
    return False


def open_store(location: str | Path, *, cache_dir: str | Path | None = None, cache_bytes: int = 0) -> MaskStore:
    """The store at ``location``: ``s3://bucket[/prefix]`` for an S3-compatible object store
    (:class:`~piggyback_core.s3store.S3Store`, with a local disk cache of task files in ``cache_dir``
    of ``cache_bytes`` at most when both are given), anything else a directory (:class:`FileSystemStore`)."""
    text = str(location)
    if text.startswith("s3://"):
        from .s3store import S3Store

        return S3Store(text, cache_dir=cache_dir, cache_bytes=cache_bytes)
    if "://" in text:
        raise StoreError(f"unsupported store location {text!r}: use a directory or s3://bucket[/prefix]")
    return FileSystemStore(text)
