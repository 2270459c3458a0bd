"""Reading chunks without the re-hash (``verify_digest=False``, what a full restore does):
AES-GCM under the chunk id still catches every change to the object."""

from __future__ import annotations

from pathlib import Path

import pytest

from emrdr.repo.chunks import ChunkStore, chunk_key, md5_text_sample
from emrdr.repo.crypto import aad_for, seal
from emrdr.repo.errors import IntegrityError
from emrdr.repo.keys import KeyFileSource, KeyRing
from emrdr.repo.storage_local import LocalStorage


@pytest.fixture
def setup(tmp_path: Path) -> tuple[LocalStorage, KeyRing, ChunkStore]:
    storage = LocalStorage(tmp_path / "repo")
    ring = KeyRing.init(storage, KeyFileSource.generate(tmp_path / "repo.key"))
    return storage, ring, ChunkStore(storage, ring)


def test_round_trip_without_rehash(setup: tuple[LocalStorage, KeyRing, ChunkStore]) -> None:
    _, _, store = setup
    data = md5_text_sample(1 << 20)
    ref = store.put(data)
    assert store.get(ref.id, verify_digest=False) == data
    assert store.get(ref.id) == data


def test_a_flipped_byte_still_fails_naming_the_chunk(
    setup: tuple[LocalStorage, KeyRing, ChunkStore],
) -> None:
    storage, _, store = setup
    ref = store.put(md5_text_sample(1 << 20))
    path = storage.root / chunk_key(ref.id)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.chmod(0o600)
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=ref.id):
        store.get(ref.id, verify_digest=False)


def test_a_chunk_moved_to_another_id_still_fails(
    setup: tuple[LocalStorage, KeyRing, ChunkStore],
) -> None:
    storage, _, store = setup
    a = store.put(b"a" * 8192)
    b_id = store.chunk_id(b"b" * 8192)
    storage.put(chunk_key(b_id), storage.get(chunk_key(a.id)))
    with pytest.raises(IntegrityError, match="authentication failed"):
        store.get(b_id, verify_digest=False)


def test_only_the_rehash_catches_a_writer_that_misnamed_a_chunk(
    setup: tuple[LocalStorage, KeyRing, ChunkStore],
) -> None:
    """What ``verify_digest`` (the restore drill) adds: a chunk emrdr itself sealed under the
    wrong id authenticates, and only the re-hash notices."""
    storage, ring, store = setup
    wrong_id = store.chunk_id(b"what it should be")
    storage.put(chunk_key(wrong_id),
                seal(ring.active, b"\x00something else", aad_for("chunk", wrong_id)))
    assert store.get(wrong_id, verify_digest=False) == b"something else"
    with pytest.raises(IntegrityError, match="content does not match its id"):
        store.get(wrong_id)
