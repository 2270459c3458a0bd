"""Signed commands: who may do what, and every refusal names its reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from emrdr.messages import Issuer
from emrdr.messages.commands import ActivateDrSite, StartBackup, StartRestore
from emrdr.security import POLICY, TrustStore, ensure_identity, load_identity


@pytest.fixture
def trust(tmp_path: Path) -> TrustStore:
    return TrustStore(tmp_path / "trust")


def unsigned(cls: type, **kw: object) -> object:
    return cls(issuer=Issuer(actor="nobody", role="dba"), **kw)


class TestVerify:
    def test_signed_command_of_allowed_role_passes(self, tmp_path: Path, trust: TrustStore) -> None:
        ident = ensure_identity(tmp_path, "dba.jane", "dba", trust)
        verdict = trust.verify(ident.sign(StartBackup(issuer=ident.issuer)))
        assert verdict.allowed, verdict.reason
        assert verdict.reason == "dba.jane (dba) may issue StartBackup"

    def test_unsigned_is_refused(self, trust: TrustStore) -> None:
        verdict = trust.verify(unsigned(StartBackup))  # type: ignore[arg-type]
        assert not verdict.allowed
        assert verdict.reason == "StartBackup from nobody is not signed"

    def test_tampered_command_is_refused(self, tmp_path: Path, trust: TrustStore) -> None:
        ident = ensure_identity(tmp_path, "op", "backup_operator", trust)
        signed = ident.sign(StartBackup(issuer=ident.issuer, kind="full"))
        forged = signed.model_copy(update={"retention_days": 1})
        verdict = trust.verify(forged)
        assert not verdict.allowed
        assert verdict.reason == "signature of StartBackup from op is invalid"

    def test_role_not_allowed(self, tmp_path: Path, trust: TrustStore) -> None:
        ident = ensure_identity(tmp_path, "op", "backup_operator", trust)
        verdict = trust.verify(ident.sign(StartRestore(issuer=ident.issuer)))
        assert verdict.reason == "role backup_operator may not issue StartRestore"

    def test_compliance_officer_cannot_act(self, tmp_path: Path, trust: TrustStore) -> None:
        ident = ensure_identity(tmp_path, "auditor", "compliance_officer", trust)
        assert not trust.verify(ident.sign(StartBackup(issuer=ident.issuer))).allowed

    def test_unenrolled_key(self, tmp_path: Path, trust: TrustStore) -> None:
        other = TrustStore(tmp_path / "elsewhere")
        ident = ensure_identity(tmp_path / "k", "eve", "admin", other)
        verdict = trust.verify(ident.sign(StartBackup(issuer=ident.issuer)))
        assert verdict.reason.endswith("of eve is not enrolled for role admin")

    def test_claiming_a_role_not_enrolled(self, tmp_path: Path, trust: TrustStore) -> None:
        ident = ensure_identity(tmp_path, "op", "backup_operator", trust)
        escalated = ident.issuer.model_copy(update={"role": "admin"})
        cmd = StartBackup(issuer=escalated)
        from emrdr.security import Identity

        forged = Identity("op", "admin", ident.private_key).sign(cmd)
        assert "is not enrolled for role admin" in trust.verify(forged).reason

    def test_stale_command_refused(self, tmp_path: Path, trust: TrustStore) -> None:
        ident = ensure_identity(tmp_path, "dba", "dba", trust)
        old = StartBackup(issuer=ident.issuer, occurred_at=datetime.now(UTC) - timedelta(days=2))
        verdict = trust.verify(ident.sign(old))
        assert "refusing a stale command" in verdict.reason

    def test_break_glass_elevation_expires(self, tmp_path: Path, trust: TrustStore) -> None:
        ident = ensure_identity(tmp_path, "resp", "emergency_responder", trust)
        from emrdr.security import Identity

        elevated = Identity("resp", "admin", ident.private_key)
        trust.enroll(
            "resp",
            "admin",
            ident.private_key.public_key(),
            expires_at=datetime.now(UTC) + timedelta(minutes=30),
        )
        cmd = elevated.sign(ActivateDrSite(issuer=elevated.issuer))
        assert trust.verify(cmd).allowed
        later = datetime.now(UTC) + timedelta(hours=1)
        verdict = trust.verify(cmd, now=later)
        assert "elevation of resp to admin expired" in verdict.reason

    def test_load_identity_missing_is_clear(self, tmp_path: Path) -> None:
        with pytest.raises(PermissionError, match="no signing key for ghost as dba"):
            load_identity(tmp_path, "ghost", "dba")

    def test_policy_roles(self) -> None:
        assert POLICY["compliance_officer"] == frozenset()
        assert "ActivateDrSite" in POLICY["emergency_responder"]
        assert "StartRestore" not in POLICY["backup_operator"]
        assert "SetLegalHold" not in POLICY["backup_operator"]
        assert "SetLegalHold" in POLICY["dba"]


def test_command_from_the_future_is_refused(tmp_path: Path) -> None:
    trust = TrustStore(tmp_path / "trust")
    ident = ensure_identity(tmp_path, "dba", "dba", trust)
    future = StartBackup(issuer=ident.issuer, occurred_at=datetime.now(UTC) + timedelta(hours=2))
    assert "in the future; refusing it" in trust.verify(ident.sign(future)).reason
