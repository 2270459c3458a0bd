"""The synthetic EMR generator (the database side is covered by the integration tests)."""

from __future__ import annotations

from datetime import UTC, datetime

from emrdr.pg.emr_seed import COLUMNS, EMR_TABLES, generate


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    a, b, c = generate(30, 42), generate(30, 42), generate(30, 7)
    assert a == b
    assert a != c
    assert a.counts()["patients"] == 30


def test_rows_are_obviously_synthetic_and_consistent() -> None:
    """Names are Patient-NNNNNN; every child row points at an existing parent."""
    rows = generate(20, 1)
    patient_ids = {p[0] for p in rows.patients}
    encounter_ids = {e[0] for e in rows.encounters}
    assert all(p[2] == f"Patient-{p[0]:06d}" for p in rows.patients)
    assert all(e[1] in patient_ids for e in rows.encounters)
    assert all(r[1] in encounter_ids and r[2] in patient_ids for r in rows.prescriptions)
    assert all(n[1] in encounter_ids for n in rows.clinical_notes)
    assert all("generated test data" in n[4] for n in rows.clinical_notes)
    for table in EMR_TABLES:
        assert all(len(r) == len(COLUMNS[table]) for r in getattr(rows, table))


def test_ids_continue_from_given_start() -> None:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    rows = generate(
        2,
        5,
        first_ids={"patients": 101, "encounters": 501, "prescriptions": 1, "clinical_notes": 9},
        base_time=base,
    )
    assert [p[0] for p in rows.patients] == [101, 102]
    assert rows.encounters[0][0] == 501
    assert rows.clinical_notes[0][0] == 9
    assert all(p[5] >= base for p in rows.patients)
