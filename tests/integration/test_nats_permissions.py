"""The shipped NATS permissions, on a real nats-server: AUDIT is append-only for all but admin.

The server runs ``compose/nats-server.conf`` itself, reduced to one local node (cluster block
and monitoring port removed; listen address and store directory from the command line), with
the production ``compose/nats-auth.conf`` beside it and random passwords in the environment.
Denied calls are expected to fail within ``DENIED_TIMEOUT`` seconds, with the server reporting a
permissions violation for the subject: a denial is proven, not inferred from slowness.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import APIError

from emrdr.bus.topology import AUDIT_ENTRY_SUBJECT, AUDIT_STREAM, bootstrap
from emrdr.messages.base import REGISTRY, Command
from emrdr.natsserver import NatsServer, free_port
from emrdr.security import POLICY

pytestmark = pytest.mark.nats

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
PROD_CONF = COMPOSE / "nats-server.conf"
AUTH_CONF = COMPOSE / "nats-auth.conf"

DENIED_TIMEOUT = 1.5
ADMIN = "admin"
AUDIT_LOGGER = "audit-logger"
PEOPLE = ("backup_operator", "dba", "compliance_officer", "emergency_responder")


# --- deriving the test configuration from the production one -----------------------------------
def find_block(text: str, key: str, top_level: bool = True) -> tuple[int, int]:
    """Start and end offsets of the ``key { ... }`` block in ``text`` (braces matched,
    comments skipped)."""
    anchor = "^" if top_level else r"^\s*"
    match = re.search(rf"{anchor}{re.escape(key)}\s*\{{", text, flags=re.MULTILINE)
    if match is None:
        raise ValueError(f"no {key!r} block in the configuration")
    depth = 0
    for i in range(match.end() - 1, len(text)):
        line_start = text.rfind("\n", 0, i) + 1
        if "#" in text[line_start:i]:
            continue  # inside a comment
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return match.start(), i + 1
    raise ValueError(f"unbalanced braces in the {key!r} block")


def strip_block(text: str, key: str) -> str:
    """``text`` without the top-level ``key { ... }`` block."""
    start, end = find_block(text, key)
    return text[:start] + text[end:]


def single_node_config(prod: str, http_port: int) -> str:
    """The production node configuration as one local node: no cluster, loopback monitoring,
    listen address and store directory left to the command line."""
    text = strip_block(prod, "cluster")
    text, n = re.subn(r"^http:.*$", f"http: 127.0.0.1:{http_port}", text, flags=re.MULTILINE)
    if n != 1:
        raise ValueError("expected exactly one 'http:' line in the production configuration")
    # The store directory comes from the command line (-sd); nats-server refuses both.
    text, n = re.subn(r"^\s*store_dir:.*\n", "", text, flags=re.MULTILINE)
    if n != 1:
        raise ValueError("expected exactly one 'store_dir:' line in the production configuration")
    return text


def user_names(auth: str) -> list[str]:
    """Users of the EMRDR account (the SYS account's user has no JetStream there)."""
    start, end = find_block(auth, "EMRDR", top_level=False)
    return re.findall(r'\{\s*user:\s*"([^"]+)"', auth[start:end])


def password_variables(auth: str) -> list[str]:
    return sorted(set(re.findall(r"\$(NATS_[A-Z0-9_]+_PASSWORD)\b", auth)))


def password_variable(user: str) -> str:
    return "NATS_" + re.sub(r"[^A-Z0-9]", "_", user.upper()) + "_PASSWORD"


# --- the server and clients --------------------------------------------------------------------
@dataclass
class Secured:
    url: str
    passwords: dict[str, str]
    users: list[str]
    log: Path


@dataclass
class Session:
    user: str
    nc: Client
    errors: list[str] = field(default_factory=list)

    def js(self, timeout: float = DENIED_TIMEOUT) -> JetStreamContext:
        return self.nc.jetstream(timeout=timeout)

    def violations(self, subject: str) -> list[str]:
        wanted = subject.lower()  # nats-py lower-cases the server's -ERR text
        return [e for e in self.errors if "permissions violation" in e.lower() and wanted in e]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("nats-perms")
    auth = AUTH_CONF.read_text()
    shutil.copy(AUTH_CONF, tmp / AUTH_CONF.name)
    conf = tmp / "nats-server.conf"
    conf.write_text(single_node_config(PROD_CONF.read_text(), free_port()))
    users = user_names(auth)
    passwords = {var: secrets.token_hex(24) for var in password_variables(auth)}
    log = tmp / "nats.log"
    with pytest.MonkeyPatch.context() as env:
        for var, value in passwords.items():
            env.setenv(var, value)
        env.setenv("NATS_SERVER_NAME", "nats-test")
        server = NatsServer(tmp / "js", config_file=conf, log_file=log).start()
    try:
        yield Secured(server.url, passwords, users, log)
    finally:
        server.stop()


async def login(secured: Secured, user: str) -> Session:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        secured.url,
        user=user,
        password=secured.passwords[password_variable(user)],
        allow_reconnect=False,
        error_cb=on_error,
    )
    return Session(user, nc, errors)


@pytest.fixture(scope="module")
async def sessions(secured: Secured) -> AsyncIterator[dict[str, Session]]:
    """One connection per user of the EMRDR account, streams bootstrapped by admin, and one
    audit entry written by the audit-logger."""
    logged_in = {u: await login(secured, u) for u in secured.users}
    try:
        await bootstrap(logged_in[ADMIN].js(timeout=10.0))
        await logged_in[AUDIT_LOGGER].js(timeout=5.0).publish(AUDIT_ENTRY_SUBJECT, b'{"seq":1}')
        yield logged_in
    finally:
        for s in logged_in.values():
            await s.nc.close()


async def outcome(call: Awaitable[Any]) -> BaseException | None:
    """None when the call succeeded, else the exception it raised. Bounded in time: nats-py's
    ``delete_msg`` ignores the JetStream context's timeout and would wait 5 s."""
    try:
        await asyncio.wait_for(call, DENIED_TIMEOUT + 0.5)
    except Exception as exc:
        return exc
    return None


async def audit_config(admin: Session) -> StreamConfig:
    info = await admin.js(timeout=5.0).stream_info(AUDIT_STREAM)
    return info.config


def non_admins(sessions: dict[str, Session]) -> list[Session]:
    return [s for u, s in sessions.items() if u != ADMIN]


# --- the proofs -------------------------------------------------------------------------------
def test_config_is_derived_from_production(secured: Secured) -> None:
    """The test node runs the shipped rules: every user of nats-auth.conf, sync_interval always."""
    prod = PROD_CONF.read_text()
    assert 'include "nats-auth.conf"' in prod
    assert re.search(r"^\s*sync_interval:\s*always", prod, flags=re.MULTILINE)
    assert {ADMIN, AUDIT_LOGGER, *PEOPLE} <= set(secured.users)
    assert {"scheduler", "backup-worker", "verifier", "replication-monitor",
            "dr-coordinator"} <= set(secured.users)
    derived = single_node_config(prod, 1)
    assert "nats-route://" not in derived
    assert not re.search(r"^cluster\s*\{", derived, flags=re.MULTILINE)


async def test_non_admins_cannot_delete_update_purge_or_erase_audit(
    sessions: dict[str, Session],
) -> None:
    """Every user but admin (services, people, the audit-logger itself) is refused delete,
    update (shrinking max_age), purge and message delete on AUDIT."""
    admin = sessions[ADMIN]
    before = await audit_config(admin)
    count_before = (await admin.js(5.0).stream_info(AUDIT_STREAM)).state.messages
    assert count_before >= 1
    shrunk = replace(before, max_age=60.0)
    attempts: dict[tuple[str, str], Awaitable[Any]] = {}
    for s in non_admins(sessions):
        js = s.js()
        attempts[(s.user, "STREAM.DELETE")] = js.delete_stream(AUDIT_STREAM)
        attempts[(s.user, "STREAM.UPDATE")] = js.update_stream(shrunk)
        attempts[(s.user, "STREAM.PURGE")] = js.purge_stream(AUDIT_STREAM)
        attempts[(s.user, "STREAM.MSG.DELETE")] = js.delete_msg(AUDIT_STREAM, 1)
    results = await asyncio.gather(*(outcome(call) for call in attempts.values()))
    allowed = [key for key, exc in zip(attempts, results, strict=True) if exc is None]
    assert not allowed, f"allowed on AUDIT (must be admin-only): {allowed}"
    for (user, op), exc in zip(attempts, results, strict=True):
        assert isinstance(exc, TimeoutError), f"{user} {op}: {exc!r}"
        subject = f"$JS.API.{op}.{AUDIT_STREAM}"
        assert sessions[user].violations(subject), f"no permissions violation for {user} {op}"
    after = await audit_config(admin)
    assert after.max_age == before.max_age
    assert (await admin.js(5.0).stream_info(AUDIT_STREAM)).state.messages == count_before


async def test_only_the_audit_logger_writes_audit_entries(sessions: dict[str, Session]) -> None:
    """A JetStream publish to emrdr.audit.entry is acknowledged for the audit-logger only; for
    every other user, admin included, it times out and the server reports the violation."""
    ack = await sessions[AUDIT_LOGGER].js(5.0).publish(AUDIT_ENTRY_SUBJECT, b'{"seq":2}')
    assert ack.stream == AUDIT_STREAM
    others = [s for u, s in sessions.items() if u != AUDIT_LOGGER]
    results = await asyncio.gather(
        *(outcome(s.js().publish(AUDIT_ENTRY_SUBJECT, b"forged")) for s in others)
    )
    for s, exc in zip(others, results, strict=True):
        assert isinstance(exc, TimeoutError), f"{s.user} wrote an audit entry"
        assert s.violations(AUDIT_ENTRY_SUBJECT), f"no permissions violation for {s.user}"


async def test_compliance_officer_reads_audit_and_publishes_no_command(
    sessions: dict[str, Session],
) -> None:
    """Read-only: stream info, message get and an ordered consumer over AUDIT work; no command
    subject accepts a publish."""
    officer = sessions["compliance_officer"]
    js = officer.js(5.0)
    info = await js.stream_info(AUDIT_STREAM)
    assert info.state.messages >= 1
    first = await js.get_msg(AUDIT_STREAM, 1)
    assert first.data == b'{"seq":1}'
    sub = await js.subscribe("emrdr.audit.>", ordered_consumer=True)
    try:
        msg = await sub.next_msg(timeout=5.0)
        assert msg.data == b'{"seq":1}'
    finally:
        await sub.unsubscribe()
    subjects = [cls.subject for cls in REGISTRY if issubclass(cls, Command)]
    assert subjects
    results = await asyncio.gather(*(outcome(officer.js().publish(s, b"{}")) for s in subjects))
    accepted = [s for s, exc in zip(subjects, results, strict=True) if exc is None]
    assert not accepted, f"compliance officer published commands: {accepted}"


def expected_nats_allowance(role: str, command: str) -> bool:
    """The NATS layer mirrors emrdr.security.POLICY, except that the compliance officer is
    read-only on the bus (POLICY lets that role sign CheckIntegrity; NATS does not carry it)."""
    if role == "compliance_officer":
        return False
    return command in POLICY[role]


async def test_people_publish_exactly_their_roles_commands(sessions: dict[str, Session]) -> None:
    """For each role and command: the JetStream publish is acknowledged iff the role may issue
    it (POLICY), e.g. backup operators only backup/verify/retention/observe, emergency
    responders the dr commands, DBAs everything but DR-site activation."""
    commands = [cls for cls in REGISTRY if issubclass(cls, Command)]
    cases = [(role, cls.__name__, cls.subject) for role in PEOPLE for cls in commands]
    results = await asyncio.gather(
        *(outcome(sessions[role].js().publish(subject, b"{}")) for role, _, subject in cases)
    )
    wrong = [
        f"{role} {name}: {'allowed' if exc is None else 'denied'}"
        for (role, name, _), exc in zip(cases, results, strict=True)
        if (exc is None) != expected_nats_allowance(role, name)
    ]
    assert not wrong, "NATS permissions disagree with the role policy:\n" + "\n".join(wrong)


async def test_services_do_their_work_but_not_each_others(sessions: dict[str, Session]) -> None:
    """A service can consume and ack a command and write its heartbeat; it cannot write
    another service's bucket or create a stream (a stream's republish could forge audit
    entries)."""
    worker = sessions["backup-worker"]
    js = worker.js(5.0)
    await sessions["scheduler"].js(5.0).publish("emrdr.cmd.backup.start", b"{}")
    sub = await js.pull_subscribe("emrdr.cmd.backup.>", durable="perm-test-backup")
    msgs = await sub.fetch(1, timeout=5.0)
    await msgs[0].ack_sync(timeout=5.0)
    beats = await js.key_value("emrdr_heartbeats")
    await beats.put("backup-worker.test", b"{}")
    await (await sessions["dr-coordinator"].js(5.0).key_value("emrdr_leases")).put("x", b"1")
    leases = await worker.js().key_value("emrdr_leases")
    denied = await asyncio.gather(
        outcome(leases.put("coordinator", b"stolen")),
        outcome(worker.js().add_stream(
            StreamConfig(name="FORGE", subjects=["forge.>"])
        )),
    )
    assert all(isinstance(exc, TimeoutError) for exc in denied), denied


async def test_admin_can_reconfigure_audit_but_not_erase_it(sessions: dict[str, Session]) -> None:
    """The denials above are by user: admin may update AUDIT's config. Message delete and purge
    are refused even to admin by the stream's own deny_delete / deny_purge."""
    admin = sessions[ADMIN]
    js = admin.js(5.0)
    original = await audit_config(admin)
    try:
        updated = await js.update_stream(replace(original, max_age=3600.0))
        assert updated.config.max_age == 3600.0
    finally:
        restored = await js.update_stream(original)
        assert restored.config.max_age == original.max_age
    with pytest.raises(APIError):
        await js.delete_msg(AUDIT_STREAM, 1)
    with pytest.raises(APIError):
        await js.purge_stream(AUDIT_STREAM)
    assert (await js.get_msg(AUDIT_STREAM, 1)).data == b'{"seq":1}'
