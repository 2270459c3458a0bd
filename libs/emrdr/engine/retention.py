"""Retention: which backups and WAL go (a pure planner), deleting them, and safe chunk GC.

Policy (the seed's table): full backups 7 years (2555 days), incrementals 90 days, WAL 30 days;
a backup's own ``retention_days`` (``--retention-days``) replaces the default for it; optional
GFS tiers keep the newest full backup of each of the last N days / ISO weeks / months / years;
a legal hold keeps a backup whatever the policy says; the newest full backup is never removed.

WAL kept: every ``.history`` file; all WAL from the first segment of the *anchor* backup on (the
newest retained backup that stopped before the WAL window opened, so any point in the window
can be recovered; the oldest retained backup if none did); and for each older retained backup,
its own start-to-stop range so it stays restorable to consistency.  With no backup, nothing is
removed.

Chunk GC safety while a backup runs (the race: a running backup dedups against a chunk GC is
deleting).  Protocol, both sides "write, then look":

* GC writes the lock object ``gc/running``, then lists incomplete backups (``started`` marker, no
  manifest).  If one started less than ``stale_after`` (24 h) ago, GC is skipped this time.
  A killed backup's marker goes stale after that, so it cannot block GC forever.
* A backup writes its ``started`` marker, then waits while ``gc/running`` exists and is fresh
  (:func:`wait_for_gc`) before it looks up any chunk.
* After taking the lock, GC re-lists complete backups and adds the chunks of any that completed
  meanwhile to the referenced set.

So either the backup sees the lock and waits, or GC sees the backup and skips.  A GC lock older
than ``stale_after`` (a killed GC) is ignored by both.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from emrdr.config import RetentionSettings, Settings
from emrdr.engine.repository import Repository, open_repository
from emrdr.pg.lsn import DEFAULT_SEGMENT_SIZE, is_history_name, parse_segment_name
from emrdr.repo import IntegrityError, ObjectNotFound, aad_for, chunk_key, open_sealed, seal
from emrdr.repo.manifest import (
    Manifest,
    hold_key,
    manifest_copy_key,
    manifest_key,
    started_key,
    wal_key,
)

__all__ = [
    "GC_LOCK_KEY",
    "BackupInfo",
    "GfsTiers",
    "HoldError",
    "RetentionPlan",
    "RetentionPolicy",
    "RetentionResult",
    "backup_time",
    "enforce_retention",
    "gc_in_progress",
    "place_hold",
    "plan_retention",
    "read_hold",
    "release_hold",
    "wait_for_gc",
]

GC_LOCK_KEY = "gc/running"
DEFAULT_STALE_AFTER = timedelta(hours=24)


class HoldError(RuntimeError):
    """A legal hold could not be placed or released."""


# --- the pure planner -----------------------------------------------------------------------


@dataclass(frozen=True)
class GfsTiers:
    """Keep the newest full backup of each of the last N days / ISO weeks / months / years."""

    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0


@dataclass(frozen=True)
class RetentionPolicy:
    full_days: int = 2555
    incremental_days: int = 90
    wal_days: int = 30
    gfs: GfsTiers = field(default_factory=GfsTiers)

    @classmethod
    def from_settings(cls, s: RetentionSettings, gfs: GfsTiers | None = None) -> RetentionPolicy:
        configured = GfsTiers(s.gfs_daily, s.gfs_weekly, s.gfs_monthly, s.gfs_yearly)
        return cls(s.full_days, s.incremental_days, s.wal_days, gfs or configured)


@dataclass(frozen=True)
class BackupInfo:
    """What retention needs to know about one backup."""

    backup_id: str
    kind: Literal["full", "incremental"]
    stopped_at: datetime
    start_wal: str
    stop_wal: str
    timeline: int
    retention_days: int | None = None
    bytes_stored: int = 0

    @classmethod
    def from_manifest(cls, m: Manifest) -> BackupInfo:
        return cls(m.backup_id, m.kind, m.stopped_at, m.start_wal, m.stop_wal, m.timeline,
                   m.retention_days, m.bytes_stored)


@dataclass(frozen=True)
class RetentionPlan:
    """Backups and WAL to remove, and why every backup is kept or removed."""

    remove_backups: list[str]
    keep: dict[str, str]
    remove_wal: list[str]
    reasons: dict[str, str]
    wal_reason: str

    def lines(self) -> list[str]:
        """One sentence per backup, then the WAL decision."""
        out = [f"remove {b}: {self.reasons[b]}" for b in self.remove_backups]
        out += [f"keep {b}: {why}" for b, why in sorted(self.keep.items())]
        out.append(f"WAL: remove {len(self.remove_wal)} files; {self.wal_reason}")
        return out


_PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar())[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


def _period_label(tier: str, key: tuple[int, ...]) -> str:
    if tier == "weekly":
        return f"{key[0]}-W{key[1]:02d}"
    return "-".join(f"{k:02d}" for k in key)


def gfs_keep(fulls: Sequence[BackupInfo], tiers: GfsTiers) -> dict[str, str]:
    """Full backups each GFS tier keeps, with the reason (newest backup of each period)."""
    ordered = sorted(fulls, key=lambda b: b.stopped_at, reverse=True)
    out: dict[str, str] = {}
    for tier, func in _PERIODS.items():
        wanted = getattr(tiers, tier)
        seen: set[tuple[int, ...]] = set()
        for b in ordered:
            if len(seen) >= wanted:
                break
            key = func(b.stopped_at.astimezone(UTC))
            if key in seen:
                continue
            seen.add(key)
            out.setdefault(b.backup_id, f"GFS {tier} ({_period_label(tier, key)})")
    return out


def backup_decision(
    b: BackupInfo,
    now: datetime,
    policy: RetentionPolicy,
    held: bool,
    newest_full: str | None,
    gfs: dict[str, str],
) -> tuple[bool, str]:
    """(keep, reason) for one backup."""
    age_days = (now - b.stopped_at).total_seconds() / 86400
    if held:
        return True, "legal hold"
    if b.backup_id == newest_full:
        return True, "newest full backup (never removed)"
    default = policy.full_days if b.kind == "full" else policy.incremental_days
    days = b.retention_days if b.retention_days is not None else default
    source = "its own" if b.retention_days is not None else f"the {b.kind}"
    if age_days <= days:
        return True, f"within {source} {days}-day retention (age {age_days:.0f} days)"
    if b.backup_id in gfs:
        return True, gfs[b.backup_id]
    return False, f"older than {source} {days}-day retention (age {age_days:.0f} days)"


def _segno(name: str, seg_size: int) -> tuple[int, int] | None:
    try:
        return parse_segment_name(name[:24], seg_size)
    except ValueError:
        return None


def plan_retention(
    backups: Sequence[BackupInfo],
    wal_segments: Iterable[str],
    now: datetime,
    policy: RetentionPolicy,
    holds: Collection[str] = frozenset(),
    seg_size: int = DEFAULT_SEGMENT_SIZE,
) -> RetentionPlan:
    """Decide what goes; see the module docstring for the rules."""
    fulls = [b for b in backups if b.kind == "full"]
    newest_full = max(fulls, key=lambda b: b.stopped_at).backup_id if fulls else None
    gfs = gfs_keep(fulls, policy.gfs)
    keep: dict[str, str] = {}
    reasons: dict[str, str] = {}
    remove: list[str] = []
    for b in sorted(backups, key=lambda b: b.stopped_at):
        kept, why = backup_decision(b, now, policy, b.backup_id in holds, newest_full, gfs)
        if kept:
            keep[b.backup_id] = why
        else:
            remove.append(b.backup_id)
            reasons[b.backup_id] = why
    names = sorted(set(wal_segments))
    retained = sorted((b for b in backups if b.backup_id in keep), key=lambda b: b.stopped_at)
    if not retained:
        return RetentionPlan(remove, keep, [], reasons,
                             "no backup is retained, so no WAL is removed")
    window_opens = now - timedelta(days=policy.wal_days)
    before_window = [b for b in retained if b.stopped_at <= window_opens]
    anchor = before_window[-1] if before_window else retained[0]
    anchor_seg = parse_segment_name(anchor.start_wal, seg_size)[1]
    ranges = [
        (b.timeline, parse_segment_name(b.start_wal, seg_size)[1],
         parse_segment_name(b.stop_wal, seg_size)[1])
        for b in retained if b.stopped_at < anchor.stopped_at
    ]
    remove_wal: list[str] = []
    for name in names:
        if is_history_name(name):
            continue
        parsed = _segno(name, seg_size)
        if parsed is None:
            continue
        tli, segno = parsed
        if segno >= anchor_seg:
            continue
        if any(tli == t and lo <= segno <= hi for t, lo, hi in ranges):
            continue
        remove_wal.append(name)
    wal_reason = (
        f"kept from {anchor.start_wal} on (start of {anchor.backup_id}, the "
        + ("newest retained backup before the "
           if before_window else "oldest retained backup; none is older than the ")
        + f"{policy.wal_days}-day WAL window) and each older retained backup's own range"
    )
    return RetentionPlan(remove, keep, remove_wal, reasons, wal_reason)


# --- legal holds ----------------------------------------------------------------------------


def place_hold(
    repo: Repository, backup_id: str, reason: str, actor: str, now: datetime | None = None
) -> dict[str, Any]:
    """Put ``backup_id`` under legal hold; returns the hold record (the existing one if held)."""
    if backup_id not in repo.backup_ids():
        raise HoldError(f"no complete backup {backup_id} to hold")
    if repo.is_held(backup_id):
        return read_hold(repo, backup_id)
    record = {"backup_id": backup_id, "reason": reason, "actor": actor,
              "placed_at": (now or datetime.now(UTC)).isoformat()}
    blob = seal(repo.keyring.active, json.dumps(record).encode(), aad_for("hold", backup_id))
    repo.storage.put(hold_key(backup_id), blob)
    return record


def read_hold(repo: Repository, backup_id: str) -> dict[str, Any]:
    blob = repo.storage.get(hold_key(backup_id))
    data: dict[str, Any] = json.loads(open_sealed(repo.keyring, blob, aad_for("hold", backup_id)))
    return data


def release_hold(repo: Repository, backup_id: str, actor: str, reason: str) -> bool:
    """Lift the legal hold of ``backup_id``; False if there was none.  The caller audits
    ``actor`` and ``reason`` (the audit trail is the record of who released what)."""
    if not reason:
        raise HoldError("releasing a legal hold needs a reason")
    if not repo.is_held(backup_id):
        return False
    repo.storage.delete(hold_key(backup_id))
    return True


# --- GC lock --------------------------------------------------------------------------------


def backup_time(backup_id: str) -> datetime | None:
    """When a backup started, from its id (``20261126T020000Z-F``); None if not parseable."""
    try:
        return datetime.strptime(backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def _lock_time(repo: Repository) -> datetime | None:
    try:
        blob = repo.storage.get(GC_LOCK_KEY)
        data = json.loads(open_sealed(repo.keyring, blob, aad_for("gc-lock", "running")))
        return datetime.fromisoformat(data["started_at"])
    except ObjectNotFound:
        return None
    except (IntegrityError, ValueError, KeyError):
        return datetime.min.replace(tzinfo=UTC)  # unreadable: treat as stale


def gc_in_progress(
    repo: Repository, now: datetime | None = None, stale_after: timedelta = DEFAULT_STALE_AFTER
) -> bool:
    """Whether a (non-stale) chunk GC holds the lock now."""
    started = _lock_time(repo)
    return started is not None and (now or datetime.now(UTC)) - started < stale_after


def wait_for_gc(
    repo: Repository, timeout: float = 600.0, stale_after: timedelta = DEFAULT_STALE_AFTER
) -> None:
    """For backups: call after writing the ``started`` marker, before any chunk lookup."""
    deadline = time.monotonic() + timeout
    while gc_in_progress(repo, stale_after=stale_after):
        if time.monotonic() > deadline:
            raise TimeoutError(f"chunk GC still holds {GC_LOCK_KEY} after {timeout:.0f}s")
        time.sleep(0.5)


def _take_lock(repo: Repository, now: datetime, stale_after: timedelta) -> str | None:
    """Take the GC lock; a reason string if it is held by a live GC."""
    started = _lock_time(repo)
    if started is not None:
        if now - started < stale_after:
            return f"another chunk GC holds {GC_LOCK_KEY} since {started.isoformat()}"
        repo.storage.delete(GC_LOCK_KEY)
    record = {"started_at": now.isoformat(), "pid": os.getpid()}
    repo.storage.put(GC_LOCK_KEY, seal(repo.keyring.active, json.dumps(record).encode(),
                                       aad_for("gc-lock", "running")))
    return None


# --- the executor ---------------------------------------------------------------------------


@dataclass
class RetentionResult:
    """What retention removed (or, with ``dry_run``, would remove)."""

    plan: RetentionPlan
    dry_run: bool
    backups_removed: list[str] = field(default_factory=list)
    wal_removed: int = 0
    chunks_removed: int = 0
    bytes_freed: int = 0
    gc_skipped: str | None = None
    unreadable: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        out = self.plan.lines()
        out.append(
            f"{verb} {len(self.plan.remove_backups)} backups, {len(self.plan.remove_wal)} WAL "
            f"files, {self.chunks_removed} chunks: {self.bytes_freed / 1e6:.1f} MB"
        )
        if self.gc_skipped:
            out.append(f"chunk GC skipped: {self.gc_skipped}")
        out += [f"kept {b}: manifest unreadable" for b in self.unreadable]
        return out


def _sizes(repo: Repository, keys: Iterable[str]) -> int:
    total = 0
    for key in keys:
        with contextlib.suppress(ObjectNotFound):
            total += repo.storage.size(key)
    return total


def _chunk_ids(repo: Repository) -> set[str]:
    return {k.rsplit("/", 1)[1] for k in repo.storage.list("chunks/")}


def enforce_retention(
    settings: Settings,
    repo: Repository | None = None,
    dry_run: bool = False,
    *,
    now: datetime | None = None,
    gfs: GfsTiers | None = None,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
) -> RetentionResult:
    """Apply the policy: manifests (the copy last), then WAL, then unreferenced chunks."""
    repo = repo if repo is not None else open_repository(settings)
    now = now or datetime.now(UTC)
    policy = RetentionPolicy.from_settings(settings.retention, gfs)
    manifests: dict[str, Manifest] = {}
    unreadable: list[str] = []
    for bid in repo.backup_ids():
        try:
            manifests[bid] = repo.read_manifest(bid)
        except (IntegrityError, ObjectNotFound):
            unreadable.append(bid)
    holds = {k.split("/", 1)[1] for k in repo.storage.list("holds/")}
    wal = repo.wal_names()
    plan = plan_retention([BackupInfo.from_manifest(m) for m in manifests.values()], wal, now,
                          policy, holds)
    result = RetentionResult(plan, dry_run, unreadable=unreadable)
    remaining = {b: m for b, m in manifests.items() if b not in plan.remove_backups}
    referenced = {c for m in remaining.values() for c in m.chunk_ids()}
    candidates = _chunk_ids(repo) - referenced
    freed = _sizes(repo, [k for b in plan.remove_backups
                          for k in (manifest_key(b), manifest_copy_key(b), started_key(b))])
    freed += _sizes(repo, [wal_key(n) for n in plan.remove_wal])
    if unreadable:
        result.gc_skipped = (
            f"manifests of {', '.join(unreadable)} are unreadable, so their chunks are unknown"
        )
        candidates = set()
    if dry_run:
        result.chunks_removed = len(candidates)
        result.bytes_freed = freed + _sizes(repo, [chunk_key(c) for c in candidates])
        return result

    for bid in plan.remove_backups:
        repo.storage.delete(manifest_key(bid))
        repo.storage.delete(started_key(bid))
        repo.storage.delete(manifest_copy_key(bid))
        for record in repo.storage.list(f"verifications/{bid}/"):
            repo.storage.delete(record)
        result.backups_removed.append(bid)
    for name in plan.remove_wal:
        repo.storage.delete(wal_key(name))
    result.wal_removed = len(plan.remove_wal)
    if candidates:
        removed, chunk_bytes, skipped = _collect(repo, candidates, set(manifests) | set(unreadable),
                                                 now, stale_after)
        result.chunks_removed, result.gc_skipped = removed, skipped
        freed += chunk_bytes
    result.bytes_freed = freed
    return result


def _collect(
    repo: Repository,
    candidates: set[str],
    known: set[str],
    now: datetime,
    stale_after: timedelta,
) -> tuple[int, int, str | None]:
    """Delete unreferenced chunks under the GC lock: (removed, bytes, skipped reason)."""
    busy = _take_lock(repo, now, stale_after)
    if busy:
        return 0, 0, busy
    try:
        running = []
        for bid in repo.incomplete_backup_ids():
            started = backup_time(bid)
            if started is None or now - started < stale_after:
                running.append(bid)
        if running:
            return 0, 0, (
                f"backup {', '.join(running)} is in progress (started marker without manifest, "
                f"younger than {stale_after}); its chunks may be among the unreferenced"
            )
        for bid in set(repo.backup_ids()) - known:  # completed meanwhile
            try:
                m = repo.read_manifest(bid)
            except (IntegrityError, ObjectNotFound):
                return 0, 0, f"backup {bid} completed during GC and its manifest is unreadable"
            candidates -= m.chunk_ids()
        removed = freed = 0
        for cid in sorted(candidates):
            key = chunk_key(cid)
            try:
                size = repo.storage.size(key)
            except ObjectNotFound:
                continue
            repo.storage.delete(key)
            removed += 1
            freed += size
        return removed, freed, None
    finally:
        repo.storage.delete(GC_LOCK_KEY)
