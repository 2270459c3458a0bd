"""Pure parts of page-level incrementals (emrdr.engine.pages)."""

from __future__ import annotations

import numpy as np

from emrdr.engine.pagecheck import BLCKSZ
from emrdr.engine.pages import (
    decode_blocks,
    decode_page_map,
    encode_blocks,
    encode_page_map,
    is_overlay_candidate,
    live_blocks,
    make_overlay,
    page_headers,
    pieces_checksum,
    region_action,
    unchanged_pages,
    with_live,
)
from emrdr.repo.manifest import FileEntry

CID = "ab" * 32


def test_blocks_round_trip_sparse_and_dense() -> None:
    for blocks in ([7], [3, 4, 5, 900, 131071], list(range(10, 522, 2))):
        arr = np.asarray(blocks, dtype=np.int64)
        assert decode_blocks(encode_blocks(arr, int(arr[0])), int(arr[0])).tolist() == blocks
    sparse = np.arange(0, 131072, 97, dtype=np.int64)
    assert len(encode_blocks(sparse, 0)) < 2000


def test_page_map_and_headers() -> None:
    pages = bytearray(3 * BLCKSZ)
    pages[BLCKSZ : BLCKSZ + 8] = (0x1).to_bytes(4, "little") + (0x2000028).to_bytes(4, "little")
    pages[BLCKSZ + 8 : BLCKSZ + 10] = (4321).to_bytes(2, "little")
    lsn, ck = page_headers(bytes(pages))
    assert lsn.tolist() == [0, (1 << 32) | 0x2000028, 0] and ck.tolist() == [0, 4321, 0]
    back = decode_page_map(encode_page_map(lsn, ck))
    assert back[0].tolist() == lsn.tolist() and back[1].tolist() == ck.tolist()


def test_unchanged_needs_old_lsn_same_header_and_good_parent_copy() -> None:
    lsn = np.asarray([10, 10, 10, 50, 10], dtype=np.uint64)
    ck = np.asarray([1, 2, 1, 1, 1], dtype=np.uint16)
    plsn = np.asarray([10, 10, 9, 50, 10], dtype=np.uint64)
    pck = np.asarray([1, 1, 1, 1, 1], dtype=np.uint16)
    bad = np.asarray([False, False, False, False, True])
    # same | hint bits (checksum) | LSN differs | at/after parent start | parent copy bad
    assert unchanged_pages(lsn, ck, plsn, pck, 40, bad).tolist() == [
        True, False, False, False, False]


def test_region_actions() -> None:
    assert region_action(512, 0, 512, 1024, 1024, 512, 0)[0] == "rebase"
    assert region_action(512, 100, 0, 200, 2000, 100, 0)[0] == "rebase"  # grew past short
    assert region_action(512, 512, 0, 300, 300, 0, 0)[0] == "rebase"  # truncated inside
    assert region_action(512, 512, 0, 512, 2048, 0, 30)[0] == "keep"
    assert region_action(512, 512, 0, 512, 2048, 50, 30)[0] == "overlay"
    assert region_action(512, 512, 0, 512, 2048, 300, 200)[0] == "rebase"


def test_live_subset_and_pieces_checksum() -> None:
    o = make_overlay(CID, np.asarray([4, 5, 9], dtype=np.int64))
    assert live_blocks(o).tolist() == [4, 5, 9] and o.pages == 3
    fewer = with_live(o, np.asarray([5], dtype=np.int64))
    assert fewer is not None and live_blocks(fewer).tolist() == [5]
    assert with_live(o, np.zeros(0, dtype=np.int64)) is None
    assert pieces_checksum([CID], [o]) != pieces_checksum([CID], [fewer])
    entry = FileEntry(path="base/1/2", size=8192, mtime=0, sha256="x", chunks=[CID],
                      overlays=[o], page_map="cd" * 32)
    assert entry.chunk_ids() == [CID, CID, "cd" * 32]


def test_candidates() -> None:
    assert is_overlay_candidate("base/5/16384", 2 << 20)[0]
    assert is_overlay_candidate("base/5/16384.3", 2 << 20)[0]
    assert not is_overlay_candidate("base/5/16384_fsm", 2 << 20)[0]
    assert not is_overlay_candidate("base/5/16384", 8192)[0]
    assert not is_overlay_candidate("pg_xact/0000", 2 << 20)[0]
