"""Envelope encryption: data keys (DEKs) wrapped by a key-encryption key (KEK).

A :class:`KeySource` turns stored KDF parameters into a :class:`Kek`: a passphrase
(PBKDF2-HMAC-SHA256, 600,000 iterations by default, never fewer than 100,000), a key file
(32 random bytes, base64), or later a PKCS#11 HSM (a ``Kek`` whose wrap/unwrap run inside it).

Layout in the repository: one immutable object per key-ring *generation*::

    keys/keyring.<generation>.json   every data key of the repository, each wrapped
                                     (AES-256-GCM, AAD = key id, seq, generation) by the
                                     KEK of that generation; KDF parameters and salt,
                                     KEK fingerprint, the active key id

``init`` writes generation 1. ``rotate`` (new active data key) and ``rewrap`` (new passphrase)
write generation n+1 with every data key rewrapped; readers take the newest generation. Data is
never re-encrypted: old backups stay readable with their old data keys, which every generation
keeps. One object per generation (rather than one per key and generation) makes a rotation
atomic and a compare-and-set: generation n+1 is create-only, so a crash leaves generation n in
force and the second of two concurrent rotations gets :class:`KeyringError` instead of silently
dropping the first one's new key.

Older generations still open with the old passphrase until they are deleted:
:meth:`KeyRing.prune_superseded` removes them once the new passphrase is confirmed.

The chunk-id key (keyed hash for deduplication) is derived by HKDF from the *first* data key, so
it is stable across rotations and dedup keeps working.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
import secrets
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from emrdr.repo.crypto import KEY_SIZE, KIND_KEY, Aad, DataKey, aad_for, hkdf_sha256
from emrdr.repo.errors import (
    IntegrityError,
    KeyringError,
    ObjectExists,
    UnknownDataKey,
    WeakKdfError,
    WrongKeyError,
)
from emrdr.repo.storage import Storage

if TYPE_CHECKING:
    from emrdr.config import RepoSettings

DEFAULT_PBKDF2_ITERATIONS = 600_000
MIN_PBKDF2_ITERATIONS = 100_000
KDF_PBKDF2 = "pbkdf2-hmac-sha256"
KDF_KEYFILE = "keyfile"
RECORD_FORMAT = 1
_COMMIT = re.compile(r"keys/keyring\.(\d+)\.json")
_CHUNK_ID_INFO = b"emrdr chunk-id key v1"
_FINGERPRINT_INFO = b"emrdr kek fingerprint v1"


# --- key-encryption keys -------------------------------------------------------------------
class Kek(ABC):
    """A key-encryption key: wraps and unwraps data keys. An HSM implements this on-device."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """A stable, non-secret identifier of this KEK (stored in key records)."""

    @abstractmethod
    def wrap(self, dek: bytes, aad: Aad) -> bytes: ...

    @abstractmethod
    def unwrap(self, wrapped: bytes, aad: Aad) -> bytes:
        """The DEK; raises ``cryptography.exceptions.InvalidTag`` if this KEK did not wrap it."""


class SoftwareKek(Kek):
    """A 32-byte KEK held in memory; wraps with AES-256-GCM (random nonce | ct | tag)."""

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_SIZE:
            raise ValueError(f"a key-encryption key is {KEY_SIZE} bytes")
        self._aead = AESGCM(material)
        self._fingerprint = "kek-" + hmac.digest(material, _FINGERPRINT_INFO, "sha256")[:8].hex()

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def wrap(self, dek: bytes, aad: Aad) -> bytes:
        nonce = os.urandom(12)  # a KEK wraps a handful of keys: random nonces are safe
        return nonce + self._aead.encrypt(nonce, dek, aad.encoded)

    def unwrap(self, wrapped: bytes, aad: Aad) -> bytes:
        if len(wrapped) < 12 + 16:
            raise InvalidTag()
        return self._aead.decrypt(wrapped[:12], wrapped[12:], aad.encoded)


class KeySource(ABC):
    """Where the KEK comes from (passphrase, key file, HSM)."""

    #: For messages: "passphrase", "key file", ...
    description: str = "key source"

    @abstractmethod
    def new_kdf(self) -> dict[str, Any]:
        """KDF parameters for a new key-ring generation (e.g. a fresh salt)."""

    @abstractmethod
    def kek(self, kdf: dict[str, Any]) -> Kek:
        """The KEK for stored KDF parameters; KeyringError if they belong to another kind."""


class PassphraseSource(KeySource):
    """KEK = PBKDF2-HMAC-SHA256(passphrase, 16-byte random salt, iterations)."""

    description = "passphrase"

    def __init__(
        self, passphrase: str | bytes, iterations: int = DEFAULT_PBKDF2_ITERATIONS
    ) -> None:
        _check_iterations(iterations, "requested")
        if not passphrase:
            raise ValueError("empty passphrase")
        self._passphrase = passphrase.encode() if isinstance(passphrase, str) else passphrase
        self.iterations = iterations
        self._cache: dict[tuple[bytes, int], Kek] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_env(
        cls, variable: str, iterations: int = DEFAULT_PBKDF2_ITERATIONS
    ) -> PassphraseSource:
        value = os.environ.get(variable)
        if not value:
            raise KeyringError(f"repository passphrase variable {variable} is not set")
        return cls(value, iterations)

    def __repr__(self) -> str:
        return f"PassphraseSource(iterations={self.iterations}, passphrase=***)"

    def new_kdf(self) -> dict[str, Any]:
        return {"kind": KDF_PBKDF2, "iterations": self.iterations, "salt": _b64(os.urandom(16))}

    def kek(self, kdf: dict[str, Any]) -> Kek:
        _expect_kind(kdf, KDF_PBKDF2, self.description)
        iterations = int(kdf["iterations"])
        _check_iterations(iterations, "stored")
        salt = base64.b64decode(kdf["salt"])
        with self._lock:
            cached = self._cache.get((salt, iterations))
            if cached is None:
                material = PBKDF2HMAC(hashes.SHA256(), KEY_SIZE, salt, iterations).derive(
                    self._passphrase
                )
                cached = self._cache[(salt, iterations)] = SoftwareKek(material)
        return cached


class KeyFileSource(KeySource):
    """KEK = 32 random bytes, base64, in a file readable only by its owner."""

    description = "key file"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            material = base64.b64decode(self.path.read_text().strip(), validate=True)
        except FileNotFoundError:
            raise KeyringError(f"key file {self.path} does not exist") from None
        except ValueError:
            raise KeyringError(f"key file {self.path} is not valid base64") from None
        if len(material) != KEY_SIZE:
            raise KeyringError(
                f"key file {self.path} must hold {KEY_SIZE} bytes, not {len(material)}"
            )
        self._kek = SoftwareKek(material)

    @classmethod
    def generate(cls, path: str | os.PathLike[str]) -> KeyFileSource:
        """Create a new key file (mode 0600; refuses to overwrite) and return its source."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(_b64(secrets.token_bytes(KEY_SIZE)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return cls(target)

    def __repr__(self) -> str:
        return f"KeyFileSource({str(self.path)!r})"

    def new_kdf(self) -> dict[str, Any]:
        return {"kind": KDF_KEYFILE}

    def kek(self, kdf: dict[str, Any]) -> Kek:
        _expect_kind(kdf, KDF_KEYFILE, self.description)
        return self._kek


def key_source_from_settings(repo: RepoSettings) -> KeySource:
    """The configured KEK source: ``repo.key_file`` if set, else the passphrase variable."""
    if repo.key_file is not None:
        return KeyFileSource(repo.key_file)
    return PassphraseSource.from_env(repo.passphrase_env)


# --- the key ring --------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyInfo:
    """What ``emrdr keys list`` shows about one data key (no secrets)."""

    id: str
    seq: int
    created_at: str
    active: bool


@dataclass(frozen=True)
class _Generation:
    number: int
    kdf: dict[str, Any]
    keys: tuple[tuple[KeyInfo, DataKey], ...]


class KeyRing:
    """The repository's data keys, unwrapped. Thread-safe; rotations are serialised."""

    def __init__(self, storage: Storage, source: KeySource, generation: _Generation) -> None:
        self._storage = storage
        self._source = source
        self._lock = threading.Lock()
        first = generation.keys[0][1]
        self._chunk_id_key = hkdf_sha256(first.material, first.id.encode(), _CHUNK_ID_INFO)
        self._set(generation)

    def _set(self, generation: _Generation) -> None:
        self._gen = generation
        self._by_id = {dek.id: dek for _, dek in generation.keys}

    # --- opening -------------------------------------------------------------------------
    @staticmethod
    def exists(storage: Storage) -> bool:
        """True if the repository has a key ring."""
        return bool(_generations(storage))

    @classmethod
    def init(cls, storage: Storage, source: KeySource) -> KeyRing:
        """Create generation 1 with the first data key; KeyringError if a key ring exists."""
        if cls.exists(storage):
            raise KeyringError(f"{storage.describe()} already has a key ring; open it instead")
        first = DataKey(_new_key_id(1), secrets.token_bytes(KEY_SIZE))
        keys = ((KeyInfo(first.id, 1, _now(), active=True), first),)
        generation = _write(storage, source, _Generation(1, source.new_kdf(), keys), "init")
        return cls(storage, source, generation)

    @classmethod
    def open(cls, storage: Storage, source: KeySource) -> KeyRing:
        """Load and unwrap the newest generation; writes nothing.

        Raises :class:`WrongKeyError` if ``source`` is not that generation's KEK.
        """
        return cls(storage, source, _load(storage, source))

    def refresh(self) -> None:
        """Reload the newest generation (another process may have rotated)."""
        with self._lock:
            self._set(_load(self._storage, self._source))

    # --- reading -------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self._gen.number

    @property
    def active(self) -> DataKey:
        """The data key new objects are sealed with (the newest one)."""
        return self._gen.keys[-1][1]

    def data_key(self, key_id: str) -> DataKey:
        """The data key ``key_id``, reloading once if unknown; else :class:`UnknownDataKey`."""
        key = self._by_id.get(key_id)
        if key is None:
            self.refresh()
            key = self._by_id.get(key_id)
            if key is None:
                raise UnknownDataKey(key_id)
        return key

    def __call__(self, key_id: str) -> DataKey:
        """A KeyRing is a key lookup for :func:`emrdr.repo.crypto.open_sealed`."""
        return self.data_key(key_id)

    @property
    def chunk_id_key(self) -> bytes:
        """Key of the chunk-id hash: HKDF of the first data key, stable across rotations."""
        return self._chunk_id_key

    def list_keys(self) -> list[KeyInfo]:
        return [info for info, _ in self._gen.keys]

    # --- changing ------------------------------------------------------------------------
    def rotate(self, new_source: KeySource | None = None) -> DataKey:
        """Add a new active data key; with ``new_source`` also rewrap every key under it.

        Writes generation n+1; no data object is touched and every old key stays usable.
        KeyringError if another process changed the key ring since it was loaded.
        """
        with self._lock:
            current = self._gen
            seq = current.keys[-1][0].seq + 1
            dek = DataKey(_new_key_id(seq), secrets.token_bytes(KEY_SIZE))
            keys = tuple((replace(i, active=False), d) for i, d in current.keys)
            keys += ((KeyInfo(dek.id, seq, _now(), active=True), dek),)
            self._commit(keys, new_source, "rotate")
            return dek

    def rewrap(self, new_source: KeySource) -> int:
        """Rewrap every data key under ``new_source`` (passphrase change); the new generation."""
        with self._lock:
            self._commit(self._gen.keys, new_source, "rewrap")
            return self.generation

    def superseded_objects(self) -> list[str]:
        """Objects of generations older than the one in force."""
        return [commit_key(n) for n in _generations(self._storage) if n < self.generation]

    def prune_superseded(self) -> list[str]:
        """Delete older generations, so an old passphrase no longer opens anything."""
        doomed = self.superseded_objects()
        for key in doomed:
            self._storage.delete(key)
        return doomed

    def _commit(
        self,
        keys: tuple[tuple[KeyInfo, DataKey], ...],
        new_source: KeySource | None,
        reason: str,
    ) -> None:
        source = new_source or self._source
        kdf = source.new_kdf() if new_source is not None else self._gen.kdf
        generation = _Generation(self._gen.number + 1, kdf, keys)
        self._set(_write(self._storage, source, generation, reason))
        self._source = source


# --- persistence ----------------------------------------------------------------------------
def commit_key(generation: int) -> str:
    """The object key of key-ring generation ``generation``."""
    return f"keys/keyring.{generation:06d}.json"


def _generations(storage: Storage) -> list[int]:
    return sorted(int(m.group(1)) for k in storage.list("keys/") if (m := _COMMIT.fullmatch(k)))


def _wrap_aad(key_id: str, seq: int, generation: int) -> Aad:
    return aad_for(KIND_KEY, key_id, seq=seq, generation=generation)


def _write(storage: Storage, source: KeySource, gen: _Generation, reason: str) -> _Generation:
    kek = source.kek(gen.kdf)
    now = _now()
    records = [
        {
            "key_id": dek.id,
            "seq": info.seq,
            "created_at": info.created_at,
            "wrapped_key": _b64(kek.wrap(dek.material, _wrap_aad(dek.id, info.seq, gen.number))),
        }
        for info, dek in gen.keys
    ]
    document = {
        "format": RECORD_FORMAT,
        "generation": gen.number,
        "created_at": now,
        "reason": reason,
        "kdf": gen.kdf,
        "kek_fingerprint": kek.fingerprint,
        "wrap": "aes-256-gcm",
        "active": gen.keys[-1][1].id,
        "keys": records,
    }
    try:
        storage.put(commit_key(gen.number), _dumps(document))
    except ObjectExists:
        raise KeyringError(
            f"key-ring generation {gen.number} was written by another process since this one "
            "loaded the key ring; reopen it and retry"
        ) from None
    return gen


def _load(storage: Storage, source: KeySource) -> _Generation:
    generations = _generations(storage)
    if not generations:
        raise KeyringError(f"{storage.describe()} has no key ring; initialise it first")
    number = generations[-1]
    doc = _read_json(storage, commit_key(number), str(number))
    records = doc.get("keys")
    if doc.get("generation") != number or not isinstance(records, list) or not records:
        raise IntegrityError("keyring", str(number), "document does not match its name")
    kdf = dict(doc["kdf"])
    kek = source.kek(kdf)
    if doc.get("kek_fingerprint") != kek.fingerprint:
        raise WrongKeyError(str(records[0].get("key_id")), source.description)
    keys: list[tuple[KeyInfo, DataKey]] = []
    for seq, record in enumerate(records, start=1):
        key_id = str(record.get("key_id"))
        if record.get("seq") != seq:
            raise IntegrityError(KIND_KEY, key_id, f"out of sequence in generation {number}")
        try:
            material = kek.unwrap(
                base64.b64decode(record["wrapped_key"]), _wrap_aad(key_id, seq, number)
            )
        except (InvalidTag, KeyError, ValueError):
            raise IntegrityError(
                KIND_KEY, key_id, "wrapped data key failed authentication (corrupted key ring)"
            ) from None
        info = KeyInfo(key_id, seq, str(record.get("created_at")), seq == len(records))
        keys.append((info, DataKey(key_id, material)))
    if doc.get("active") != keys[-1][1].id:
        raise IntegrityError("keyring", str(number), "active key is not the newest key")
    return _Generation(number, kdf, tuple(keys))


def _read_json(storage: Storage, key: str, generation: str) -> dict[str, Any]:
    raw = storage.get(key)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError("keyring", generation, f"{key} is not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise IntegrityError("keyring", generation, f"{key} has an unknown format")
    return data


# --- helpers ----------------------------------------------------------------------------------
def _check_iterations(iterations: int, what: str) -> None:
    if iterations < MIN_PBKDF2_ITERATIONS:
        raise WeakKdfError(
            f"{what} PBKDF2 iteration count {iterations:,} is below the minimum "
            f"{MIN_PBKDF2_ITERATIONS:,} (default {DEFAULT_PBKDF2_ITERATIONS:,})"
        )


def _expect_kind(kdf: dict[str, Any], kind: str, description: str) -> None:
    stored = kdf.get("kind")
    if stored != kind:
        raise KeyringError(
            f"the key ring is protected by a {_KIND_NAMES.get(str(stored), str(stored))}, "
            f"but a {description} was given"
        )


_KIND_NAMES = {KDF_PBKDF2: "passphrase", KDF_KEYFILE: "key file"}


def _new_key_id(seq: int) -> str:
    return f"k-{seq:04d}-{secrets.token_hex(4)}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n"
