"""Seed scenario 3 (data corruption) as one procedure: :func:`recover_corruption`.

Steps, each reported through ``on_step(name, ok, detail)``; the first failure stops the
procedure and is reported (nothing after it is attempted, nothing is guessed):

1. ``plan``: the live primary (its data directory must be on this host), the newest
   *verified* backup (its last restore drill passed) that stopped before the target time, with
   continuous WAL to it;
2. ``scope``: repository integrity check (quick) and ``pg_amcheck --heapallindexed`` of the
   EMR database on the live primary; findings are reported (damage is expected); a repository
   problem touching the chosen backup fails the step;
3. ``maintenance``: ``maintenance(True, reason)`` (the caller publishes ``MaintenanceChanged``)
   and every client session on the EMR database is terminated;
4. ``archive``: the primary switches WAL, the segment is archived and the spool uploaded, so
   the repository holds WAL up to the target; the backup is chosen again with that WAL;
5. ``restore``: PITR into a new data directory next to the primary's
   (``<data>.restored-<stamp>``), started on a free port;
6. ``verify``: ``pg_amcheck`` on every database, the backup's canary row, then a clean
   shutdown and ``pg_checksums --check``;
7. ``swap``: stop the damaged primary, *move* its data directory aside to
   ``<data>.damaged-<stamp>`` (never deleted: evidence, and the way back), move the restored
   directory into its place, remove the restore-only settings, start it on the primary's port.
   If it does not start, the damaged directory is moved back and started again (the state
   before the swap) and the step fails;
8. ``resume``: the primary accepts writes on a new timeline; ``maintenance(False, ...)``.

Replicas still follow the damaged history (they are past the recovery point on the old
timeline): they must be re-based (``pg_rewind`` or a new base backup) before they stream again.
Take a new full backup afterwards.  ``dry_run`` does step 1 only and returns the plan.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from emrdr.config import PgNode, Settings
from emrdr.engine.pitr import PitrError, RecoveryTarget, choose_backup
from emrdr.engine.repository import Repository
from emrdr.engine.restore import restore_to_point, stop_restored
from emrdr.pg.lsn import is_history_name, timeline_of
from emrdr.pg.osuser import OsUser, ensure_os_user, run_as
from emrdr.recovery.live import RecoveryError, find_primary
from emrdr.repo import IntegrityError, ObjectNotFound
from emrdr.repo.manifest import Manifest
from emrdr.verify import pgcheck
from emrdr.verify.drill import canary_check, verified_backup_ids
from emrdr.verify.integrity import check_repository
from emrdr.verify.pgcheck import StepCallback
from emrdr.verify.sandbox import free_port

__all__ = [
    "RESTORE_BLOCK_MARK",
    "CorruptionRecoveryResult",
    "recover_corruption",
    "strip_restore_settings",
]

RESTORE_BLOCK_MARK = "# emrdr restore of "
MaintenanceCallback = Callable[[bool, str], None]


@dataclass
class CorruptionRecoveryResult:
    to_time: datetime
    dry_run: bool
    plan: list[str] = field(default_factory=list)
    steps: list[tuple[str, bool, str]] = field(default_factory=list)
    backup_id: str | None = None
    reached: str | None = None
    data_dir: Path | None = None
    damaged_dir: Path | None = None
    failed_step: str | None = None
    error: str | None = None
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failed_step is None


class _StepFailed(Exception):
    def __init__(self, step: str, detail: str) -> None:
        super().__init__(detail)
        self.step = step


def strip_restore_settings(text: str) -> str:
    """``postgresql.auto.conf`` without the block a restore appended (recovery target, port,
    no archiving, no socket): what the restored directory needs to run as the primary."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(RESTORE_BLOCK_MARK):
            kept = "\n".join(lines[:i]).rstrip("\n")
            return kept + "\n" if kept else ""
    return text


def _histories(repo: Repository, names: list[str]) -> dict[int, str]:
    return {timeline_of(n): repo.get_wal(n).decode() for n in names if is_history_name(n)}


def _choose(repo: Repository, to_time: datetime) -> tuple[str, str]:
    verified = verified_backup_ids(repo)
    manifests: list[Manifest] = []
    for bid in sorted(verified & set(repo.backup_ids())):
        with contextlib.suppress(IntegrityError, ObjectNotFound):
            manifests.append(repo.read_manifest(bid))
    if not manifests:
        raise RecoveryError("no verified backup in the repository: run `emrdr verify` on a "
                            "backup first (only a backup whose restore drill passed is used)")
    names = repo.wal_names()
    try:
        return choose_backup(manifests, RecoveryTarget(time=to_time), names,
                             _histories(repo, names))
    except PitrError as exc:
        raise RecoveryError(f"among verified backups {[m.backup_id for m in manifests]}: "
                            f"{exc}") from exc


def _pg_ctl(settings: Settings, user: OsUser, args: list[str], timeout: float = 120.0) -> None:
    import subprocess

    try:
        run_as(user, [str(settings.pg.bindir / "pg_ctl"), *args], timeout=timeout)
    except subprocess.CalledProcessError as exc:
        raise RecoveryError(f"pg_ctl {args[0]} failed: {(exc.stderr or '').strip()}") from exc


def _wait_archived(settings: Settings, node: PgNode, timeout: float = 60.0) -> str:
    seg = pgcheck.psql(settings, node.port, "SELECT pg_walfile_name(pg_switch_wal())",
                       host=node.host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = pgcheck.psql(settings, node.port, "SELECT coalesce(last_archived_wal, '') "
                            "FROM pg_stat_archiver", host=node.host)
        if last and last[:24] >= seg:
            return seg
        time.sleep(0.1)
    raise RecoveryError(f"WAL segment {seg} was not archived within {timeout:.0f}s: is "
                        "archive_command working?")


def recover_corruption(
    settings: Settings,
    repo: Repository,
    to_time: datetime,
    dry_run: bool = False,
    on_step: StepCallback | None = None,
    *,
    maintenance: MaintenanceCallback | None = None,
    primary: PgNode | None = None,
    workers: int = 2,
    timeout: float = 3600.0,
) -> CorruptionRecoveryResult:
    """Run (or with ``dry_run`` only plan) the corruption runbook; see the module docstring.

    ``maintenance(active, reason)`` is called synchronously from this (worker) thread; a
    service passes a function that publishes ``MaintenanceChanged`` and waits for the publish.
    """
    t0 = time.monotonic()
    result = CorruptionRecoveryResult(to_time=to_time, dry_run=dry_run)

    def report(name: str, ok: bool, detail: str) -> None:
        result.steps.append((name, ok, detail))
        if on_step is not None:
            on_step(name, ok, detail)

    try:
        _run(settings, repo, to_time, dry_run, report, maintenance, primary, workers, timeout,
             result)
    except _StepFailed as exc:
        result.failed_step, result.error = exc.step, str(exc)
        report(exc.step, False, str(exc))
    result.duration_s = time.monotonic() - t0
    return result


def _step(name: str, fn: Callable[[], str], report: StepCallback) -> str:
    try:
        detail = fn()
    except _StepFailed:
        raise
    except Exception as exc:
        raise _StepFailed(name, f"{type(exc).__name__}: {exc}" if not isinstance(
            exc, RecoveryError) else str(exc)) from exc
    report(name, True, detail)
    return detail


def _run(
    settings: Settings, repo: Repository, to_time: datetime, dry_run: bool,
    report: StepCallback, maintenance: MaintenanceCallback | None, primary: PgNode | None,
    workers: int, timeout: float, result: CorruptionRecoveryResult,
) -> None:
    db = settings.pg.database
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    state: dict[str, object] = {}

    def plan() -> str:
        if to_time.tzinfo is None:
            raise RecoveryError(f"time {to_time.isoformat()} has no time zone")
        if to_time > datetime.now(UTC):
            raise RecoveryError(f"{to_time.isoformat()} is in the future")
        node = find_primary(settings, primary)
        if node.data_dir is None or not (Path(node.data_dir) / "PG_VERSION").exists():
            raise RecoveryError(f"primary {node.name}'s data directory is not on this host "
                                f"({node.data_dir}); run this where the primary runs")
        bid, why = _choose(repo, to_time)
        data = Path(node.data_dir).absolute()
        state.update(node=node, bid=bid, data=data)
        replicas = [n.name for n in settings.resolved_pg_nodes() if n.name != node.name]
        result.backup_id, result.data_dir = bid, data
        result.plan = [
            f"1. scope: quick repository integrity check; pg_amcheck --heapallindexed of {db} "
            f"on {node.name}",
            f"2. maintenance: publish MaintenanceChanged(active) and terminate client sessions "
            f"on {db}",
            "3. archive: switch WAL on the primary, upload the spooled WAL",
            f"4. restore: {why}; recover to {to_time.isoformat()} into "
            f"{data.parent / (data.name + '.restored-' + stamp)}",
            "5. verify: pg_amcheck on every database, canary row, pg_checksums after a clean "
            "shutdown",
            f"6. swap: stop {node.name}, move {data} to "
            f"{data.parent / (data.name + '.damaged-' + stamp)} (kept), move the restored "
            f"directory into place, start it on port {node.port}",
            "7. resume: check writes, publish MaintenanceChanged(inactive); replicas "
            f"{', '.join(replicas) or '(none)'} must be re-based (pg_rewind or a new base "
            "backup); take a new full backup",
        ]
        return f"backup {bid} ({why})" + (" [dry run: nothing changed]" if dry_run else "")

    _step("plan", plan, report)
    if dry_run:
        return
    node = state["node"]
    data = state["data"]
    assert isinstance(node, PgNode) and isinstance(data, Path)
    user = ensure_os_user(settings.pg.os_user)

    def scope() -> str:
        integrity = check_repository(settings, repo)
        touching = [p.line() for p in integrity.problems if state["bid"] in p.backup_ids]
        if touching:
            raise RecoveryError("the chosen backup has repository problems: "
                                + "; ".join(touching))
        amcheck = pgcheck.amcheck_check(settings, node.port, node.host, [db],
                                        relations=pgcheck.relation_map(settings, node.port,
                                                                       node.host))
        return (f"repository: {len(integrity.problems)} problem(s), none in backup "
                f"{state['bid']}; live {db}: {amcheck.detail}")

    _step("scope", scope, report)

    def enter_maintenance() -> str:
        reason = f"data corruption recovery to {to_time.isoformat()}"
        if maintenance is not None:
            maintenance(True, reason)
        killed = pgcheck.psql(
            settings, node.port, "SELECT count(pg_terminate_backend(pid)) FROM "
            f"pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid() AND "
            "backend_type = 'client backend'", host=node.host)
        return f"maintenance announced; {killed} client session(s) on {db} terminated"

    _step("maintenance", enter_maintenance, report)

    def archive() -> str:
        from emrdr.engine.wal import upload_spool

        seg = _wait_archived(settings, node)
        uploaded = upload_spool(settings, repo)
        bid, why = _choose(repo, to_time)
        state["bid"] = bid
        result.backup_id = bid
        return f"{seg} archived, {len(uploaded)} WAL file(s) uploaded; using {why}"

    _step("archive", archive, report)
    restored = data.parent / f"{data.name}.restored-{stamp}"

    def restore() -> str:
        res = restore_to_point(settings, repo, RecoveryTarget(time=to_time), restored,
                               backup_id=str(state["bid"]), workers=workers, start=True,
                               port=free_port(), os_user=user, timeout=timeout)
        state["port"] = res.port
        result.reached = res.reached
        if res.reached_time is not None and res.reached_time > to_time:
            raise RecoveryError(f"recovery went past the target: {res.reached}")
        return f"{restored}: reached {res.reached}"

    _step("restore", restore, report)

    def verify() -> str:
        port = int(str(state["port"]))
        relations = pgcheck.relation_map(settings, port)
        checks = [pgcheck.amcheck_check(settings, port, relations=relations),
                  canary_check(settings, port, repo.read_manifest(str(state["bid"])))]
        stop_restored(settings, restored, user, mode="fast")
        checks.append(pgcheck.checksums_check(settings, restored, user, relations))
        bad = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
        if bad:
            raise RecoveryError(f"the restored copy in {restored} fails: " + "; ".join(bad))
        return "; ".join(f"{c.name}: {c.detail}" for c in checks)

    _step("verify", verify, report)
    damaged = data.parent / f"{data.name}.damaged-{stamp}"
    log = data.parent / "postgresql.log"

    def swap() -> str:
        _pg_ctl(settings, user, ["stop", "-D", str(data), "-m", "fast", "-w", "-s"])
        data.rename(damaged)
        result.damaged_dir = damaged
        restored.rename(data)
        auto = data / "postgresql.auto.conf"
        auto.write_text(strip_restore_settings(auto.read_text()))
        try:
            _pg_ctl(settings, user, ["start", "-D", str(data), "-l", str(log), "-w", "-t",
                                     "120", "-s"], timeout=150)
        except RecoveryError as exc:
            with contextlib.suppress(RecoveryError):
                _pg_ctl(settings, user, ["stop", "-D", str(data), "-m", "immediate", "-w"])
            data.rename(restored)
            damaged.rename(data)
            result.damaged_dir = None
            _pg_ctl(settings, user, ["start", "-D", str(data), "-l", str(log), "-w", "-s"])
            raise RecoveryError(f"the restored directory did not start ({exc}); the damaged "
                                f"primary was put back and started; restored copy kept in "
                                f"{restored}") from exc
        return f"{data} now holds the restored data; damaged data kept in {damaged}"

    _step("swap", swap, report)

    def resume() -> str:
        row = pgcheck.psql(settings, node.port, "SELECT pg_is_in_recovery(), "
                           "substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)", host=node.host)
        in_recovery, tli = row.split("|")
        if in_recovery != "f":
            raise RecoveryError(f"{node.name} is still in recovery")
        if maintenance is not None:
            maintenance(False, f"recovered to {to_time.isoformat()}")
        replicas = [n.name for n in settings.resolved_pg_nodes() if n.name != node.name]
        return (f"{node.name} accepts writes on timeline {int(tli, 16)}; maintenance ended"
                + (f"; re-base replicas {', '.join(replicas)}" if replicas else "")
                + "; take a new full backup")

    _step("resume", resume, report)
