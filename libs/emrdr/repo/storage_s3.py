"""S3-compatible object storage backend (AWS S3, MinIO, Ceph RGW, ...), via boto3.

A put never overwrites: it first asks whether the key exists (then compares bytes, as the
interface requires), and otherwise writes with ``If-None-Match: *`` so the server itself refuses
to replace an object created meanwhile. A server that rejects the conditional header with
``NotImplemented`` is remembered and written with a plain PUT after the existence check (the race
window is then only between two writers of one key; chunks are content-addressed, and key-ring
commits detect it on read). This makes the backend compatible with Object Lock (WORM) buckets.

Credentials: explicit :class:`S3Credentials`, else boto3's usual chain (environment, profile,
instance role).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from emrdr.repo.errors import ObjectExists, ObjectNotFound, RepoError
from emrdr.repo.storage import FEATURE_CONDITIONAL_PUT, Storage

_MISSING = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_UNSUPPORTED = {"NotImplemented", "501"}


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # never print the secret
        return f"S3Credentials(access_key_id={self.access_key_id!r}, secret_access_key=***)"


class S3Storage(Storage):
    """Objects under ``prefix`` in ``bucket`` (the bucket must exist)."""

    def __init__(
        self,
        *,
        bucket: str,
        endpoint: str | None = None,
        prefix: str = "",
        region: str = "us-east-1",
        credentials: S3Credentials | None = None,
        max_pool_connections: int = 16,
        client: Any = None,
    ) -> None:
        self.bucket = bucket
        self.endpoint = endpoint
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._lock = threading.Lock()
        self._conditional = True
        if client is None:
            kwargs: dict[str, Any] = {}
            if credentials is not None:
                kwargs = {
                    "aws_access_key_id": credentials.access_key_id,
                    "aws_secret_access_key": credentials.secret_access_key,
                    "aws_session_token": credentials.session_token,
                }
            config = Config(
                region_name=region,
                max_pool_connections=max_pool_connections,
                retries={"max_attempts": 5, "mode": "standard"},
                s3={"addressing_style": "path"},
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint, config=config, **kwargs
            )
        self._s3 = client

    @property
    def features(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({FEATURE_CONDITIONAL_PUT}) if self._conditional else frozenset()

    def describe(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    # --- hooks ---------------------------------------------------------------------------
    def _put(self, key: str, data: bytes) -> bool:
        if self._exists(key):
            return self._same_or_raise(key, data)
        try:
            if self._conditional:
                self._s3.put_object(
                    Bucket=self.bucket, Key=self.prefix + key, Body=data, IfNoneMatch="*"
                )
            else:
                self._s3.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)
        except ClientError as exc:
            code = _code(exc)
            if code in _PRECONDITION:
                return self._same_or_raise(key, data)
            if code in _UNSUPPORTED and self._conditional:
                with self._lock:
                    self._conditional = False
                return self._put(key, data)
            raise self._error(exc, key) from exc
        return True

    def _get(self, key: str) -> bytes:
        try:
            response = self._s3.get_object(Bucket=self.bucket, Key=self.prefix + key)
            body: bytes = response["Body"].read()
        except ClientError as exc:
            raise self._error(exc, key) from exc
        return body

    def _exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFound:
            return False
        return True

    def _size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def _list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self._s3.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                keys.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", ()))
        except ClientError as exc:
            raise self._error(exc, prefix) from exc
        return keys

    def _delete(self, key: str) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return
            raise self._error(exc, key) from exc

    # --- internals ---------------------------------------------------------------------------
    def _head(self, key: str) -> dict[str, Any]:
        try:
            head: dict[str, Any] = self._s3.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as exc:
            raise self._error(exc, key) from exc
        return head

    def _same_or_raise(self, key: str, data: bytes) -> bool:
        if self._size(key) != len(data) or self._get(key) != data:
            raise ObjectExists(key)
        return False

    def _error(self, exc: ClientError, key: str) -> RepoError:
        code = _code(exc)
        if code in _MISSING:
            return ObjectNotFound(key, self.describe())
        if code == "NoSuchBucket":
            return RepoError(f"bucket {self.bucket!r} does not exist ({self.describe()})")
        message = exc.response.get("Error", {}).get("Message", str(exc))
        return RepoError(f"{self.describe()}: {key}: S3 error {code}: {message}")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
