"""The fast paths of backup and restore: one hashing pass, chunk sessions, batched page checks,
files split across workers (backup) and restored chunk by chunk in parallel (restore)."""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from emrdr.engine.backup import PlannedFile, SourceFile, _entry_from, _Piece, copy_files
from emrdr.engine.pagecheck import (
    BLCKSZ,
    bad_pages_of_files,
    checksum_pages,
    verify_pages,
)
from emrdr.engine.repository import Repository
from emrdr.engine.restore import RestoreError, _Progress, _write_files
from emrdr.repo.chunks import (
    ChunkRef,
    ChunkStore,
    checksum_of_digests,
    chunk_key,
    file_checksum,
    md5_text_sample,
)
from emrdr.repo.crypto import KIND_CHUNK, aad_for, seal
from emrdr.repo.errors import IntegrityError, StorageFullError
from emrdr.repo.keys import KeyFileSource, KeyRing
from emrdr.repo.manifest import FileEntry
from emrdr.repo.storage_local import LocalStorage

CHUNK = 4 * BLCKSZ  # tiny chunks: many per file without big test data


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "repo")


@pytest.fixture
def repo(storage: LocalStorage, tmp_path: Path) -> Repository:
    ring = KeyRing.init(storage, KeyFileSource.generate(tmp_path / "repo.key"))
    return Repository(storage, ring, ChunkStore(storage, ring, zstd_level=1))


def _page(block: int, fill: int) -> bytes:
    """A valid PostgreSQL page (pd_upper != 0) with the right checksum for ``block``."""
    page = bytearray(BLCKSZ)
    page[14:16] = (BLCKSZ - 64).to_bytes(2, "little")  # pd_upper
    page[100:BLCKSZ] = bytes([fill]) * (BLCKSZ - 100)
    page[8:10] = int(checksum_pages(bytes(page), block)[0]).to_bytes(2, "little")
    return bytes(page)


class TestHashing:
    def test_id_is_keyed_on_the_digest_and_decode_returns_it(self, repo: Repository) -> None:
        data = md5_text_sample(50_000)
        ref = repo.chunks.put(data)
        assert ref.digest == hashlib.sha256(data).digest()
        assert ref.id == repo.chunks.id_for_digest(ref.digest)
        assert repo.chunks.get_with_digest(ref.id) == (data, ref.digest)

    def test_chunks_named_by_the_first_id_scheme_still_read(
        self, repo: Repository, storage: LocalStorage
    ) -> None:
        data = b"written by an earlier version" * 100
        legacy = hmac.digest(repo.keyring.chunk_id_key, data, "sha256").hex()
        blob = seal(repo.keyring.active, b"\x00" + data, aad_for(KIND_CHUNK, legacy))
        storage.put(chunk_key(legacy), blob)
        assert repo.chunks.get(legacy) == data

    def test_file_checksum_forms(self, tmp_path: Path) -> None:
        data = os.urandom(3 * CHUNK + 5)
        pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
        expected = checksum_of_digests(hashlib.sha256(p).digest() for p in pieces)
        assert file_checksum(data, "chunks", CHUNK) == expected
        (tmp_path / "f").write_bytes(data)
        assert file_checksum(tmp_path / "f", "chunks", CHUNK) == expected
        assert file_checksum(data, "content", CHUNK) == hashlib.sha256(data).hexdigest()
        assert file_checksum(b"", "chunks") == hashlib.sha256(b"").hexdigest()
        with pytest.raises(ValueError, match="unknown checksum kind"):
            file_checksum(data, "md5")


class TestChunkSession:
    def test_dedups_within_the_session_and_everything_is_readable_after_close(
        self, repo: Repository, storage: LocalStorage
    ) -> None:
        blocks = [md5_text_sample(20_000, seed=n % 5) for n in range(20)]
        with repo.chunks.session(io_threads=3, max_pending=2) as session:
            refs = [session.put(b) for b in blocks]
        assert sum(r.new for r in refs) == 5
        assert len(storage.list("chunks/")) == 5
        for block, ref in zip(blocks, refs, strict=True):
            assert repo.chunks.get(ref.id) == block
        with repo.chunks.session() as again:
            assert not again.put(blocks[0]).new  # found in the repository

    def test_a_write_error_surfaces_and_the_session_fails(
        self, repo: Repository, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def full(key: str, data: bytes, dirs: set[str]) -> bool:
            raise StorageFullError(str(storage.root / key))

        monkeypatch.setattr(storage, "put_new", full)
        with pytest.raises(StorageFullError), repo.chunks.session(io_threads=1) as session:
            for n in range(50):
                session.put(os.urandom(1000) + bytes([n]))
        assert storage.list("chunks/") == []

    def test_put_new_and_sync_dirs(self, storage: LocalStorage) -> None:
        dirs: set[str] = set()
        assert storage.put_new("chunks/ab/x1", b"one", dirs)
        assert storage.put_new("chunks/cd/x2", b"two", dirs)
        assert not storage.put_new("chunks/ab/x1", b"one", dirs)  # identical: fine
        storage.sync_dirs(dirs)
        assert dirs == {str(storage.root / "chunks/ab"), str(storage.root / "chunks/cd")}
        assert storage.get("chunks/cd/x2") == b"two"


class TestPageChecks:
    def test_many_files_in_one_pass_find_the_same_bad_pages(self) -> None:
        a = b"".join(_page(b, 1) for b in range(3))
        b = bytearray(b"".join(_page(131072 + n, 2) for n in range(2)))
        b[BLCKSZ + 200] ^= 0xFF  # second page of b: block 131073 is bad
        c = b"\x00" * BLCKSZ  # a new page: not checked
        assert verify_pages(bytes(b), 131072)[0].block == 131073
        assert bad_pages_of_files([(a, 0), (bytes(b), 131072), (c, 7), (b"", 0)]) == [
            (1, 131073)
        ]
        assert bad_pages_of_files([]) == []


def _piece(sizes: list[int], complete: bool = True) -> _Piece:
    refs = [ChunkRef(f"{n:064x}", s, 1, True, bytes([n]) * 32) for n, s in enumerate(sizes)]
    return _Piece(chunks=refs, complete=complete)


class TestAssembly:
    source = SourceFile("base/5/16384", Path("/nonexistent"), 10 * CHUNK, 1.0, 0o600)

    def test_pieces_in_order_make_the_entry(self) -> None:
        entry = _entry_from(self.source, [_piece([CHUNK, CHUNK]), _piece([CHUNK, 10])], CHUNK)
        assert entry is not None
        assert entry.size == 3 * CHUNK + 10 and len(entry.chunks) == 4
        assert entry.sha256_of == "chunks"

    def test_a_file_truncated_while_read_ends_at_its_first_short_chunk(self) -> None:
        entry = _entry_from(
            self.source, [_piece([CHUNK, 100], complete=False), _piece([CHUNK])], CHUNK
        )
        assert entry is not None and entry.size == CHUNK + 100 and len(entry.chunks) == 2

    def test_a_vanished_file_has_no_entry(self) -> None:
        assert _entry_from(self.source, [_piece([CHUNK]), _Piece(vanished=True)], CHUNK) is None


class TestCopyAndRestore:
    def test_big_and_small_files_round_trip_in_parallel(
        self, repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from emrdr.engine import backup

        monkeypatch.setattr(backup, "READ_UNIT", 2 * CHUNK)
        data_dir = tmp_path / "data"
        (data_dir / "base" / "5").mkdir(parents=True)
        contents = {
            "base/5/16384": b"".join(_page(b, b % 7) for b in range(37)),  # several units
            "base/5/16385": _page(0, 3),
            "PG_VERSION": b"15\n",
            "empty": b"",
            "postgresql.conf": md5_text_sample(3 * CHUNK + 17),  # not a relation file
        }
        for rel, raw in contents.items():
            (data_dir / rel).write_bytes(raw)
        plan = []
        for rel in sorted(contents):
            st = (data_dir / rel).stat()
            plan.append(PlannedFile(
                SourceFile(rel, data_dir / rel, st.st_size, st.st_mtime, 0o600), "read", "test"
            ))
        seen: list[int] = []
        entries, totals = copy_files(
            repo, plan, {}, workers=3, skip_lsn_from=None,
            on_progress=lambda done, total: seen.append(done), chunk_size=CHUNK,
        )
        assert [e.path for e in entries] == sorted(contents)
        assert totals.read == sum(len(v) for v in contents.values()) == seen[-1]
        for e in entries:
            assert e.checksum_failures == []
            assert e.sha256 == file_checksum(contents[e.path], "chunks", CHUNK)
        target = tmp_path / "restored"
        target.mkdir()
        restored = _write_files(repo, target, entries, CHUNK, _Progress(0, None), 3)
        assert restored == sum(len(v) for v in contents.values())
        for rel, raw in contents.items():
            assert (target / rel).read_bytes() == raw
            assert (target / rel).stat().st_mtime == (data_dir / rel).stat().st_mtime

    @pytest.mark.parametrize("where", ["disk", "tmpfs"])
    def test_direct_writes_restore_the_same_bytes(
        self, repo: Repository, tmp_path: Path, where: str
    ) -> None:
        """O_DIRECT for whole 4 KiB blocks, the page cache for an unaligned tail; a file
        system without O_DIRECT (tmpfs) falls back to buffered writes."""
        raw = md5_text_sample(5 * CHUNK + 5000)
        refs = [repo.chunks.put(raw[i : i + CHUNK]) for i in range(0, len(raw), CHUNK)]
        entry = FileEntry(path="base/1/16384", size=len(raw), mtime=1.0, sha256_of="chunks",
                          sha256=checksum_of_digests(r.digest for r in refs),
                          chunks=[r.id for r in refs])
        small = FileEntry(path="PG_VERSION", size=3, mtime=1.0, sha256_of="chunks",
                          sha256=checksum_of_digests([repo.chunks.put(b"15\n").digest]),
                          chunks=[repo.chunks.put(b"15\n").id])
        if where == "tmpfs":
            shm = Path("/dev/shm")
            if not shm.is_dir() or not os.access(shm, os.W_OK):
                pytest.skip("no writable /dev/shm")
            root = Path(tempfile.mkdtemp(dir=shm))
        else:
            root = tmp_path / "direct"
            root.mkdir()
        try:
            for direct in (True, False):
                target = root / str(direct)
                target.mkdir()
                got = _write_files(repo, target, [entry, small], CHUNK, _Progress(0, None), 2,
                                   direct=direct)
                assert got == len(raw) + 3
                assert (target / entry.path).read_bytes() == raw
                assert (target / "PG_VERSION").read_bytes() == b"15\n"
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def test_a_file_system_refusing_o_direct_gets_buffered_writes(
        self, repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import errno

        from emrdr.engine import restore as restore_mod

        real = restore_mod._open_for_write
        refused: list[Path] = []

        def no_direct(path: Path, extra: int = 0) -> int:
            if extra & os.O_DIRECT:
                refused.append(path)
                raise OSError(errno.EINVAL, "O_DIRECT not supported", str(path))
            return real(path, extra)

        monkeypatch.setattr(restore_mod, "_open_for_write", no_direct)
        raw = md5_text_sample(3 * CHUNK)
        refs = [repo.chunks.put(raw[i : i + CHUNK]) for i in range(0, len(raw), CHUNK)]
        entry = FileEntry(path="a", size=len(raw), mtime=1.0, sha256_of="chunks",
                          sha256=checksum_of_digests(r.digest for r in refs),
                          chunks=[r.id for r in refs])
        (tmp_path / "t").mkdir()
        assert _write_files(repo, tmp_path / "t", [entry], CHUNK, _Progress(0, None), 2,
                            direct=True) == len(raw)
        assert (tmp_path / "t" / "a").read_bytes() == raw
        assert len(refused) == 1  # asked once, then buffered for the rest of the file

    def test_restore_refuses_a_checksum_mismatch_and_reads_whole_file_checksums(
        self, repo: Repository, tmp_path: Path
    ) -> None:
        raw = md5_text_sample(3 * CHUNK)
        refs = [repo.chunks.put(raw[i : i + CHUNK]) for i in range(0, len(raw), CHUNK)]
        good = FileEntry(  # sha256_of="content": what earlier backups recorded
            path="a", size=len(raw), mtime=1.0, sha256=hashlib.sha256(raw).hexdigest(),
            chunks=[r.id for r in refs],
        )
        bad = good.model_copy(update={"path": "b", "sha256_of": "chunks"})
        (tmp_path / "t").mkdir()
        assert _write_files(repo, tmp_path / "t", [good], CHUNK, _Progress(0, None), 2) == len(raw)
        assert (tmp_path / "t" / "a").read_bytes() == raw
        with pytest.raises(RestoreError, match="file b: checksum"):
            _write_files(repo, tmp_path / "t", [bad], CHUNK, _Progress(0, None), 2)

    def test_a_flipped_chunk_byte_names_the_chunk(
        self, repo: Repository, storage: LocalStorage, tmp_path: Path
    ) -> None:
        raw = md5_text_sample(3 * CHUNK)
        refs = [repo.chunks.put(raw[i : i + CHUNK]) for i in range(0, len(raw), CHUNK)]
        entry = FileEntry(path="a", size=len(raw), mtime=1.0, sha256_of="chunks",
                          sha256=checksum_of_digests(r.digest for r in refs),
                          chunks=[r.id for r in refs])
        path = storage.path_of(chunk_key(refs[1].id))
        blob = bytearray(path.read_bytes())
        blob[-5] ^= 1
        path.chmod(0o600)
        path.write_bytes(bytes(blob))
        (tmp_path / "t").mkdir()
        with pytest.raises(RestoreError, match=f"chunk {refs[1].id} of file a failed"):
            _write_files(repo, tmp_path / "t", [entry], CHUNK, _Progress(0, None), 2)
        with pytest.raises(IntegrityError):
            repo.chunks.get(refs[1].id)
