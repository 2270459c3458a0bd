"""Sealing repository objects: AES-256-GCM with the object's identity as associated data."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from emrdr.repo.crypto import (
    NONCE_SIZE,
    SALT_SIZE,
    DataKey,
    aad_for,
    hkdf_sha256,
    open_sealed,
    parse_header,
    seal,
    sealed_key_id,
)
from emrdr.repo.errors import IntegrityError

KEY = DataKey("k-0001-test", bytes(range(32)))
OTHER = DataKey("k-0002-test", bytes(range(1, 33)))


class TestAad:
    def test_canonical_and_order_independent(self) -> None:
        """Context order does not change the bytes; every field does."""
        a = aad_for("wal", "000000010000000000000001", timeline=1, backup="b1")
        b = aad_for("wal", "000000010000000000000001", backup="b1", timeline=1)
        assert a.encoded == b.encoded
        assert a.encoded != aad_for("wal", "000000010000000000000001", timeline=2).encoded
        assert a.encoded != aad_for("chunk", "000000010000000000000001").encoded

    def test_kind_and_id_required_and_not_overridable(self) -> None:
        with pytest.raises(ValueError):
            aad_for("", "x")
        with pytest.raises(ValueError):
            aad_for("chunk", "")


class TestSeal:
    def test_round_trip(self) -> None:
        """What is sealed opens again with the same key and identity."""
        aad = aad_for("manifest", "b-20250622", backup="b-20250622")
        blob = seal(KEY, b"plaintext", aad)
        assert open_sealed(KEY, blob, aad) == b"plaintext"
        assert open_sealed({KEY.id: KEY}, blob, aad) == b"plaintext"
        assert sealed_key_id(blob, aad) == KEY.id

    def test_empty_and_large_plaintexts(self) -> None:
        aad = aad_for("chunk", "c")
        big = os.urandom(3 * 1024 * 1024)
        assert open_sealed(KEY, seal(KEY, b"", aad), aad) == b""
        assert open_sealed(KEY, seal(KEY, big, aad), aad) == big

    def test_same_plaintext_seals_differently(self) -> None:
        """Every seal draws a fresh salt and nonce."""
        aad = aad_for("chunk", "c")
        assert seal(KEY, b"same", aad) != seal(KEY, b"same", aad)

    def test_every_flipped_byte_fails_naming_the_object(self) -> None:
        """Flipping any single byte -- header, nonce, ciphertext or tag -- fails authentication."""
        aad = aad_for("chunk", "3fa2")
        blob = seal(KEY, b"x" * 40, aad)
        for i in range(len(blob)):
            bad = bytearray(blob)
            bad[i] ^= 0x01
            with pytest.raises(IntegrityError) as caught:
                open_sealed({KEY.id: KEY}, bytes(bad), aad)
            assert (caught.value.kind, caught.value.id) == ("chunk", "3fa2")
            assert str(caught.value).startswith("chunk 3fa2: ")

    def test_authentication_failure_message(self) -> None:
        aad = aad_for("chunk", "3fa2")
        bad = bytearray(seal(KEY, b"data", aad))
        bad[-1] ^= 0xFF
        with pytest.raises(IntegrityError, match=r"^chunk 3fa2: authentication failed"):
            open_sealed(KEY, bytes(bad), aad)

    def test_truncated_or_extended_fails(self) -> None:
        aad = aad_for("wal", "seg")
        blob = seal(KEY, b"y" * 100, aad)
        for cut in (0, 1, 2, 10, len(blob) // 2, len(blob) - 1):
            with pytest.raises(IntegrityError, match=r"^wal seg: "):
                open_sealed(KEY, blob[:cut], aad)
        with pytest.raises(IntegrityError):
            open_sealed(KEY, blob + b"\x00", aad)

    def test_moved_to_another_identity_fails(self) -> None:
        """A blob copied under another object's name, kind or context does not open."""
        blob = seal(KEY, b"chunk A", aad_for("chunk", "aaaa"))
        for other in (
            aad_for("chunk", "bbbb"),
            aad_for("wal", "aaaa"),
            aad_for("chunk", "aaaa", backup="b1"),
        ):
            with pytest.raises(IntegrityError) as caught:
                open_sealed(KEY, blob, other)
            assert caught.value.id == other.id

    def test_wrong_or_unknown_key_fails(self) -> None:
        aad = aad_for("chunk", "c")
        blob = seal(KEY, b"data", aad)
        with pytest.raises(IntegrityError, match="expected 'k-0002-test'"):
            open_sealed(OTHER, blob, aad)
        with pytest.raises(IntegrityError, match="not in the key ring"):
            open_sealed({OTHER.id: OTHER}, blob, aad)
        impostor = DataKey(KEY.id, OTHER.material)  # same id, different material
        with pytest.raises(IntegrityError, match="authentication failed"):
            open_sealed(impostor, blob, aad)

    def test_hkdf_matches_the_reference_implementation(self) -> None:
        ikm, salt, info = os.urandom(32), os.urandom(32), b"emrdr object key v1"
        expected = HKDF(hashes.SHA256(), 32, salt, info).derive(ikm)
        assert hkdf_sha256(ikm, salt, info) == expected

    @pytest.mark.slow
    def test_a_million_seals_never_repeat_a_subkey_and_nonce(self) -> None:
        """10^6 small objects under one data key: every (salt -> subkey, nonce) pair is unique."""
        aad = aad_for("chunk", "n")
        n = 1_000_000
        seen: set[bytes] = set()
        start = 2 + len(KEY.id)
        end = start + SALT_SIZE + NONCE_SIZE
        for _ in range(n):
            seen.add(seal(KEY, b"tiny", aad)[start:end])
        assert len(seen) == n
        header = parse_header(seal(KEY, b"tiny", aad), aad)
        assert header.length == end
