"""The one storage interface every repository backend implements.

Objects are immutable: ``put`` of an existing key is a no-op when the bytes are identical and
raises :class:`ObjectExists` otherwise; nothing is ever overwritten in place (S3 Object Lock
friendly). Retention removes whole objects with ``delete``.

Keys are relative '/'-separated names such as ``chunks/3f/3fa2...`` or ``keys/k-1.000001.json``.
Each segment uses only ``A-Z a-z 0-9 . _ - + = @``, may not start with '.', and '..', absolute
keys and empty segments are rejected (a leading '.' is reserved for backends' temporary files).

Public methods validate the key and call the backend's ``_hook`` methods, so a backend only
implements the storage operations themselves.
"""

from __future__ import annotations

import builtins
import os
import re
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, cast

from emrdr.repo.errors import InvalidKey

if TYPE_CHECKING:
    from emrdr.config import RepoSettings, Settings

MAX_KEY_LENGTH = 1024
_SEGMENT = re.compile(r"[A-Za-z0-9_\-+=@][A-Za-z0-9._\-+=@]*")

#: Feature names a backend may declare in :attr:`Storage.features`.
FEATURE_FSYNC = "fsync"  # a successful put is durable on the local disk
FEATURE_CONDITIONAL_PUT = "conditional_put"  # create-if-absent is enforced by the server
FEATURE_LOCAL_PATH = "local_path"  # objects are plain files (``path_of`` works)


def validate_key(key: object) -> str:
    """Return ``key`` if it is a safe relative object key, else raise :class:`InvalidKey`."""
    if not isinstance(key, str):
        raise InvalidKey(key, "must be a str")
    if not key:
        raise InvalidKey(key, "empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(key, f"longer than {MAX_KEY_LENGTH} characters")
    if key.startswith("/"):
        raise InvalidKey(key, "absolute keys are not allowed")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(key, f"segment {segment!r} is not allowed")
        if not _SEGMENT.fullmatch(segment):
            raise InvalidKey(
                key,
                f"segment {segment!r} must use only A-Z a-z 0-9 . _ - + = @ and not start with '.'",
            )
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: '' or the start of a valid key (it may end with '/')."""
    if prefix == "":
        return prefix
    probe = prefix[:-1] if prefix.endswith("/") else prefix
    if probe:
        validate_key(probe)
    else:
        raise InvalidKey(prefix, "a prefix may not be only '/'")
    return prefix


class Storage(ABC):
    """A flat namespace of immutable objects. Implementations must be thread-safe."""

    #: What this backend guarantees beyond the interface (see the ``FEATURE_*`` names).
    features: frozenset[str] = frozenset()

    def describe(self) -> str:
        """Where the objects live, for messages."""
        return type(self).__name__

    # --- required operations ----------------------------------------------------------
    def put(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` atomically; True if written, False if already identical.

        Raises :class:`ObjectExists` when ``key`` holds different bytes and
        :class:`StorageFullError` when the backend ran out of space (nothing partial remains).
        """
        return self._put(validate_key(key), bytes(data))

    def get(self, key: str) -> bytes:
        """The bytes of ``key``; :class:`ObjectNotFound` if absent."""
        return self._get(validate_key(key))

    def exists(self, key: str) -> bool:
        return self._exists(validate_key(key))

    def size(self, key: str) -> int:
        """Stored size of ``key`` in bytes; :class:`ObjectNotFound` if absent."""
        return self._size(validate_key(key))

    def list(self, prefix: str = "") -> list[str]:
        """Every key starting with ``prefix`` (plain string prefix, as in S3), sorted."""
        return sorted(self._list(validate_prefix(prefix)))

    def delete(self, key: str) -> None:
        """Remove ``key`` (retention); a missing key is not an error."""
        self._delete(validate_key(key))

    # --- optional helpers with portable defaults ---------------------------------------
    def put_file(self, key: str, path: str | os.PathLike[str]) -> bool:
        """Store the content of a local file under ``key`` (same rules as :meth:`put`)."""
        return self.put(key, Path(path).read_bytes())

    def get_to_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Write the object to ``path`` atomically (temp file in the same directory + rename)."""
        write_file_atomic(Path(path), self.get(key))

    # --- backend hooks -----------------------------------------------------------------
    @abstractmethod
    def _put(self, key: str, data: bytes) -> bool: ...

    @abstractmethod
    def _get(self, key: str) -> bytes: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _size(self, key: str) -> int: ...

    @abstractmethod
    def _list(self, prefix: str) -> builtins.list[str]: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...


def write_file_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` via a synced temp file and rename (replaces ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_storage(settings: RepoSettings | Settings) -> Storage:
    """The storage backend configured in ``settings.repo`` (or a bare ``RepoSettings``).

    A local repository without a path uses ``$EMRDR_HOME/repo``. boto3 is imported only for
    S3, so opening a local repository stays cheap (``wal push`` runs once per segment).
    """
    from emrdr.paths import default_home  # not emrdr.config: keep pydantic off this path

    repo = cast("RepoSettings", getattr(settings, "repo", settings))
    local_path = getattr(settings, "repo_path", None) or repo.path or (default_home() / "repo")
    if repo.kind == "local":
        from emrdr.repo.storage_local import LocalStorage

        return LocalStorage(local_path)
    if repo.kind == "s3":
        if not repo.s3_bucket:
            raise ValueError("repo.kind is 's3' but repo.s3_bucket is not set")
        from emrdr.repo.storage_s3 import S3Storage

        return S3Storage(
            endpoint=repo.s3_endpoint,
            bucket=repo.s3_bucket,
            prefix=repo.s3_prefix,
            region=repo.s3_region,
        )
    raise ValueError(f"unknown repository kind {repo.kind!r}")
