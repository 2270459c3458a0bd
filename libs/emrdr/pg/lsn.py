"""Write-ahead log positions (LSNs) and WAL file names.

An LSN is a 64-bit byte position printed by PostgreSQL as two hex halves, ``"16/B374D848"``.
A WAL segment file is named ``TTTTTTTTXXXXXXXXYYYYYYYY``: timeline, then the segment number split
into "log id" and "segment within log id" (each 8 hex digits).  Timeline history files are
``TTTTTTTT.history``.

    >>> parse_lsn("0/3000060")
    50331744
    >>> segment_name(1, "0/3000060")
    '000000010000000000000003'
"""

from __future__ import annotations

import re

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024

_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_HISTORY_RE = re.compile(r"^([0-9A-F]{8})\.history$")

Lsn = int | str


def parse_lsn(text: str) -> int:
    """``"16/B374D848"`` -> integer byte position; raises ValueError naming the bad text."""
    m = _LSN_RE.match(text.strip())
    if m is None:
        raise ValueError(f"not an LSN (expected like '16/B374D848'): {text!r}")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(value: int) -> str:
    """Integer byte position -> ``"16/B374D848"`` (PostgreSQL's own spelling)."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"LSN out of range: {value}")
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def as_lsn(value: Lsn) -> int:
    """Accept an integer or the text form."""
    return value if isinstance(value, int) else parse_lsn(value)


def lsn_diff(a: Lsn, b: Lsn) -> int:
    """Bytes from ``b`` to ``a`` (``a - b``, as ``pg_wal_lsn_diff``); negative if a < b."""
    return as_lsn(a) - as_lsn(b)


def _check_seg_size(seg_size: int) -> None:
    if seg_size <= 0 or seg_size & (seg_size - 1):
        raise ValueError(f"WAL segment size must be a power of two, got {seg_size}")


def segment_number(lsn: Lsn, seg_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """Number of the segment holding byte ``lsn``."""
    _check_seg_size(seg_size)
    return as_lsn(lsn) // seg_size


def segment_name(timeline: int, lsn: Lsn, seg_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """Name of the WAL file on ``timeline`` that holds ``lsn`` (like ``pg_walfile_name``).

    Note: ``pg_walfile_name`` maps an LSN exactly on a segment boundary to the *previous*
    segment (it names where the preceding record ended); this function does not.
    """
    segno = segment_number(lsn, seg_size)
    return segment_name_from_number(timeline, segno, seg_size)


def segment_name_from_number(
    timeline: int, segno: int, seg_size: int = DEFAULT_SEGMENT_SIZE
) -> str:
    _check_seg_size(seg_size)
    if not 0 < timeline <= 0xFFFFFFFF:
        raise ValueError(f"timeline out of range: {timeline}")
    per_id = 0x100000000 // seg_size
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def parse_segment_name(name: str, seg_size: int = DEFAULT_SEGMENT_SIZE) -> tuple[int, int]:
    """``"000000010000000000000003"`` -> ``(timeline, segment_number)``."""
    _check_seg_size(seg_size)
    m = _SEGMENT_RE.match(name)
    if m is None:
        raise ValueError(f"not a WAL segment file name: {name!r}")
    per_id = 0x100000000 // seg_size
    log_id, seg = int(m.group(2), 16), int(m.group(3), 16)
    if seg >= per_id:
        raise ValueError(f"segment part {seg:08X} too large for segment size {seg_size}: {name!r}")
    return int(m.group(1), 16), log_id * per_id + seg


def segment_start_lsn(name: str, seg_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """First byte position covered by a segment file."""
    return parse_segment_name(name, seg_size)[1] * seg_size


def is_segment_name(name: str) -> bool:
    return _SEGMENT_RE.match(name) is not None


def is_history_name(name: str) -> bool:
    return _HISTORY_RE.match(name) is not None


def history_name(timeline: int) -> str:
    """``2`` -> ``"00000002.history"``."""
    return f"{timeline:08X}.history"


def timeline_of(name: str) -> int:
    """Timeline of a segment or history file name."""
    m = _SEGMENT_RE.match(name) or _HISTORY_RE.match(name)
    if m is None:
        raise ValueError(f"not a WAL segment or history file name: {name!r}")
    return int(m.group(1), 16)
