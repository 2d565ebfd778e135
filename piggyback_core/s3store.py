"""An S3-compatible object store behind the :class:`~piggyback_core.store.MaskStore` interface.

For deployments without a ReadWriteMany volume: AWS S3, Google Cloud Storage's XML API, MinIO,
Ceph RGW, Cloudflare R2. One object ``<prefix><task>.safetensors`` per task. Location:
``s3://bucket/optional/prefix``. Credentials, region and endpoint come from boto3's standard chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, an instance or pod role, ``AWS_ENDPOINT_URL`` for a
non-AWS endpoint), so nothing secret goes into the location string.

Why this is as safe as the filesystem store:

* ``put`` is one ``PutObject`` with the body's MD5 (``Content-MD5``): S3 stores the whole object or
  nothing, and a body corrupted in transit is refused by the server. Readers never see a torn file.
* The version of a task is the object's ETag, which a ``ListObjectsV2`` returns for every task in
  one request (per 1000 tasks), so polling for other replicas' changes costs one request, and a
  ``GetObject`` returns the same token for the bytes it read. Writing identical bytes again keeps
  the ETag: nothing to reload, because nothing changed.
* S3 has been strongly consistent for reads after writes and for lists since December 2020; two
  writers of one name: the last ``PutObject`` wins, exactly as the filesystem's last rename.

A server reads a task's **header** with a ranged ``GetObject`` (the first 64 KiB, and the rest of
the header if it is longer), and its **body** at its first use into a bounded **local disk cache**
(``cache_dir``, ``cache_bytes``): one file per task version, named by its ETag, mapped into memory
like a filesystem store's file, the least recently used files removed past the bound (a file still
mapped by a loaded task keeps its disk blocks until it is let go). A body whose ETag is its MD5 (a
single-part upload) is checked against it before it enters the cache.

boto3 is imported lazily (``pip install 'piggyback-server[s3]'``).
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import mmap
import os
import re
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import PiggybackError, StoreError, TaskNotFoundError
from .names import TASK_NAME_PATTERN, validate_task_name
from .store import SUFFIX, MaskStore, StoredTask, TaskBlob, TaskHead
from .taskfile import header_length

__all__ = ["S3Store", "parse_s3_url"]


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``; the prefix is empty or ends in ``/``."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreError(f"not an S3 location: {url!r} (expected s3://bucket[/prefix])")
    if parsed.query or parsed.fragment:
        raise StoreError(f"an S3 location takes no query or fragment: {url!r}")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


def _etag(value: str) -> str:
    return value.strip('"')


class S3Store(MaskStore):
    """Task files as objects in an S3 bucket. ``client`` is a boto3 S3 client; by default one is
    made from the environment (``endpoint_url`` overrides ``AWS_ENDPOINT_URL``)."""

    def __init__(
        self,
        url: str,
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        cache_dir: str | Path | None = None,
        cache_bytes: int = 0,
    ) -> None:
        self.url = url
        self.cache = _DiskCache(Path(cache_dir), cache_bytes) if cache_dir is not None and cache_bytes > 0 else None
        self.bucket, self.prefix = parse_s3_url(url)
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise StoreError("an s3:// store needs boto3: pip install 'piggyback-server[s3]'") from exc
            client = boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                config=Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=60),
            )
        self.client = client
        self._check_bucket()

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    def _key(self, name: str) -> str:
        return f"{self.prefix}{validate_task_name(name)}{SUFFIX}"

    def _fail(self, what: str, exc: Exception) -> StoreError:
        code, message = _error_code(exc), _error_message(exc)
        return StoreError(f"cannot {what} in {self.url}: {code + ': ' if code else ''}{message}")

    def _check_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # botocore raises many unrelated classes; all mean "unusable"
            if _error_code(exc) in ("404", "NoSuchBucket"):
                raise StoreError(f"S3 bucket {self.bucket!r} does not exist ({self.url})") from exc
            raise self._fail("open the store", exc) from exc

    def put(self, name: str, data: bytes) -> StoredTask:
        key = self._key(name)
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        try:
            response = self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentMD5=md5,
                ContentType="application/octet-stream",
            )
        except Exception as exc:
            raise self._fail(f"store task {name!r}", exc) from exc
        return StoredTask(name=name, version=_etag(response["ETag"]), size=len(data))

    def get(self, name: str) -> TaskBlob:
        key = self._key(name)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            data = response["Body"].read()
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404"):
                raise TaskNotFoundError(task=name) from None
            raise self._fail(f"read task {name!r}", exc) from exc
        return TaskBlob(name=name, version=_etag(response["ETag"]), data=data)

    def head(self, name: str, version: str | None = None) -> TaskHead:
        """The header from the disk cache when it holds ``version``, else from one ranged
        ``GetObject`` of the first 64 KiB (two when the header is longer)."""
        if self.cache is not None and version is not None:
            path = self.cache.lookup(name, version)
            if path is not None:
                try:
                    with open(path, "rb") as f:
                        prefix = f.read(8)
                        if len(prefix) == 8:
                            prefix += f.read(header_length(prefix) - 8)
                        return TaskHead(name, version, os.fstat(f.fileno()).st_size, prefix)
                except FileNotFoundError:
                    pass  # evicted meanwhile
        key = self._key(name)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{_HEAD_BYTES - 1}")
            prefix = response["Body"].read()
            etag = response["ETag"]
            size = _total_size(response, len(prefix))
            if len(prefix) >= 8 and header_length(prefix[:8]) > len(prefix) and size > len(prefix):
                rest = self.client.get_object(
                    Bucket=self.bucket,
                    Key=key,
                    Range=f"bytes={len(prefix)}-{header_length(prefix[:8]) - 1}",
                    IfMatch=etag,
                )
                prefix += rest["Body"].read()
        except PiggybackError:
            raise  # a header that claims too much: the file's problem, not the store's
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404"):
                raise TaskNotFoundError(task=name) from None
            if _error_code(exc) == "InvalidRange":  # an empty object
                return TaskHead(name, "", 0, b"")
            raise self._fail(f"read the header of task {name!r}", exc) from exc
        return TaskHead(name=name, version=_etag(etag), size=size, prefix=prefix)

    def map(self, name: str, version: str | None = None) -> TaskBlob:
        """With a disk cache: the task's file there (downloaded first if it is not), mapped into
        memory; without one, :meth:`get`."""
        if self.cache is None:
            return self.get(name)
        if version is not None:
            path = self.cache.lookup(name, version)
            if path is not None:
                try:
                    return TaskBlob(name=name, version=version, data=_map(path))
                except FileNotFoundError:
                    pass  # evicted meanwhile
        blob = self.get(name)
        if _is_md5(blob.version) and hashlib.md5(blob.data, usedforsecurity=False).hexdigest() != blob.version:
            raise StoreError(f"task {name!r} read from {self.url} does not match its ETag (MD5): a corrupt transfer")
        try:
            path = self.cache.put(name, blob.version, blob.data)
            return TaskBlob(name=name, version=blob.version, data=_map(path))
        except OSError:  # a full or unwritable cache disk: serve from memory this time
            return blob

    def delete(self, name: str) -> None:
        key = self._key(name)
        try:
            # DeleteObject succeeds on a missing key; the contract wants TaskNotFoundError.
            self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404"):
                raise TaskNotFoundError(task=name) from None
            raise self._fail(f"delete task {name!r}", exc) from exc
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise self._fail(f"delete task {name!r}", exc) from exc

    def list(self) -> builtins.list[StoredTask]:
        out: builtins.list[StoredTask] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    stem = obj["Key"][len(self.prefix) :].removesuffix(SUFFIX)
                    if stem == obj["Key"][len(self.prefix) :] or TASK_NAME_PATTERN.fullmatch(stem) is None:
                        continue  # anything foreign in the bucket
                    out.append(StoredTask(name=stem, version=_etag(obj["ETag"]), size=int(obj["Size"])))
        except Exception as exc:
            raise self._fail("list tasks", exc) from exc
        return sorted(out, key=lambda t: t.name)


_HEAD_BYTES = 64 * 1024  # one ranged read takes the header of any task file of a torchvision backbone


def _total_size(response: dict[str, Any], read: int) -> int:
    """The object's size from a ranged read's ``Content-Range: bytes a-b/TOTAL``."""
    content_range = response.get("ContentRange") or ""
    total = content_range.rpartition("/")[2]
    return int(total) if total.isdigit() else read


def _is_md5(etag: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{32}", etag) is not None


def _map(path: Path) -> mmap.mmap | bytearray:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else bytearray()


class _DiskCache:
    """Task files on local disk, ``<name>.<etag>.safetensors``, at most ``max_bytes`` in all: the
    least recently used go first (a hit touches its file's mtime; order at start: by mtime)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the S3 disk cache {str(root)!r}: {exc.strerror}") from exc
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # file name -> bytes, least recently used first
        found = []
        for entry in os.scandir(root):
            if entry.name.startswith(".tmp-"):
                Path(entry.path).unlink(missing_ok=True)  # a download cut short
            elif entry.name.endswith(SUFFIX) and entry.is_file():
                st = entry.stat()
                found.append((st.st_mtime_ns, entry.name, st.st_size))
        for _, file, size in sorted(found):
            self._files[file] = size
        with self._lock:
            self._evict_to(max_bytes)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(self._files.values())

    def files(self) -> list[str]:
        with self._lock:
            return list(self._files)

    @staticmethod
    def _file(name: str, version: str) -> str:
        return f"{name}.{re.sub(r'[^0-9A-Za-z-]', '_', version)}{SUFFIX}"

    def lookup(self, name: str, version: str) -> Path | None:
        file = self._file(name, version)
        with self._lock:
            if file not in self._files:
                return None
            self._files.move_to_end(file)
        path = self.root / file
        try:
            os.utime(path)  # the order survives a restart
        except FileNotFoundError:
            with self._lock:
                self._files.pop(file, None)
            return None
        return path

    def put(self, name: str, version: str, data: bytes | bytearray | mmap.mmap) -> Path:
        """Write a task version (atomically: a temp file renamed), drop its other versions, evict
        the least recently used files past the bound; the path of the new file."""
        file = self._file(name, version)
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.root / file)
        finally:
            tmp.unlink(missing_ok=True)
        with self._lock:
            for old in [f for f in self._files if f.split(".")[0] == name and f != file]:  # other versions
                (self.root / old).unlink(missing_ok=True)
                del self._files[old]
            self._files[file] = len(data)
            self._files.move_to_end(file)
            self._evict_to(self.max_bytes, keep=file)
        return self.root / file

    def _evict_to(self, limit: int, keep: str | None = None) -> None:
        total = sum(self._files.values())
        for file in list(self._files):
            if total <= limit:
                break
            if file == keep:
                continue
            (self.root / file).unlink(missing_ok=True)
            total -= self._files.pop(file)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _error_message(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        message = response.get("Error", {}).get("Message")
        if message:
            return str(message)
    return str(exc) or type(exc).__name__
