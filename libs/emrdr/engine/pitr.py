"""Point-in-time recovery targets: which backup to start from, and whether WAL reaches the target.

Pure functions over manifests and the names of archived WAL files; nothing here touches storage.

Times are aware datetimes.  A time without a zone means the *server's* time zone (that is what
PostgreSQL would do with ``recovery_target_time``); callers resolve it first with
:func:`resolve_time` and print the resolved instant with its zone.  The recovery settings are
always written with an explicit UTC offset, so PostgreSQL never guesses.

Timelines: a target on timeline T is reachable from a backup on timeline B when B == T, or B is
an ancestor of T (from T's ``.history`` file) and the backup stopped before T forked off B.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Literal

from emrdr.pg.lsn import (
    DEFAULT_SEGMENT_SIZE,
    format_lsn,
    is_history_name,
    parse_lsn,
    parse_segment_name,
    segment_name_from_number,
    timeline_of,
)
from emrdr.repo.manifest import Manifest

__all__ = [
    "PitrError",
    "RecoveryTarget",
    "TimelineStep",
    "choose_backup",
    "needed_timeline",
    "parse_history",
    "resolve_time",
    "timeline_path",
    "wal_gaps",
]

TargetKind = Literal["time", "lsn", "xid", "name", "immediate"]


class PitrError(ValueError):
    """The recovery target cannot be reached; the message says why (and names any WAL gap)."""


def resolve_time(value: datetime, server_tz: tzinfo | None = None) -> datetime:
    """An aware instant: a naive ``value`` is read in ``server_tz`` (default: UTC)."""
    if value.tzinfo is not None:
        return value
    return value.replace(tzinfo=server_tz or UTC)


@dataclass(frozen=True)
class RecoveryTarget:
    """Where recovery stops: exactly one of time / lsn / xid / name, or none (= consistency).

    ``inclusive`` stops just after (True) or just before the target.  ``timeline`` is the
    timeline to follow; None means the newest one (``recovery_target_timeline = 'latest'``).
    """

    time: datetime | None = None
    lsn: str | None = None
    xid: int | None = None
    name: str | None = None
    inclusive: bool = True
    timeline: int | None = None

    def __post_init__(self) -> None:
        given = [x for x in (self.time, self.lsn, self.xid, self.name) if x is not None]
        if len(given) > 1:
            raise ValueError("give at most one recovery target: time, lsn, xid or name")
        if self.time is not None and self.time.tzinfo is None:
            raise ValueError(
                f"recovery target time {self.time.isoformat()} has no time zone: resolve it "
                "first (a time without a zone is the server's time zone)"
            )
        if self.lsn is not None:
            parse_lsn(self.lsn)
        if self.xid is not None and self.xid <= 0:
            raise ValueError(f"transaction id must be positive, got {self.xid}")
        if self.name is not None and not self.name:
            raise ValueError("restore point name is empty")

    @property
    def kind(self) -> TargetKind:
        if self.time is not None:
            return "time"
        if self.lsn is not None:
            return "lsn"
        if self.xid is not None:
            return "xid"
        if self.name is not None:
            return "name"
        return "immediate"

    def describe(self) -> str:
        if self.time is not None:
            return f"time {self.time.isoformat()}"
        if self.lsn is not None:
            return f"LSN {self.lsn}"
        if self.xid is not None:
            return f"transaction {self.xid}"
        if self.name is not None:
            return f"restore point {self.name!r}"
        return "end of backup (consistency)"

    def gucs(self, backup_timeline: int) -> dict[str, str]:
        """The ``recovery_target*`` settings for this target (values unquoted)."""
        out: dict[str, str] = {}
        if self.time is not None:
            out["recovery_target_time"] = self.time.astimezone(UTC).isoformat(sep=" ")
        elif self.lsn is not None:
            out["recovery_target_lsn"] = self.lsn
        elif self.xid is not None:
            out["recovery_target_xid"] = str(self.xid)
        elif self.name is not None:
            out["recovery_target_name"] = self.name
        else:
            out["recovery_target"] = "immediate"
        if self.kind != "immediate":
            out["recovery_target_inclusive"] = "on" if self.inclusive else "off"
        if self.kind == "immediate":
            out["recovery_target_timeline"] = str(backup_timeline)
        elif self.timeline is None:
            out["recovery_target_timeline"] = "latest"
        else:
            out["recovery_target_timeline"] = str(self.timeline)
        out["recovery_target_action"] = "promote"
        return out


# --- timelines ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelineStep:
    """One timeline on the way to the target: used for WAL up to ``end_lsn`` (None: no end)."""

    timeline: int
    end_lsn: int | None


def parse_history(text: str) -> list[tuple[int, int]]:
    """A ``.history`` file's ``(parent timeline, switch LSN)`` lines, oldest first."""
    out: list[tuple[int, int]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) < 2:
            raise ValueError(f"malformed timeline history line: {line!r}")
        out.append((int(fields[0]), parse_lsn(fields[1])))
    return out


def timeline_path(target_timeline: int, histories: Mapping[int, str]) -> list[TimelineStep]:
    """Timelines from the oldest ancestor to ``target_timeline``, each with its end LSN."""
    if target_timeline == 1 or target_timeline not in histories:
        return [TimelineStep(target_timeline, None)]
    steps = [TimelineStep(tli, lsn) for tli, lsn in parse_history(histories[target_timeline])]
    return [*steps, TimelineStep(target_timeline, None)]


def needed_timeline(
    path: Sequence[TimelineStep], segno: int, seg_size: int = DEFAULT_SEGMENT_SIZE
) -> int:
    """Timeline whose copy of segment ``segno`` recovery reads (the switch segment is the
    child's: it holds the parent's tail and the child's beginning)."""
    for step in path:
        if step.end_lsn is None or segno < step.end_lsn // seg_size:
            return step.timeline
    return path[-1].timeline


def _reachable(manifest: Manifest, path: Sequence[TimelineStep]) -> bool:
    stop = parse_lsn(manifest.stop_lsn)
    for step in path:
        if step.timeline == manifest.timeline:
            return step.end_lsn is None or stop <= step.end_lsn
    return False


# --- WAL continuity -------------------------------------------------------------------------


def _segno(segment: str | int, seg_size: int) -> int:
    return segment if isinstance(segment, int) else parse_segment_name(segment, seg_size)[1]


def _present(names: Iterable[str], seg_size: int) -> set[tuple[int, int]]:
    """(timeline, segno) of every complete segment among ``names`` (not .partial/.history)."""
    out: set[tuple[int, int]] = set()
    for name in names:
        if is_history_name(name) or len(name) != 24:
            continue
        try:
            out.add(parse_segment_name(name, seg_size))
        except ValueError:
            continue
    return out


def wal_gaps(
    names: Iterable[str],
    timeline: int | Sequence[TimelineStep],
    from_segment: str | int,
    to_segment: str | int,
    seg_size: int = DEFAULT_SEGMENT_SIZE,
) -> list[tuple[str, str]]:
    """Runs of missing segments between two segments (inclusive), as (first, last) names.

    ``timeline`` is one timeline, or a :func:`timeline_path` (each segment is then expected on
    the timeline recovery reads it from).  ``from``/``to`` are segment names or numbers.
    """
    path = [TimelineStep(timeline, None)] if isinstance(timeline, int) else list(timeline)
    have = _present(names, seg_size)
    first, last = _segno(from_segment, seg_size), _segno(to_segment, seg_size)
    gaps: list[tuple[str, str]] = []
    run: tuple[str, str] | None = None
    for segno in range(first, last + 1):
        tli = needed_timeline(path, segno, seg_size)
        if (tli, segno) in have:
            if run:
                gaps.append(run)
                run = None
            continue
        name = segment_name_from_number(tli, segno, seg_size)
        run = (run[0], name) if run else (name, name)
    if run:
        gaps.append(run)
    return gaps


def _last_archived(names: Iterable[str], path: Sequence[TimelineStep], seg_size: int) -> int:
    timelines = {s.timeline for s in path}
    nums = [segno for tli, segno in _present(names, seg_size) if tli in timelines]
    return max(nums, default=-1)


def _describe_gap(gap: tuple[str, str]) -> str:
    first, last = gap
    return first if first == last else f"{first} to {last}"


# --- choosing a backup ----------------------------------------------------------------------


def choose_backup(
    manifests: Sequence[Manifest],
    target: RecoveryTarget,
    wal_available: Collection[str],
    histories: Mapping[int, str] | None = None,
    seg_size: int = DEFAULT_SEGMENT_SIZE,
) -> tuple[str, str]:
    """The backup to restore for ``target`` and why; :class:`PitrError` if it is unreachable.

    Picks the newest complete backup that stopped before the target (by time: ``stopped_at``;
    by LSN: ``stop_lsn``) on a timeline the target is reachable from, then checks that WAL is
    continuous from the backup's first segment to the target (to the last archived segment when
    the target's position is unknown before replay: time, xid, name).  Restore points and
    transaction ids cannot be placed before replay, so those use the oldest backup with
    continuous WAL to the end of the archive: pass a backup id to start from a newer one.
    """
    histories = dict(histories or {})
    if not manifests:
        raise PitrError("no complete backup in the repository")
    timelines = {m.timeline for m in manifests} | {
        timeline_of(n) for n in wal_available if is_history_name(n) or len(n) == 24
    }
    target_tli = target.timeline or max(timelines)
    path = timeline_path(target_tli, histories)
    ordered = sorted(manifests, key=lambda m: (m.stopped_at, parse_lsn(m.stop_lsn)))
    oldest = ordered[0]
    reachable = [m for m in ordered if _reachable(m, path)]
    if not reachable:
        raise PitrError(
            f"no backup is on timeline {target_tli} or its ancestors "
            f"{[s.timeline for s in path]}: backups are on timelines "
            f"{sorted({m.timeline for m in manifests})}"
        )
    if target.time is not None:
        when = target.time
        before = [m for m in reachable if m.stopped_at <= when]
        if not before:
            raise PitrError(
                f"target {when.isoformat()} is before the oldest backup (oldest is "
                f"{oldest.backup_id} stopped at {oldest.stopped_at.isoformat()})"
            )
        chosen = before[-1]
        why = (
            f"newest backup stopped before {when.isoformat()} "
            f"(at {chosen.stopped_at.isoformat()})"
        )
    elif target.lsn is not None:
        want = parse_lsn(target.lsn)
        before = [m for m in reachable if parse_lsn(m.stop_lsn) <= want]
        if not before:
            raise PitrError(
                f"target LSN {target.lsn} is before the oldest backup (oldest is "
                f"{oldest.backup_id} stopped at {oldest.stop_lsn}, "
                f"{oldest.stopped_at.isoformat()})"
            )
        chosen = before[-1]
        why = f"newest backup stopped before LSN {target.lsn} (at {chosen.stop_lsn})"
    elif target.kind == "immediate":
        chosen = reachable[-1]
        why = "newest backup"
    else:
        # A restore point or transaction cannot be placed before replay: start from the oldest
        # backup from which WAL runs without a gap to the end of the archive (correct wherever
        # the point is; slower).  Name a newer backup explicitly to replay less.
        last = _last_archived(wal_available, path, seg_size)
        continuous = [
            m for m in reachable
            if not wal_gaps(wal_available, path, _segno(m.start_wal, seg_size),
                            max(last, _segno(m.stop_wal, seg_size)), seg_size)
        ]
        chosen = continuous[0] if continuous else reachable[-1]
        why = (
            f"oldest backup with continuous WAL to the end of the archive ({target.describe()} "
            "cannot be placed before replay; name a newer backup to replay less)"
        )

    start = _segno(chosen.start_wal, seg_size)
    stop = _segno(chosen.stop_wal, seg_size)
    if target.lsn is not None:
        end = parse_lsn(target.lsn) // seg_size
    else:
        end = max(stop, _last_archived(wal_available, path, seg_size))
    end = max(end, stop)
    gaps = wal_gaps(wal_available, path, start, end, seg_size)
    if target.time is not None and gaps:
        # A later backup that stopped after the target and before the first gap proves the
        # target lies before the gap.
        first_missing = _segno(gaps[0][0], seg_size)
        proof = [
            m for m in reachable
            if m.stopped_at >= target.time and _segno(m.stop_wal, seg_size) < first_missing
        ]
        if proof:
            gaps = []
    if gaps:
        first_missing = _segno(gaps[0][0], seg_size)
        if first_missing <= stop:
            raise PitrError(
                f"WAL gap: {_describe_gap(gaps[0])} missing; backup {chosen.backup_id} needs "
                f"{chosen.start_wal} to {chosen.stop_wal} to become consistent"
            )
        last_tli = needed_timeline(path, first_missing - 1, seg_size)
        last_good = segment_name_from_number(last_tli, first_missing - 1, seg_size)
        raise PitrError(
            f"WAL gap: {_describe_gap(gaps[0])} missing after backup {chosen.backup_id}; "
            f"the newest reachable point is LSN {format_lsn(first_missing * seg_size)} "
            f"(end of {last_good}) on timeline {last_tli}"
        )
    return chosen.backup_id, f"{chosen.backup_id}: {why}; WAL continuous from {chosen.start_wal}"
