"""Page checksums: the vectorised implementation against a plain one-page-at-a-time reference
written from the algorithm's description, and the verification rules (new pages, LSN skip).

Agreement with PostgreSQL itself is tested on a real ``initdb -k`` cluster in
tests/integration/test_engine_backup.py (every page of a fresh cluster verifies; a flipped byte
is found at its block).
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from emrdr.engine.pagecheck import (
    _BASE_OFFSETS,
    BLCKSZ,
    RELSEG_SIZE,
    checksum_pages,
    first_block_of,
    is_checksummed_file,
    page_checksum,
    verify_pages,
)

MASK = 0xFFFFFFFF


def reference_checksum(page: bytes, block: int) -> int:
    """One page, scalar, straight from the description."""
    buf = bytearray(page)
    buf[8:10] = b"\0\0"
    words = struct.unpack(f"<{BLCKSZ // 4}I", bytes(buf))
    lanes = [int(x) for x in _BASE_OFFSETS]
    for row in range(64 + 2):
        for j in range(32):
            value = words[row * 32 + j] if row < 64 else 0
            t = lanes[j] ^ value
            lanes[j] = ((t * 16777619) & MASK) ^ (t >> 17)
    folded = 0
    for lane in lanes:
        folded ^= lane
    folded ^= block & MASK
    return folded % 65535 + 1


def make_page(seed: int, lsn: int = 0x1_0000_0000, upper: int = 4000) -> bytes:
    rng = np.random.default_rng(seed)
    buf = bytearray(rng.integers(0, 256, BLCKSZ, dtype=np.uint8).tobytes())
    struct.pack_into("<II", buf, 0, lsn >> 32, lsn & MASK)
    struct.pack_into("<H", buf, 14, upper)
    return bytes(buf)


def with_checksum(page: bytes, block: int) -> bytes:
    buf = bytearray(page)
    struct.pack_into("<H", buf, 8, page_checksum(page, block))
    return bytes(buf)


class TestChecksum:
    def test_matches_reference_on_random_pages(self) -> None:
        for seed, block in [(1, 0), (2, 1), (3, 131071), (4, 2**32 - 1)]:
            page = make_page(seed)
            assert page_checksum(page, block) == reference_checksum(page, block)

    def test_whole_chunk_at_once_equals_page_by_page(self) -> None:
        pages = [make_page(s) for s in range(16)]
        got = checksum_pages(b"".join(pages), 100)
        assert [int(x) for x in got] == [reference_checksum(p, 100 + i)
                                         for i, p in enumerate(pages)]

    def test_stored_checksum_is_ignored_while_computing(self) -> None:
        page = make_page(7)
        assert page_checksum(with_checksum(page, 3), 3) == page_checksum(page, 3)

    def test_result_is_in_1_to_65535(self) -> None:
        sums = checksum_pages(os.urandom(BLCKSZ * 64), 0)
        assert sums.min() >= 1

    def test_rejects_partial_page(self) -> None:
        with pytest.raises(ValueError, match="8192"):
            page_checksum(b"x" * 100, 0)


class TestVerify:
    def test_good_pages_pass_and_a_flipped_byte_names_its_block(self) -> None:
        data = bytearray(b"".join(with_checksum(make_page(s), 40 + s) for s in range(8)))
        assert verify_pages(bytes(data), 40) == []
        data[3 * BLCKSZ + 777] ^= 0x01
        bad = verify_pages(bytes(data), 40)
        assert [v.block for v in bad] == [43]
        assert bad[0].stored != bad[0].computed

    def test_a_page_moved_to_another_block_fails(self) -> None:
        page = with_checksum(make_page(9), 5)
        assert verify_pages(page, 5) == []
        assert [v.block for v in verify_pages(page, 6)] == [6]

    def test_new_pages_are_skipped(self) -> None:
        zero = bytes(BLCKSZ)
        uninitialised = make_page(11, upper=0)  # pd_upper == 0, no valid checksum
        assert verify_pages(zero + uninitialised, 0) == []

    def test_pages_newer_than_the_backup_start_are_skipped(self) -> None:
        broken = bytearray(with_checksum(make_page(12, lsn=0x5_0000_0000), 0))
        broken[5000] ^= 0xFF
        assert verify_pages(bytes(broken), 0)
        assert verify_pages(bytes(broken), 0, skip_lsn_from=0x5_0000_0000) == []
        assert verify_pages(bytes(broken), 0, skip_lsn_from=0x6_0000_0000)

    def test_trailing_partial_page_is_ignored(self) -> None:
        page = with_checksum(make_page(13), 0)
        assert verify_pages(page + b"\x01" * 100, 0) == []


class TestRelationFiles:
    @pytest.mark.parametrize(
        "path",
        ["base/5/16384", "base/5/16384.2", "base/5/16384_fsm", "base/5/16384_vm",
         "global/1262", "pg_tblspc/16390/PG_15_202209061/5/16391.1", "base/5/16384_init"],
    )
    def test_relation_files_are_checked(self, path: str) -> None:
        assert is_checksummed_file(path)

    @pytest.mark.parametrize(
        "path",
        ["global/pg_control", "base/5/PG_VERSION", "base/5/pg_filenode.map", "pg_xact/0000",
         "base/5/pg_internal.init", "base/5/t3_16384", "PG_VERSION", "pg_multixact/offsets/0000"],
    )
    def test_other_files_are_not(self, path: str) -> None:
        assert not is_checksummed_file(path)

    def test_segment_files_start_at_their_block(self) -> None:
        assert first_block_of("base/5/16384") == 0
        assert first_block_of("base/5/16384.3") == 3 * RELSEG_SIZE
        with pytest.raises(ValueError, match="not a relation file"):
            first_block_of("base/5/PG_VERSION")
