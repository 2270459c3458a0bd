"""PITR decisions: recovery targets, WAL gaps, timelines, choosing the backup, what to stage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from emrdr.engine.pitr import (
    PitrError,
    RecoveryTarget,
    TimelineStep,
    choose_backup,
    needed_timeline,
    parse_history,
    resolve_time,
    timeline_path,
    wal_gaps,
)
from emrdr.engine.restore import (
    fetch_command,
    recovery_settings,
    staging_dir_for,
    wal_to_stage,
)
from emrdr.pg.lsn import format_lsn, segment_name_from_number
from emrdr.repo.manifest import Manifest

SEG = 16 * 1024 * 1024
T0 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


def seg(n: int, tli: int = 1) -> str:
    return segment_name_from_number(tli, n)


def manifest(bid: str, stopped: datetime, start: int, stop: int, tli: int = 1) -> Manifest:
    return Manifest(
        backup_id=bid, kind="full", label=bid, started_at=stopped - timedelta(minutes=5),
        stopped_at=stopped, start_lsn=format_lsn(start * SEG + 40),
        stop_lsn=format_lsn(stop * SEG + 300), start_wal=seg(start, tli), stop_wal=seg(stop, tli),
        timeline=tli, system_identifier="1", pg_version=15, key_id="k1", chunk_size=1 << 20,
        zstd_level=3, files=[], backup_label="START WAL LOCATION: x\n",
    )


B1 = manifest("20260301T015500Z-F", T0, 2, 2)
B2 = manifest("20260302T015500Z-F", T0 + timedelta(days=1), 10, 11)
ALL_WAL = [seg(n) for n in range(2, 21)]


class TestRecoveryTarget:
    def test_a_naive_time_is_refused(self) -> None:
        """A time without a zone must be resolved first (it means the server's zone)."""
        with pytest.raises(ValueError, match="no time zone"):
            RecoveryTarget(time=datetime(2026, 3, 1, 12, 0))

    def test_resolve_time_uses_the_server_zone(self) -> None:
        cet = timezone(timedelta(hours=1))
        got = resolve_time(datetime(2026, 3, 1, 12, 0), cet)
        assert got == datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
        aware = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
        assert resolve_time(aware, cet) is aware

    def test_only_one_target(self) -> None:
        with pytest.raises(ValueError, match="at most one"):
            RecoveryTarget(lsn="0/1", name="x")

    def test_a_bad_lsn_is_refused(self) -> None:
        with pytest.raises(ValueError, match="not an LSN"):
            RecoveryTarget(lsn="nonsense")

    def test_time_settings_carry_an_explicit_offset(self) -> None:
        t = RecoveryTarget(time=datetime(2026, 3, 1, 14, 30, tzinfo=timezone(timedelta(hours=2))))
        g = t.gucs(1)
        assert g["recovery_target_time"] == "2026-03-01 12:30:00+00:00"
        assert g["recovery_target_timeline"] == "latest"
        assert g["recovery_target_action"] == "promote"
        assert g["recovery_target_inclusive"] == "on"

    def test_plain_restore_recovers_to_consistency_on_the_backups_timeline(self) -> None:
        g = RecoveryTarget().gucs(3)
        assert g["recovery_target"] == "immediate"
        assert g["recovery_target_timeline"] == "3"
        assert "recovery_target_inclusive" not in g

    @pytest.mark.parametrize(
        ("target", "name", "value"),
        [
            (RecoveryTarget(lsn="0/3000060"), "recovery_target_lsn", "0/3000060"),
            (RecoveryTarget(xid=1234), "recovery_target_xid", "1234"),
            (RecoveryTarget(name="before-upgrade"), "recovery_target_name", "before-upgrade"),
        ],
    )
    def test_each_kind(self, target: RecoveryTarget, name: str, value: str) -> None:
        assert target.gucs(1)[name] == value
        assert target.kind in name


class TestWalGaps:
    def test_continuous(self) -> None:
        assert wal_gaps(ALL_WAL, 1, seg(2), seg(20)) == []

    def test_runs_of_missing_segments(self) -> None:
        names = [n for n in ALL_WAL if n not in {seg(5), seg(6), seg(9)}]
        assert wal_gaps(names, 1, 2, 20) == [(seg(5), seg(6)), (seg(9), seg(9))]

    def test_missing_at_the_end(self) -> None:
        assert wal_gaps(ALL_WAL, 1, 18, 22) == [(seg(21), seg(22))]

    def test_other_timelines_and_partials_do_not_fill_a_gap(self) -> None:
        names = [seg(2), seg(3, tli=2), seg(3) + ".partial", seg(4)]
        assert wal_gaps(names, 1, 2, 4) == [(seg(3), seg(3))]

    def test_across_a_timeline_switch(self) -> None:
        """The switch segment is read from the child timeline."""
        path = [TimelineStep(1, 5 * SEG + 100), TimelineStep(2, None)]
        names = [seg(3), seg(4), seg(5, 2), seg(6, 2)]
        assert wal_gaps(names, path, 3, 6) == []
        assert wal_gaps([seg(3), seg(4), seg(5), seg(6, 2)], path, 3, 6) == [(seg(5, 2), seg(5, 2))]


class TestTimelines:
    def test_parse_history(self) -> None:
        text = "1\t0/5000100\tno recovery target specified\n\n2\t0/9000000\tafter failover\n"
        assert parse_history(text) == [(1, 5 * SEG + 0x100), (2, 9 * SEG)]

    def test_path_and_needed_timeline(self) -> None:
        path = timeline_path(3, {3: "1\t0/5000100\tx\n2\t0/9000000\ty\n"})
        assert [s.timeline for s in path] == [1, 2, 3]
        assert [needed_timeline(path, n) for n in (4, 5, 8, 9, 10)] == [1, 2, 2, 3, 3]


class TestChooseBackup:
    def test_by_time_the_newest_backup_stopped_before(self) -> None:
        bid, why = choose_backup([B1, B2], RecoveryTarget(time=T0 + timedelta(hours=3)), ALL_WAL)
        assert bid == B1.backup_id
        assert "newest backup stopped before" in why
        bid, _ = choose_backup([B1, B2], RecoveryTarget(time=T0 + timedelta(days=2)), ALL_WAL)
        assert bid == B2.backup_id

    def test_a_target_before_the_oldest_backup_is_refused(self) -> None:
        with pytest.raises(PitrError) as info:
            choose_backup([B2, B1], RecoveryTarget(time=T0 - timedelta(hours=1)), ALL_WAL)
        assert str(info.value) == (
            f"target {(T0 - timedelta(hours=1)).isoformat()} is before the oldest backup "
            f"(oldest is {B1.backup_id} stopped at {T0.isoformat()})"
        )

    def test_by_lsn(self) -> None:
        bid, _ = choose_backup([B1, B2], RecoveryTarget(lsn=format_lsn(12 * SEG)), ALL_WAL)
        assert bid == B2.backup_id
        bid, _ = choose_backup([B1, B2], RecoveryTarget(lsn=format_lsn(5 * SEG)), ALL_WAL)
        assert bid == B1.backup_id
        with pytest.raises(PitrError, match="before the oldest backup"):
            choose_backup([B1, B2], RecoveryTarget(lsn="0/100"), ALL_WAL)

    def test_a_wal_gap_after_the_backup_is_refused_naming_it(self) -> None:
        names = [n for n in ALL_WAL if n not in {seg(5), seg(6), seg(7)}]
        with pytest.raises(PitrError) as info:
            choose_backup([B1, B2], RecoveryTarget(time=T0 + timedelta(hours=3)), names)
        assert str(info.value) == (
            f"WAL gap: {seg(5)} to {seg(7)} missing after backup {B1.backup_id}; the newest "
            f"reachable point is LSN 0/5000000 (end of {seg(4)}) on timeline 1"
        )

    def test_an_lsn_target_before_the_gap_is_fine(self) -> None:
        names = [n for n in ALL_WAL if n != seg(8)]
        bid, _ = choose_backup([B1, B2], RecoveryTarget(lsn=format_lsn(6 * SEG + 5)), names)
        assert bid == B1.backup_id

    def test_a_later_backup_proves_a_time_target_lies_before_the_gap(self) -> None:
        names = [n for n in ALL_WAL if n != seg(15)]
        bid, _ = choose_backup([B1, B2], RecoveryTarget(time=T0 + timedelta(hours=3)), names)
        assert bid == B1.backup_id

    def test_a_gap_inside_the_backups_own_range(self) -> None:
        names = [n for n in ALL_WAL if n != seg(11)]
        with pytest.raises(PitrError, match=f"WAL gap: {seg(11)} missing; backup {B2.backup_id} "
                                            "needs"):
            choose_backup([B1, B2], RecoveryTarget(time=T0 + timedelta(days=3)), names)

    def test_a_restore_point_uses_the_oldest_backup_with_continuous_wal(self) -> None:
        bid, why = choose_backup([B1, B2], RecoveryTarget(name="rp"), ALL_WAL)
        assert bid == B1.backup_id and "cannot be placed before replay" in why
        names = [n for n in ALL_WAL if n != seg(4)]
        bid, _ = choose_backup([B1, B2], RecoveryTarget(name="rp"), names)
        assert bid == B2.backup_id

    def test_timelines(self) -> None:
        """After a failover at 0/F000000 on timeline 1, B1 and B2 lead to timeline 2; a backup
        taken on timeline 1 after the fork does not."""
        hist = {2: "1\t0/F000000\tfailover\n"}
        names = [*[seg(n) for n in range(2, 15)], *[seg(n, 2) for n in range(15, 21)],
                 "00000002.history"]
        late = manifest("20260303T015500Z-F", T0 + timedelta(days=2), 16, 16)
        bid, _ = choose_backup([B1, B2, late], RecoveryTarget(time=T0 + timedelta(days=3)),
                               names, hist)
        assert bid == B2.backup_id
        with pytest.raises(PitrError, match="no backup is on timeline 5"):
            choose_backup([B1], RecoveryTarget(time=T0 + timedelta(days=3), timeline=5), names)

    def test_no_backup(self) -> None:
        with pytest.raises(PitrError, match="no complete backup"):
            choose_backup([], RecoveryTarget(), ALL_WAL)


class TestStaging:
    def test_plain_restore_stages_the_backups_range_and_histories(self) -> None:
        names = [*ALL_WAL, "00000002.history"]
        assert wal_to_stage(B2, RecoveryTarget(), names, {}) == [
            seg(10), seg(11), "00000002.history"
        ]

    def test_lsn_target_stops_after_its_segment(self) -> None:
        got = wal_to_stage(B1, RecoveryTarget(lsn=format_lsn(4 * SEG + 7)), ALL_WAL, {})
        assert got == [seg(2), seg(3), seg(4), seg(5)]

    def test_time_target_stages_to_the_end(self) -> None:
        got = wal_to_stage(B2, RecoveryTarget(time=T0 + timedelta(days=3)), ALL_WAL, {})
        assert got == [seg(n) for n in range(10, 21)]

    def test_recovery_settings_isolate_the_copy(self) -> None:
        g = recovery_settings(B1, RecoveryTarget(), Path("/x/50%/data.wal-staging"), 6000)
        assert g["restore_command"] == fetch_command(Path("/x/50%/data.wal-staging"))
        assert g["restore_command"].startswith("d=/x/50%%/data.wal-staging; ")
        assert g["archive_mode"] == "off" and g["primary_conninfo"] == ""
        assert g["port"] == "6000" and g["unix_socket_directories"] == ""
        assert g["listen_addresses"] == "127.0.0.1"
        assert staging_dir_for(Path("/r/data")) == Path("/r/data.wal-staging")
