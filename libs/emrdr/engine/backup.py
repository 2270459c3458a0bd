"""Full and incremental base backups of one PostgreSQL 15 node into the repository.

The procedure, in the order :func:`run_backup` reads:

1. connect to the node (primary or standby) and hold that session for the whole backup;
2. choose the parent (incremental): the newest complete backup of the same system on this
   timeline or an ancestor of it; without one the backup is taken as a full;
3. mark the backup started in the repository, ``pg_backup_start(label, fast => true)``;
4. list the data directory (skipping what ``pg_basebackup`` skips), plan each file: *reuse*
   the parent's chunk list for a file whose size and mtime are unchanged and whose mtime is
   older than the parent's start minus a safety margin, *read* everything else;
5. read files in parallel, big ones in units of one chunk on every worker at once, small ones in
   batches: page checksums of relation files (a bad page makes the backup *degraded*, naming
   relation and block), chunks (4 MiB) hashed once (SHA-256: the chunk id is keyed on it and the
   file checksum is built from it), compressed and sealed on the workers and written by a chunk
   session's I/O threads (dedup; every chunk durable before the manifest);
6. write the canary row on the primary (waiting for a standby source to replay it), record EMR
   row counts, ``pg_backup_stop`` (not waiting for the archiver: step 7 waits for more);
7. upload spooled WAL in-process until every segment from start to stop is in the repository;
8. write the manifest (two copies): only now is the backup listed as complete.

Any failure before 8 leaves no manifest, so the backup is never listed; earlier backups are not
touched (objects are immutable).  Every manifest lists every file with its full chunk list (a
synthetic full), so restore never walks a chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import asyncpg
import numpy as np

from emrdr.config import PgNode, Settings
from emrdr.engine.pagecheck import (
    BLCKSZ,
    bad_pages,
    bad_pages_of_files,
    first_block_of,
    is_checksummed_file,
    verify_pages,
)
from emrdr.engine.pages import (
    Blocks,
    ParentPages,
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
from emrdr.engine.repository import Repository
from emrdr.engine.wal import WalConflict, upload_spool
from emrdr.pg import emr_seed
from emrdr.pg.lsn import format_lsn, parse_lsn, segment_name_from_number
from emrdr.repo import DEFAULT_CHUNK_SIZE, ChunkRef, RepoError
from emrdr.repo.chunks import ChunkSession, checksum_of_digests
from emrdr.repo.manifest import FileEntry, Manifest, PageOverlay, backup_id_for, started_key

__all__ = [
    "MTIME_SAFETY_MARGIN_S",
    "BackupError",
    "BackupResult",
    "PlannedFile",
    "SourceFile",
    "choose_parent",
    "exclusion",
    "list_data_dir",
    "plan_file",
    "run_backup",
]

Kind = Literal["full", "incremental"]
ProgressFn = Callable[[int, int], None]

#: A file modified this close to (or after) the parent's start is read again even if its size
#: and mtime look unchanged: coarse timestamps cannot prove it did not change meanwhile.
MTIME_SAFETY_MARGIN_S = 10.0
WAL_TIMEOUT_S = 300.0

# What pg_basebackup leaves out.  Directories whose *contents* are skipped (the directory
# itself is kept, empty):
_EMPTY_DIRS = frozenset({
    "pg_wal", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots",
    "pg_stat_tmp", "pg_subtrans",
})
# Files skipped by exact name at the top of the data directory:
_SKIP_TOP_FILES = frozenset({
    "postmaster.pid", "postmaster.opts", "backup_label", "backup_label.old", "tablespace_map",
    "standby.signal", "recovery.signal", "postgresql.auto.conf.tmp", "current_logfiles.tmp",
})
_TEMP_REL = re.compile(r"^t\d+_\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?$")
_REL_MAIN = re.compile(r"^(\d+)(?:_(?:fsm|vm))?(?:\.\d+)?$")


class BackupError(RuntimeError):
    """The backup failed; nothing was listed as complete."""


# --- data shapes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    """One file of the data directory as listed (before reading)."""

    path: str  # relative, '/'-separated
    abs_path: Path
    size: int
    mtime: float
    mode: int


@dataclass(frozen=True)
class PlannedFile:
    source: SourceFile
    action: Literal["read", "reuse", "pages"]  # pages: changed pages only (engine.pages)
    reason: str


@dataclass
class BackupResult:
    """What a backup did (also what a dry run would do)."""

    backup_id: str
    kind: Kind
    parent_id: str | None
    bytes_source: int  # size of every file in the backup
    bytes_read: int
    bytes_reused: int
    bytes_stored: int  # new bytes in the repository (chunks; WAL not included)
    duration_s: float
    start_lsn: str | None = None
    stop_lsn: str | None = None
    start_wal: str | None = None
    stop_wal: str | None = None
    timeline: int | None = None
    files: int = 0
    files_read: int = 0
    files_reused: int = 0
    degraded: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False
    plan: list[PlannedFile] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per step of the procedure

    @property
    def dedup_ratio(self) -> float:
        """Bytes in the backup per new byte stored (higher is better)."""
        return self.bytes_source / self.bytes_stored if self.bytes_stored else float("inf")

    @property
    def throughput_mb_s(self) -> float:
        """Source bytes covered per second (MB = 10**6 bytes)."""
        return self.bytes_source / 1e6 / self.duration_s if self.duration_s > 0 else 0.0


# --- pure decisions ------------------------------------------------------------------------


def exclusion(relpath: str, is_dir: bool) -> str | None:
    """Why ``relpath`` is left out of a base backup (None: it is backed up)."""
    parts = relpath.split("/")
    name = parts[-1]
    if name.startswith("pgsql_tmp"):
        return "temporary file"
    if len(parts) > 1 and parts[0] in _EMPTY_DIRS:
        if parts[0] == "pg_wal" and parts[1:] == ["archive_status"] and is_dir:
            return None
        return f"contents of {parts[0]}/ are not backed up"
    if is_dir:
        return None
    if len(parts) == 1 and name in _SKIP_TOP_FILES:
        return f"{name} is not backed up"
    if name == "pg_internal.init":
        return "relation cache init file (rebuilt at start)"
    if _TEMP_REL.match(name) and _in_database_dir(parts):
        return "temporary relation"
    return None


def _in_database_dir(parts: list[str]) -> bool:
    return (len(parts) == 3 and parts[0] == "base") or (
        len(parts) == 5 and parts[0] == "pg_tblspc"
    )


def unlogged_exclusions(relpaths: Iterable[str]) -> set[str]:
    """Files of unlogged relations other than their init fork (reset at recovery anyway)."""
    paths = list(relpaths)
    init_forks = {p[: -len("_init")] for p in paths if p.endswith("_init")}
    out: set[str] = set()
    for p in paths:
        directory, _, name = p.rpartition("/")
        m = _REL_MAIN.match(name)
        if m and f"{directory}/{m.group(1)}" in init_forks:
            out.add(p)
    return out


def plan_file(
    source: SourceFile, previous: FileEntry | None, reuse_before: float | None
) -> tuple[Literal["read", "reuse"], str]:
    """Read or reuse one file, with the reason (``reuse_before``: parent start - margin)."""
    if previous is None or reuse_before is None:
        return "read", "not in the parent backup" if reuse_before is not None else "full backup"
    if previous.size != source.size:
        return "read", f"size changed ({previous.size} -> {source.size})"
    if previous.mtime != source.mtime:
        return "read", "modification time changed"
    if source.mtime >= reuse_before:
        return "read", "modified too close to the parent backup's start to trust the timestamp"
    return "reuse", "unchanged since the parent backup"


def plan_pages(
    planned: PlannedFile, previous: FileEntry | None, parent: Manifest | None
) -> PlannedFile:
    """Turn a planned read into a read of changed pages when the parent recorded the file's
    pages (relation main fork of whole pages, same timeline, see emrdr.engine.pages)."""
    if planned.action != "read" or parent is None or previous is None:
        return planned
    if previous.page_map is None or previous.size % BLCKSZ:
        return planned
    ok, _why = is_overlay_candidate(planned.source.path, planned.source.size)
    if not ok:
        return planned
    return PlannedFile(planned.source, "pages",
                       f"{planned.reason}: changed pages only (page LSNs vs the parent's)")


def load_parent_pages(
    repo: Repository, plan: list[PlannedFile], previous: dict[str, FileEntry],
    parent: Manifest | None, notes: list[str], chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, ParentPages]:
    """The parent's page records of the files planned ``pages`` (a file whose record cannot
    be read is read whole instead, with a note)."""
    wanted = [p.source.path for p in plan if p.action == "pages"]
    if parent is None or not wanted:
        return {}
    start = parse_lsn(parent.start_lsn)

    def one(path: str) -> ParentPages | None:
        entry = previous[path]
        try:
            blob = repo.chunks.get(entry.page_map or "")
            return ParentPages.build(entry, start, blob, first_block_of(path),
                                     chunk_size // BLCKSZ)
        except (RepoError, ValueError) as exc:
            notes.append(f"{path}: parent page record unusable ({exc}); read whole")
            return None

    with ThreadPoolExecutor(4, thread_name_prefix="backup-pagemap") as pool:
        got = dict(zip(wanted, pool.map(one, wanted), strict=True))
    return {k: v for k, v in got.items() if v is not None}


@dataclass(frozen=True)
class ParentCandidate:
    backup_id: str
    system_identifier: str
    timeline: int


def choose_parent(
    candidates: Iterable[ParentCandidate], system_identifier: str, ancestry: set[int]
) -> tuple[str | None, str]:
    """The newest backup of this system on a timeline of this cluster's history, with why."""
    ordered = sorted(candidates, key=lambda c: c.backup_id, reverse=True)
    if not ordered:
        return None, "no earlier complete backup in the repository"
    for c in ordered:
        if c.system_identifier != system_identifier:
            continue
        if c.timeline not in ancestry:
            continue
        return c.backup_id, f"newest backup of this system on timeline {c.timeline}"
    return None, (
        f"no earlier backup of system {system_identifier} on timelines {sorted(ancestry)}"
    )


def parse_backup_label(text: str) -> dict[str, str]:
    """``START WAL LOCATION: 0/2000028 (file 0000...)`` -> ``{"START WAL LOCATION": ...}``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out[key.strip()] = value.strip()
    return out


def timeline_ancestry(history_text: str | None, timeline: int) -> set[int]:
    """Timelines in a cluster's history (from its ``<tli>.history`` file) plus its own."""
    result = {timeline}
    for line in (history_text or "").splitlines():
        first = line.strip().split("\t")[0].split(" ")[0]
        if first.isdigit():
            result.add(int(first))
    return result


# --- listing -------------------------------------------------------------------------------


def list_data_dir(data_dir: Path) -> tuple[list[SourceFile], list[str]]:
    """Files to back up (sorted by path) and every kept directory, both relative.

    Tablespace links under ``pg_tblspc`` are followed; a file that vanishes while listing is
    skipped (dropped relations are PostgreSQL's business, replayed from WAL).
    """
    files: list[SourceFile] = []
    dirs: list[str] = []
    data_dir = Path(data_dir)

    def walk(abs_dir: Path, rel_dir: str) -> None:
        try:
            entries = list(os.scandir(abs_dir))
        except FileNotFoundError:
            return
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            follow = rel.startswith("pg_tblspc/")
            try:
                st = entry.stat(follow_symlinks=follow)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if exclusion(rel, True) is None:
                    dirs.append(rel)
                    walk(Path(entry.path), rel)
            elif stat.S_ISREG(st.st_mode) and exclusion(rel, False) is None:
                files.append(
                    SourceFile(rel, Path(entry.path), st.st_size, st.st_mtime,
                               stat.S_IMODE(st.st_mode))
                )
            # sockets, fifos and dangling links are not data

    walk(data_dir, "")
    skip = unlogged_exclusions(f.path for f in files)
    files = sorted((f for f in files if f.path not in skip), key=lambda f: f.path)
    return files, sorted(dirs)


# --- reading -------------------------------------------------------------------------------


@dataclass
class _Totals:
    total: int
    done: int = 0
    stored: int = 0
    read: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, refs: list[ChunkRef], on_progress: ProgressFn | None,
            read: int | None = None) -> None:
        n = sum(r.raw_size for r in refs) if read is None else read
        with self.lock:
            self.done += n
            self.read += n
            self.stored += sum(r.stored_size for r in refs if r.new)
            done, total = self.done, max(self.total, self.done)
        if on_progress is not None:
            on_progress(done, total)


#: Files bigger than this are read in units of this many bytes (whole chunks), one worker task
#: each, so the units of one 1 GiB relation segment are compressed on every core at once.
READ_UNIT = DEFAULT_CHUNK_SIZE
#: Smaller files are read up to this many per task, their pages checked in one pass.
SMALL_BATCH_FILES = 64
#: Threads writing chunk objects: fsync latency overlaps the hashing and compression.
IO_THREADS = 4


@dataclass
class _Piece:
    """What reading one part of a file gave: its chunks, bad blocks, whether it was all there."""

    chunks: list[ChunkRef] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)
    complete: bool = True
    vanished: bool = False
    headers: tuple[np.ndarray, np.ndarray] | None = None  # page LSNs and checksums (maps)


def _pread(path: Path, offset: int, length: int) -> bytes | None:
    """``length`` bytes at ``offset`` (fewer at the end of the file); None if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.pread(fd, length, offset)
        while 0 < len(data) < length:
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)


def _reverify(path: Path, block_in_file: int, block: int, skip_lsn_from: int | None) -> bool:
    """Re-read one page (it may have been read while being written); True if it is bad."""
    page = _pread(path, block_in_file * BLCKSZ, BLCKSZ)
    return page is not None and len(page) == BLCKSZ and bool(
        verify_pages(page, block, skip_lsn_from)
    )


def _store(session: ChunkSession, data: bytes, chunk_size: int) -> list[ChunkRef]:
    view = memoryview(data)
    return [session.put(view[i : i + chunk_size]) for i in range(0, len(view), chunk_size)]


def _read_unit(
    session: ChunkSession, source: SourceFile, offset: int, length: int, *,
    skip_lsn_from: int | None, chunk_size: int, totals: _Totals, on_progress: ProgressFn | None,
) -> _Piece:
    """Read, check and store ``length`` bytes of a big file from ``offset``."""
    data = _pread(source.abs_path, offset, length)
    if data is None:
        return _Piece(vanished=True)
    piece = _Piece(complete=len(data) == length)
    if is_overlay_candidate(source.path, source.size)[0]:
        piece.headers = page_headers(data)
    if is_checksummed_file(source.path):
        base = first_block_of(source.path)
        first = base + offset // BLCKSZ
        for bad in verify_pages(data, first, skip_lsn_from):
            if _reverify(source.abs_path, bad.block - base, bad.block, skip_lsn_from):
                piece.failures.append(bad.block)
    piece.chunks = _store(session, data, chunk_size)
    totals.add(piece.chunks, on_progress)
    return piece


def _read_small(
    session: ChunkSession, sources: list[SourceFile], *,
    skip_lsn_from: int | None, chunk_size: int, totals: _Totals, on_progress: ProgressFn | None,
) -> list[_Piece]:
    """Read, check and store several small files whole (one page-check pass for all)."""
    datas = [_pread(s.abs_path, 0, s.size) for s in sources]
    pieces = [
        _Piece(vanished=True) if d is None else _Piece(complete=len(d) == s.size)
        for s, d in zip(sources, datas, strict=True)
    ]
    checked = [
        (i, d) for i, (s, d) in enumerate(zip(sources, datas, strict=True))
        if d is not None and is_checksummed_file(s.path)
    ]
    parts = [(d, first_block_of(sources[i].path)) for i, d in checked]
    for part, block in bad_pages_of_files(parts, skip_lsn_from):
        i = checked[part][0]
        base = parts[part][1]
        if _reverify(sources[i].abs_path, block - base, block, skip_lsn_from):
            pieces[i].failures.append(block)
    for s, piece, data in zip(sources, pieces, datas, strict=True):
        if data is not None:
            if is_overlay_candidate(s.path, s.size)[0]:
                piece.headers = page_headers(data)
            piece.chunks = _store(session, data, chunk_size)
            totals.add(piece.chunks, on_progress)
    return pieces


def _entry_from(
    source: SourceFile, pieces: list[_Piece], chunk_size: int, session: ChunkSession | None = None
) -> FileEntry | None:
    """The manifest entry of a file read in ``pieces`` (None if it vanished meanwhile).

    A file that ended early (truncated while read) is kept up to its first short chunk: WAL
    replay redoes the truncation, as it redoes any change made during the backup."""
    if any(p.vanished for p in pieces):
        return None
    refs: list[ChunkRef] = []
    failures: list[int] = []
    for piece in pieces:
        failures.extend(piece.failures)
        short = False
        for ref in piece.chunks:
            refs.append(ref)
            if ref.raw_size < chunk_size:
                short = True
                break
        if short or not piece.complete:
            break
    page_map: str | None = None
    size = sum(r.raw_size for r in refs)
    if session is not None and size == source.size and all(p.headers for p in pieces):
        lsn = np.concatenate([p.headers[0] for p in pieces if p.headers])
        ck = np.concatenate([p.headers[1] for p in pieces if p.headers])
        if lsn.shape[0] * BLCKSZ == size:
            page_map = session.put(encode_page_map(lsn, ck)).id
    return FileEntry(
        page_map=page_map,
        path=source.path,
        size=sum(r.raw_size for r in refs),
        mode=source.mode,
        mtime=source.mtime,
        sha256=checksum_of_digests(r.digest for r in refs),
        sha256_of="chunks",
        chunks=[r.id for r in refs],
        checksum_failures=sorted(set(failures)),
    )


def _reused_entry(source: SourceFile, previous: FileEntry) -> FileEntry:
    return previous.model_copy(update={"reused": True, "mode": source.mode})


def copy_files(
    repo: Repository,
    plan: list[PlannedFile],
    previous: dict[str, FileEntry],
    *,
    workers: int,
    skip_lsn_from: int | None,
    on_progress: ProgressFn | None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    parents: dict[str, ParentPages] | None = None,
) -> tuple[list[FileEntry], _Totals]:
    """Read the planned files on ``workers`` threads (reused files are not opened).

    Big files are cut into :data:`READ_UNIT` tasks (largest files first), small ones batched;
    each task reads, checks pages, hashes, compresses and seals (all GIL-free in C), and
    hands the objects to the chunk session's writer threads.  Files planned ``pages`` (with
    their parent's record in ``parents``) are read in spans of :data:`SPAN_REGIONS` regions
    and only their changed pages stored (:mod:`emrdr.engine.pages`); one that changed size
    while read is read again whole.  Returns only once every new chunk is durable."""
    if READ_UNIT % chunk_size:
        raise ValueError(f"chunk size {chunk_size} does not divide the read unit {READ_UNIT}")
    parents = parents or {}
    totals = _Totals(total=sum(p.source.size for p in plan))
    entries: dict[str, FileEntry] = {}
    for p in plan:
        if p.action == "reuse":
            entries[p.source.path] = _reused_entry(p.source, previous[p.source.path])
            with totals.lock:
                totals.done += p.source.size
    by_pages = sorted(
        (p.source for p in plan if p.action == "pages" and p.source.path in parents),
        key=lambda s: (-s.size, s.path),
    )
    paged = {s.path for s in by_pages}
    to_read = sorted(
        (p.source for p in plan if p.action in ("read", "pages") and p.source.path not in paged),
        key=lambda s: (-s.size, s.path),
    )
    pieces: dict[str, list[_Piece | None]] = {}
    spans: dict[str, list[_PageSpan | None]] = {}

    def unit(session: ChunkSession, s: SourceFile, index: int) -> None:
        pieces[s.path][index] = _read_unit(
            session, s, index * READ_UNIT, min(READ_UNIT, s.size - index * READ_UNIT),
            skip_lsn_from=skip_lsn_from, chunk_size=chunk_size, totals=totals,
            on_progress=on_progress,
        )

    def batch(session: ChunkSession, group: list[SourceFile]) -> None:
        read = _read_small(
            session, group, skip_lsn_from=skip_lsn_from, chunk_size=chunk_size, totals=totals,
            on_progress=on_progress,
        )
        for s, piece in zip(group, read, strict=True):
            pieces[s.path][0] = piece

    def span(session: ChunkSession, s: SourceFile, index: int, first: int, last: int) -> None:
        spans[s.path][index] = _read_page_span(
            session, s, parents[s.path], first, last, skip_lsn_from=skip_lsn_from,
            chunk_size=chunk_size, totals=totals, on_progress=on_progress,
        )

    def submit_regular(
        pool: ThreadPoolExecutor, session: ChunkSession, sources: list[SourceFile]
    ) -> list[Future[None]]:
        futures: list[Future[None]] = []
        for s in (s for s in sources if s.size > READ_UNIT):
            count = -(-s.size // READ_UNIT)
            pieces[s.path] = [None] * count
            futures.extend(pool.submit(unit, session, s, i) for i in range(count))
        group: list[SourceFile] = []
        group_bytes = 0
        for s in (s for s in sources if s.size <= READ_UNIT):
            pieces[s.path] = [None]
            group.append(s)
            group_bytes += s.size
            if len(group) >= SMALL_BATCH_FILES or group_bytes >= READ_UNIT:
                futures.append(pool.submit(batch, session, group))
                group, group_bytes = [], 0
        if group:
            futures.append(pool.submit(batch, session, group))
        return futures

    with (
        repo.chunks.session(io_threads=IO_THREADS) as session,
        ThreadPoolExecutor(max(1, workers), thread_name_prefix="backup-read") as pool,
    ):
        futures: list[Future[None]] = []
        region_pages = chunk_size // BLCKSZ
        for s in by_pages:
            regions = -(-s.size // chunk_size)
            bounds = list(range(0, regions, SPAN_REGIONS))
            spans[s.path] = [None] * len(bounds)
            futures.extend(
                pool.submit(span, session, s, i, b, min(b + SPAN_REGIONS, regions))
                for i, b in enumerate(bounds)
            )
        futures.extend(submit_regular(pool, session, to_read))
        _wait_all(futures)
        again: list[SourceFile] = []
        for s in by_pages:
            done_spans = [x for x in spans[s.path] if x is not None]
            if len(done_spans) != len(spans[s.path]) or any(x.vanished for x in done_spans):
                continue
            if not all(x.complete for x in done_spans):
                again.append(s)  # changed size while read: store it whole
                continue
            entries[s.path] = _pages_entry(s, parents[s.path], done_spans, session,
                                           region_pages)
        if again:
            to_read.extend(again)
            _wait_all(submit_regular(pool, session, again))
        for s in to_read:
            done = [p for p in pieces[s.path] if p is not None]
            entry = (
                _entry_from(s, done, chunk_size, session)
                if len(done) == len(pieces[s.path]) else None
            )
            if entry is not None:
                entries[s.path] = entry
    return [entries[k] for k in sorted(entries)], totals


#: Regions (chunks) read per task of a file stored by changed pages (128 MiB at 4 MiB chunks).
SPAN_REGIONS = 32


@dataclass
class _PageSpan:
    """What reading regions of a file by pages gave (see :func:`_read_page_span`)."""

    rebased: dict[int, ChunkRef] = field(default_factory=dict)
    overlays: list[tuple[ChunkRef, Blocks]] = field(default_factory=list)
    superseded: list[Blocks] = field(default_factory=list)  # parent copies no longer live
    lsn: list[np.ndarray] = field(default_factory=list)
    ck: list[np.ndarray] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)
    complete: bool = True
    vanished: bool = False


def _read_page_span(
    session: ChunkSession, source: SourceFile, parent: ParentPages, first: int, last: int, *,
    skip_lsn_from: int | None, chunk_size: int, totals: _Totals, on_progress: ProgressFn | None,
) -> _PageSpan:
    """Regions ``first``..``last`` (exclusive) of a file: compare page headers with the
    parent's record, store changed pages packed into overlay chunks (a region with too many
    of them, or a new one, whole as a base chunk); record every page's header."""
    out = _PageSpan()
    region_pages = chunk_size // BLCKSZ
    file_pages = source.size // BLCKSZ
    base_block = first_block_of(source.path)
    pend_blocks: list[Blocks] = []
    pend_pages: list[bytes] = []
    pend_n = 0

    def flush() -> None:
        nonlocal pend_n
        if not pend_n:
            return
        blocks = np.concatenate(pend_blocks)
        ref = session.put(b"".join(pend_pages))
        out.overlays.append((ref, blocks))
        totals.add([ref], on_progress, read=0)
        pend_blocks.clear()
        pend_pages.clear()
        pend_n = 0

    for r in range(first, last):
        start, end = r * region_pages, min((r + 1) * region_pages, file_pages)
        data = _pread(source.abs_path, start * BLCKSZ, (end - start) * BLCKSZ)
        if data is None:
            out.vanished = True
            return out
        if len(data) != (end - start) * BLCKSZ:
            out.complete = False
            return out
        lsn, ck = page_headers(data)
        out.lsn.append(lsn)
        out.ck.append(ck)
        known = max(0, min(end, parent.pages) - start)
        same = np.zeros(end - start, dtype=bool)
        if known:
            k = slice(start, start + known)
            same[:known] = unchanged_pages(lsn[:known], ck[:known], parent.lsn[k], parent.ck[k],
                                           parent.start_lsn, parent.bad[k])
        changed = np.nonzero(~same)[0]
        live_kept = int(np.count_nonzero((parent.owner[start:start + known] >= 0) & same[:known]))
        action, _why = region_action(region_pages, parent.region_base_pages(r), start, end,
                                     file_pages, int(changed.size), live_kept)
        if action == "rebase":
            for bad in verify_pages(data, base_block + start, skip_lsn_from):
                if _reverify(source.abs_path, bad.block - base_block, bad.block, skip_lsn_from):
                    out.failures.append(bad.block)
            ref = session.put(data)
            out.rebased[r] = ref
            out.superseded.append(np.arange(start, end, dtype=np.int64))
            totals.add([ref], on_progress, read=len(data))
            continue
        totals.add([], on_progress, read=len(data))
        if action == "keep":
            continue
        view = np.frombuffer(data, dtype=np.uint8).reshape(-1, BLCKSZ)
        packed = view[changed].tobytes()
        blocks = changed.astype(np.int64) + start
        for i, _stored, _computed in bad_pages(packed, blocks + base_block, skip_lsn_from):
            block = int(blocks[i])
            if _reverify(source.abs_path, block, block + base_block, skip_lsn_from):
                out.failures.append(block + base_block)
        out.superseded.append(blocks)
        # pack into chunks of at most one region's worth of pages
        offset = 0
        while offset < blocks.size:
            take = min(region_pages - pend_n, blocks.size - offset)
            pend_blocks.append(blocks[offset:offset + take])
            pend_pages.append(packed[offset * BLCKSZ:(offset + take) * BLCKSZ])
            pend_n += take
            offset += take
            if pend_n >= region_pages:
                flush()
    flush()
    return out


def _pages_entry(
    source: SourceFile, parent: ParentPages, spans: list[_PageSpan], session: ChunkSession,
    region_pages: int,
) -> FileEntry:
    """The manifest entry of a file stored as base chunks + merged overlays."""
    file_pages = source.size // BLCKSZ
    regions = -(-file_pages // region_pages)
    rebased = {r: ref for sp in spans for r, ref in sp.rebased.items()}
    chunks: list[str] = []
    base_pages = 0
    for r in range(regions):
        if r in rebased:
            chunks.append(rebased[r].id)
            base_pages += rebased[r].raw_size // BLCKSZ
        else:
            chunks.append(parent.entry.chunks[r])
            base_pages += parent.region_base_pages(r)
    superseded = (np.concatenate([b for sp in spans for b in sp.superseded])
                  if any(sp.superseded for sp in spans) else np.zeros(0, dtype=np.int64))
    overlays: list[PageOverlay] = []
    for o in parent.entry.overlays:
        live = live_blocks(o)
        live = live[(live < file_pages) & ~np.isin(live, superseded)]
        kept = with_live(o, live)
        if kept is not None:
            overlays.append(kept)
    overlays.extend(make_overlay(ref.id, blocks) for sp in spans for ref, blocks in sp.overlays)
    lsn = np.concatenate([a for sp in spans for a in sp.lsn])
    ck = np.concatenate([a for sp in spans for a in sp.ck])
    page_map = session.put(encode_page_map(lsn, ck)).id
    return FileEntry(
        path=source.path,
        size=source.size,
        mode=source.mode,
        mtime=source.mtime,
        sha256=pieces_checksum(chunks, overlays),
        sha256_of="pieces",
        chunks=chunks,
        checksum_failures=sorted({b for sp in spans for b in sp.failures}),
        overlays=overlays,
        base_size=None if base_pages == file_pages else base_pages * BLCKSZ,
        page_map=page_map,
    )


def _wait_all(futures: list[Future[None]]) -> None:
    """Wait for ``futures``; on the first failure cancel the rest and raise it."""
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    for fut in done:
        exc = fut.exception()
        if exc is not None:
            for other in pending:
                other.cancel()
            for other in pending:
                with contextlib.suppress(BaseException):
                    other.result()
            raise exc


# --- the procedure -------------------------------------------------------------------------


async def _connect(settings: Settings, node: PgNode, database: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=node.host, port=node.port, user=settings.pg.user, password=settings.pg.password,
        database=database, timeout=10,
    )


async def _database_exists(conn: asyncpg.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))


def _find_primary(settings: Settings, exclude: PgNode) -> PgNode | None:
    for n in settings.pg.nodes:
        if n.role == "primary" and (n.host, n.port) != (exclude.host, exclude.port):
            return n
    return None


def _new_backup_id(repo: Repository, kind: Kind) -> tuple[str, datetime]:
    """A fresh id (ids have one-second resolution: wait for the next second if taken)."""
    while True:
        now = datetime.now(UTC)
        bid = backup_id_for(now, kind)
        if not repo.storage.exists(started_key(bid)) and bid not in repo.backup_ids():
            return bid, now
        time.sleep(1.0 - now.microsecond / 1e6 + 0.01)


def _load_parent(
    repo: Repository, system_id: str, ancestry: set[int]
) -> tuple[Manifest | None, str]:
    """Newest complete backup usable as parent (manifests are read newest first)."""
    ids = repo.backup_ids()
    if not ids:
        return None, choose_parent([], system_id, ancestry)[1]
    for bid in reversed(ids):
        try:
            m = repo.read_manifest(bid)
        except Exception:  # an unreadable manifest is never a parent
            continue
        candidate = ParentCandidate(m.backup_id, m.system_identifier, m.timeline)
        parent_id, reason = choose_parent([candidate], system_id, ancestry)
        if parent_id is not None:
            return m, reason
    return None, f"no earlier backup of system {system_id} on timelines {sorted(ancestry)}"


async def _relation_names(
    settings: Settings, node: PgNode, failures: dict[str, list[int]]
) -> dict[str, str]:
    """``base/<db>/<filenode>`` -> ``db.schema.table`` for files with bad pages (best effort)."""
    names: dict[str, str] = {}
    by_db: dict[int, list[tuple[str, int]]] = {}
    for path in failures:
        parts = path.split("/")
        fname = parts[-1].split(".")[0].split("_")[0]
        if parts[0] == "base" and len(parts) == 3 and fname.isdigit():
            by_db.setdefault(int(parts[1]), []).append((path, int(fname)))
    if not by_db:
        return names
    try:
        conn = await _connect(settings, node, "postgres")
        try:
            dbs = {
                int(r["oid"]): str(r["datname"])
                for r in await conn.fetch("SELECT oid, datname FROM pg_database")
            }
        finally:
            await conn.close()
        for db_oid, items in by_db.items():
            dbname = dbs.get(db_oid)
            if dbname is None:
                continue
            conn = await _connect(settings, node, dbname)
            try:
                for path, filenode in items:
                    rel = await conn.fetchval(
                        "SELECT c.oid::regclass::text FROM pg_class c "
                        "WHERE pg_relation_filenode(c.oid) = $1",
                        filenode,
                    )
                    if rel:
                        names[path] = f"{dbname}.{rel}"
            finally:
                await conn.close()
    except (OSError, asyncpg.PostgresError):
        pass
    return names


async def _write_canary(
    settings: Settings, source: PgNode, source_conn: asyncpg.Connection, in_recovery: bool,
    backup_id: str, timeout: float = 60.0,
) -> tuple[bool, dict[str, int], list[str]]:
    """Canary row on the primary (a standby source waits to replay it) + EMR row counts."""
    notes: list[str] = []
    primary = _find_primary(settings, source) if in_recovery else source
    if primary is None:
        notes.append("canary not written: source is a standby and no primary is configured")
        return False, {}, notes
    conn = await _connect(settings, primary, "postgres")
    try:
        dbname = settings.pg.database if await _database_exists(conn, settings.pg.database) else (
            "postgres"
        )
    finally:
        await conn.close()
    conn = await _connect(settings, primary, dbname)
    try:
        await emr_seed.write_canary(conn, backup_id)
        canary_lsn = str(await conn.fetchval("SELECT pg_current_wal_flush_lsn()::text"))
        counts: dict[str, int] = {}
        if await conn.fetchval("SELECT to_regclass('emr.patients') IS NOT NULL"):
            counts = await emr_seed.row_counts(conn)
    finally:
        await conn.close()
    if in_recovery:
        deadline = time.monotonic() + timeout
        while True:
            replayed = await source_conn.fetchval("SELECT pg_last_wal_replay_lsn()::text")
            if replayed and parse_lsn(str(replayed)) >= parse_lsn(canary_lsn):
                break
            if time.monotonic() > deadline:
                raise BackupError(
                    f"standby {source.name} did not replay the canary (LSN {canary_lsn}) "
                    f"within {timeout:.0f}s"
                )
            await asyncio.sleep(0.05)
    return True, counts, notes


async def _switch_wal_on_primary(settings: Settings, source: PgNode) -> None:
    primary = _find_primary(settings, source)
    if primary is None:
        return
    conn = await _connect(settings, primary, "postgres")
    try:
        await conn.execute("SELECT pg_switch_wal()")
    finally:
        await conn.close()


def wal_range(
    start_lsn: int, stop_lsn: int, timeline: int, seg_size: int
) -> list[str]:
    """Segments holding WAL from ``start_lsn`` up to (not including) ``stop_lsn``."""
    first = start_lsn // seg_size
    last = max(stop_lsn - 1, start_lsn) // seg_size
    return [segment_name_from_number(timeline, n, seg_size) for n in range(first, last + 1)]


def _upload_spool_early(settings: Settings, repo: Repository) -> WalConflict | None:
    """One upload pass of the spool; a conflict is returned (to fail the backup as
    :func:`wait_for_wal` would), other errors are left for :func:`wait_for_wal` to report."""
    try:
        upload_spool(settings, repo)
    except WalConflict as exc:
        return exc
    except Exception:  # retried, and reported if it persists, by wait_for_wal
        pass
    return None


def wait_for_wal(
    settings: Settings, repo: Repository, segments: list[str], timeout: float = WAL_TIMEOUT_S
) -> None:
    """Upload spooled WAL until every segment is in the repository; BackupError names the
    first missing one on timeout."""
    missing = list(segments)
    deadline = time.monotonic() + timeout
    while True:
        upload_spool(settings, repo)
        missing = [s for s in missing if not repo.has_wal(s)]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise BackupError(
                f"WAL segment {missing[0]} (needed by this backup, {len(missing)} missing) did "
                f"not reach the repository within {timeout:.0f}s: is archive_command "
                f"'emrdr wal push %p' working, and is {settings.home} its EMRDR_HOME?"
            )
        time.sleep(0.05)


async def run_backup(
    settings: Settings,
    repo: Repository,
    node: PgNode,
    kind: Kind = "full",
    on_progress: ProgressFn | None = None,
    dry_run: bool = False,
    retention_days: int | None = None,
    workers: int = 2,
    label: str | None = None,
    *,
    reuse_margin_s: float = MTIME_SAFETY_MARGIN_S,
    wal_timeout_s: float = WAL_TIMEOUT_S,
) -> BackupResult:
    """Take a full or incremental base backup of ``node`` (see the module docstring).

    ``on_progress(bytes_done, bytes_total)`` is called from the reader threads after each chunk.
    """
    if node.data_dir is None:
        raise BackupError(f"node {node.name} has no local data_dir: emrdr reads files directly")
    data_dir = Path(node.data_dir)
    if not (data_dir / "PG_VERSION").is_file():
        raise BackupError(f"{data_dir} is not a readable PostgreSQL data directory")
    t0 = time.monotonic()
    ids: list[str] = []
    try:
        conn = await _connect(settings, node, "postgres")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise BackupError(f"cannot connect to node {node.name} ({node.host}:{node.port}): "
                          f"{exc}") from exc
    try:
        return await _backup_with(
            settings, repo, node, conn, data_dir, kind, on_progress, dry_run, retention_days,
            workers, label, reuse_margin_s, wal_timeout_s, t0, ids,
        )
    except (RepoError, BackupError):
        raise
    except Exception as exc:
        which = f"backup {ids[0]}" if ids else "backup"
        raise BackupError(
            f"{which} of node {node.name} failed: {type(exc).__name__}: {exc}; no manifest was "
            "written, so it is not listed as complete, and earlier backups are untouched"
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


async def _backup_with(
    settings: Settings, repo: Repository, node: PgNode, conn: asyncpg.Connection,
    data_dir: Path, kind: Kind, on_progress: ProgressFn | None, dry_run: bool,
    retention_days: int | None, workers: int, label: str | None, reuse_margin_s: float,
    wal_timeout_s: float, t0: float, ids: list[str],
) -> BackupResult:
    system_id = str(await conn.fetchval("SELECT system_identifier FROM pg_control_system()"))
    pg_version = int(str(await conn.fetchval("SHOW server_version_num"))) // 10000
    seg_size = int(await conn.fetchval(
        "SELECT setting::bigint * (CASE unit WHEN 'B' THEN 1 WHEN 'MB' THEN 1048576 ELSE 1 END)"
        " FROM pg_settings WHERE name = 'wal_segment_size'"
    ))
    in_recovery = bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
    timeline = int(await conn.fetchval("SELECT timeline_id FROM pg_control_checkpoint()"))
    history = data_dir / "pg_wal" / f"{timeline:08X}.history"
    ancestry = timeline_ancestry(history.read_text() if history.exists() else None, timeline)

    notes: list[str] = []
    parent: Manifest | None = None
    if kind == "incremental":
        parent, reason = _load_parent(repo, system_id, ancestry)
        if parent is None:
            notes.append(f"taken as a full backup: {reason}")
            kind = "full"
        else:
            notes.append(f"parent {parent.backup_id}: {reason}")
    previous = {f.path: f for f in parent.files} if parent else {}
    if parent is not None and parent.chunk_size != DEFAULT_CHUNK_SIZE:
        notes.append(
            f"parent {parent.backup_id} used {parent.chunk_size}-byte chunks, this backup "
            f"{DEFAULT_CHUNK_SIZE}: every file is read again (chunks still deduplicate)"
        )
        previous = {}
    reuse_before = parent.started_at.timestamp() - reuse_margin_s if parent else None

    backup_id, started = _new_backup_id(repo, kind)
    ids.append(backup_id)
    label = label or f"emrdr {backup_id}"

    pages_from = parent if parent is not None and parent.timeline == timeline else None
    if parent is not None and pages_from is None:
        notes.append(f"parent {parent.backup_id} is on timeline {parent.timeline}: relation "
                     "files are not compared page by page")
    if dry_run:
        files, _dirs = list_data_dir(data_dir)
        plan = [PlannedFile(f, *plan_file(f, previous.get(f.path), reuse_before)) for f in files]
        plan = [plan_pages(p, previous.get(p.source.path), pages_from) for p in plan]
        return _dry_result(backup_id, kind, parent, plan, notes, t0, timeline)

    repo.mark_started(backup_id, {
        "backup_id": backup_id, "kind": kind, "node": node.name, "label": label,
        "started_at": started.isoformat(), "parent_id": parent.backup_id if parent else None,
    })
    phases: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = round(now - mark, 3)
        mark = now

    row = await conn.fetchrow(
        "SELECT pg_backup_start($1, fast => true)::text AS lsn", label
    )
    lap("start")
    start_lsn = parse_lsn(str(row["lsn"])) if row else 0

    files, dirs = list_data_dir(data_dir)
    plan = [PlannedFile(f, *plan_file(f, previous.get(f.path), reuse_before)) for f in files]
    plan = [plan_pages(p, previous.get(p.source.path), pages_from) for p in plan]
    parents = await asyncio.to_thread(load_parent_pages, repo, plan, previous, pages_from,
                                      notes)
    # WAL already spooled (written since the last upload) goes up while files are copied, so
    # step 7 waits only for the segments of the backup itself.
    early_wal = asyncio.create_task(asyncio.to_thread(_upload_spool_early, settings, repo))
    try:
        entries, totals = await asyncio.to_thread(
            copy_files, repo, plan, previous, workers=workers, skip_lsn_from=start_lsn,
            on_progress=on_progress, parents=parents,
        )
    finally:
        conflict = await early_wal
    if conflict is not None:
        raise conflict
    await _check_reused_chunks(repo, entries)
    lap("copy")

    canary_ok, counts, canary_notes = await _write_canary(
        settings, node, conn, in_recovery, backup_id
    )
    notes.extend(canary_notes)
    # wait_for_archive => false: PostgreSQL re-checks the archiver only once a second, and
    # wait_for_wal below waits for more (the segments in the repository, not just archived).
    stop = await conn.fetchrow(
        "SELECT lsn::text AS lsn, labelfile, spcmapfile FROM pg_backup_stop(false)"
    )
    if stop is None:
        raise BackupError(f"pg_backup_stop on {node.name} returned nothing")
    stop_lsn = parse_lsn(str(stop["lsn"]))
    labelfile = str(stop["labelfile"])
    spcmap = str(stop["spcmapfile"] or "") or None
    if in_recovery:
        await _switch_wal_on_primary(settings, node)
    stopped = datetime.now(UTC)
    lap("stop")

    info = parse_backup_label(labelfile)
    start_tli = int(info.get("START TIMELINE", str(timeline)))
    segments = wal_range(start_lsn, stop_lsn, start_tli, seg_size)
    await asyncio.to_thread(wait_for_wal, settings, repo, segments, wal_timeout_s)
    lap("wal")

    problems, degraded = await _problems(settings, node, entries)
    bytes_source = sum(e.size for e in entries)
    bytes_reused = sum(e.size for e in entries if e.reused)
    manifest = Manifest(
        backup_id=backup_id,
        kind=kind,
        parent_id=parent.backup_id if parent else None,
        label=label,
        source_node=node.name,
        started_at=started,
        stopped_at=stopped,
        start_lsn=format_lsn(start_lsn),
        stop_lsn=format_lsn(stop_lsn),
        start_wal=segments[0],
        stop_wal=segments[-1],
        timeline=start_tli,
        system_identifier=system_id,
        pg_version=pg_version,
        key_id=repo.keyring.active.id,
        chunk_size=DEFAULT_CHUNK_SIZE,
        zstd_level=repo.chunks.zstd_level,
        files=entries,
        directories=dirs,
        backup_label=labelfile,
        tablespace_map=spcmap,
        bytes_source=bytes_source,
        bytes_stored=totals.stored,
        bytes_reused=bytes_reused,
        degraded=degraded,
        problems=problems,
        retention_days=retention_days,
        row_counts=counts,
        canary_written=canary_ok,
    )
    repo.write_manifest(manifest)
    lap("manifest")
    return BackupResult(
        backup_id=backup_id, kind=kind, parent_id=manifest.parent_id,
        bytes_source=bytes_source, bytes_read=totals.read, bytes_reused=bytes_reused,
        bytes_stored=totals.stored, duration_s=time.monotonic() - t0,
        start_lsn=manifest.start_lsn, stop_lsn=manifest.stop_lsn,
        start_wal=manifest.start_wal, stop_wal=manifest.stop_wal, timeline=start_tli,
        files=len(entries), files_read=sum(1 for e in entries if not e.reused),
        files_reused=sum(1 for e in entries if e.reused),
        degraded=degraded, problems=problems, notes=notes, phases=phases,
    )


async def _check_reused_chunks(repo: Repository, entries: list[FileEntry]) -> None:
    """Reused chunk lists point at the parent's chunks: make sure they still exist (retention
    could have removed the parent meanwhile)."""
    ids = sorted({c for e in entries if e.reused or e.sha256_of == "pieces" for c in e.chunk_ids()})
    if not ids:
        return

    def check() -> str | None:
        with ThreadPoolExecutor(8, thread_name_prefix="backup-check") as pool:
            for cid, ok in zip(ids, pool.map(repo.chunks.exists, ids), strict=True):
                if not ok:
                    return cid
        return None

    missing = await asyncio.to_thread(check)
    if missing is not None:
        raise BackupError(
            f"chunk {missing} of the parent backup is no longer in the repository (removed by "
            "retention during this backup?); take a full backup"
        )


async def _problems(
    settings: Settings, node: PgNode, entries: list[FileEntry]
) -> tuple[list[str], bool]:
    failures = {e.path: e.checksum_failures for e in entries if e.checksum_failures}
    if not failures:
        return [], False
    names = await _relation_names(settings, node, failures)
    problems = []
    for path, blocks in sorted(failures.items()):
        rel = f" (relation {names[path]})" if path in names else ""
        shown = ", ".join(str(b) for b in blocks[:20]) + (" ..." if len(blocks) > 20 else "")
        problems.append(f"page checksum mismatch in {path}{rel}: block(s) {shown}")
    return problems, True


def _dry_result(
    backup_id: str, kind: Kind, parent: Manifest | None, plan: list[PlannedFile],
    notes: list[str], t0: float, timeline: int,
) -> BackupResult:
    read = [p for p in plan if p.action == "read"]
    reuse = [p for p in plan if p.action == "reuse"]
    return BackupResult(
        backup_id=backup_id, kind=kind, parent_id=parent.backup_id if parent else None,
        bytes_source=sum(p.source.size for p in plan),
        bytes_read=sum(p.source.size for p in read),
        bytes_reused=sum(p.source.size for p in reuse),
        bytes_stored=0, duration_s=time.monotonic() - t0, timeline=timeline,
        files=len(plan), files_read=len(read), files_reused=len(reuse),
        notes=notes, dry_run=True, plan=plan,
    )
