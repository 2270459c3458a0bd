"""The audit chain in a real JetStream AUDIT stream: append, read, export, tamper, race.

The AUDIT stream is shared by the whole test session: tests check the chain as a whole and look
only at the entries they added.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from emrdr.audit.chain import GENESIS_HASH, AuditEntry, verify_chain
from emrdr.audit.log import AuditWriter, export_jsonl, load_jsonl, read_entries
from emrdr.bus.topology import AUDIT_STREAM, audit_stream
from emrdr.cli.main import main
from emrdr.config import get_settings
from emrdr.messages.base import Issuer
from emrdr.messages.commands import StartRestore
from emrdr.messages.events import BackupCompleted, CommandReceived

pytestmark = pytest.mark.nats


def run_cli(argv: list[str]) -> int:
    """The real ``emrdr`` entry point, in-process."""
    return main(argv)


def completed(tag: str) -> BackupCompleted:
    return BackupCompleted(
        source="backup-worker",
        backup_id=f"{tag}",
        kind="full",
        bytes_source=2048,
        bytes_stored=512,
        dedup_ratio=4.0,
        duration_s=1.5,
        throughput_mb_s=1.3,
    )


def denied(actor: str) -> CommandReceived:
    cmd = StartRestore(issuer=Issuer(actor=actor, role="backup_operator"), backup_id="b-x")
    return CommandReceived(
        source="backup-worker",
        command_type=cmd.type,
        command_id=str(cmd.event_id),
        command_subject=cmd.subject,
        issuer=cmd.issuer,
        authorized=False,
        reason="role backup_operator may not restore",
        command=cmd.model_dump(mode="json"),
    )


def mine(entries: list[AuditEntry], ids: set[str]) -> list[AuditEntry]:
    return [e for e in entries if e.message_id in ids]


@pytest.fixture
def cli_env(bootstrapped: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point the CLI's settings at the test server."""
    monkeypatch.setenv("EMRDR_NATS__URL", bootstrapped)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
async def scratch_js(nc: Client) -> AsyncIterator[tuple[JetStreamContext, str, str]]:
    """A fresh, empty stream shaped like AUDIT (for genesis and volume tests)."""
    js = nc.jetstream()
    tag = uuid.uuid4().hex[:8]
    cfg = audit_stream()
    cfg.name = f"AUDIT_SCRATCH_{tag}"
    subject = f"scratch.{tag}.audit.entry"
    cfg.subjects = [f"scratch.{tag}.audit.>"]
    cfg.deny_delete = cfg.deny_purge = False
    await js.add_stream(cfg)
    try:
        yield js, cfg.name, subject
    finally:
        await js.delete_stream(cfg.name)


async def test_append_read_verify(nc: Client) -> None:
    """Appended entries read back in order, linked to each other, and the chain verifies."""
    js = nc.jetstream()
    writer = AuditWriter(js)
    await writer.start()
    messages = [completed(f"b-{i}") for i in range(20)] + [denied("op.tom")]
    appended = [await writer.append_message(m) for m in messages]
    assert [e.index for e in appended] == list(
        range(appended[0].index, appended[0].index + len(appended))
    )
    for prev, entry in itertools.pairwise(appended):
        assert entry.prev_hash == prev.hash

    entries = await read_entries(js)
    report = verify_chain(entries)
    assert report.ok, report.reason
    ids = {str(m.event_id) for m in messages}
    assert mine(entries, ids) == appended
    assert appended[-1].outcome == "denied"
    assert appended[-1].action == "StartRestore"


async def test_genesis_and_fast_read(scratch_js: tuple[JetStreamContext, str, str]) -> None:
    """An empty stream starts at genesis; a thousand entries read back in well under seconds."""
    js, stream, subject = scratch_js
    assert await read_entries(js, stream=stream, subject=subject) == []
    writer = AuditWriter(js, stream=stream, subject=subject)
    await writer.start()
    assert (writer.next_index, writer.last_hash) == (0, GENESIS_HASH)
    first = await writer.append_message(completed("g-0"))
    assert (first.index, first.prev_hash) == (0, GENESIS_HASH)
    for i in range(1, 1000):
        await writer.append_message(completed(f"g-{i}"))

    started = time.perf_counter()
    entries = await read_entries(js, stream=stream, subject=subject)
    elapsed = time.perf_counter() - started
    assert len(entries) == 1000
    assert verify_chain(entries).ok
    assert elapsed < 3.0, f"reading 1000 entries took {elapsed:.2f}s"

    # A new writer picks up the tail where the first left it.
    second = AuditWriter(js, stream=stream, subject=subject)
    await second.start()
    assert (second.next_index, second.last_hash) == (1000, entries[-1].hash)
    later = await read_entries(js, start_seq=999, stream=stream, subject=subject)
    assert [e.index for e in later] == [998, 999]


async def test_redelivered_message_stored_once(nc: Client) -> None:
    """The same event appended twice (even by another writer) is stored once."""
    js = nc.jetstream()
    writer, other = AuditWriter(js), AuditWriter(js)
    await writer.start()
    await other.start()
    msg = completed("dup")
    stored = await writer.append_message(msg)
    next_index = writer.next_index
    assert await writer.append_message(msg) == stored
    assert writer.next_index == next_index
    assert await other.append_message(msg) == stored

    raw = b"\xff not json"
    bad = await writer.append_malformed("emrdr.evt.bogus", raw, "message is not JSON")
    assert await other.append_malformed("emrdr.evt.bogus", raw, "message is not JSON") == bad

    entries = await read_entries(js)
    assert verify_chain(entries).ok
    assert len(mine(entries, {str(msg.event_id)})) == 1
    assert [e.hash for e in entries].count(bad.hash) == 1
    assert bad.action == "MalformedMessage"


async def test_concurrent_writers_make_one_chain(bootstrapped: str) -> None:
    """Two writers on separate connections racing for the tail produce one unbroken chain."""
    conns = [await nats.connect(bootstrapped) for _ in range(2)]
    try:
        writers = [AuditWriter(c.jetstream()) for c in conns]
        for w in writers:
            await w.start()
        batches = [[completed(f"w{n}-{i}") for i in range(40)] for n in range(2)]

        async def run(writer: AuditWriter, batch: list[BackupCompleted]) -> list[AuditEntry]:
            return [await writer.append_message(m) for m in batch]

        results = await asyncio.gather(*(run(w, b) for w, b in zip(writers, batches, strict=True)))
        entries = await read_entries(conns[0].jetstream())
    finally:
        for c in conns:
            await c.close()
    report = verify_chain(entries)
    assert report.ok, report.reason
    ids = {str(m.event_id) for batch in batches for m in batch}
    stored = mine(entries, ids)
    assert len(stored) == 80
    assert sorted(e.index for r in results for e in r) == sorted(e.index for e in stored)


def tamper(lines: list[str], how: str, at: int) -> tuple[list[str], str]:
    """Damage an export the way an attacker might; returns the lines and the expected reason."""
    out = list(lines)
    if how == "alter":
        entry = json.loads(out[at])
        entry["actor"] = "mallory"
        out[at] = json.dumps(entry)
        return out, f"entry {at}: hash does not match its contents"
    if how == "remove":
        del out[at]
        return out, f"entry {at}: index {at + 1} out of order"
    if how == "swap":
        out[at], out[at + 1] = out[at + 1], out[at]
        return out, f"entry {at}: index {at + 1} out of order"
    if how == "prev_hash":
        entry = json.loads(out[at])
        entry["prev_hash"] = "e" * 64
        out[at] = json.dumps(entry)
        return out, f"entry {at}: hash does not match its contents"
    raise ValueError(how)


async def test_export_tamper_verify_file(
    nc: Client, cli_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`emrdr audit export` then `audit verify --file`: every kind of tampering is caught."""
    js = nc.jetstream()
    writer = AuditWriter(js)
    await writer.start()
    added = [await writer.append_message(completed(f"t-{i}")) for i in range(5)]
    victim = added[2].index

    export = tmp_path / "audit.jsonl"
    assert await asyncio.to_thread(run_cli, ["audit", "export", "--out", str(export)]) == 0
    assert "chain OK" in capsys.readouterr().out
    entries = load_jsonl(export)
    assert entries[victim] == added[2]
    assert run_cli(["audit", "verify", "--file", str(export)]) == 0
    assert "audit trail OK" in capsys.readouterr().out

    lines = export.read_text().splitlines()
    for how in ("alter", "remove", "swap", "prev_hash"):
        damaged, reason = tamper(lines, how, victim)
        path = tmp_path / f"{how}.jsonl"
        path.write_text("\n".join(damaged) + "\n")
        assert run_cli(["audit", "verify", "--file", str(path), "--json"]) == 1, how
        report = json.loads(capsys.readouterr().out)
        assert (report["first_bad_index"], report["reason"]) == (victim, reason), how
        assert run_cli(["audit", "verify", "--file", str(path)]) == 1
        assert f"BROKEN at entry {victim}" in capsys.readouterr().out


async def test_cli_live_verify_and_query(
    nc: Client, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`emrdr audit verify` and `audit query` read the live stream."""
    writer = AuditWriter(nc.jetstream())
    actor = f"op.{uuid.uuid4().hex[:6]}"
    entry = await writer.append_message(denied(actor))

    assert await asyncio.to_thread(run_cli, ["audit", "verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["count"] >= entry.index + 1

    argv = ["audit", "query", "--actor", actor, "--outcome", "denied", "--json"]
    assert await asyncio.to_thread(run_cli, argv) == 0
    found = json.loads(capsys.readouterr().out)
    assert [(e["index"], e["action"], e["hash"]) for e in found] == [
        (entry.index, "StartRestore", entry.hash)
    ]
    since = entry.at.strftime("%Y-%m-%dT%H:%M:%S+00:00")
    argv = ["audit", "query", "--actor", actor, "--since", since, "--limit", "5"]
    assert await asyncio.to_thread(run_cli, argv) == 0
    out = capsys.readouterr().out
    assert actor in out and "1 entry" in out and "since " in out


async def test_export_file_round_trip(nc: Client, tmp_path: Path) -> None:
    entries = await read_entries(nc.jetstream())
    path = tmp_path / "copy.jsonl"
    assert export_jsonl(entries, path) == len(entries)
    assert load_jsonl(path) == entries
    info = await nc.jetstream().stream_info(AUDIT_STREAM)
    assert info.config.deny_delete and info.config.deny_purge
