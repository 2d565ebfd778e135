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

boto3 is imported lazily (``pip install 'piggyback-server[s3]'``).
"""

from __future__ import annotations

import base64
import builtins
import hashlib
from typing import Any
from urllib.parse import urlparse

from .errors import StoreError, TaskNotFoundError
from .names import TASK_NAME_PATTERN, validate_task_name
from .store import SUFFIX, MaskStore, StoredTask, TaskBlob

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

    def __init__(self, url: str, *, client: Any = None, endpoint_url: str | None = None) -> None:
        self.url = url
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
