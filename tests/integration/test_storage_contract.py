"""One contract for every repository storage backend: local files and a real S3 API server.

Needs the ``tests.fixtures.s3`` plugin (``s3_storage``, ``s3_endpoint``, ``s3_bucket``).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from emrdr.config import RepoSettings
from emrdr.repo import (
    ChunkStore,
    IntegrityError,
    InvalidKey,
    KeyFileSource,
    KeyRing,
    LocalStorage,
    ObjectExists,
    ObjectNotFound,
    RepoError,
    Storage,
    StorageFullError,
    chunk_key,
    open_storage,
)
from emrdr.repo.storage_s3 import S3Storage
from tests.fixtures.s3 import S3_TEST_CREDENTIALS

BAD_KEYS = [
    "",
    "/etc/passwd",
    "..",
    "a/../b",
    "a/./b",
    "a//b",
    "a/",
    ".hidden",
    "dir/.tmp",
    "a\\b",
    "sp ace",
    "nul\x00",
    "x" * 1025,
]


class StorageContract:
    """Behaviour every backend must show; subclasses provide the ``storage`` fixture."""

    def test_put_then_get_returns_the_bytes(self, storage: Storage) -> None:
        """A stored object reads back byte for byte."""
        assert storage.put("chunks/ab/abc", b"hello") is True
        assert storage.get("chunks/ab/abc") == b"hello"

    def test_empty_and_large_objects_round_trip(self, storage: Storage) -> None:
        """Zero-length and multi-MiB objects are stored exactly."""
        big = os.urandom(5 * 1024 * 1024 + 17)
        storage.put("empty", b"")
        storage.put("wal/big", big)
        assert storage.get("empty") == b""
        assert storage.get("wal/big") == big
        assert storage.size("wal/big") == len(big)

    def test_same_bytes_again_is_a_no_op(self, storage: Storage) -> None:
        """Putting identical bytes under an existing key succeeds and reports nothing written."""
        storage.put("keys/k-1.000001.json", b"{}")
        assert storage.put("keys/k-1.000001.json", b"{}") is False
        assert storage.get("keys/k-1.000001.json") == b"{}"

    def test_different_bytes_raise_object_exists_and_keep_the_original(
        self, storage: Storage
    ) -> None:
        """Objects are immutable: different content under an existing key is refused."""
        storage.put("manifests/b1", b"original")
        with pytest.raises(ObjectExists, match="manifests/b1"):
            storage.put("manifests/b1", b"tampered")
        with pytest.raises(ObjectExists):
            storage.put("manifests/b1", b"origina")  # a prefix of the original
        assert storage.get("manifests/b1") == b"original"

    def test_missing_object_raises_object_not_found(self, storage: Storage) -> None:
        """get and size of an absent key raise ObjectNotFound naming the key."""
        with pytest.raises(ObjectNotFound, match="nope/x"):
            storage.get("nope/x")
        with pytest.raises(ObjectNotFound):
            storage.size("nope/x")
        with pytest.raises(RepoError):
            storage.get("nope/x")

    def test_exists(self, storage: Storage) -> None:
        """exists is true only for stored objects, not for their 'directories'."""
        storage.put("a/b/c", b"1")
        assert storage.exists("a/b/c")
        assert not storage.exists("a/b")
        assert not storage.exists("a/b/d")

    def test_size(self, storage: Storage) -> None:
        storage.put("s", b"12345")
        assert storage.size("s") == 5

    def test_list_is_sorted_and_filtered_by_prefix(self, storage: Storage) -> None:
        """list returns full keys under a plain string prefix, sorted."""
        for key in ["chunks/ff/ff01", "chunks/0a/0a99", "chunks/0a/0a01", "keys/k", "wal/1"]:
            storage.put(key, key.encode())
        assert storage.list("chunks/") == ["chunks/0a/0a01", "chunks/0a/0a99", "chunks/ff/ff01"]
        assert storage.list("chunks/0a/0a0") == ["chunks/0a/0a01"]
        assert storage.list("chunks/0") == ["chunks/0a/0a01", "chunks/0a/0a99"]
        assert storage.list("") == sorted(
            ["chunks/ff/ff01", "chunks/0a/0a99", "chunks/0a/0a01", "keys/k", "wal/1"]
        )
        assert storage.list("nothing/") == []

    def test_delete_removes_and_missing_is_fine(self, storage: Storage) -> None:
        """delete removes an object; deleting an absent key is not an error."""
        storage.put("wal/000000010000000000000001", b"seg")
        storage.delete("wal/000000010000000000000001")
        assert not storage.exists("wal/000000010000000000000001")
        assert storage.list("wal/") == []
        storage.delete("wal/000000010000000000000001")
        storage.delete("never/was")
        assert storage.put("wal/000000010000000000000001", b"new") is True

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_bad_keys_are_rejected_everywhere(self, storage: Storage, key: str) -> None:
        """Absolute keys, '..', empty segments, hidden names and odd characters are refused."""
        with pytest.raises(InvalidKey):
            storage.put(key, b"x")
        with pytest.raises(InvalidKey):
            storage.get(key)
        with pytest.raises(InvalidKey):
            storage.exists(key)
        with pytest.raises(InvalidKey):
            storage.delete(key)

    def test_bad_list_prefixes_are_rejected(self, storage: Storage) -> None:
        for prefix in ["/", "../", "a/../", "/abs"]:
            with pytest.raises(InvalidKey):
                storage.list(prefix)

    def test_put_file_and_get_to_file(self, storage: Storage, tmp_path: Path) -> None:
        """Files go in and come out unchanged; put_file obeys immutability too."""
        src = tmp_path / "000000010000000000000002"
        src.write_bytes(os.urandom(300_000))
        assert storage.put_file("wal/seg2", src) is True
        assert storage.put_file("wal/seg2", src) is False
        other = tmp_path / "other"
        other.write_bytes(b"different")
        with pytest.raises(ObjectExists):
            storage.put_file("wal/seg2", other)
        dest = tmp_path / "out" / "seg"
        storage.get_to_file("wal/seg2", dest)
        assert dest.read_bytes() == src.read_bytes()

    def test_concurrent_puts_of_one_key_write_once(self, storage: Storage) -> None:
        """Racing writers of identical bytes: one writes, the others see a no-op."""
        results: list[bool] = []
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                results.append(storage.put("race/same", b"identical" * 1000))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sorted(results) == [False] * 7 + [True]

    def test_concurrent_puts_of_different_bytes_never_overwrite(self, storage: Storage) -> None:
        """Racing writers of different bytes: exactly one wins, the rest get ObjectExists."""
        outcomes: dict[int, object] = {}

        def worker(n: int) -> None:
            try:
                outcomes[n] = storage.put("race/diff", f"writer {n}".encode() * 100)
            except ObjectExists as exc:
                outcomes[n] = exc

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [n for n, o in outcomes.items() if o is True]
        assert len(winners) == 1
        assert all(isinstance(o, ObjectExists) for n, o in outcomes.items() if n != winners[0])
        assert storage.get("race/diff") == f"writer {winners[0]}".encode() * 100

    def test_features_is_a_frozenset_of_names(self, storage: Storage) -> None:
        assert isinstance(storage.features, frozenset)
        assert all(isinstance(f, str) for f in storage.features)


class TestLocalStorage(StorageContract):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> LocalStorage:
        return LocalStorage(tmp_path / "repo")

    def test_no_temp_files_are_left(self, storage: LocalStorage) -> None:
        """After puts (including refused ones) only the objects themselves are on disk."""
        storage.put("a/x", b"1")
        storage.put("a/x", b"1")
        with pytest.raises(ObjectExists):
            storage.put("a/x", b"2")
        assert sorted(p.name for p in (storage.root / "a").iterdir()) == ["x"]

    def test_listing_ignores_crash_leftovers(self, storage: LocalStorage) -> None:
        """A temp file left by a crash is invisible to list/exists."""
        storage.put("a/x", b"1")
        (storage.root / "a" / ".y.abc.tmp").write_bytes(b"partial")
        assert storage.list("a/") == ["a/x"]

    def test_default_modes_let_the_postgres_group_in(self, storage: LocalStorage) -> None:
        """Directories are 0o770 and files 0o640 regardless of the umask."""
        old = os.umask(0o077)
        try:
            storage.put("wal/tl1/seg", b"x")
        finally:
            os.umask(old)
        assert (storage.root / "wal").stat().st_mode & 0o777 == 0o770
        assert (storage.root / "wal" / "tl1").stat().st_mode & 0o777 == 0o770
        assert (storage.root / "wal" / "tl1" / "seg").stat().st_mode & 0o777 == 0o640

    def test_custom_modes_and_owner(self, tmp_path: Path) -> None:
        """Modes and an owner (uid, gid) are applied to what the backend creates."""
        if os.geteuid() != 0:
            pytest.skip("chown needs root")
        storage = LocalStorage(
            tmp_path / "repo", dir_mode=0o750, file_mode=0o600, owner=(65534, 65534)
        )
        storage.put("d/f", b"x")
        st_dir, st_file = (storage.root / "d").stat(), (storage.root / "d" / "f").stat()
        assert (st_dir.st_mode & 0o777, st_file.st_mode & 0o777) == (0o750, 0o600)
        assert (st_dir.st_uid, st_file.st_uid, st_file.st_gid) == (65534, 65534, 65534)

    def test_enospc_from_write_leaves_nothing(
        self, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A full disk during the write raises StorageFullError naming the path, no leftovers."""
        real_write = os.write

        def full_write(fd: int, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "write", full_write)
        with pytest.raises(StorageFullError, match="chunks/aa/aabb"):
            storage.put("chunks/aa/aabb", b"x" * 10_000)
        monkeypatch.setattr(os, "write", real_write)
        assert not storage.exists("chunks/aa/aabb")
        assert list((storage.root / "chunks" / "aa").iterdir()) == []

    def test_real_full_filesystem(self, tmp_path: Path) -> None:
        """On a 1 MiB tmpfs, a 2 MiB object fails cleanly and smaller ones still fit."""
        mnt = tmp_path / "tiny"
        mnt.mkdir()
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
        try:
            storage = LocalStorage(mnt / "repo")
            with pytest.raises(StorageFullError) as caught:
                storage.put("wal/big", os.urandom(2 * 1024 * 1024))
            assert "wal/big" in str(caught.value)
            assert [p.name for p in (mnt / "repo" / "wal").iterdir()] == []
            assert storage.put("wal/small", b"fits") is True
            assert storage.get("wal/small") == b"fits"
        finally:
            subprocess.run(["umount", str(mnt)], check=False)

    def test_path_of(self, storage: LocalStorage) -> None:
        storage.put("a/b", b"1")
        assert storage.path_of("a/b").read_bytes() == b"1"
        with pytest.raises(InvalidKey):
            storage.path_of("../x")


class TestS3Storage(StorageContract):
    @pytest.fixture
    def storage(self, s3_storage: S3Storage) -> Iterator[S3Storage]:
        yield s3_storage

    def test_conditional_put_is_supported(self, storage: S3Storage) -> None:
        """The server enforces create-if-absent (If-None-Match: *)."""
        storage.put("x", b"1")
        assert "conditional_put" in storage.features

    def test_prefix_isolates_repositories(
        self, storage: S3Storage, s3_endpoint: str, s3_bucket: str
    ) -> None:
        """Two prefixes in one bucket do not see each other's objects."""
        from emrdr.repo.storage_s3 import S3Credentials

        other = S3Storage(
            endpoint=s3_endpoint,
            bucket=s3_bucket,
            prefix="other",
            credentials=S3Credentials(**S3_TEST_CREDENTIALS),
        )
        storage.put("k", b"mine")
        other.put("k", b"theirs")
        assert storage.get("k") == b"mine"
        assert other.list("") == ["k"]

    def test_server_without_conditional_put(self, storage: S3Storage, s3_client: Any) -> None:
        """A server that answers NotImplemented to If-None-Match still gets create-only puts."""
        calls: list[dict[str, Any]] = []

        class NoConditional:
            def __getattr__(self, name: str) -> Any:
                return getattr(s3_client, name)

            def put_object(self, **kwargs: Any) -> Any:
                calls.append(kwargs)
                if "IfNoneMatch" in kwargs:
                    raise ClientError(
                        {"Error": {"Code": "NotImplemented", "Message": "no"}}, "PutObject"
                    )
                return s3_client.put_object(**kwargs)

        plain = S3Storage(bucket=storage.bucket, prefix=storage.prefix, client=NoConditional())
        assert plain.put("a", b"1") is True
        assert "conditional_put" not in plain.features
        assert plain.put("a", b"1") is False
        with pytest.raises(ObjectExists):
            plain.put("a", b"2")
        assert plain.put("b", b"2") is True
        assert [("IfNoneMatch" in c) for c in calls] == [True, False, False]

    def test_chunk_store_on_s3(self, storage: S3Storage, tmp_path: Path) -> None:
        """Key ring and chunks work unchanged on S3: dedup, round trip, tamper detection."""
        ring = KeyRing.init(storage, KeyFileSource.generate(tmp_path / "k"))
        chunks = ChunkStore(storage, ring)
        ref = chunks.put(b"page" * 4096)
        assert chunks.put(b"page" * 4096).new is False
        assert chunks.get(ref.id) == b"page" * 4096
        other = chunks.put(b"other" * 100)
        storage.delete(chunk_key(other.id))
        storage.put(chunk_key(other.id), storage.get(chunk_key(ref.id)))
        with pytest.raises(IntegrityError, match=f"chunk {other.id}"):
            chunks.get(other.id)

    def test_missing_bucket_is_named(self, s3_endpoint: str) -> None:
        from emrdr.repo.storage_s3 import S3Credentials

        missing = S3Storage(
            endpoint=s3_endpoint,
            bucket="no-such-bucket-emrdr",
            credentials=S3Credentials(**S3_TEST_CREDENTIALS),
        )
        with pytest.raises(RepoError, match="no-such-bucket-emrdr"):
            missing.list("")


class TestOpenStorage:
    def test_local(self, tmp_path: Path) -> None:
        storage = open_storage(RepoSettings(path=tmp_path / "r"))
        assert isinstance(storage, LocalStorage)
        assert storage.root == tmp_path / "r"

    def test_local_from_settings_defaults_to_home(self, tmp_path: Path) -> None:
        from emrdr.config import Settings

        storage = open_storage(Settings(home=tmp_path))
        assert isinstance(storage, LocalStorage)
        assert storage.root == tmp_path / "repo"

    def test_s3(self, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_TEST_CREDENTIALS["access_key_id"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_TEST_CREDENTIALS["secret_access_key"])
        settings = RepoSettings(
            kind="s3", s3_endpoint=s3_endpoint, s3_bucket=s3_bucket, s3_prefix="p"
        )
        storage = open_storage(settings)
        assert isinstance(storage, S3Storage)
        storage.put("a", b"1")
        assert storage.list("") == ["a"]

    def test_s3_without_bucket_is_refused(self) -> None:
        with pytest.raises(ValueError, match="s3_bucket"):
            open_storage(RepoSettings(kind="s3"))
