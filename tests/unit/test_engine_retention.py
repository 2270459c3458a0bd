"""The retention planner over synthetic backups spanning more than seven years."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from emrdr.config import RetentionSettings
from emrdr.engine.retention import (
    BackupInfo,
    GfsTiers,
    RetentionPolicy,
    backup_decision,
    backup_time,
    gfs_keep,
    plan_retention,
)
from emrdr.pg.lsn import segment_name_from_number

NOW = datetime(2033, 6, 1, 3, 30, tzinfo=UTC)
POLICY = RetentionPolicy.from_settings(RetentionSettings())


def seg(n: int, tli: int = 1) -> str:
    return segment_name_from_number(tli, n)


def backup(days_ago: float, kind: str = "full", retention_days: int | None = None,
           n: int | None = None) -> BackupInfo:
    """A backup ``days_ago`` days old using 4 WAL segments per day of history."""
    stopped = NOW - timedelta(days=days_ago)
    num = n if n is not None else int((5000 - days_ago) * 4)
    return BackupInfo(
        backup_id=stopped.strftime("%Y%m%dT%H%M%SZ") + ("-F" if kind == "full" else "-I"),
        kind="full" if kind == "full" else "incremental", stopped_at=stopped,
        start_wal=seg(num), stop_wal=seg(num + 1), timeline=1, retention_days=retention_days,
    )


def daily_history() -> list[BackupInfo]:
    """A full every day for 8 years (2920 days) and an incremental every day for 200 days."""
    fulls = [backup(d + 0.1) for d in range(2920)]
    incs = [backup(d + 0.5, "incremental") for d in range(200)]
    return fulls + incs


class TestBackups:
    def test_seven_years_of_fulls_and_ninety_days_of_incrementals(self) -> None:
        backups = daily_history()
        plan = plan_retention(backups, [], NOW, POLICY)
        kept = {b.backup_id: b for b in backups if b.backup_id in plan.keep}
        assert all(b.kind == "incremental" or (NOW - b.stopped_at).days <= 2555
                   for b in kept.values())
        assert sum(b.kind == "full" for b in kept.values()) == 2555
        assert sum(b.kind == "incremental" for b in kept.values()) == 90
        assert len(plan.remove_backups) == len(backups) - 2555 - 90
        oldest_removed = min(plan.remove_backups)
        assert plan.reasons[oldest_removed] == (
            "older than the full 2555-day retention (age 2919 days)"
        )

    def test_the_newest_full_is_never_removed(self) -> None:
        old = [backup(3000), backup(2900), backup(10, "incremental")]
        policy = RetentionPolicy(full_days=30, incremental_days=5)
        plan = plan_retention(old, [], NOW, policy)
        assert plan.keep == {old[1].backup_id: "newest full backup (never removed)"}
        assert plan.remove_backups == [old[0].backup_id, old[2].backup_id]

    def test_per_backup_override_shortens_and_lengthens(self) -> None:
        short = backup(20, retention_days=10)
        long = backup(1000, "incremental", retention_days=3650)
        newest = backup(1)
        plan = plan_retention([short, long, newest], [], NOW, POLICY)
        assert plan.reasons[short.backup_id] == (
            "older than its own 10-day retention (age 20 days)"
        )
        assert plan.keep[long.backup_id] == "within its own 3650-day retention (age 1000 days)"

    def test_legal_hold_keeps_anything(self) -> None:
        ancient = backup(4000)
        inc = backup(400, "incremental")
        plan = plan_retention([ancient, inc, backup(1)], [], NOW, POLICY,
                              holds={ancient.backup_id, inc.backup_id})
        assert plan.keep[ancient.backup_id] == "legal hold"
        assert plan.keep[inc.backup_id] == "legal hold"
        assert plan.remove_backups == []

    def test_decision_is_a_pure_function_with_a_reason(self) -> None:
        b = backup(100, "incremental")
        assert backup_decision(b, NOW, POLICY, False, None, {}) == (
            False, "older than the incremental 90-day retention (age 100 days)"
        )
        assert backup_decision(b, NOW, POLICY, True, None, {}) == (True, "legal hold")


class TestGfs:
    def test_tiers_keep_the_newest_full_of_each_period(self) -> None:
        backups = [backup(d + 0.1) for d in range(2920)]
        policy = RetentionPolicy(full_days=7, gfs=GfsTiers(daily=7, weekly=4, monthly=12,
                                                           yearly=7))
        plan = plan_retention(backups, [], NOW, policy)
        kept = sorted(plan.keep)
        years = {k[:4] for k in kept}
        assert len(years) == 7
        months = {k[:6] for k in kept}
        assert len(months) >= 12
        # 8 by age (0..7 days), +4 weekly, +12 monthly, +7 yearly minus overlaps
        assert 20 <= len(kept) <= 31
        reasons = set(plan.keep.values())
        assert any(r.startswith("GFS yearly (") for r in reasons)
        assert any(r.startswith("GFS monthly (") for r in reasons)
        assert any(r.startswith("GFS weekly (") for r in reasons)

    def test_periods_without_backups_do_not_count(self) -> None:
        sparse = [backup(0.1), backup(40), backup(400)]
        keep = gfs_keep(sparse, GfsTiers(monthly=2))
        assert set(keep) == {sparse[0].backup_id, sparse[1].backup_id}

    def test_incrementals_are_not_gfs_candidates(self) -> None:
        plan = plan_retention([backup(200, "incremental"), backup(1)], [], NOW,
                              RetentionPolicy(gfs=GfsTiers(yearly=5)))
        assert len(plan.remove_backups) == 1


class TestWal:
    def test_wal_is_kept_for_the_window_and_for_retained_backups(self) -> None:
        old = backup(1000, n=100)      # retained full: keeps its own range only
        anchor = backup(35, n=500)     # newest retained backup before the 30-day window
        recent = backup(5, n=600)
        wal = [seg(n) for n in range(90, 700)] + ["00000002.history", seg(95) + ".partial"]
        plan = plan_retention([old, anchor, recent], wal, NOW, POLICY)
        removed = set(plan.remove_wal)
        assert seg(100) not in removed and seg(101) not in removed
        assert seg(102) in removed and seg(499) in removed and seg(99) in removed
        assert all(seg(n) not in removed for n in range(500, 700))
        assert "00000002.history" not in removed
        assert seg(95) + ".partial" in removed
        assert plan.wal_reason.startswith(f"kept from {seg(500)} on (start of {anchor.backup_id}")

    def test_without_an_old_backup_wal_is_kept_from_the_oldest_retained(self) -> None:
        b = backup(5, n=300)
        plan = plan_retention([b], [seg(n) for n in range(250, 320)], NOW, POLICY)
        assert plan.remove_wal == [seg(n) for n in range(250, 300)]

    def test_no_backup_no_wal_removed(self) -> None:
        plan = plan_retention([], [seg(1), seg(2)], NOW, POLICY)
        assert plan.remove_wal == [] and "no backup is retained" in plan.wal_reason

    def test_wal_of_removed_backups_goes(self) -> None:
        gone = backup(3000, n=10)
        keep = backup(1, n=50)
        plan = plan_retention([gone, keep], [seg(n) for n in range(10, 60)], NOW, POLICY)
        assert plan.remove_backups == [gone.backup_id]
        assert plan.remove_wal == [seg(n) for n in range(10, 50)]

    def test_lines(self) -> None:
        plan = plan_retention([backup(3000, n=10), backup(1, n=50)],
                              [seg(n) for n in range(10, 60)], NOW, POLICY)
        lines = plan.lines()
        assert lines[0].startswith("remove ") and "2555-day" in lines[0]
        assert lines[-1].startswith("WAL: remove 40 files; kept from")


def test_backup_time_from_id() -> None:
    assert backup_time("20330601T020000Z-F") == datetime(2033, 6, 1, 2, 0, tzinfo=UTC)
    assert backup_time("nonsense") is None
