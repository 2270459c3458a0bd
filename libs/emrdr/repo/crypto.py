"""Authenticated encryption of repository objects: AES-256-GCM under per-object subkeys.

Sealed blob (format version 1)::

    0x01 | len(key_id) (1 byte) | key_id (ASCII) | salt (32 bytes) | nonce (12 bytes) | ct+tag

The GCM associated data is the whole header followed by :func:`aad_for` of the object's
identity (kind, id, and context such as backup id and position). Flipping any byte, truncating,
appending, or moving a blob to another object's key therefore fails authentication, reported as
:class:`IntegrityError` naming the object's kind and id.

Why nonces never repeat under one key
-------------------------------------
GCM breaks if a (key, nonce) pair is ever reused. Counters are unsafe here: many processes
(``archive_command`` runs once per WAL segment, backup workers, restores) seal under the same data
key, and a counter would need shared, crash-safe state. Plain random 96-bit nonces are limited by
NIST SP 800-38D to 2^32 messages per key, which seven years of chunks and WAL could approach.

Instead every object gets its own AES key: ``subkey = HKDF-SHA256(ikm=DEK, salt=<32 random
bytes>, info="emrdr object key v1")``, used for exactly one message (with a random nonce as
well). A (subkey, nonce) pair can repeat only if two 256-bit salts collide: after 2^48 objects the
probability is below 2^-160. There is no state to share across processes, forks or restored VM
snapshots beyond a working ``os.urandom``. The cost is two HMAC calls (~2 us) per object.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from emrdr.repo.errors import IntegrityError

FORMAT_VERSION = 1
SALT_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
MAX_KEY_ID = 64
_SUBKEY_INFO = b"emrdr object key v1"
_AAD_PREFIX = b"emrdr/aad/v1\n"

#: Object kinds used in associated data.
KIND_CHUNK = "chunk"
KIND_MANIFEST = "manifest"
KIND_WAL = "wal"
KIND_KEY = "key"


@dataclass(frozen=True)
class DataKey:
    """A data-encryption key (DEK): its id and 32 bytes of key material."""

    id: str
    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.material) != KEY_SIZE:
            raise ValueError(f"data key {self.id}: expected {KEY_SIZE} bytes of key material")
        raw = self.id.encode("ascii")
        if not 0 < len(raw) <= MAX_KEY_ID:
            raise ValueError(f"data key id {self.id!r} must be 1..{MAX_KEY_ID} ASCII characters")


@dataclass(frozen=True)
class Aad:
    """The identity of an object, bound into its encryption as GCM associated data."""

    kind: str
    id: str
    encoded: bytes = field(repr=False)


def aad_for(kind: str, id: str, **context: str | int) -> Aad:
    """Canonical associated data for object ``kind``/``id`` plus context (e.g. backup, position)."""
    if not kind or not id:
        raise ValueError("associated data needs a kind and an id")
    body = {"kind": kind, "id": id, **context}
    if len(body) != len(context) + 2:
        raise ValueError("context may not redefine 'kind' or 'id'")
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return Aad(kind=kind, id=id, encoded=_AAD_PREFIX + text.encode("ascii"))


KeyLookup = Mapping[str, DataKey] | Callable[[str], DataKey]
"""How :func:`open_sealed` finds a key by id: a mapping or a function raising KeyError."""


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 HKDF with SHA-256 and a 32-byte output (one expand block)."""
    prk = hmac.digest(salt, ikm, "sha256")
    return hmac.digest(prk, info + b"\x01", "sha256")


def seal(key: DataKey, plaintext: bytes, aad: Aad) -> bytes:
    """Encrypt and authenticate ``plaintext`` as the object named by ``aad``."""
    salt_nonce = os.urandom(SALT_SIZE + NONCE_SIZE)
    raw_id = key.id.encode("ascii")
    header = bytes((FORMAT_VERSION, len(raw_id))) + raw_id + salt_nonce
    subkey = hkdf_sha256(key.material, salt_nonce[:SALT_SIZE], _SUBKEY_INFO)
    ciphertext = AESGCM(subkey).encrypt(salt_nonce[SALT_SIZE:], plaintext, header + aad.encoded)
    return header + ciphertext


@dataclass(frozen=True)
class SealedHeader:
    version: int
    key_id: str
    salt: bytes
    nonce: bytes
    length: int  # header size in bytes


def parse_header(blob: bytes | memoryview, aad: Aad) -> SealedHeader:
    """The header of a sealed blob; :class:`IntegrityError` naming the object if malformed."""
    if len(blob) < 2:
        raise IntegrityError(aad.kind, aad.id, f"truncated: only {len(blob)} bytes")
    version, id_len = blob[0], blob[1]
    if version != FORMAT_VERSION:
        raise IntegrityError(aad.kind, aad.id, f"unknown sealed-object format version {version}")
    length = 2 + id_len + SALT_SIZE + NONCE_SIZE
    if id_len == 0 or id_len > MAX_KEY_ID or len(blob) < length + TAG_SIZE:
        raise IntegrityError(aad.kind, aad.id, f"truncated or malformed header ({len(blob)} bytes)")
    try:
        key_id = bytes(blob[2 : 2 + id_len]).decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError(aad.kind, aad.id, "malformed data-key id in header") from None
    salt = bytes(blob[2 + id_len : 2 + id_len + SALT_SIZE])
    nonce = bytes(blob[length - NONCE_SIZE : length])
    return SealedHeader(version, key_id, salt, nonce, length)


def sealed_key_id(blob: bytes, aad: Aad) -> str:
    """Which data key sealed ``blob`` (without decrypting it)."""
    return parse_header(blob, aad).key_id


def open_sealed(keys: DataKey | KeyLookup, blob: bytes, aad: Aad) -> bytes:
    """Authenticate and decrypt ``blob`` as the object named by ``aad``.

    ``keys`` is the one expected key, or a lookup by key id (mapping or function). Any
    tampering -- flipped, truncated, extended, or swapped with another object -- raises
    :class:`IntegrityError` naming ``aad.kind`` and ``aad.id``.
    """
    view = memoryview(blob)
    header = parse_header(view, aad)
    key = _resolve(keys, header.key_id, aad)
    subkey = hkdf_sha256(key.material, header.salt, _SUBKEY_INFO)
    try:
        return AESGCM(subkey).decrypt(
            header.nonce, view[header.length :], bytes(view[: header.length]) + aad.encoded
        )
    except InvalidTag:
        raise IntegrityError(
            aad.kind, aad.id, "authentication failed (flipped, truncated or swapped object)"
        ) from None


def _resolve(keys: DataKey | KeyLookup, key_id: str, aad: Aad) -> DataKey:
    if isinstance(keys, DataKey):
        if keys.id != key_id:
            raise IntegrityError(
                aad.kind, aad.id, f"sealed with data key {key_id!r}, expected {keys.id!r}"
            )
        return keys
    try:
        return keys[key_id] if isinstance(keys, Mapping) else keys(key_id)
    except KeyError:
        raise IntegrityError(
            aad.kind,
            aad.id,
            f"sealed with data key {key_id!r}, which is not in the key ring "
            "(corrupted header or an object from another repository)",
        ) from None
