"""Synthetic EMR data for demos, drills and tests: nothing here describes a real person.

Schema ``emr``: ``patients`` -> ``encounters`` -> ``prescriptions`` / ``clinical_notes`` (foreign
keys, indexes, timestamps).  Schema ``emrdr_meta`` holds ``canary``, the row a backup writes just
before it ends so a restore drill can prove it recovered up to that moment.

Data comes from :func:`generate`, a pure function of ``(patients, seed, first ids, base time)``,
so the same seed always gives the same rows.  Patients are named ``Patient-000123``; drugs are
made up.

    async with pool.acquire() as conn:
        counts = await seed(conn, patients=200, seed=42)
        await add_rows(conn, 10)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

__all__ = [
    "EMR_TABLES",
    "SCHEMA_SQL",
    "SeedRows",
    "add_rows",
    "ensure_schema",
    "generate",
    "read_canary",
    "row_counts",
    "seed",
    "write_canary",
]

EMR_TABLES = ("patients", "encounters", "prescriptions", "clinical_notes")
BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS emr;
CREATE TABLE IF NOT EXISTS emr.patients (
    patient_id     bigint PRIMARY KEY,
    mrn            text NOT NULL UNIQUE,
    display_name   text NOT NULL,
    date_of_birth  date NOT NULL,
    sex            text NOT NULL CHECK (sex IN ('F', 'M', 'X')),
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS emr.encounters (
    encounter_id   bigint PRIMARY KEY,
    patient_id     bigint NOT NULL REFERENCES emr.patients (patient_id) ON DELETE CASCADE,
    kind           text NOT NULL CHECK (kind IN ('outpatient', 'inpatient', 'emergency')),
    department     text NOT NULL,
    started_at     timestamptz NOT NULL,
    ended_at       timestamptz,
    created_at     timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS encounters_patient_idx ON emr.encounters (patient_id, started_at);
CREATE TABLE IF NOT EXISTS emr.prescriptions (
    prescription_id bigint PRIMARY KEY,
    encounter_id    bigint NOT NULL REFERENCES emr.encounters (encounter_id) ON DELETE CASCADE,
    patient_id      bigint NOT NULL REFERENCES emr.patients (patient_id) ON DELETE CASCADE,
    drug            text NOT NULL,
    dose_mg         numeric(8, 2) NOT NULL,
    frequency       text NOT NULL,
    prescribed_at   timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS prescriptions_patient_idx ON emr.prescriptions (patient_id);
CREATE INDEX IF NOT EXISTS prescriptions_encounter_idx ON emr.prescriptions (encounter_id);
CREATE TABLE IF NOT EXISTS emr.clinical_notes (
    note_id        bigint PRIMARY KEY,
    encounter_id   bigint NOT NULL REFERENCES emr.encounters (encounter_id) ON DELETE CASCADE,
    patient_id     bigint NOT NULL REFERENCES emr.patients (patient_id) ON DELETE CASCADE,
    author         text NOT NULL,
    body           text NOT NULL,
    written_at     timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS clinical_notes_encounter_idx ON emr.clinical_notes (encounter_id);
CREATE INDEX IF NOT EXISTS clinical_notes_written_idx ON emr.clinical_notes (written_at);
CREATE SCHEMA IF NOT EXISTS emrdr_meta;
CREATE TABLE IF NOT EXISTS emrdr_meta.canary (
    backup_id   text PRIMARY KEY,
    written_at  timestamptz NOT NULL DEFAULT now()
);
"""

_DRUGS = (
    "Examplozine", "Fictomab", "Placebitol", "Synthorex", "Demoprazole",
    "Mockacillin", "Testosartan", "Samplofen", "Dummydronate", "Nulltrexate",
)
_FREQUENCIES = ("once daily", "twice daily", "three times daily", "every 8 hours", "as needed")
_DEPARTMENTS = ("cardiology", "oncology", "pediatrics", "emergency", "orthopedics", "neurology")
_KINDS = ("outpatient", "inpatient", "emergency")
_COMPLAINTS = (
    "mild headache", "seasonal cough", "sprained ankle", "follow-up visit",
    "routine check", "elevated blood pressure", "minor rash", "lower back pain",
)
_PLANS = (
    "continue current plan", "review in two weeks", "order routine labs",
    "start synthetic medication", "refer to clinic", "no change",
)


@dataclass
class SeedRows:
    """Rows per table, as tuples in the column order of :data:`COLUMNS`."""

    patients: list[tuple[Any, ...]] = field(default_factory=list)
    encounters: list[tuple[Any, ...]] = field(default_factory=list)
    prescriptions: list[tuple[Any, ...]] = field(default_factory=list)
    clinical_notes: list[tuple[Any, ...]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {t: len(getattr(self, t)) for t in EMR_TABLES}


COLUMNS: dict[str, tuple[str, ...]] = {
    "patients": (
        "patient_id", "mrn", "display_name", "date_of_birth", "sex", "created_at", "updated_at",
    ),
    "encounters": (
        "encounter_id", "patient_id", "kind", "department", "started_at", "ended_at",
        "created_at",
    ),
    "prescriptions": (
        "prescription_id", "encounter_id", "patient_id", "drug", "dose_mg", "frequency",
        "prescribed_at",
    ),
    "clinical_notes": ("note_id", "encounter_id", "patient_id", "author", "body", "written_at"),
}


def generate(
    patients: int,
    seed: int,
    *,
    first_ids: dict[str, int] | None = None,
    base_time: datetime = BASE_TIME,
) -> SeedRows:
    """Deterministic synthetic rows for ``patients`` patients and their records."""
    rng = random.Random(seed)
    ids = {"patients": 1, "encounters": 1, "prescriptions": 1, "clinical_notes": 1}
    ids.update(first_ids or {})
    rows = SeedRows()
    for _ in range(patients):
        pid = ids["patients"]
        ids["patients"] += 1
        created = base_time + timedelta(minutes=rng.randint(0, 60 * 24 * 30))
        dob = date(1930, 1, 1) + timedelta(days=rng.randint(0, 365 * 90))
        rows.patients.append(
            (pid, f"MRN-{pid:08d}", f"Patient-{pid:06d}", dob, rng.choice("FMX"), created, created)
        )
        for _ in range(rng.randint(1, 4)):
            eid = ids["encounters"]
            ids["encounters"] += 1
            start = created + timedelta(minutes=rng.randint(0, 60 * 24 * 60))
            end = start + timedelta(minutes=rng.randint(15, 60 * 48))
            rows.encounters.append(
                (eid, pid, rng.choice(_KINDS), rng.choice(_DEPARTMENTS), start, end, start)
            )
            for _ in range(rng.randint(0, 3)):
                rid = ids["prescriptions"]
                ids["prescriptions"] += 1
                rows.prescriptions.append(
                    (
                        rid, eid, pid, rng.choice(_DRUGS),
                        Decimal(rng.randint(1, 2000)) / Decimal(4),
                        rng.choice(_FREQUENCIES),
                        start + timedelta(minutes=rng.randint(1, 120)),
                    )
                )
            for _ in range(rng.randint(1, 2)):
                nid = ids["clinical_notes"]
                ids["clinical_notes"] += 1
                body = (
                    f"Synthetic note {nid} for Patient-{pid:06d}: presents with "
                    f"{rng.choice(_COMPLAINTS)}; vitals within synthetic range "
                    f"(pulse {rng.randint(55, 110)}, temp {rng.randint(360, 389) / 10}). "
                    f"Plan: {rng.choice(_PLANS)}. This record is generated test data."
                )
                rows.clinical_notes.append(
                    (
                        nid, eid, pid, f"Clinician-{rng.randint(1, 40):03d}", body,
                        start + timedelta(minutes=rng.randint(5, 240)),
                    )
                )
    return rows


async def ensure_schema(conn: asyncpg.Connection) -> None:
    """Create the ``emr`` and ``emrdr_meta`` schemas and tables if missing (safe to repeat)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('emrdr.emr_seed'))")
        await conn.execute(SCHEMA_SQL)


async def _insert(conn: asyncpg.Connection, rows: SeedRows) -> None:
    for table in EMR_TABLES:
        records = getattr(rows, table)
        if records:
            await conn.copy_records_to_table(
                table, records=records, columns=list(COLUMNS[table]), schema_name="emr"
            )


async def row_counts(conn: asyncpg.Connection) -> dict[str, int]:
    """Exact row count of every ``emr`` table."""
    out: dict[str, int] = {}
    for table in EMR_TABLES:
        out[table] = int(await conn.fetchval(f"SELECT count(*) FROM emr.{table}"))
    return out


async def seed(
    conn: asyncpg.Connection, patients: int = 200, seed: int = 42, *, reset: bool = False
) -> dict[str, int]:
    """Create the schema and fill it; returns row counts per table.

    Idempotent: a database that already has patients is left alone (counts returned) unless
    ``reset`` empties it first.
    """
    await ensure_schema(conn)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('emrdr.emr_seed'))")
        if reset:
            await conn.execute(
                "TRUNCATE emr.clinical_notes, emr.prescriptions, emr.encounters, emr.patients"
            )
        elif await conn.fetchval("SELECT EXISTS (SELECT 1 FROM emr.patients)"):
            return await row_counts(conn)
        await _insert(conn, generate(patients, seed))
    return await row_counts(conn)


async def add_rows(conn: asyncpg.Connection, n: int, seed: int | None = None) -> dict[str, int]:
    """Add ``n`` new patients with their records (recent timestamps); returns rows inserted.

    Without ``seed`` the generator is seeded from the next patient id, so the rows depend only
    on what the database already holds.
    """
    await ensure_schema(conn)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('emrdr.emr_seed'))")
        first = {
            "patients": int(await conn.fetchval(
                "SELECT coalesce(max(patient_id), 0) + 1 FROM emr.patients")),
            "encounters": int(await conn.fetchval(
                "SELECT coalesce(max(encounter_id), 0) + 1 FROM emr.encounters")),
            "prescriptions": int(await conn.fetchval(
                "SELECT coalesce(max(prescription_id), 0) + 1 FROM emr.prescriptions")),
            "clinical_notes": int(await conn.fetchval(
                "SELECT coalesce(max(note_id), 0) + 1 FROM emr.clinical_notes")),
        }
        now = await conn.fetchval("SELECT now()")
        rows = generate(
            n, seed if seed is not None else first["patients"], first_ids=first,
            base_time=now - timedelta(days=95),  # every generated timestamp lands before now
        )
        await _insert(conn, rows)
    return rows.counts()


async def write_canary(conn: asyncpg.Connection, backup_id: str) -> datetime:
    """Record the canary row of one backup; returns its server timestamp."""
    await ensure_schema(conn)
    written: datetime = await conn.fetchval(
        "INSERT INTO emrdr_meta.canary (backup_id) VALUES ($1) "
        "ON CONFLICT (backup_id) DO UPDATE SET written_at = now() RETURNING written_at",
        backup_id,
    )
    return written


async def read_canary(conn: asyncpg.Connection, backup_id: str) -> datetime | None:
    """The canary timestamp of one backup, or None if the row is absent."""
    value: datetime | None = await conn.fetchval(
        "SELECT written_at FROM emrdr_meta.canary WHERE backup_id = $1", backup_id
    )
    return value
