"""verifier: restore drills into a temporary PostgreSQL, and repository integrity checks.

* ``StartVerification`` (CLI ``emrdr verify``, the weekly schedule) and ``BackupCompleted`` with
  ``verify_requested`` (``emrdr backup full --verify``) run a drill
  (:func:`emrdr.verify.drill.run_drill`): ``VerificationStarted``, then ``VerificationPassed``
  or ``VerificationFailed`` with every check, the measured restore time, bytes and throughput.
* ``CheckIntegrity`` runs :func:`emrdr.verify.integrity.check_repository`: ``IntegrityChecked``
  when clean, ``IntegrityCheckFailed`` (a failure outcome: the CLI exits non-zero) otherwise.

Blocking work runs in threads, one drill at a time.  Temporary instances left by a killed
verifier are removed at start; a stopping verifier aborts its running drill, which removes its
instance.  Metrics: ``emrdr_verification_failures_total``, ``emrdr_restore_drill_seconds``
(latest drill's restore time), ``emrdr_verifications_total{result}`` (success rate),
``emrdr_corruption_detected_total{scope}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Counter, Gauge

from emrdr.bus.runtime import HandlerContext, Service, run_service
from emrdr.engine.repository import open_repository
from emrdr.messages.commands import CheckIntegrity, StartVerification
from emrdr.messages.events import (
    BackupCompleted,
    IntegrityChecked,
    IntegrityCheckFailed,
    VerificationFailed,
    VerificationPassed,
    VerificationStarted,
)
from emrdr.verify.drill import (
    C_AMCHECK,
    C_CHECKSUMS,
    DrillError,
    DrillReport,
    last_verification,
    resolve_backup_id,
    run_drill,
)
from emrdr.verify.integrity import IntegrityReport, check_repository
from emrdr.verify.sandbox import Interrupted, cleanup_stale_drills

NAME = "verifier"
KEEPALIVE_S = 15.0
log = logging.getLogger(__name__)


class Verifier:
    """The verifier's handlers and metrics, bound to one service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings
        self.lock = asyncio.Lock()
        self.abort = threading.Event()  # set when the service stops: a running drill ends
        reg = service.registry
        self.m_failures = Counter("emrdr_verification_failures_total",
                                  "Failed verifications / restore drills", registry=reg)
        self.m_runs = Counter("emrdr_verifications_total", "Restore drills run, by result",
                              ["result"], registry=reg)
        self.m_drill_seconds = Gauge("emrdr_restore_drill_seconds",
                                     "Measured restore time of the latest drill (RTO evidence)",
                                     registry=reg)
        self.m_last_success = Gauge("emrdr_verification_last_success_timestamp_seconds",
                                    "When the last drill passed (Unix time)", registry=reg)
        self.m_corruption = Counter("emrdr_corruption_detected_total",
                                    "Corrupt files/objects found", ["scope"], registry=reg)

    # --- keeping a long message alive -------------------------------------------------------
    async def _with_keepalive(self, ctx: HandlerContext, work: Awaitable[Any]) -> Any:
        async def beat() -> None:
            while True:
                await asyncio.sleep(KEEPALIVE_S)
                await ctx.in_progress()

        task = asyncio.create_task(beat())
        try:
            return await work
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- drills -----------------------------------------------------------------------------
    async def drill(self, requested: str, ctx: HandlerContext) -> None:
        async with self.lock:
            repo = await asyncio.to_thread(open_repository, self.settings)
            try:
                ids = await asyncio.to_thread(repo.backup_ids)
                bid = resolve_backup_id(requested, ids)
            except DrillError as exc:
                self._count(False)
                await ctx.publish(VerificationFailed(
                    **ctx.envelope(), backup_id=None if requested == "latest" else requested,
                    error=str(exc)))
                return
            await ctx.publish(VerificationStarted(**ctx.envelope(), backup_id=bid))
            try:
                report: DrillReport = await self._with_keepalive(
                    ctx, asyncio.to_thread(run_drill, self.settings, repo, bid, abort=self.abort))
            except Interrupted as exc:  # NAK: the drill runs again after the restart
                raise RuntimeError(f"drill of {bid} interrupted ({exc}); it will be redelivered"
                                   ) from None
            await self._publish_report(report, ctx)

    def _count(self, passed: bool) -> None:
        self.m_runs.labels("passed" if passed else "failed").inc()
        if passed:
            self.m_last_success.set(time.time())
        else:
            self.m_failures.inc()

    async def _publish_report(self, report: DrillReport, ctx: HandlerContext) -> None:
        self._count(report.passed)
        if report.restore_seconds > 0:
            self.m_drill_seconds.set(report.restore_seconds)
        for check in report.failed():
            if check.name in (C_AMCHECK, C_CHECKSUMS):
                self.m_corruption.labels("file").inc()
        if report.passed:
            await ctx.publish(VerificationPassed(
                **ctx.envelope(), backup_id=report.backup_id, checks=report.checks,
                restore_seconds=round(report.restore_seconds, 3),
                bytes_restored=report.bytes_restored,
                throughput_mb_s=round(report.throughput_mb_s, 1),
                total_seconds=round(report.total_seconds, 3), reached=report.reached,
                record_key=report.record_key))
            return
        await ctx.publish(VerificationFailed(
            **ctx.envelope(), backup_id=report.backup_id, checks=report.checks,
            error=report.summary(),
            restore_seconds=round(report.restore_seconds, 3) if report.restore_seconds else None,
            bytes_restored=report.bytes_restored or None,
            throughput_mb_s=round(report.throughput_mb_s, 1) if report.bytes_restored else None,
            total_seconds=round(report.total_seconds, 3), record_key=report.record_key))

    async def on_backup_completed(self, event: BackupCompleted, ctx: HandlerContext) -> None:
        if not event.verify_requested or event.dry_run:
            return
        repo = await asyncio.to_thread(open_repository, self.settings)
        previous = await asyncio.to_thread(last_verification, repo, event.backup_id)
        if previous is not None and str(previous.get("started_at", "")) >= (
            event.occurred_at.isoformat()
        ):
            return  # a redelivery of an event whose drill already ran
        await self.drill(event.backup_id, ctx)

    # --- integrity ----------------------------------------------------------------------------
    async def integrity(self, command: CheckIntegrity, ctx: HandlerContext) -> None:
        def check() -> IntegrityReport:
            return check_repository(self.settings, open_repository(self.settings),
                                    command.comprehensive)

        try:
            report: IntegrityReport = await self._with_keepalive(ctx, asyncio.to_thread(check))
        except Exception as exc:
            await ctx.publish(IntegrityCheckFailed(
                **ctx.envelope(), comprehensive=command.comprehensive,
                error=f"{type(exc).__name__}: {exc}"))
            return
        problems = [p.line() for p in report.problems]
        corrupt = [p for p in report.problems if p.kind in ("chunk", "manifest", "wal")]
        if corrupt:
            self.m_corruption.labels("file").inc(len(corrupt))
        common: dict[str, Any] = {
            "comprehensive": report.comprehensive, "problems": problems,
            "bad_backups": report.bad_backups(), "backups": report.backups,
            "window_from": report.window_from, "duration_s": round(report.duration_s, 3),
        }
        if report.ok:
            await ctx.publish(IntegrityChecked(**ctx.envelope(), ok=True, **common))
        else:
            await ctx.publish(IntegrityCheckFailed(**ctx.envelope(), **common))

    # --- dispatch -----------------------------------------------------------------------------
    async def on_command(self, command: Any, ctx: HandlerContext) -> None:
        if isinstance(command, StartVerification):
            await self.drill(command.backup_id, ctx)
        elif isinstance(command, CheckIntegrity):
            await self.integrity(command, ctx)
        else:
            raise ValueError(f"the verifier does not handle {command.type}")


def _abort_on_stop(verifier: Verifier) -> Callable[[], Awaitable[None]]:
    async def wait_forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            verifier.abort.set()  # the service is stopping: a running drill cleans up and ends

    return wait_forever


def attach(service: Service) -> Verifier:
    """Register the verifier's handlers on ``service`` (and clean up after a killed drill)."""
    removed = cleanup_stale_drills(service.settings)
    if removed:
        log.warning("removed %d temporary instance(s) left by a killed drill: %s",
                    len(removed), ", ".join(str(p) for p in removed))
    verifier = Verifier(service)
    service.on_command("emrdr.cmd.verify.>", verifier.on_command)
    service.on_event(BackupCompleted.subject, verifier.on_backup_completed,
                     durable="verifier-backup-completed-v1")
    service.spawn(_abort_on_stop(verifier), "abort-on-stop")
    return verifier


def build(service: Service) -> None:
    attach(service)


def main() -> int:
    return run_service(build, NAME)
