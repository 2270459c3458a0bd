"""The CLI contract of DESIGN.md §8: every verb parses; the WAL fast path is light and strict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from emrdr.cli.main import build_parser, main

VERBS = [
    ["up"],
    ["demo"],
    ["service", "audit-logger"],
    ["status", "--json"],
    ["backup", "full", "--verify", "--retention-days", "30", "--dry-run"],
    ["backup", "incremental"],
    ["backups", "list", "--json"],
    ["backups", "hold", "20261126T020000Z-F", "--reason", "case 42"],
    ["backups", "release", "20261126T020000Z-F", "--reason", "case closed"],
    ["wal", "push", "pg_wal/000000010000000000000001"],
    ["wal", "fetch", "000000010000000000000001", "/tmp/x"],
    ["verify", "latest"],
    ["verify", "20261126T020000Z-F"],
    ["integrity-check", "--comprehensive"],
    ["restore", "full", "20261126T020000Z-F", "--target-dir", "/tmp/r"],
    ["restore", "full", "20261126T020000Z-F", "--target-db", "recovery_test"],
    ["restore", "pitr", "2025-06-22 14:30:00", "--target-dir", "/tmp/r"],
    ["restore", "pitr", "--lsn", "0/3000000", "--target-dir", "/tmp/r"],
    ["restore", "pitr", "--xid", "1234", "--target-dir", "/tmp/r"],
    ["restore", "pitr", "--name", "before-migration", "--target-dir", "/tmp/r"],
    [
        "restore",
        "table",
        "emr.prescriptions",
        "--time",
        "2025-06-22 14:30:00",
        "--target-db",
        "emr",
        "--as",
        "prescriptions_restored",
    ],
    ["dr", "recover-corruption", "--to", "2025-06-22 14:30:00", "--dry-run"],
    ["dr", "activate-site"],
    ["failover", "promote", "pg-replica-1"],
    ["switchover", "--to", "pg-replica-1"],
    ["keys", "rotate"],
    ["keys", "list"],
    ["retention", "enforce", "--dry-run"],
    ["audit", "verify"],
    [
        "audit",
        "query",
        "--since",
        "2025-06-22",
        "--actor",
        "dba",
        "--action",
        "StartBackup",
        "--json",
    ],
    ["bus", "bootstrap", "--replicas", "3"],
]


@pytest.mark.parametrize("argv", VERBS, ids=lambda a: " ".join(a[:2]))
def test_every_verb_parses(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert callable(args.func)


def test_status_without_a_stack_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMRDR_HOME", str(tmp_path))
    monkeypatch.delenv("EMRDR_NATS__URL", raising=False)
    from emrdr.config import reload_settings

    reload_settings()
    try:
        assert main(["status"]) == 1
    finally:
        monkeypatch.undo()
        reload_settings()
    err = capsys.readouterr().err
    assert "no running stack found: start one with `emrdr up`" in err


class TestWalFastPath:
    def run(self, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, EMRDR_HOME=str(home))
        return subprocess.run(
            [sys.executable, "-m", "emrdr.cli.main", "wal", *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    def test_push_twice_is_fine_different_content_is_refused(self, tmp_path: Path) -> None:
        seg = tmp_path / "000000010000000000000003"
        seg.write_bytes(os.urandom(64 * 1024))
        assert self.run(tmp_path, "push", str(seg)).returncode == 0
        assert self.run(tmp_path, "push", str(seg)).returncode == 0
        seg.write_bytes(os.urandom(64 * 1024))
        res = self.run(tmp_path, "push", str(seg))
        assert res.returncode == 1
        assert "already archived with different content" in res.stderr
        spooled = tmp_path / "spool" / "wal" / seg.name
        assert spooled.read_bytes() != seg.read_bytes(), "the archived copy must be untouched"

    def test_fetch_round_trip_and_missing(self, tmp_path: Path) -> None:
        seg = tmp_path / "000000010000000000000004"
        seg.write_bytes(b"x" * 8192)
        assert self.run(tmp_path, "push", str(seg)).returncode == 0
        dest = tmp_path / "restored"
        assert self.run(tmp_path, "fetch", seg.name, str(dest)).returncode == 0
        assert dest.read_bytes() == seg.read_bytes()
        res = self.run(tmp_path, "fetch", "000000010000000000000099", str(dest))
        assert res.returncode == 1
        assert "000000010000000000000099 is not in the archive" in res.stderr

    def test_push_of_a_missing_file_fails_loudly(self, tmp_path: Path) -> None:
        res = self.run(tmp_path, "push", str(tmp_path / "nope"))
        assert res.returncode == 1
        assert "nope" in res.stderr

    def test_fast_path_does_not_import_pydantic_or_nats(self, tmp_path: Path) -> None:
        """archive_command starts once per segment: keep its imports light."""
        seg = tmp_path / "000000010000000000000005"
        seg.write_bytes(b"y" * 8192)
        code = (
            "import sys; from emrdr.cli.main import main; "
            f"rc = main(['wal', 'push', {str(seg)!r}]); "
            "heavy = sorted(m for m in ('pydantic', 'nats', 'faststream', 'asyncpg') "
            "if m in sys.modules); print(rc, heavy)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=dict(os.environ, EMRDR_HOME=str(tmp_path)),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert out == "0 []"


def test_new_identity_then_enroll_gives_a_trusted_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An administrator enrols an operator's key; commands it signs then verify."""
    from emrdr.config import reload_settings
    from emrdr.messages.commands import StartBackup
    from emrdr.security import TrustStore, load_identity

    monkeypatch.setenv("EMRDR_HOME", str(tmp_path))
    reload_settings()
    try:
        pub = tmp_path / "jane.pem"
        assert main(["keys", "new-identity", "jane", "--role", "dba", "--out", str(pub)]) == 0
        trust = TrustStore(tmp_path / "keys" / "trust")
        ident = load_identity(tmp_path / "keys", "jane", "dba")
        cmd = ident.sign(StartBackup(issuer=ident.issuer))
        assert not trust.verify(cmd).allowed
        assert main(["keys", "enroll", "jane", "--role", "dba", "--public-key", str(pub)]) == 0
        assert trust.verify(cmd).allowed
        assert main(["keys", "enroll", "jane", "--role", "janitor", "--public-key", str(pub)]) == 2
    finally:
        monkeypatch.undo()
        reload_settings()
