"""PostgreSQL data-page checksums, verified a whole chunk (many pages) at a time with numpy.

The algorithm (PostgreSQL's ``storage/checksum_impl.h``, written here from its description):
a page is read as 64 rows of 32 little-endian ``uint32`` words; 32 FNV-1a-like lanes, each
started from its own base offset, absorb their column word by word with
``t = lane ^ word; lane = t * 16777619 ^ (t >> 17)`` (mod 2**32), then absorb two more rows of
zeroes; the lanes are XOR-folded, XORed with the block number and reduced to
``(sum % 65535) + 1``.  The page's own ``pd_checksum`` (bytes 8-9) counts as zero.

Here the 32 lanes of every page in a chunk are one ``(pages, 32)`` array, so each of the 66
rounds is a handful of numpy operations over all pages at once.

Pages that are new (``pd_upper == 0``, all zero or not yet initialised) are skipped, as are pages
whose LSN is at or after the backup's start LSN when that is given: such a page is being
written during the backup, may be read torn, and is replaced by its full-page image in WAL.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "BLCKSZ",
    "RELSEG_SIZE",
    "PageVerdict",
    "bad_pages",
    "bad_pages_of_files",
    "checksum_pages",
    "first_block_of",
    "is_checksummed_file",
    "page_checksum",
    "verify_pages",
]

BLCKSZ = 8192
RELSEG_SIZE = 131072  # blocks per 1 GiB relation segment file
N_SUMS = 32
FNV_PRIME = np.uint32(16777619)
_ROWS = BLCKSZ // (4 * N_SUMS)  # 64

# Initial state of the 32 lanes (part of the on-disk format, hence fixed).
_BASE_OFFSETS = np.array(
    [
        0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2,
        0x83E13D2C, 0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C,
        0xF718902A, 0x0B1C9CDB, 0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979,
        0xCCA6C0B2, 0x304A0979, 0x85AA43D4, 0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E,
        0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
    ],
    dtype=np.uint32,
)

_CHECKSUM_OFFSET = 8  # pd_checksum: uint16 after the 8-byte pd_lsn
_UPPER_OFFSET = 14  # pd_upper: after pd_checksum, pd_flags, pd_lower

# Relation data files: <relfilenode>[_fsm|_vm|_init][.<segment>] in base/<db>/, global/ and
# pg_tblspc/<oid>/<version dir>/<db>/.
_REL_FILE = re.compile(r"^(\d+)(?:_(?:fsm|vm|init))?(?:\.(\d+))?$")
_REL_DIR = re.compile(r"^(?:global|base/\d+|pg_tblspc/\d+/[^/]+/\d+)$")


@dataclass(frozen=True)
class PageVerdict:
    """One page whose checksum did not verify."""

    block: int
    stored: int
    computed: int


def is_checksummed_file(relpath: str) -> bool:
    """Whether a data-directory file (relative, '/'-separated) is a relation file with pages."""
    directory, _, name = relpath.rpartition("/")
    return bool(_REL_DIR.match(directory) and _REL_FILE.match(name))


def first_block_of(relpath: str) -> int:
    """Block number of the first page of a relation segment file (``1234.2`` -> 2 * 131072)."""
    m = _REL_FILE.match(relpath.rpartition("/")[2])
    if m is None:
        raise ValueError(f"not a relation file: {relpath!r}")
    return int(m.group(2) or 0) * RELSEG_SIZE


def _as_pages(data: bytes | bytearray | memoryview) -> npt.NDArray[np.uint8]:
    whole = len(data) - len(data) % BLCKSZ
    return np.frombuffer(data, dtype=np.uint8, count=whole).reshape(-1, BLCKSZ)


Blocks = int | npt.NDArray[np.integer]
"""The block number of each page: the first page's (consecutive pages) or one per page."""


def _block_numbers(blocks: Blocks, n: int) -> npt.NDArray[np.uint32]:
    if isinstance(blocks, int | np.integer):
        return (np.arange(n, dtype=np.uint64) + np.uint64(int(blocks))).astype(np.uint32)
    arr = np.asarray(blocks)
    if arr.shape != (n,):
        raise ValueError(f"{arr.shape[0] if arr.ndim else 0} block numbers for {n} pages")
    return arr.astype(np.uint32)


def checksum_pages(
    data: bytes | bytearray | memoryview, first_block: Blocks
) -> npt.NDArray[np.uint16]:
    """The checksum PostgreSQL would store in each whole page of ``data`` (a trailing partial
    page is ignored); page ``i`` is block ``first_block + i`` (or ``first_block[i]`` when an
    array of block numbers is given, for pages gathered from several files)."""
    n = len(data) // BLCKSZ
    words = np.frombuffer(data, dtype="<u4", count=n * _ROWS * N_SUMS).reshape(n, _ROWS, N_SUMS)
    # pd_checksum (bytes 8-9) is the low half of word 2 of row 0: it counts as zero.
    row0 = words[:, 0, :].copy()
    row0[:, _CHECKSUM_OFFSET // 4] &= np.uint32(0xFFFF0000)
    sums = np.empty((n, N_SUMS), dtype=np.uint32)
    sums[...] = _BASE_OFFSETS
    tmp = np.empty_like(sums)
    shifted = np.empty_like(sums)
    for row in range(_ROWS + 2):
        if row == 0:
            np.bitwise_xor(sums, row0, out=tmp)
        elif row < _ROWS:
            np.bitwise_xor(sums, words[:, row, :], out=tmp)
        else:
            tmp[...] = sums
        np.right_shift(tmp, 17, out=shifted)
        np.multiply(tmp, FNV_PRIME, out=sums)
        np.bitwise_xor(sums, shifted, out=sums)
    folded = np.bitwise_xor.reduce(sums, axis=1)
    folded ^= _block_numbers(first_block, n)
    return ((folded % np.uint32(65535)) + np.uint32(1)).astype(np.uint16)


def page_checksum(page: bytes, block: int) -> int:
    """The checksum of one 8 KiB page at ``block``."""
    if len(page) != BLCKSZ:
        raise ValueError(f"a page is {BLCKSZ} bytes, got {len(page)}")
    return int(checksum_pages(page, block)[0])


def bad_pages(
    data: bytes | bytearray | memoryview, blocks: Blocks, skip_lsn_from: int | None = None
) -> list[tuple[int, int, int]]:
    """``(page index, stored, computed)`` of each whole page of ``data`` whose checksum is wrong
    (new pages and, with ``skip_lsn_from``, pages with an LSN at or after it are skipped)."""
    pages = _as_pages(data)
    if pages.shape[0] == 0:
        return []
    upper = pages[:, _UPPER_OFFSET : _UPPER_OFFSET + 2].copy().view("<u2").ravel()
    checked = upper != 0
    if skip_lsn_from is not None:
        halves = pages[:, :8].copy().view("<u4")
        lsn = (halves[:, 0].astype(np.uint64) << np.uint64(32)) | halves[:, 1].astype(np.uint64)
        checked &= lsn < np.uint64(skip_lsn_from)
    if not checked.any():
        return []
    stored = pages[:, _CHECKSUM_OFFSET : _CHECKSUM_OFFSET + 2].copy().view("<u2").ravel()
    computed = checksum_pages(data, blocks)
    bad = np.nonzero(checked & (stored != computed))[0]
    return [(int(i), int(stored[i]), int(computed[i])) for i in bad]


def verify_pages(
    data: bytes | bytearray | memoryview, first_block: int, skip_lsn_from: int | None = None
) -> list[PageVerdict]:
    """Pages of ``data`` whose stored checksum is wrong (new pages and, with ``skip_lsn_from``,
    pages with an LSN at or after it are not checked)."""
    return [
        PageVerdict(first_block + i, stored, computed)
        for i, stored, computed in bad_pages(data, first_block, skip_lsn_from)
    ]


def bad_pages_of_files(
    parts: Sequence[tuple[bytes | bytearray | memoryview, int]], skip_lsn_from: int | None = None
) -> list[tuple[int, int]]:
    """``(part index, block)`` of each bad page of several files' contents (``(data, block of
    its first page)`` each), checked in one pass over all their whole pages (small files)."""
    datas: list[bytes | bytearray | memoryview] = []
    blocks: list[npt.NDArray[np.uint64]] = []
    starts: list[int] = []
    owners: list[int] = []
    pages = 0
    for index, (data, first_block) in enumerate(parts):
        n = len(data) // BLCKSZ
        if n == 0:
            continue
        datas.append(memoryview(data)[: n * BLCKSZ])
        blocks.append(np.arange(n, dtype=np.uint64) + np.uint64(first_block))
        starts.append(pages)
        owners.append(index)
        pages += n
    if not datas:
        return []
    joined = datas[0] if len(datas) == 1 else b"".join(datas)
    all_blocks = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    out: list[tuple[int, int]] = []
    for i, _stored, _computed in bad_pages(joined, all_blocks, skip_lsn_from):
        j = int(np.searchsorted(np.asarray(starts), i, side="right")) - 1
        out.append((owners[j], int(all_blocks[i])))
    return out
