"""Integrity check of the whole repository: :func:`check_repository`.

What it checks, naming every bad object, backup and gap:

* every complete backup's manifest is readable (with ``comprehensive``: both copies
  authenticate);
* every chunk a manifest references exists (a missing one names the chunk, file and backups);
* with ``comprehensive``: every stored chunk and WAL file authenticates (read in full:
  AES-GCM with the object's identity, chunk ids re-hashed);
* WAL continuity per timeline (from its first to its last archived segment), and each
  backup's own start-to-stop range; each gap is named by its first and last segment;
* the recovery window: point-in-time recovery must reach back to the start of the WAL
  retention window (``retention.wal_days``; or the oldest backup, in a younger repository),
  through a backup from which WAL runs without a gap to the end of the archive.

Read-only; no NATS.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from emrdr.config import Settings
from emrdr.engine.pitr import timeline_path, wal_gaps
from emrdr.engine.repository import Repository
from emrdr.pg.lsn import (
    DEFAULT_SEGMENT_SIZE,
    is_history_name,
    parse_segment_name,
    segment_name_from_number,
    timeline_of,
)
from emrdr.repo import IntegrityError, ObjectNotFound, aad_for, chunk_key, open_sealed
from emrdr.repo.manifest import Manifest, manifest_copy_key, manifest_key, wal_key

__all__ = ["IntegrityReport", "Problem", "check_repository", "window_verdict"]

ProblemKind = Literal["manifest", "chunk", "wal", "gap", "window"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong: its kind, the object (key or segment range), the backup concerned."""

    kind: ProblemKind
    object: str
    detail: str
    backup_ids: tuple[str, ...] = ()

    def line(self) -> str:
        who = f" [backup {', '.join(self.backup_ids)}]" if self.backup_ids else ""
        return f"{self.kind}: {self.object}: {self.detail}{who}"


@dataclass
class IntegrityReport:
    comprehensive: bool
    backups: int = 0
    chunks_referenced: int = 0
    chunks_authenticated: int = 0
    wal_files: int = 0
    wal_authenticated: int = 0
    problems: list[Problem] = field(default_factory=list)
    window_from: datetime | None = None
    window_expected_from: datetime | None = None
    last_segment: str | None = None
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def bad_backups(self) -> list[str]:
        return sorted({b for p in self.problems for b in p.backup_ids})

    def summary(self) -> str:
        scope = "comprehensive" if self.comprehensive else "quick"
        head = (f"{scope} integrity check: {self.backups} backups, {self.chunks_referenced} "
                f"chunks referenced, {self.wal_files} WAL files")
        if self.comprehensive:
            head += (f" ({self.chunks_authenticated} chunks and {self.wal_authenticated} WAL "
                     "files authenticated)")
        return head + (": OK" if self.ok else f": {len(self.problems)} problem(s)")

    def lines(self) -> list[str]:
        out = [self.summary()]
        if self.window_from is not None:
            out.append(f"recovery window: from {self.window_from.isoformat()} to the end of "
                       f"{self.last_segment}")
        out.extend(f"  {p.line()}" for p in self.problems)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "comprehensive": self.comprehensive,
            "backups": self.backups,
            "chunks_referenced": self.chunks_referenced,
            "chunks_authenticated": self.chunks_authenticated,
            "wal_files": self.wal_files,
            "wal_authenticated": self.wal_authenticated,
            "window_from": self.window_from.isoformat() if self.window_from else None,
            "window_expected_from": (
                self.window_expected_from.isoformat() if self.window_expected_from else None
            ),
            "last_segment": self.last_segment,
            "bad_backups": self.bad_backups(),
            "problems": [
                {"kind": p.kind, "object": p.object, "detail": p.detail,
                 "backup_ids": list(p.backup_ids)}
                for p in self.problems
            ],
            "duration_s": round(self.duration_s, 3),
        }


# --- pure decisions -------------------------------------------------------------------------


def window_verdict(
    covered_from: datetime | None, oldest_backup_stop: datetime | None, now: datetime,
    wal_days: int,
) -> tuple[bool, datetime | None, str]:
    """(ok, expected start, reason): does PITR reach back as far as the policy promises?"""
    if oldest_backup_stop is None:
        return True, None, "no backup: no recovery window to check"
    expected = max(now - timedelta(days=wal_days), oldest_backup_stop)
    if covered_from is None:
        return False, expected, (
            "no backup has continuous WAL to the end of the archive: point-in-time recovery "
            "to recent times is impossible"
        )
    if covered_from > expected:
        return False, expected, (
            f"point-in-time recovery reaches back only to {covered_from.isoformat()}, the "
            f"retention policy ({wal_days} days of WAL) promises {expected.isoformat()}"
        )
    return True, expected, f"covered from {covered_from.isoformat()}"


def _gap_text(a: str, b: str) -> str:
    return a if a == b else f"{a} to {b}"


# --- the check ------------------------------------------------------------------------------


def _authenticate_all(
    items: list[str], fn: Callable[[str], object], workers: int
) -> dict[str, str]:
    """Run ``fn`` over ``items`` in threads; item -> error text for each failure."""

    def one(item: str) -> tuple[str, str | None]:
        try:
            fn(item)
            return item, None
        except (IntegrityError, ObjectNotFound, ValueError) as exc:
            return item, str(exc)

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="integrity") as pool:
        return {i: err for i, err in pool.map(one, items) if err is not None}


def check_repository(
    settings: Settings,
    repo: Repository,
    comprehensive: bool = False,
    *,
    now: datetime | None = None,
    workers: int = 4,
    seg_size: int = DEFAULT_SEGMENT_SIZE,
) -> IntegrityReport:
    """Check the repository (see the module docstring); never changes anything."""
    t0 = time.monotonic()
    now = now or datetime.now(UTC)
    report = IntegrityReport(comprehensive=comprehensive)
    problems = report.problems

    # manifests
    manifests: dict[str, Manifest] = {}
    ids = repo.backup_ids()
    report.backups = len(ids)
    for bid in ids:
        if comprehensive:
            for key in (manifest_key(bid), manifest_copy_key(bid)):
                try:
                    open_sealed(repo.keyring, repo.storage.get(key), aad_for("manifest", bid))
                except (IntegrityError, ObjectNotFound) as exc:
                    problems.append(Problem("manifest", key, f"does not authenticate: {exc}",
                                            (bid,)))
        try:
            manifests[bid] = repo.read_manifest(bid)
        except (IntegrityError, ObjectNotFound) as exc:
            if not comprehensive:
                problems.append(Problem("manifest", manifest_key(bid), f"unreadable: {exc}",
                                        (bid,)))

    # chunks
    users: dict[str, list[str]] = {}
    where: dict[str, str] = {}
    for bid, m in manifests.items():
        for f in m.files:
            for cid in f.chunk_ids():
                using = users.setdefault(cid, [])
                if not using or using[-1] != bid:
                    using.append(bid)
                where.setdefault(cid, f.path)
    report.chunks_referenced = len(users)
    stored = {k.rsplit("/", 1)[1] for k in repo.storage.list("chunks/")}
    for cid in sorted(set(users) - stored):
        problems.append(Problem("chunk", chunk_key(cid),
                                f"missing (file {where[cid]})", tuple(users[cid])))
    if comprehensive:
        bad = _authenticate_all(sorted(stored), repo.chunks.get, workers)
        report.chunks_authenticated = len(stored) - len(bad)
        for cid, err in sorted(bad.items()):
            owners = tuple(users.get(cid, []))
            note = f"(file {where[cid]})" if cid in where else "(not referenced by any backup)"
            problems.append(Problem("chunk", chunk_key(cid),
                                    f"does not authenticate {note}: {err}", owners))

    # WAL
    names = repo.wal_names()
    report.wal_files = len(names)
    if comprehensive:
        bad_wal = _authenticate_all(names, repo.get_wal, workers)
        report.wal_authenticated = len(names) - len(bad_wal)
        for name, err in sorted(bad_wal.items()):
            problems.append(Problem("wal", wal_key(name), f"does not authenticate: {err}"))
    _wal_continuity(report, manifests, names, seg_size)
    _window(settings, report, repo, manifests, names, now, seg_size)
    report.duration_s = time.monotonic() - t0
    return report


def _segments_by_timeline(names: list[str], seg_size: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for name in names:
        if is_history_name(name) or len(name) != 24:
            continue
        try:
            tli, segno = parse_segment_name(name, seg_size)
        except ValueError:
            continue
        out.setdefault(tli, []).append(segno)
    return out


def _wal_continuity(
    report: IntegrityReport, manifests: dict[str, Manifest], names: list[str], seg_size: int
) -> None:
    for tli, segnos in sorted(_segments_by_timeline(names, seg_size).items()):
        for a, b in wal_gaps(names, tli, min(segnos), max(segnos), seg_size):
            report.problems.append(Problem(
                "gap", _gap_text(a, b), f"timeline {tli}: WAL segment(s) missing from the archive"
            ))
    for bid, m in sorted(manifests.items()):
        gaps = wal_gaps(names, m.timeline, m.start_wal, m.stop_wal, seg_size)
        for a, b in gaps:
            report.problems.append(Problem(
                "gap", _gap_text(a, b),
                f"needed by backup {bid} to become consistent ({m.start_wal} to {m.stop_wal})",
                (bid,),
            ))


def _window(
    settings: Settings, report: IntegrityReport, repo: Repository,
    manifests: dict[str, Manifest], names: list[str], now: datetime, seg_size: int,
) -> None:
    if not manifests:
        return
    histories: dict[int, str] = {}
    for n in names:
        if is_history_name(n):
            try:
                histories[timeline_of(n)] = repo.get_wal(n).decode()
            except (IntegrityError, ObjectNotFound, UnicodeDecodeError):
                continue
    by_tli = _segments_by_timeline(names, seg_size)
    timelines = set(by_tli) | {m.timeline for m in manifests.values()}
    path = timeline_path(max(timelines), histories)
    on_path = {s.timeline for s in path}
    last = max((s for t in on_path for s in by_tli.get(t, [])), default=-1)
    if last >= 0:
        last_tli = max(t for t in on_path if last in by_tli.get(t, []))
        report.last_segment = segment_name_from_number(last_tli, last, seg_size)
    bad = set(report.bad_backups())
    covered: datetime | None = None
    for m in sorted(manifests.values(), key=lambda m: m.stopped_at):
        if m.backup_id in bad or m.timeline not in on_path:
            continue
        start = parse_segment_name(m.start_wal, seg_size)[1]
        stop = parse_segment_name(m.stop_wal, seg_size)[1]
        if not wal_gaps(names, path, start, max(last, stop), seg_size):
            covered = m.stopped_at
            break
    oldest = min(m.stopped_at for m in manifests.values())
    ok, expected, reason = window_verdict(covered, oldest, now, settings.retention.wal_days)
    report.window_from = covered
    report.window_expected_from = expected
    if not ok:
        report.problems.append(Problem("window", report.last_segment or "(no WAL)", reason))

