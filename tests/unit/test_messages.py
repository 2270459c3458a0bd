"""Typed messages: envelope, registry decoding, and clear errors for bad input."""

from __future__ import annotations

import json
import uuid

import pytest

from emrdr.messages import REGISTRY, DecodeError, Issuer
from emrdr.messages.commands import COMMAND_TYPES, StartBackup
from emrdr.messages.events import BackupCompleted, CommandRejected

ISSUER = Issuer(actor="dba.jane", role="dba")


class TestEnvelope:
    def test_every_type_defaults_to_its_class_name(self) -> None:
        """Each registered message's ``type`` is its own class name (no leaking defaults)."""
        for cls in REGISTRY:
            assert cls.model_fields["type"].default == cls.__name__

    def test_messages_are_frozen(self) -> None:
        cmd = StartBackup(issuer=ISSUER)
        with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
            cmd.kind = "incremental"  # type: ignore[misc]

    def test_caused_links_correlation_and_causation(self) -> None:
        cmd = StartBackup(issuer=ISSUER)
        rej = CommandRejected(
            source="backup-worker",
            command_type="StartBackup",
            command_id=str(cmd.event_id),
            actor="dba.jane",
            reason="x",
            **cmd.caused(),
        )
        assert rej.correlation_id == cmd.correlation_id
        assert rej.causation_id == cmd.event_id

    def test_commands_are_imperative_events_past_tense(self) -> None:
        names = {c.__name__ for c in COMMAND_TYPES}
        for cls in REGISTRY:
            if cls.__name__ in names:
                assert cls.subject.startswith("emrdr.cmd.")
            else:
                assert cls.subject.startswith("emrdr.evt.")
                assert cls.__name__.endswith(("ed", "Observed")), cls.__name__


class TestDecode:
    def test_round_trip(self) -> None:
        cmd = StartBackup(issuer=ISSUER, kind="incremental", retention_days=30)
        assert REGISTRY.decode(cmd.to_bytes()) == cmd

    @pytest.mark.parametrize(
        ("payload", "expected"),
        [
            (b"\xff\xfe not json", "not JSON"),
            (b"[1, 2]", "not a JSON object"),
            (b'{"kind": "full"}', "no 'type' field"),
            (b'{"type": "DropDatabase"}', "unknown message type 'DropDatabase'"),
        ],
    )
    def test_garbage_is_named(self, payload: bytes, expected: str) -> None:
        with pytest.raises(DecodeError, match=expected):
            REGISTRY.decode(payload)

    def test_unknown_version_is_refused(self) -> None:
        body = json.loads(StartBackup(issuer=ISSUER).to_bytes())
        body["schema_version"] = 2
        with pytest.raises(DecodeError, match="schema_version 2 is not supported"):
            REGISTRY.decode(json.dumps(body))

    def test_invalid_field_is_named(self) -> None:
        body = json.loads(StartBackup(issuer=ISSUER).to_bytes())
        body["kind"] = "differential"
        with pytest.raises(DecodeError, match=r"StartBackup is malformed: kind"):
            REGISTRY.decode(json.dumps(body))

    def test_extra_fields_are_refused(self) -> None:
        body = json.loads(StartBackup(issuer=ISSUER).to_bytes())
        body["drop_everything"] = True
        with pytest.raises(DecodeError, match="drop_everything"):
            REGISTRY.decode(json.dumps(body))

    def test_type_must_match_class(self) -> None:
        ev = BackupCompleted(
            source="bw",
            backup_id="b1",
            kind="full",
            bytes_source=1,
            bytes_stored=1,
            dedup_ratio=1.0,
            duration_s=1.0,
            throughput_mb_s=1.0,
        )
        body = json.loads(ev.to_bytes())
        body["event_id"] = str(uuid.uuid4())
        assert REGISTRY.decode(json.dumps(body)).type == "BackupCompleted"
