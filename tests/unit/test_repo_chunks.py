"""Content-addressed chunks: keyed ids, dedup, zstd, sealing, integrity on read, splitting."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from emrdr.repo.chunks import (
    DEFAULT_CHUNK_SIZE,
    PAGE_SIZE,
    ChunkStore,
    chunk_key,
    md5_text_sample,
    split,
)
from emrdr.repo.crypto import aad_for, open_sealed
from emrdr.repo.errors import IntegrityError, ObjectNotFound
from emrdr.repo.keys import MIN_PBKDF2_ITERATIONS, KeyFileSource, KeyRing, PassphraseSource
from emrdr.repo.storage_local import LocalStorage


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "repo")


@pytest.fixture
def ring(storage: LocalStorage, tmp_path: Path) -> KeyRing:
    return KeyRing.init(storage, KeyFileSource.generate(tmp_path / "repo.key"))


@pytest.fixture
def store(storage: LocalStorage, ring: KeyRing) -> ChunkStore:
    return ChunkStore(storage, ring)


class TestChunkStore:
    def test_round_trip(self, store: ChunkStore) -> None:
        data = md5_text_sample(200_000)
        ref = store.put(data)
        assert ref.new and ref.raw_size == len(data)
        assert 0 < ref.stored_size < len(data)  # md5 text compresses
        assert store.get(ref.id) == data

    def test_id_is_a_keyed_hash(self, store: ChunkStore, tmp_path: Path) -> None:
        """Same data, same repository -> same id; another repository's key -> another id."""
        assert store.chunk_id(b"page") == store.chunk_id(b"page")
        assert len(store.chunk_id(b"page")) == 64
        other_storage = LocalStorage(tmp_path / "other")
        other_ring = KeyRing.init(other_storage, KeyFileSource.generate(tmp_path / "o.key"))
        assert ChunkStore(other_storage, other_ring).chunk_id(b"page") != store.chunk_id(b"page")

    def test_dedup_stores_one_object(self, store: ChunkStore, storage: LocalStorage) -> None:
        """The same data twice is one object; the second put reports new=False."""
        data = os.urandom(100_000)
        first, second = store.put(data), store.put(data)
        assert first.new and not second.new
        assert first.id == second.id and first.stored_size == second.stored_size
        assert storage.list("chunks/") == [chunk_key(first.id)]

    def test_object_layout(self, store: ChunkStore, storage: LocalStorage) -> None:
        ref = store.put(b"abc" * 1000)
        assert storage.exists(f"chunks/{ref.id[:2]}/{ref.id}")
        assert store.exists(ref.id)

    def test_incompressible_data_is_stored_raw(self, store: ChunkStore) -> None:
        data = os.urandom(64 * 1024)
        encoded = store.encode(data)
        assert not encoded.compressed
        assert store.decode(encoded.id, encoded.blob) == data
        assert store.encode(b"\x00" * 65536).compressed

    def test_zstd_level_is_honoured(self, storage: LocalStorage, ring: KeyRing) -> None:
        """The configured level is the one used: output equals zstd at that level."""
        data = md5_text_sample(DEFAULT_CHUNK_SIZE)
        sizes = {}
        for level in (1, 3, 19):
            store = ChunkStore(storage, ring, zstd_level=level)
            payload = open_sealed(
                ring, store.encode(data).blob, aad_for("chunk", store.chunk_id(data))
            )
            expected = zstandard.ZstdCompressor(level=level).compress(data)
            assert payload == b"\x01" + expected
            sizes[level] = len(payload)
        assert sizes[19] < sizes[1]
        with pytest.raises(ValueError):
            ChunkStore(storage, ring, zstd_level=0)

    def test_flipped_byte_names_the_chunk(self, store: ChunkStore, storage: LocalStorage) -> None:
        ref = store.put(b"x" * 5000)
        path = storage.path_of(chunk_key(ref.id))
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0x40
        path.chmod(0o640)
        path.write_bytes(bytes(blob))
        with pytest.raises(IntegrityError, match=f"^chunk {ref.id}: authentication failed"):
            store.get(ref.id)

    def test_truncated_chunk(self, store: ChunkStore, storage: LocalStorage) -> None:
        ref = store.put(b"y" * 5000)
        path = storage.path_of(chunk_key(ref.id))
        path.write_bytes(path.read_bytes()[:-1])
        with pytest.raises(IntegrityError, match=f"chunk {ref.id}"):
            store.get(ref.id)

    def test_blob_moved_to_another_chunk_key(
        self, store: ChunkStore, storage: LocalStorage
    ) -> None:
        """Copying chunk A's object over chunk B's fails authentication for B."""
        a, b = store.put(b"A" * 4096), store.put(b"B" * 4096)
        storage.path_of(chunk_key(b.id)).write_bytes(storage.get(chunk_key(a.id)))
        with pytest.raises(IntegrityError) as caught:
            store.get(b.id)
        assert (caught.value.kind, caught.value.id) == ("chunk", b.id)

    def test_authentic_but_wrong_content_is_caught(
        self, store: ChunkStore, storage: LocalStorage, ring: KeyRing
    ) -> None:
        """A chunk sealed for id X whose content hashes to Y (a buggy writer) fails on read."""
        from emrdr.repo.crypto import seal

        fake_id = store.chunk_id(b"what it should be")
        blob = seal(ring.active, b"\x00" + b"something else", aad_for("chunk", fake_id))
        storage.put(chunk_key(fake_id), blob)
        with pytest.raises(IntegrityError, match="content does not match its id"):
            store.get(fake_id)

    def test_missing_chunk(self, store: ChunkStore) -> None:
        with pytest.raises(ObjectNotFound):
            store.get("0" * 64)
        with pytest.raises(ValueError):
            store.get("../../keys")

    def test_chunks_survive_key_rotation(
        self, storage: LocalStorage, ring: KeyRing, tmp_path: Path
    ) -> None:
        """After rotation old chunks read back and identical data still dedups."""
        store = ChunkStore(storage, ring)
        old = store.put(b"before rotation" * 100)
        ring.rotate(PassphraseSource("new", MIN_PBKDF2_ITERATIONS))
        reopened = KeyRing.open(storage, PassphraseSource("new", MIN_PBKDF2_ITERATIONS))
        store2 = ChunkStore(storage, reopened)
        assert store2.get(old.id) == b"before rotation" * 100
        assert store2.put(b"before rotation" * 100).new is False
        fresh = store2.put(b"after rotation" * 100)
        assert storage.get(chunk_key(fresh.id))[2:].startswith(reopened.active.id.encode())

    def test_thread_pool_puts_and_gets(self, store: ChunkStore, storage: LocalStorage) -> None:
        """Many threads sharing one store: every chunk stored once and read back intact."""
        blocks = [md5_text_sample(64 * 1024, seed=n % 16) for n in range(64)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            refs = list(pool.map(store.put, blocks))
            back = list(pool.map(store.get, [r.id for r in refs]))
        assert back == blocks
        assert sum(r.new for r in refs) == 16
        assert len(storage.list("chunks/")) == 16


class TestSplit:
    def test_bytes_are_cut_on_page_multiples(self) -> None:
        data = os.urandom(3 * PAGE_SIZE + 100)
        parts = list(split(data, chunk_size=2 * PAGE_SIZE))
        assert [len(p) for p in parts] == [2 * PAGE_SIZE, PAGE_SIZE + 100]
        assert b"".join(parts) == data

    def test_files_and_file_objects(self, tmp_path: Path) -> None:
        data = os.urandom(DEFAULT_CHUNK_SIZE * 2 + 1)
        path = tmp_path / "16384"
        path.write_bytes(data)
        assert b"".join(split(path)) == data
        assert [len(p) for p in split(str(path))] == [DEFAULT_CHUNK_SIZE] * 2 + [1]
        with path.open("rb", buffering=0) as raw:
            assert b"".join(split(raw)) == data
        assert list(split(io.BytesIO(b""))) == []

    def test_chunk_size_must_be_whole_pages(self) -> None:
        with pytest.raises(ValueError, match="multiple of 8192"):
            list(split(b"x", chunk_size=1000))
        with pytest.raises(ValueError):
            list(split(b"x", chunk_size=0))

    def test_one_changed_page_changes_one_chunk(self, store: ChunkStore) -> None:
        """The reason for page-aligned fixed chunks: an update to one page touches one chunk."""
        relation = bytearray(os.urandom(4 * DEFAULT_CHUNK_SIZE))
        before = [store.chunk_id(c) for c in split(bytes(relation))]
        relation[2 * DEFAULT_CHUNK_SIZE + 5 * PAGE_SIZE] ^= 0xFF
        after = [store.chunk_id(c) for c in split(bytes(relation))]
        assert sum(a != b for a, b in zip(before, after, strict=True)) == 1
