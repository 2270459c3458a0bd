"""The backup repository: immutable objects in pluggable storage, envelope-encrypted.

Layers, bottom up: :mod:`~emrdr.repo.storage` (one interface; local files or S3),
:mod:`~emrdr.repo.crypto` (AES-256-GCM with the object's identity as associated data),
:mod:`~emrdr.repo.keys` (data keys wrapped by a passphrase / key-file / HSM key) and
:mod:`~emrdr.repo.chunks` (content-addressed, deduplicated, compressed chunks).

``S3Storage`` is imported lazily so that local-only users (``emrdr wal push``) never load boto3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emrdr.repo.chunks import DEFAULT_CHUNK_SIZE, ChunkRef, ChunkStore, chunk_key, split
from emrdr.repo.crypto import Aad, DataKey, aad_for, open_sealed, seal, sealed_key_id
from emrdr.repo.errors import (
    IntegrityError,
    InvalidKey,
    KeyringError,
    ObjectExists,
    ObjectNotFound,
    RepoError,
    StorageFullError,
    UnknownDataKey,
    WeakKdfError,
    WrongKeyError,
)
from emrdr.repo.keys import (
    DEFAULT_PBKDF2_ITERATIONS,
    MIN_PBKDF2_ITERATIONS,
    KeyFileSource,
    KeyInfo,
    KeyRing,
    KeySource,
    PassphraseSource,
    key_source_from_settings,
)
from emrdr.repo.storage import Storage, open_storage, validate_key
from emrdr.repo.storage_local import LocalStorage

if TYPE_CHECKING:
    from emrdr.repo.storage_s3 import S3Credentials, S3Storage

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PBKDF2_ITERATIONS",
    "MIN_PBKDF2_ITERATIONS",
    "Aad",
    "ChunkRef",
    "ChunkStore",
    "DataKey",
    "IntegrityError",
    "InvalidKey",
    "KeyFileSource",
    "KeyInfo",
    "KeyRing",
    "KeySource",
    "KeyringError",
    "LocalStorage",
    "ObjectExists",
    "ObjectNotFound",
    "PassphraseSource",
    "RepoError",
    "S3Credentials",
    "S3Storage",
    "Storage",
    "StorageFullError",
    "UnknownDataKey",
    "WeakKdfError",
    "WrongKeyError",
    "aad_for",
    "chunk_key",
    "key_source_from_settings",
    "open_sealed",
    "open_storage",
    "seal",
    "sealed_key_id",
    "split",
    "validate_key",
]


def __getattr__(name: str) -> Any:
    if name in ("S3Storage", "S3Credentials"):
        from emrdr.repo import storage_s3

        return getattr(storage_s3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
