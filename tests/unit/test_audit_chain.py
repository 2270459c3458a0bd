"""The audit hash chain: mapping messages to entries, tamper detection, queries, checkpoints."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from emrdr.audit.chain import (
    GENESIS_HASH,
    AuditEntry,
    Checkpoint,
    checkpoint,
    compute_hash,
    entry_for_malformed,
    entry_from_message,
    query,
    verify_chain,
    verify_checkpoint,
)
from emrdr.audit.log import export_jsonl, load_jsonl
from emrdr.cli import audit as audit_cli
from emrdr.cli.audit import parse_time
from emrdr.cli.main import CliError
from emrdr.messages.base import Issuer, Message
from emrdr.messages.commands import StartBackup, StartRestore, Switchover
from emrdr.messages.events import (
    BackupCompleted,
    BackupFailed,
    CommandReceived,
    CommandRejected,
    FailoverCompleted,
    ReplicationLagChanged,
    WalArchived,
)

T0 = datetime(2025, 6, 22, 14, 0, tzinfo=UTC)
JANE = Issuer(actor="dba.jane", role="dba")


def completed(backup_id: str, at: datetime = T0) -> BackupCompleted:
    return BackupCompleted(
        source="backup-worker",
        occurred_at=at,
        backup_id=backup_id,
        kind="full",
        bytes_source=1000,
        bytes_stored=400,
        dedup_ratio=2.5,
        duration_s=3.0,
        throughput_mb_s=0.3,
    )


def received(authorized: bool, at: datetime = T0) -> CommandReceived:
    cmd = StartRestore(issuer=JANE, backup_id="b-7", target_dir="restore")
    return CommandReceived(
        source="backup-worker",
        occurred_at=at,
        command_type="StartRestore",
        command_id=str(cmd.event_id),
        command_subject=cmd.subject,
        issuer=JANE,
        authorized=authorized,
        reason="role dba may restore" if authorized else "role not allowed",
        command=cmd.model_dump(mode="json"),
    )


def main(argv: list[str]) -> int:
    """``emrdr audit ...`` as ``emrdr.cli.main.main`` runs it (only the audit verbs registered)."""
    parser = argparse.ArgumentParser(prog="emrdr")
    audit_cli.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"emrdr: {exc}")
        return exc.code
    return code


def build_chain(messages: list[Message]) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    prev = GENESIS_HASH
    for i, msg in enumerate(messages):
        entry = entry_from_message(msg, i, prev)
        entries.append(entry)
        prev = entry.hash
    return entries


def chain_of(n: int) -> list[AuditEntry]:
    return build_chain([completed(f"b-{i}", T0 + timedelta(minutes=i)) for i in range(n)])


def rehashed(entry: AuditEntry, **changes: Any) -> AuditEntry:
    """A forger's edit: change fields and recompute the entry's own hash."""
    changed = entry.model_copy(update=changes)
    return changed.model_copy(update={"hash": compute_hash(changed.hashed_fields())})


class TestMapping:
    def test_event_outcome_target_and_sizes(self) -> None:
        """An event's actor is its source; outcome from its class; sizes from bytes fields."""
        entry = entry_from_message(completed("b-1"), 0, GENESIS_HASH)
        assert (entry.actor, entry.role, entry.action) == ("backup-worker", None, "BackupCompleted")
        assert (entry.target, entry.outcome, entry.at) == ("b-1", "success", T0)
        assert entry.sizes == {"bytes_source": 1000, "bytes_stored": 400}
        assert entry.detail["kind"] == "full"
        assert entry.subject == BackupCompleted.subject
        assert entry.prev_hash == GENESIS_HASH
        assert entry.hash == compute_hash(entry.hashed_fields())

    def test_command_received_is_an_access_attempt(self) -> None:
        """CommandReceived records the command's type, its issuer and accepted/denied."""
        ok = entry_from_message(received(True), 0, GENESIS_HASH)
        assert (ok.action, ok.actor, ok.role, ok.outcome) == (
            "StartRestore",
            "dba.jane",
            "dba",
            "accepted",
        )
        assert ok.target == "b-7"
        assert ok.detail["via"] == "CommandReceived"
        assert "command" not in ok.detail
        denied = entry_from_message(received(False), 1, ok.hash)
        assert denied.outcome == "denied"
        assert denied.detail["reason"] == "role not allowed"

    def test_command_rejected_names_its_actor(self) -> None:
        msg = CommandRejected(
            source="dr-coordinator",
            command_type="PromoteNode",
            command_id="c-1",
            actor="mallory",
            reason="bad signature",
        )
        entry = entry_from_message(msg, 0, GENESIS_HASH)
        assert (entry.actor, entry.action, entry.outcome) == ("mallory", "PromoteNode", "denied")

    def test_command_itself(self) -> None:
        entry = entry_from_message(StartBackup(issuer=JANE), 0, GENESIS_HASH)
        assert (entry.actor, entry.role, entry.action, entry.outcome) == (
            "dba.jane",
            "dba",
            "StartBackup",
            "info",
        )

    @pytest.mark.parametrize(
        ("msg", "target", "outcome", "sizes"),
        [
            (
                WalArchived(
                    source="wal",
                    segment="000000010000000000000003",
                    bytes_source=16,
                    bytes_stored=4,
                    latency_ms=2.0,
                ),
                "000000010000000000000003",
                "info",
                {"bytes_source": 16, "bytes_stored": 4},
            ),
            (
                ReplicationLagChanged(
                    source="mon",
                    node="pg2",
                    severity="warning",
                    previous="ok",
                    lag_seconds=3.5,
                    lag_bytes=9000,
                ),
                "pg2",
                "info",
                {"lag_bytes": 9000},
            ),
            (Switchover(issuer=JANE, to_node="pg3"), "pg3", "info", {}),
            (
                FailoverCompleted(
                    source="dr",
                    old_primary=None,
                    new_primary="pg2",
                    epoch=4,
                    reason="primary down",
                    duration_s=8.0,
                ),
                "pg2",
                "success",
                {},
            ),
            (BackupFailed(source="bw", error="disk full"), None, "failure", {}),
        ],
    )
    def test_targets(
        self, msg: Message, target: str | None, outcome: str, sizes: dict[str, int]
    ) -> None:
        entry = entry_from_message(msg, 0, GENESIS_HASH)
        assert (entry.target, entry.outcome, entry.sizes) == (target, outcome, sizes)

    def test_malformed(self) -> None:
        """Undecodable input keeps its size and digest, never its bytes."""
        raw = b'{"type": "Nope", "patient": "Doe"}'
        entry = entry_for_malformed("emrdr.evt.x", raw, "unknown message type 'Nope'", 0, "a" * 64)
        assert (entry.action, entry.outcome, entry.actor) == (
            "MalformedMessage",
            "failure",
            "unknown",
        )
        assert entry.sizes == {"bytes_raw": len(raw)}
        assert "Doe" not in entry.to_json()

    def test_hash_independent_of_zone_and_survives_json(self) -> None:
        """The same instant in another zone hashes the same; a JSON round trip keeps the hash."""
        msg = completed("b-1")
        entry = entry_from_message(msg, 0, GENESIS_HASH)
        plus2 = T0.astimezone(timezone(timedelta(hours=2)))
        other = entry_from_message(msg.model_copy(update={"occurred_at": plus2}), 0, GENESIS_HASH)
        assert other.at.tzinfo == UTC
        assert other.hash == entry.hash
        again = AuditEntry.model_validate_json(entry.to_json())
        assert again == entry
        assert compute_hash(again.hashed_fields()) == entry.hash


class TestVerify:
    def test_genesis_and_empty(self) -> None:
        assert verify_chain([]).ok
        entries = chain_of(3)
        assert entries[0].prev_hash == GENESIS_HASH
        report = verify_chain(entries)
        assert (report.ok, report.count, report.head_hash) == (True, 3, entries[-1].hash)

    def test_first_entry_must_follow_genesis(self) -> None:
        entries = chain_of(3)
        entries[0] = rehashed(entries[0], prev_hash="1" * 64)
        report = verify_chain(entries)
        assert (report.first_bad_index, report.reason) == (
            0,
            "entry 0: prev_hash is not the genesis hash",
        )

    def test_altered_field(self) -> None:
        entries = chain_of(30)
        entries[17] = entries[17].model_copy(update={"actor": "mallory"})
        report = verify_chain(entries)
        assert not report.ok
        assert (report.first_bad_index, report.reason) == (
            17,
            "entry 17: hash does not match its contents",
        )

    def test_altered_field_with_recomputed_hash(self) -> None:
        """A forger who rehashes the entry breaks the next link."""
        entries = chain_of(30)
        entries[17] = rehashed(entries[17], outcome="failure")
        report = verify_chain(entries)
        assert (report.first_bad_index, report.reason) == (
            18,
            "entry 18: prev_hash does not match entry 17",
        )

    def test_removed_entry(self) -> None:
        entries = chain_of(30)
        del entries[17]
        report = verify_chain(entries)
        assert (report.first_bad_index, report.reason) == (17, "entry 17: index 18 out of order")

    def test_removed_first_entry(self) -> None:
        report = verify_chain(chain_of(5)[1:])
        assert (report.first_bad_index, report.reason) == (0, "entry 0: index 1 out of order")

    def test_swapped_entries(self) -> None:
        entries = chain_of(30)
        entries[17], entries[18] = entries[18], entries[17]
        report = verify_chain(entries)
        assert (report.first_bad_index, report.reason) == (17, "entry 17: index 18 out of order")

    def test_edited_prev_hash(self) -> None:
        entries = chain_of(30)
        entries[17] = entries[17].model_copy(update={"prev_hash": "f" * 64})
        assert verify_chain(entries).first_bad_index == 17
        assert "hash does not match its contents" in verify_chain(entries).reason

    def test_edited_prev_hash_with_recomputed_hash(self) -> None:
        entries = chain_of(30)
        entries[17] = rehashed(entries[17], prev_hash="f" * 64)
        report = verify_chain(entries)
        assert (report.first_bad_index, report.reason) == (
            17,
            "entry 17: prev_hash does not match entry 16",
        )

    def test_renumbered_after_removal(self) -> None:
        """Removing an entry and renumbering (and rehashing) the rest still breaks a link."""
        entries = chain_of(10)
        del entries[4]
        for i in range(4, len(entries)):
            entries[i] = rehashed(entries[i], index=i)
        report = verify_chain(entries)
        assert (report.first_bad_index, report.reason) == (
            4,
            "entry 4: prev_hash does not match entry 3",
        )


class TestQuery:
    def test_filters(self) -> None:
        messages: list[Message] = [
            completed("b-0", T0),
            received(True, T0 + timedelta(minutes=1)),
            received(False, T0 + timedelta(minutes=2)),
            completed("b-1", T0 + timedelta(minutes=3)),
        ]
        entries = build_chain(messages)
        assert [e.index for e in query(entries, actor="dba.jane")] == [1, 2]
        assert [e.index for e in query(entries, outcome="denied")] == [2]
        assert [e.index for e in query(entries, action="startrestore")] == [1, 2]
        assert [e.index for e in query(entries, since=T0 + timedelta(minutes=1))] == [1, 2, 3]
        assert [e.index for e in query(entries, until=T0 + timedelta(minutes=1))] == [0, 1]
        plus2 = timezone(timedelta(hours=2))
        since = (T0 + timedelta(minutes=2)).astimezone(plus2)
        assert [e.index for e in query(entries, since=since, action="BackupCompleted")] == [3]
        assert query(entries, actor="nobody") == []


class TestCheckpoint:
    def test_sign_and_verify(self) -> None:
        key = Ed25519PrivateKey.generate()
        entries = chain_of(5)
        cp = checkpoint(entries, key, at=T0)
        assert (cp.index, cp.hash) == (4, entries[-1].hash)
        assert verify_checkpoint(cp, key.public_key())
        restored = Checkpoint.model_validate_json(cp.model_dump_json())
        assert verify_checkpoint(restored, key.public_key())

    def test_forged_checkpoints_rejected(self) -> None:
        key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        entries = chain_of(5)
        cp = checkpoint(entries, key, at=T0)
        assert not verify_checkpoint(checkpoint(entries, other, at=T0), key.public_key())
        assert not verify_checkpoint(cp.model_copy(update={"hash": "0" * 64}), key.public_key())
        assert not verify_checkpoint(cp.model_copy(update={"index": 3}), key.public_key())
        assert not verify_checkpoint(
            cp.model_copy(update={"signature": "bm9wZQ=="}), key.public_key()
        )
        assert not verify_checkpoint(cp.model_copy(update={"signature": "%%%"}), key.public_key())

    def test_checkpoint_proves_truncation(self) -> None:
        key = Ed25519PrivateKey.generate()
        entries = chain_of(6)
        cp = checkpoint(entries, key)
        assert verify_chain(entries, [cp]).ok
        report = verify_chain(entries[:4], [cp])
        assert (report.ok, report.first_bad_index) == (False, 4)
        assert "removed from the end" in report.reason
        rewritten = chain_of(6)  # a different history with the same shape
        report = verify_chain(rewritten, [cp])
        assert (report.first_bad_index, report.reason) == (
            5,
            "entry 5: hash differs from the signed checkpoint",
        )

    def test_empty_chain_cannot_be_checkpointed(self) -> None:
        with pytest.raises(ValueError, match="empty"):
            checkpoint([], Ed25519PrivateKey.generate())


class TestCliOffline:
    def test_parse_time(self) -> None:
        local = parse_time("2025-06-22 14:30:00")
        assert local.tzinfo is not None
        assert local.replace(tzinfo=None) == datetime(2025, 6, 22, 14, 30)
        assert parse_time("2025-06-22T14:30:00Z") == datetime(2025, 6, 22, 14, 30, tzinfo=UTC)

    def test_verify_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        entries = chain_of(8)
        good = tmp_path / "good.jsonl"
        export_jsonl(entries, good)
        assert load_jsonl(good) == entries
        assert main(["audit", "verify", "--file", str(good)]) == 0
        assert "OK: 8 entries" in capsys.readouterr().out

        lines = good.read_text().splitlines()
        lines[3] = "{not json"
        bad = tmp_path / "bad.jsonl"
        bad.write_text("\n".join(lines) + "\n")
        assert main(["audit", "verify", "--file", str(bad), "--json"]) == 1
        report = json.loads(capsys.readouterr().out)
        assert (report["ok"], report["first_bad_index"]) == (False, 3)

    def test_query_file_json(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        path = tmp_path / "trail.jsonl"
        export_jsonl(build_chain([completed("b-0"), received(False)]), path)
        assert main(["audit", "query", "--file", str(path), "--outcome", "denied", "--json"]) == 0
        found = json.loads(capsys.readouterr().out)
        assert [(e["index"], e["actor"]) for e in found] == [(1, "dba.jane")]
        assert main(["audit", "query", "--file", str(path), "--since", "2025-06-22 00:00:00"]) == 0
        out = capsys.readouterr().out
        assert "StartRestore" in out and "2 entries" in out

    def test_checkpoint_cli(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`audit checkpoint` signs the head; `verify --checkpoint` then proves truncation."""
        from cryptography.hazmat.primitives import serialization

        def write_keys(name: str) -> tuple[Path, Path]:
            key = Ed25519PrivateKey.generate()
            private, public = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"
            private.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            public.write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
            return private, public

        private, public = write_keys("audit")
        _, stranger = write_keys("stranger")
        trail, cp = tmp_path / "trail.jsonl", tmp_path / "cp.json"
        entries = chain_of(6)
        export_jsonl(entries, trail)
        argv = ["audit", "checkpoint", "--file", str(trail), "--private-key", str(private)]
        assert main([*argv, "--out", str(cp)]) == 0
        assert "entry 5" in capsys.readouterr().out

        verify = ["audit", "verify", "--checkpoint", str(cp)]
        assert main([*verify, "--file", str(trail), "--public-key", str(public)]) == 0
        capsys.readouterr()
        export_jsonl(entries[:4], trail)
        assert main([*verify, "--file", str(trail), "--public-key", str(public)]) == 1
        assert "removed from the end" in capsys.readouterr().out
        assert main([*verify, "--file", str(trail), "--public-key", str(stranger)]) == 1
        assert "does not verify" in capsys.readouterr().out
        assert main([*verify, "--file", str(trail)]) == 1
        assert "needs --public-key" in capsys.readouterr().out
