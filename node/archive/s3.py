"""The archive in an S3-compatible object store (``[archive] url = "s3://bucket/prefix"``).

Through boto3, the AWS SDK for Python (well kept, and what every S3-compatible server is tested
against). Objects are stored under ``<prefix>/<key>``; a PUT that has returned is durable, so the
listener acknowledges a C-STORE only after it. Path-style addressing, so that servers behind a
plain host name (SeaweedFS, MinIO, Ceph) work without DNS for each bucket. Each request has
``[archive] s3_timeout_s`` to connect and to read, and botocore's standard retry mode (3
attempts, backing off); what still fails is an :class:`node.archive.ArchiveError`.

Objects the worker and sender need as files (``dcmread``, pynetdicom's chunked send) are copied
into a private scratch folder (``<data_dir>/scratch``, 0700) for as long as they are used.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node import faults
from node.archive import (
    Archive,
    ArchiveError,
    Stored,
    check_key,
    check_prefix,
    make_private_dirs,
)

if TYPE_CHECKING:
    from node.settings import Settings

_MISSING = {"404", "NoSuchKey", "NotFound"}


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3Archive(Archive):
    """Objects in ``bucket`` under ``prefix``, through a boto3 S3 ``client`` (thread-safe)."""

    def __init__(self, client: Any, bucket: str, prefix: str, *, scratch: Path, endpoint: str = "") -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")
        self.endpoint = endpoint
        self.scratch = Path(scratch)
        make_private_dirs(self.scratch)
        self._errors = (BotoCoreError, ClientError)

    @classmethod
    def for_settings(cls, settings: Settings) -> S3Archive:
        import boto3
        from botocore.config import Config

        cfg = settings.archive
        bucket, prefix = cfg.s3_location()
        client = boto3.session.Session().client(
            "s3", endpoint_url=cfg.s3_endpoint_url or None, region_name=cfg.s3_region or None,
            aws_access_key_id=cfg.s3_access_key_id or None,
            aws_secret_access_key=cfg.s3_secret_access_key or None,
            config=Config(connect_timeout=cfg.s3_timeout_s, read_timeout=cfg.s3_timeout_s,
                          retries={"mode": "standard", "max_attempts": 3},
                          s3={"addressing_style": "path"}, max_pool_connections=16))
        return cls(client, bucket, prefix, scratch=settings.data_path / "scratch", endpoint=cfg.s3_endpoint_url)

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, doing: str, key: str, exc: Exception) -> ArchiveError:
        code = _error_code(exc)
        return ArchiveError(f"object store {self.describe()}: {doing} {key}: "
                            f"{code or type(exc).__name__}: {exc}"[:500])

    def put(self, key: str, data: bytes | memoryview) -> int:
        body = bytes(data)
        name = self._name(key)
        if key.startswith("results/"):
            faults.fire("result-write")  # tests: the store refuses while results are written
        try:
            self.client.put_object(Bucket=self.bucket, Key=name, Body=body,
                                   ContentType="application/dicom")
        except self._errors as exc:
            raise self._fail("storing", key, exc) from None
        return len(body)

    def read(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._name(key))
            return response["Body"].read()
        except self._errors as exc:
            if _error_code(exc) in _MISSING:
                raise FileNotFoundError(f"{key} is not in the archive") from None
            raise self._fail("reading", key, exc) from None

    def size(self, key: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._name(key))["ContentLength"])
        except self._errors as exc:
            if _error_code(exc) in _MISSING:
                return None
            raise self._fail("looking up", key, exc) from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        except self._errors as exc:
            if _error_code(exc) not in _MISSING:
                raise self._fail("deleting", key, exc) from None

    def list(self, prefix: str) -> list[Stored]:
        start = f"{self.prefix}/" if self.prefix else ""
        check_prefix(prefix)
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start + prefix)
            for page in pages:
                for item in page.get("Contents", ()):
                    found.append(Stored(item["Key"][len(start):], int(item["Size"])))
        except self._errors as exc:
            raise self._fail("listing", prefix or "(all)", exc) from None
        return sorted(found, key=lambda item: item.key)

    @contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        fd, name = tempfile.mkstemp(dir=self.scratch, suffix=".dcm")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(self.read(key))
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    def probe(self) -> str:
        key = f"tmp/readyz-{uuid.uuid4().hex}.probe"
        self.put(key, b"cxrnode readiness probe\n")
        self.delete(key)
        return f"writable ({self.describe()})"

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} at {self.endpoint}" if self.endpoint else where
