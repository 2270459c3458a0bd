"""Pure decisions of the verifier and the recovery procedures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from emrdr.messages.events import CheckResult
from emrdr.recovery.corruption import strip_restore_settings
from emrdr.recovery.dbcopy import check_new_db_name
from emrdr.recovery.table import renamed_object, split_table_name
from emrdr.verify.drill import (
    C_FILES,
    C_OBJECTS,
    C_RECOVERY,
    DrillError,
    DrillReport,
    classify_restore_error,
    resolve_backup_id,
)
from emrdr.verify.integrity import Problem, window_verdict
from emrdr.verify.pgcheck import (
    counts_plausible,
    describe_bad_block,
    name_relations,
    parse_amcheck,
    parse_checksum_failures,
)
from emrdr.verify.sandbox import stale_decision

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_pg_checksums_output_names_relation_and_block() -> None:
    out = (
        'pg_checksums: error: checksum verification failed in file "/d/data/base/16384/16457", '
        "block 0: calculated checksum 5C1 but block contains 9A3B\n"
        'pg_checksums: error: checksum verification failed in file "/d/data/base/16384/16460.1",'
        " block 2: calculated checksum 1 but block contains 2\n"
    )
    failures = parse_checksum_failures(out)
    assert failures == [("/d/data/base/16384/16457", 0), ("/d/data/base/16384/16460.1", 2)]
    rels = {"base/16384/16457": "emr.public.victim", "base/16384/16460": "emr.emr.big"}
    data = Path("/d/data")
    assert describe_bad_block(*failures[0], data, rels) == (
        "relation emr.public.victim block 0 (file base/16384/16457)")
    assert describe_bad_block(*failures[1], data, rels) == (
        "relation emr.emr.big block 131074 (file base/16384/16460.1)")
    assert "relation unknown" in describe_bad_block("/d/data/base/1/99", 3, data, rels)


def test_amcheck_findings_are_one_line_each() -> None:
    out = (
        'heap table "emr"."emr"."patients", block 3, offset 7:\n'
        "    xmin 123 precedes relation freeze threshold 0:456\n"
        'btree index "emr"."emr"."patients_pkey":\n'
        "    mismatch between parent key and child high key\n"
        "pg_amcheck: error: error sending command to database \"emr\": ERROR:  invalid page in "
        "block 0 of relation base/16384/16457\n"
    )
    found = parse_amcheck(out)
    assert found[0] == ("heap table emr.emr.patients block 3 offset 7: xmin 123 precedes "
                        "relation freeze threshold 0:456")
    assert found[1].startswith("btree index emr.emr.patients_pkey: mismatch")
    assert name_relations(found[2], {"base/16384/16457": "emr.public.victim"}).endswith(
        "(emr.public.victim)")


@pytest.mark.parametrize(
    ("recorded", "restored", "ok", "text"),
    [
        ({"patients": 100}, {"patients": 100}, True, "equal"),
        ({"patients": 10_000}, {"patients": 10_040}, True, "within tolerance"),
        ({"patients": 100}, {"patients": 30}, False, "-70"),
        ({"patients": 100}, {}, False, "missing"),
        ({}, {}, True, "no EMR row counts"),
    ],
)
def test_row_count_plausibility(
    recorded: dict[str, int], restored: dict[str, int], ok: bool, text: str
) -> None:
    verdict, detail = counts_plausible(recorded, restored)
    assert verdict is ok and text in detail


def test_restore_errors_are_filed_under_the_right_check() -> None:
    assert classify_restore_error("chunk ab12 of file base/1/2 is missing from the repository"
                                  ) == C_OBJECTS
    assert classify_restore_error("WAL file 000000010000000000000002 failed verification: x"
                                  ) == C_OBJECTS
    assert classify_restore_error("file base/1/2: SHA-256 aa does not match the manifest's bb"
                                  ) == C_FILES
    assert classify_restore_error("the restored server in /x stopped during recovery"
                                  ) == C_RECOVERY


def test_latest_and_unknown_backup_ids() -> None:
    ids = ["20261125T020000Z-F", "20261126T020000Z-I"]
    assert resolve_backup_id("latest", ids) == "20261126T020000Z-I"
    assert resolve_backup_id(ids[0], ids) == ids[0]
    with pytest.raises(DrillError, match="not a complete backup"):
        resolve_backup_id("20200101T000000Z-F", ids)
    with pytest.raises(DrillError, match="no complete backup"):
        resolve_backup_id("latest", [])


def test_a_report_passes_only_when_every_check_passed() -> None:
    report = DrillReport("b", NOW, [CheckResult(name="a", passed=True)], 2.0, 4_000_000)
    assert report.passed and report.throughput_mb_s == 2.0
    report.checks.append(CheckResult(name="pg_checksums --check", passed=False, detail="blk 0"))
    assert not report.passed and report.summary() == "backup b: pg_checksums --check failed: blk 0"
    assert not DrillReport("b", NOW).passed
    assert report.to_record()["passed"] is False


def test_stale_drill_registrations() -> None:
    assert stale_decision({"pid": 5}, lambda p: False, 1)[0] == "remove"
    assert stale_decision({"pid": 5}, lambda p: True, 1)[0] == "keep"
    assert stale_decision({"pid": 1}, lambda p: False, 1)[0] == "keep"
    assert stale_decision({}, lambda p: True, 1)[0] == "remove"


def test_recovery_window_against_the_policy() -> None:
    ok, expected, _ = window_verdict(NOW - timedelta(days=31), NOW - timedelta(days=40), NOW, 30)
    assert ok and expected == NOW - timedelta(days=30)
    ok, _, why = window_verdict(NOW - timedelta(days=2), NOW - timedelta(days=40), NOW, 30)
    assert not ok and "reaches back only" in why
    ok, expected, _ = window_verdict(NOW - timedelta(days=3), NOW - timedelta(days=3), NOW, 30)
    assert ok and expected == NOW - timedelta(days=3)  # a young repository
    assert not window_verdict(None, NOW, NOW, 30)[0]
    assert window_verdict(None, None, NOW, 30)[0]
    assert Problem("gap", "A to B", "missing", ("b1",)).line() == "gap: A to B: missing [backup b1]"


@pytest.mark.parametrize(
    ("name", "exists", "replace", "action"),
    [
        ("recovery_test", False, False, "create"),
        ("recovery_test", True, False, "refuse"),
        ("recovery_test", True, True, "replace"),
        ("postgres", False, True, "refuse"),
        ("bad-name", False, False, "refuse"),
        ("x" * 60, False, False, "refuse"),
    ],
)
def test_target_database_names(name: str, exists: bool, replace: bool, action: str) -> None:
    assert check_new_db_name(name, exists, replace)[0] == action


def test_table_names_and_renamed_indexes() -> None:
    assert split_table_name("emr.prescriptions") == ("emr", "prescriptions")
    with pytest.raises(ValueError, match=r"SCHEMA\.TABLE"):
        split_table_name("prescriptions")
    with pytest.raises(ValueError):
        split_table_name("emr.pre;scriptions")
    assert renamed_object("prescriptions_pkey", "prescriptions", "prescriptions_restored") == (
        "prescriptions_restored_pkey")
    assert renamed_object("rx_by_patient", "prescriptions", "p2") == "p2_rx_by_patient"


def test_restore_settings_are_stripped_for_the_swapped_in_primary() -> None:
    original = "# Do not edit\nwork_mem = '8MB'\n"
    appended = (original.rstrip("\n") + "\n\n# emrdr restore of B, target time X\n"
                "restore_command = 'cp /s/%f %p'\nport = '5999'\n")
    assert strip_restore_settings(appended) == original
    assert strip_restore_settings(original) == original
    assert strip_restore_settings("# emrdr restore of B\nport = '1'\n") == ""
