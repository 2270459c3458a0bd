"""The embedded stack of ``emrdr up``: NATS, a sandbox PostgreSQL primary + replica, six services.

State lives under ``$EMRDR_HOME``:

- ``nats/``      JetStream store of the embedded nats-server
- ``pg/``        data directories of the sandbox cluster (resumed by the next ``emrdr up``)
- ``spool/wal/`` WAL segments pushed by ``archive_command`` (writable by PostgreSQL's OS user)
- ``repo/``      the backup repository
- ``keys/``      signing identities and the trust store
- ``logs/``      one log per process
- ``run/``       ``stack.json`` (how other commands find the running stack) and the lock

With configuration (an existing NATS URL, configured PostgreSQL nodes) the embedded parts are
not started and the services use what is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats

from emrdr.bus.runtime import SERVICE_NAMES
from emrdr.bus.topology import bootstrap
from emrdr.cli.wal import archive_command
from emrdr.config import Settings
from emrdr.natsserver import NatsServer
from emrdr.pg.instance import process_alive
from emrdr.pg.osuser import (
    OsUser,
    can_access_as,
    can_exec_as,
    current_user,
    ensure_os_user,
    is_root,
    make_dir,
)
from emrdr.pg.sandbox import SandboxCluster
from emrdr.security import TrustStore, ensure_identity


class StackError(RuntimeError):
    """The stack cannot start; the message says why and what to do."""


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0


@dataclass
class EmbeddedStack:
    settings: Settings
    n_replicas: int = 1
    with_services: bool = True
    say: Callable[[str], None] = print
    nats_server: NatsServer | None = None
    cluster: SandboxCluster | None = None
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    nats_url: str = ""
    started_at: float = 0.0

    # --- locations ----------------------------------------------------------------------
    @property
    def home(self) -> Path:
        return self.settings.home

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def lock_file(self) -> Path:
        return self.settings.run_dir / "up.pid"

    # --- start --------------------------------------------------------------------------
    def start(self) -> EmbeddedStack:
        self.started_at = time.monotonic()
        make_dir(self.home, current_user(), 0o755)
        for sub in ("run", "logs", "keys"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._start_nats()
            self._start_pg()
            self._ensure_identities()
            self._ensure_repository()
            self._write_state()
            if self.with_services:
                for name in SERVICE_NAMES:
                    self._spawn(name)
        except BaseException:
            self.stop()
            raise
        return self

    def _take_lock(self) -> None:
        lock = self.lock_file
        if lock.exists():
            try:
                pid = int(lock.read_text().strip())
            except ValueError:
                pid = 0
            if pid and pid != os.getpid() and process_alive(pid):
                raise StackError(
                    f"a stack is already running from {self.home} (pid {pid}); "
                    "stop it first (Ctrl-C in its terminal, or kill -TERM it)"
                )
        lock.write_text(str(os.getpid()))

    def _start_nats(self) -> None:
        if self.settings.nats.url:
            self.nats_url = self.settings.nats.url
            self.say(f"NATS          : using configured {self.nats_url}")
        else:
            previous = self.settings.stack_state() or {}
            port = previous.get("nats_port")
            server = NatsServer(
                self.home / "nats",
                port=int(port) if port else None,
                log_file=self.logs / "nats.log",
            )
            try:
                server.start()
            except (RuntimeError, TimeoutError):
                server = NatsServer(self.home / "nats", log_file=self.logs / "nats.log").start()
            self.nats_server = server
            self.nats_url = server.url
            self.say(f"NATS          : embedded nats-server {server.url} (pid {server.pid})")
        actions = asyncio.run(self._bootstrap())
        for action in actions:
            self.say(f"bus           : {action}")

    async def _bootstrap(self) -> list[str]:
        nc = await nats.connect(
            self.nats_url, user=self.settings.nats.user, password=self.settings.nats.password
        )
        try:
            return await bootstrap(nc.jetstream())
        finally:
            await nc.close()

    def pg_user(self) -> OsUser:
        return ensure_os_user(self.settings.pg.os_user) if is_root() else current_user()

    def _start_pg(self) -> None:
        if self.settings.pg.nodes:
            names = ", ".join(f"{n.name} {n.host}:{n.port}" for n in self.settings.pg.nodes)
            self.say(f"PostgreSQL    : using configured nodes {names}")
            return
        user = self.pg_user()
        spool = self.home / "spool"
        make_dir(spool, user, 0o770)
        make_dir(spool / "wal", user, 0o770)
        import emrdr.cli.wal as wal_module

        for needed, ok in (
            (Path(sys.executable), can_exec_as(user, Path(sys.executable))),
            (Path(wal_module.__file__), can_access_as(user, Path(wal_module.__file__), "r")),
        ):
            if not ok:
                raise StackError(
                    f"PostgreSQL runs as OS user {user.name}, who cannot use {needed} for "
                    "archive_command; put the virtual environment and the checkout where that "
                    "user can read them (see README)"
                )
        archive = archive_command(self.home)
        cluster = SandboxCluster(
            self.home / "pg",
            n_replicas=self.n_replicas,
            archive_command=archive,
            archive_timeout=60,
            bindir=self.settings.pg.bindir,
            os_user=user,
        )
        resumed = (self.home / "pg").exists() and any((self.home / "pg").iterdir())
        cluster.start()
        cluster.wait_replicas_streaming(timeout=60)
        self.cluster = cluster
        for node in cluster.nodes():
            self.say(
                f"PostgreSQL    : {node.name:<13} {node.role:<8} {node.host}:{node.port} "
                f"{node.data_dir}{' (resumed)' if resumed else ''}"
            )

    def _ensure_identities(self) -> None:
        trust = TrustStore(self.settings.keys_dir / "trust")
        for name in SERVICE_NAMES:
            ensure_identity(self.settings.keys_dir, name, "system", trust)
        ensure_identity(self.settings.keys_dir, self.settings.actor, "dba", trust)

    def _ensure_repository(self) -> None:
        """The sandbox's repository key (unless one is configured) and an initialised repo."""
        from emrdr.engine.repository import ensure_sandbox_key, open_repository

        ensure_sandbox_key(self.settings)
        repo = open_repository(self.settings, create=True)
        self.say(
            f"repository    : {repo.storage.describe()} (key {repo.keyring.active.id}, "
            f"zstd {self.settings.repo.zstd_level})"
        )

    def _write_state(self) -> None:
        nodes = self.cluster.nodes() if self.cluster else list(self.settings.pg.nodes)
        state: dict[str, Any] = {
            "pid": os.getpid(),
            "started_at": datetime.now(UTC).isoformat(),
            "nats_url": self.nats_url,
            "nats_port": self.nats_server.port if self.nats_server else None,
            "nats_pid": self.nats_server.pid if self.nats_server else None,
            "pg_nodes": [n.model_dump(mode="json") for n in nodes],
            "repository": str(self.settings.repo_path),
            "home": str(self.home),
        }
        tmp = self.settings.stack_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.settings.stack_file)

    # --- services -----------------------------------------------------------------------
    def _spawn(self, name: str) -> None:
        sp = self.services.setdefault(name, ServiceProcess(name))
        env = dict(os.environ)
        env["EMRDR_HOME"] = str(self.home)
        env.setdefault("EMRDR_NATS__URL", self.nats_url)
        env["EMRDR_PARENT_PID"] = str(os.getpid())  # services stop if `up` dies
        log = (self.logs / f"{name}.log").open("ab")
        try:
            sp.proc = subprocess.Popen(
                [sys.executable, "-m", "emrdr.cli.main", "service", name],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()

    def supervise_once(self) -> list[str]:
        """Restart services that died (with back-off); returns what was done."""
        done: list[str] = []
        now = time.monotonic()
        for name, sp in self.services.items():
            if sp.proc is None or sp.proc.poll() is None:
                continue
            if sp.next_start == 0.0:
                sp.next_start = now + min(30.0, 2.0**sp.restarts)
                done.append(
                    f"service {name} exited with code {sp.proc.returncode}; "
                    f"restarting (see {self.logs / (name + '.log')})"
                )
            elif now >= sp.next_start:
                sp.restarts += 1
                sp.next_start = 0.0
                self._spawn(name)
        return done

    def wait_services_alive(
        self, timeout: float = 60.0, stop: threading.Event | None = None
    ) -> dict[str, bool]:
        """Wait until every service heartbeats (reads the heartbeat bucket), or ``stop``."""
        from emrdr.cli.status import collect_status

        deadline = time.monotonic() + timeout
        alive: dict[str, bool] = {}
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            with contextlib.suppress(Exception):
                status = asyncio.run(collect_status())
                alive = {k: v["alive"] for k, v in status["services"].items()}
                if alive and all(alive.values()):
                    return alive
            self.supervise_once()
            time.sleep(0.5)
        return alive

    # --- stop ---------------------------------------------------------------------------
    def stop(self) -> None:
        for sp in self.services.values():
            if sp.proc is not None and sp.proc.poll() is None:
                sp.proc.send_signal(signal.SIGTERM)
        for sp in self.services.values():
            if sp.proc is None:
                continue
            try:
                sp.proc.wait(15)
            except subprocess.TimeoutExpired:
                sp.proc.kill()
                sp.proc.wait(5)
        if self.cluster is not None:
            try:
                self.cluster.stop()
            except Exception as exc:
                self.say(f"PostgreSQL    : stop reported: {exc}")
        if self.nats_server is not None:
            self.nats_server.stop()
        # Stopping twice (a signal during start, then the caller's cleanup) is harmless.
        self.services, self.cluster, self.nats_server = {}, None, None
        with contextlib.suppress(FileNotFoundError):
            self.settings.stack_file.unlink()
        with contextlib.suppress(FileNotFoundError):
            if self.lock_file.read_text().strip() == str(os.getpid()):
                self.lock_file.unlink()

    def run_forever(self, stop: threading.Event) -> None:
        """Supervise until ``stop`` is set (see :func:`stop_on_signals`), then stop cleanly."""
        try:
            while not stop.is_set():
                for line in self.supervise_once():
                    self.say(line)
                stop.wait(0.5)
        finally:
            self.say("stopping: services, PostgreSQL, NATS ...")
            self.stop()
            self.say("stopped cleanly")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT for as long as the block runs.

    The handlers only set the event (raising from a handler can be swallowed by whatever code
    it interrupts, e.g. an asyncio task); long waits check it.
    """
    stop = threading.Event()

    def _set(signum: int, frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _set) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
