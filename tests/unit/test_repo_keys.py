"""Envelope keys: passphrase / key-file KEKs, the key ring, rotation and rewrapping."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from emrdr.repo.crypto import aad_for, open_sealed, seal
from emrdr.repo.errors import (
    IntegrityError,
    KeyringError,
    ObjectExists,
    UnknownDataKey,
    WeakKdfError,
    WrongKeyError,
)
from emrdr.repo.keys import (
    DEFAULT_PBKDF2_ITERATIONS,
    MIN_PBKDF2_ITERATIONS,
    KeyFileSource,
    KeyRing,
    PassphraseSource,
    commit_key,
)
from emrdr.repo.storage import Storage
from emrdr.repo.storage_local import LocalStorage

FAST = MIN_PBKDF2_ITERATIONS  # the cheapest count the repository accepts


def snapshot(storage: Storage) -> dict[str, bytes]:
    return {key: storage.get(key) for key in storage.list("")}


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "repo")


@pytest.fixture
def ring(storage: LocalStorage) -> KeyRing:
    return KeyRing.init(storage, PassphraseSource("correct horse", FAST))


class TestKdfPolicy:
    def test_default_is_600000_iterations(self, storage: LocalStorage) -> None:
        """A passphrase key ring uses PBKDF2-HMAC-SHA256 with 600,000 iterations by default."""
        source = PassphraseSource("pw")
        assert source.iterations == DEFAULT_PBKDF2_ITERATIONS == 600_000
        KeyRing.init(storage, source)
        doc = json.loads(storage.get(commit_key(1)))
        assert doc["kdf"]["kind"] == "pbkdf2-hmac-sha256"
        assert doc["kdf"]["iterations"] == 600_000
        assert len(base64.b64decode(doc["kdf"]["salt"])) == 16

    def test_fewer_than_100000_iterations_are_refused(self) -> None:
        with pytest.raises(WeakKdfError, match="99,999 is below the minimum 100,000"):
            PassphraseSource("pw", iterations=99_999)
        PassphraseSource("pw", iterations=100_000)

    def test_a_stored_weak_kdf_is_refused_on_open(
        self, storage: LocalStorage, ring: KeyRing
    ) -> None:
        """A key ring whose stored KDF was weakened is not opened."""
        doc = json.loads(storage.get(commit_key(1)))
        doc["kdf"]["iterations"] = 1000
        doc["generation"] = 2
        storage.put(commit_key(2), json.dumps(doc).encode())
        with pytest.raises(WeakKdfError, match="stored PBKDF2 iteration count 1,000"):
            KeyRing.open(storage, PassphraseSource("correct horse", FAST))

    def test_empty_passphrase_is_refused(self) -> None:
        with pytest.raises(ValueError):
            PassphraseSource("")


class TestKeyRing:
    def test_open_returns_the_same_keys(self, storage: LocalStorage, ring: KeyRing) -> None:
        again = KeyRing.open(storage, PassphraseSource("correct horse", FAST))
        assert again.active == ring.active
        assert again.chunk_id_key == ring.chunk_id_key
        assert again.generation == 1
        assert [k.id for k in again.list_keys()] == [ring.active.id]
        assert again.active.id.startswith("k-0001-")

    def test_wrong_passphrase_raises_and_changes_nothing(
        self, storage: LocalStorage, ring: KeyRing
    ) -> None:
        """A wrong passphrase names the data key and leaves every object as it was."""
        before = snapshot(storage)
        with pytest.raises(WrongKeyError) as caught:
            KeyRing.open(storage, PassphraseSource("wrong horse", FAST))
        assert str(caught.value) == (
            f"wrong passphrase: key-encryption key does not unwrap data key {ring.active.id}; "
            "nothing was changed"
        )
        assert snapshot(storage) == before

    def test_init_refuses_an_existing_key_ring(self, storage: LocalStorage, ring: KeyRing) -> None:
        with pytest.raises(KeyringError, match="already has a key ring"):
            KeyRing.init(storage, PassphraseSource("other", FAST))

    def test_open_without_key_ring(self, storage: LocalStorage) -> None:
        assert not KeyRing.exists(storage)
        with pytest.raises(KeyringError, match="has no key ring"):
            KeyRing.open(storage, PassphraseSource("x", FAST))

    def test_unknown_data_key(self, ring: KeyRing) -> None:
        with pytest.raises(UnknownDataKey, match="k-9999-x"):
            ring.data_key("k-9999-x")
        with pytest.raises(KeyError):
            ring("k-9999-x")

    def test_corrupted_wrapped_key_is_an_integrity_error(self, storage: LocalStorage) -> None:
        source = PassphraseSource("pw", FAST)
        ring = KeyRing.init(storage, source)
        doc = json.loads(storage.get(commit_key(1)))
        wrapped = bytearray(base64.b64decode(doc["keys"][0]["wrapped_key"]))
        wrapped[20] ^= 1
        doc["keys"][0]["wrapped_key"] = base64.b64encode(wrapped).decode()
        doc["generation"] = 2
        storage.put(commit_key(2), json.dumps(doc).encode())
        with pytest.raises(IntegrityError, match=f"^key {ring.active.id}: wrapped data key"):
            KeyRing.open(storage, source)

    def test_a_swapped_wrapped_key_fails(self, storage: LocalStorage, ring: KeyRing) -> None:
        """Wrapped keys are bound to their id and position: swapping two records fails."""
        ring.rotate()
        doc = json.loads(storage.get(commit_key(2)))
        a, b = doc["keys"]
        a["wrapped_key"], b["wrapped_key"] = b["wrapped_key"], a["wrapped_key"]
        doc["generation"] = 3
        storage.put(commit_key(3), json.dumps(doc).encode())
        with pytest.raises(IntegrityError, match="failed authentication"):
            KeyRing.open(storage, PassphraseSource("correct horse", FAST))


class TestRotation:
    def test_rotation_keeps_old_data_readable_and_seals_new_data_with_the_new_key(
        self, storage: LocalStorage, ring: KeyRing
    ) -> None:
        aad_old, aad_new = aad_for("chunk", "old"), aad_for("chunk", "new")
        old_key = ring.active
        old_blob = seal(ring.active, b"old backup", aad_old)
        chunk_id_key = ring.chunk_id_key

        new_key = ring.rotate()

        assert ring.active == new_key != old_key
        assert new_key.id.startswith("k-0002-")
        assert ring.generation == 2
        new_blob = seal(ring.active, b"new backup", aad_new)
        reopened = KeyRing.open(storage, PassphraseSource("correct horse", FAST))
        assert open_sealed(reopened, old_blob, aad_old) == b"old backup"
        assert open_sealed(reopened, new_blob, aad_new) == b"new backup"
        assert reopened.active.id == new_key.id
        assert reopened.chunk_id_key == chunk_id_key  # dedup keeps working
        assert [(k.seq, k.active) for k in reopened.list_keys()] == [(1, False), (2, True)]

    def test_passphrase_change_rewraps_every_key(
        self, storage: LocalStorage, ring: KeyRing
    ) -> None:
        """After a rotation to a new passphrase, only it opens the key ring; old data stays."""
        aad = aad_for("manifest", "b1")
        blob = seal(ring.active, b"manifest", aad)
        data_objects = {k: v for k, v in snapshot(storage).items() if not k.startswith("keys/")}

        ring.rotate(PassphraseSource("new passphrase", FAST))

        reopened = KeyRing.open(storage, PassphraseSource("new passphrase", FAST))
        assert open_sealed(reopened, blob, aad) == b"manifest"
        assert len(reopened.list_keys()) == 2
        with pytest.raises(WrongKeyError):
            KeyRing.open(storage, PassphraseSource("correct horse", FAST))
        after = {k: v for k, v in snapshot(storage).items() if not k.startswith("keys/")}
        assert after == data_objects  # no data object was rewritten

    def test_rewrap_then_prune_superseded(self, storage: LocalStorage, ring: KeyRing) -> None:
        first = ring.active
        assert ring.rewrap(PassphraseSource("second", FAST)) == 2
        assert ring.active == first
        assert ring.superseded_objects() == [commit_key(1)]
        assert ring.prune_superseded() == [commit_key(1)]
        assert storage.list("keys/") == [commit_key(2)]
        assert KeyRing.open(storage, PassphraseSource("second", FAST)).active == first

    def test_concurrent_rotation_is_detected(self, storage: LocalStorage, ring: KeyRing) -> None:
        """Two holders of generation 1 both rotating: the second is refused, nothing is lost."""
        other = KeyRing.open(storage, PassphraseSource("correct horse", FAST))
        winner = ring.rotate()
        with pytest.raises(KeyringError, match="another process"):
            other.rotate()
        assert KeyRing.open(storage, PassphraseSource("correct horse", FAST)).active == winner

    def test_a_stale_key_ring_finds_keys_rotated_elsewhere(
        self, storage: LocalStorage, ring: KeyRing
    ) -> None:
        """A long-running reader reloads when it meets a data key it does not know."""
        other = KeyRing.open(storage, PassphraseSource("correct horse", FAST))
        new_key = other.rotate()
        aad = aad_for("wal", "seg")
        blob = seal(new_key, b"wal", aad)
        assert open_sealed(ring, blob, aad) == b"wal"
        assert ring.generation == 2

    def test_crash_before_commit_leaves_the_old_generation(
        self, storage: LocalStorage, ring: KeyRing, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real_put = storage.put

        def failing_put(key: str, data: bytes) -> bool:
            raise OSError("disk gone")

        monkeypatch.setattr(storage, "put", failing_put)
        with pytest.raises(OSError):
            ring.rotate()
        monkeypatch.setattr(storage, "put", real_put)
        reopened = KeyRing.open(storage, PassphraseSource("correct horse", FAST))
        assert reopened.generation == 1
        assert reopened.rotate().id.startswith("k-0002-")

    def test_generation_objects_are_create_only(self, storage: LocalStorage, ring: KeyRing) -> None:
        with pytest.raises(ObjectExists):
            storage.put(commit_key(1), b"{}")


class TestKeyFile:
    def test_key_file_round_trip(self, storage: LocalStorage, tmp_path: Path) -> None:
        path = tmp_path / "secrets" / "repo.key"
        source = KeyFileSource.generate(path)
        assert path.stat().st_mode & 0o777 == 0o600
        ring = KeyRing.init(storage, source)
        assert KeyRing.open(storage, KeyFileSource(path)).active == ring.active
        with pytest.raises(FileExistsError):
            KeyFileSource.generate(path)

    def test_wrong_key_file(self, storage: LocalStorage, tmp_path: Path) -> None:
        KeyRing.init(storage, KeyFileSource.generate(tmp_path / "a.key"))
        with pytest.raises(WrongKeyError, match=r"^wrong key file: "):
            KeyRing.open(storage, KeyFileSource.generate(tmp_path / "b.key"))

    def test_passphrase_on_a_key_file_ring(self, storage: LocalStorage, tmp_path: Path) -> None:
        KeyRing.init(storage, KeyFileSource.generate(tmp_path / "a.key"))
        with pytest.raises(KeyringError, match="protected by a key file, but a passphrase"):
            KeyRing.open(storage, PassphraseSource("pw", FAST))

    def test_bad_key_files(self, tmp_path: Path) -> None:
        with pytest.raises(KeyringError, match="does not exist"):
            KeyFileSource(tmp_path / "missing")
        (tmp_path / "short").write_text("AAAA\n")
        with pytest.raises(KeyringError, match="must hold 32 bytes"):
            KeyFileSource(tmp_path / "short")
        (tmp_path / "junk").write_text("not base64 !!!\n")
        with pytest.raises(KeyringError, match="not valid base64"):
            KeyFileSource(tmp_path / "junk")

    def test_rotate_from_key_file_to_passphrase(
        self, storage: LocalStorage, tmp_path: Path
    ) -> None:
        ring = KeyRing.init(storage, KeyFileSource.generate(tmp_path / "a.key"))
        ring.rotate(PassphraseSource("now a passphrase", FAST))
        reopened = KeyRing.open(storage, PassphraseSource("now a passphrase", FAST))
        assert reopened.active == ring.active


class TestKeySourceFromSettings:
    def test_key_file_wins_then_passphrase_variable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from emrdr.config import RepoSettings
        from emrdr.repo.keys import key_source_from_settings

        KeyFileSource.generate(tmp_path / "k")
        assert isinstance(
            key_source_from_settings(RepoSettings(key_file=tmp_path / "k")), KeyFileSource
        )
        monkeypatch.delenv("EMRDR_TEST_PASS", raising=False)
        settings = RepoSettings(passphrase_env="EMRDR_TEST_PASS")
        with pytest.raises(KeyringError, match="EMRDR_TEST_PASS is not set"):
            key_source_from_settings(settings)
        monkeypatch.setenv("EMRDR_TEST_PASS", "secret")
        source = key_source_from_settings(settings)
        assert isinstance(source, PassphraseSource)
        assert source.iterations == DEFAULT_PBKDF2_ITERATIONS
