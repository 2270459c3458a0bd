"""One local PostgreSQL 15 server (a "node") managed through its own binaries.

A :class:`PgInstance` owns a base directory::

    <base_dir>/data/             the data directory (PGDATA)
    <base_dir>/run/              unix socket directory
    <base_dir>/postgresql.log    server log (pg_ctl -l)

Settings emrdr manages live in ``data/emrdr.conf``, included from ``postgresql.conf``; a standby's
upstream (``primary_conninfo``, ``primary_slot_name``) is kept there too, so re-pointing a replica
is an edit of one file.  Every program runs as the OS user from :mod:`emrdr.pg.osuser`.

Sandbox servers trust loopback connections (``initdb --auth=trust``): they are for local
development, tests and restore drills, never for patient data on a shared host.

    primary = PgInstance(base / "pg-primary", port=54321, name="pg-primary")
    primary.initdb(); primary.configure(); primary.start()
    replica = primary.create_replica(base / "pg-replica-1", "pg-replica-1", 54322)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import asyncpg

from emrdr.config import default_pg_bindir
from emrdr.pg.osuser import OsUser, ensure_os_user, make_dir, run_as

__all__ = [
    "CONF_FILE",
    "PgError",
    "PgInstance",
    "child_pids",
    "parse_conf",
    "process_alive",
    "quote_guc",
    "render_conf",
    "sandbox_gucs",
    "slot_name_for",
]

CONF_FILE = "emrdr.conf"
_INCLUDE_LINE = f"include_if_exists = '{CONF_FILE}'"
GucValue = str | int | float | bool


class PgError(RuntimeError):
    """A PostgreSQL program failed; the message names the node and carries the evidence."""


# --- pure helpers -------------------------------------------------------------------------


def quote_guc(value: GucValue) -> str:
    """Render one setting value for a configuration file."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.]*$")


def render_conf(gucs: Mapping[str, GucValue]) -> str:
    """Render settings as ``name = value`` lines, in the order given."""
    lines = ["# Managed by emrdr: edits here are overwritten.", ""]
    for name, value in gucs.items():
        if not _NAME_RE.match(name):
            raise ValueError(f"not a PostgreSQL setting name: {name!r}")
        lines.append(f"{name} = {quote_guc(value)}")
    return "\n".join(lines) + "\n"


_LINE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=?\s*(.*?)\s*$")


def _unquote(raw: str) -> str:
    if raw.startswith("'"):
        out: list[str] = []
        i = 1
        while i < len(raw):
            ch = raw[i]
            if ch == "'" and i + 1 < len(raw) and raw[i + 1] == "'":
                out.append("'")
                i += 2
                continue
            if ch == "\\" and i + 1 < len(raw):
                out.append(raw[i + 1])
                i += 2
                continue
            if ch == "'":
                break
            out.append(ch)
            i += 1
        return "".join(out)
    return raw.split("#", 1)[0].strip()


def parse_conf(text: str) -> dict[str, str]:
    """Parse ``name = value`` lines (as :func:`render_conf` writes them); later lines win."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _LINE_RE.match(stripped)
        if m:
            result[m.group(1)] = _unquote(m.group(2))
    return result


def sandbox_gucs(
    *,
    name: str,
    port: int,
    socket_dir: Path,
    host: str = "127.0.0.1",
    archive_command: str = "true",
    archive_timeout: int = 60,
) -> dict[str, GucValue]:
    """The settings every sandbox node runs with (replication-ready, archiving on)."""
    return {
        "cluster_name": name,
        "listen_addresses": host,
        "port": port,
        "unix_socket_directories": str(socket_dir),
        "max_connections": 50,
        "shared_buffers": "128MB",
        "wal_level": "replica",
        "max_wal_senders": 10,
        "max_replication_slots": 10,
        "hot_standby": True,
        "hot_standby_feedback": True,
        "wal_log_hints": True,
        "archive_mode": True,
        "archive_command": archive_command,
        "archive_timeout": archive_timeout,
        "log_line_prefix": "%m [%p] %q%u@%d ",
        "log_timezone": "UTC",
        "log_checkpoints": True,
    }


def slot_name_for(node_name: str) -> str:
    """A replication slot name for a node (lower-case letters, digits and underscores)."""
    slot = re.sub(r"[^a-z0-9_]", "_", node_name.lower())
    return slot[:63] or "replica"


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        stat_text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat_text.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    out: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


# --- the instance -------------------------------------------------------------------------


class PgInstance:
    """One PostgreSQL server in ``base_dir`` listening on ``host:port``."""

    def __init__(
        self,
        base_dir: Path,
        port: int,
        name: str,
        *,
        host: str = "127.0.0.1",
        bindir: Path | None = None,
        os_user: OsUser | None = None,
        superuser: str = "postgres",
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.port = port
        self.name = name
        self.host = host
        self.bindir = Path(bindir) if bindir is not None else default_pg_bindir()
        self.superuser = superuser
        self._user = os_user

    def __repr__(self) -> str:
        return f"PgInstance(name={self.name!r}, port={self.port}, base_dir={str(self.base_dir)!r})"

    # --- locations ----------------------------------------------------------------------
    @property
    def user(self) -> OsUser:
        """The OS user the server runs as (resolved from settings on first use)."""
        if self._user is None:
            from emrdr.config import get_settings

            self._user = ensure_os_user(get_settings().pg.os_user)
        return self._user

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "run"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "postgresql.log"

    @property
    def conf_file(self) -> Path:
        return self.data_dir / CONF_FILE

    @property
    def is_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    @property
    def is_standby(self) -> bool:
        """Whether the data directory is set up to start as a standby (``standby.signal``)."""
        return (self.data_dir / "standby.signal").exists()

    @property
    def conninfo(self) -> str:
        return f"host={self.host} port={self.port} user={self.superuser} dbname=postgres"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.superuser}@{self.host}:{self.port}/{database}"

    def bin(self, program: str) -> str:
        path = self.bindir / program
        if not path.exists():
            raise PgError(
                f"{program} not found in {self.bindir}: install PostgreSQL 15 server binaries "
                "or set EMRDR_PG_BINDIR"
            )
        return str(path)

    # --- running programs ---------------------------------------------------------------
    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def _run(
        self, args: list[str], *, timeout: float = 120.0, what: str, with_log: bool = False
    ) -> subprocess.CompletedProcess[str]:
        try:
            return run_as(self.user, args, cwd=self.base_dir, timeout=timeout)
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or exc.stdout or "").strip()
            msg = f"{what} failed for {self.name} (exit {exc.returncode}): {detail}"
            if with_log:
                msg += f"\n--- last lines of {self.log_file} ---\n{self.log_tail()}"
            raise PgError(msg) from exc
        except subprocess.TimeoutExpired as exc:
            msg = f"{what} for {self.name} did not finish within {timeout}s"
            if with_log:
                msg += f"\n--- last lines of {self.log_file} ---\n{self.log_tail()}"
            raise PgError(msg) from exc

    def _prepare_dirs(self) -> None:
        make_dir(self.base_dir, self.user, 0o755)
        make_dir(self.socket_dir, self.user, 0o755)

    def _write_owned(self, path: Path, text: str, mode: int = 0o600) -> None:
        path.write_text(text)
        if not self.user.is_current:
            os.chown(path, self.user.uid, self.user.gid)
        path.chmod(mode)

    # --- lifecycle ----------------------------------------------------------------------
    def initdb(self) -> None:
        """Create a new data directory (checksums on, UTF8, C locale, trust auth on loopback)."""
        if self.is_initialized:
            raise PgError(f"{self.name}: {self.data_dir} is already initialised")
        self._prepare_dirs()
        make_dir(self.data_dir, self.user, 0o700)
        self._run(
            [
                self.bin("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.superuser,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-k",
                "--no-instructions",
            ],
            what="initdb",
        )

    def read_conf(self) -> dict[str, str]:
        """Settings currently in ``emrdr.conf`` (empty if none)."""
        try:
            return parse_conf(self.conf_file.read_text())
        except FileNotFoundError:
            return {}

    def configure(
        self,
        *,
        archive_command: str | None = None,
        archive_timeout: int | str | None = None,
        **gucs: GucValue | None,
    ) -> None:
        """Write ``emrdr.conf``: sandbox defaults, then what is already there, then ``gucs``.

        A ``None`` value removes a setting.  Takes effect at the next start or :meth:`reload`
        (``port`` and a few others only at restart).
        """
        if not self.is_initialized:
            raise PgError(f"{self.name}: configure() before initdb() ({self.data_dir} is empty)")
        current = self.read_conf()
        merged: dict[str, GucValue] = dict(
            sandbox_gucs(
                name=self.name,
                port=self.port,
                socket_dir=self.socket_dir,
                host=self.host,
            )
        )
        # Keep managed identity settings from this object, everything else from the file.
        identity = {"cluster_name", "port", "listen_addresses", "unix_socket_directories"}
        merged.update({k: v for k, v in current.items() if k not in identity})
        if archive_command is not None:
            merged["archive_command"] = archive_command
        if archive_timeout is not None:
            merged["archive_timeout"] = archive_timeout
        for key, value in gucs.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        self._write_owned(self.conf_file, render_conf(merged))
        main_conf = self.data_dir / "postgresql.conf"
        text = main_conf.read_text()
        if _INCLUDE_LINE not in text:
            self._write_owned(main_conf, text.rstrip("\n") + f"\n\n{_INCLUDE_LINE}\n")

    def set_port(self, port: int) -> None:
        """Move the node to another port (written to its configuration; restart to apply)."""
        self.port = port
        if self.is_initialized:
            self.configure()

    def pid(self) -> int | None:
        """The postmaster's pid from ``postmaster.pid`` (None if there is no such file)."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first.strip())
        except (OSError, IndexError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self.pid()
        return pid is not None and process_alive(pid)

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it accepts connections (no-op if running)."""
        if self.is_running():
            return
        if not self.is_initialized:
            raise PgError(f"{self.name}: cannot start, {self.data_dir} is not initialised")
        self._prepare_dirs()
        self._remove_stale_locks()
        self._run(
            [
                self.bin("pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                str(int(timeout)),
                "-s",
            ],
            timeout=timeout + 15,
            what="pg_ctl start",
            with_log=True,
        )

    def _remove_stale_locks(self) -> None:
        """Drop lock files of a dead postmaster (a killed one may linger as a zombie, which
        PostgreSQL's own liveness check would take for a running server)."""
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        if not self.socket_dir.is_dir():
            return
        for lock in self.socket_dir.glob(".s.PGSQL.*.lock"):
            try:
                owner = int(lock.read_text().splitlines()[0].strip())
            except (OSError, IndexError, ValueError):
                owner = None
            if owner is None or not process_alive(owner):
                lock.unlink(missing_ok=True)
                Path(str(lock)[: -len(".lock")]).unlink(missing_ok=True)

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Stop the server (``smart``, ``fast`` or ``immediate``); no-op if not running."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"stop mode must be smart, fast or immediate, not {mode!r}")
        if not self.is_running():
            return
        self.sigcont()  # a hung (SIGSTOPped) server cannot shut down
        self._run(
            [
                self.bin("pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                str(int(timeout)),
                "-s",
            ],
            timeout=timeout + 15,
            what=f"pg_ctl stop -m {mode}",
            with_log=True,
        )

    def restart(self, timeout: float = 60.0) -> None:
        self.stop(timeout=timeout)
        self.start(timeout=timeout)

    def reload(self) -> None:
        """Re-read configuration files (SIGHUP)."""
        if self.is_running():
            self._run([self.bin("pg_ctl"), "reload", "-D", str(self.data_dir), "-s"],
                      what="pg_ctl reload")

    def _tree(self) -> list[int]:
        pid = self.pid()
        if pid is None or not process_alive(pid):
            return []
        return [pid, *child_pids(pid)]

    def _signal_tree(self, sig: signal.Signals) -> int:
        pids = self._tree()
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        return len(pids)

    def kill9(self, wait: float = 10.0) -> None:
        """Crash the node: SIGKILL the postmaster and all its processes at once."""
        pids = self._tree()
        self._signal_tree(signal.SIGKILL)
        deadline = time.monotonic() + wait
        while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)

    def sigstop(self) -> None:
        """Hang the node: SIGSTOP the postmaster and its processes (sockets stay open)."""
        self._signal_tree(signal.SIGSTOP)

    def sigcont(self) -> None:
        """Resume a node hung by :meth:`sigstop`."""
        self._signal_tree(signal.SIGCONT)

    def promote(self, timeout: float = 60.0) -> None:
        """Promote a standby to primary and wait until it accepts writes."""
        self._run(
            [self.bin("pg_ctl"), "promote", "-D", str(self.data_dir), "-w", "-t",
             str(int(timeout)), "-s"],
            timeout=timeout + 15,
            what="pg_ctl promote",
            with_log=True,
        )

    # --- SQL ----------------------------------------------------------------------------
    def psql(self, sql: str, database: str = "postgres", timeout: float = 30.0) -> str:
        """Run SQL with psql (unaligned, tuples only) and return its output, stripped."""
        env = dict(os.environ, PGCONNECT_TIMEOUT="5")
        try:
            proc = subprocess.run(
                [
                    self.bin("psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                    "-h", self.host, "-p", str(self.port), "-U", self.superuser,
                    "-d", database, "-c", sql,
                ],
                capture_output=True, text=True, timeout=timeout, env=env, check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise PgError(f"psql on {self.name} timed out after {timeout}s: {sql[:200]}") from exc
        if proc.returncode != 0:
            raise PgError(f"psql on {self.name} failed: {proc.stderr.strip()} (SQL: {sql[:200]})")
        return proc.stdout.strip()

    def is_in_recovery(self) -> bool:
        return self.psql("SELECT pg_is_in_recovery()") == "t"

    async def connect(
        self, database: str = "postgres", timeout: float = 10.0
    ) -> asyncpg.Connection:
        """An asyncpg connection as the superuser over TCP loopback."""
        return await asyncpg.connect(
            host=self.host, port=self.port, user=self.superuser, database=database,
            timeout=timeout,
        )

    def ensure_slot(self, slot: str) -> None:
        """Create a physical replication slot on this (primary) node if missing."""
        if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
            raise ValueError(f"invalid replication slot name: {slot!r}")
        self.psql(
            "SELECT pg_create_physical_replication_slot(s) "
            f"FROM (SELECT '{slot}'::name AS s) x "
            "WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = x.s)"
        )

    # --- replication --------------------------------------------------------------------
    def upstream_conninfo(self, application_name: str) -> str:
        """``primary_conninfo`` a standby of this node uses."""
        return (
            f"host={self.host} port={self.port} user={self.superuser} "
            f"application_name={application_name}"
        )

    def create_replica(
        self,
        base_dir: Path,
        name: str,
        port: int,
        *,
        start: bool = True,
        timeout: float = 120.0,
    ) -> PgInstance:
        """Clone this running primary into a streaming standby with its own slot and port.

        Uses ``pg_basebackup -X stream`` through a physical slot named after the replica, writes
        the replica's own settings and upstream, and starts it unless ``start`` is False.
        """
        replica = PgInstance(
            base_dir, port, name, host=self.host, bindir=self.bindir, os_user=self.user,
            superuser=self.superuser,
        )
        if replica.is_initialized:
            raise PgError(f"{name}: {replica.data_dir} already holds a data directory")
        slot = slot_name_for(name)
        self.ensure_slot(slot)
        replica._prepare_dirs()
        if replica.data_dir.exists():  # leftovers of an interrupted clone (no PG_VERSION)
            shutil.rmtree(replica.data_dir)
        make_dir(replica.data_dir, replica.user, 0o700)
        self._run(
            [
                self.bin("pg_basebackup"),
                "-D", str(replica.data_dir),
                "-h", self.host, "-p", str(self.port), "-U", self.superuser,
                "-X", "stream", "-S", slot, "-c", "fast", "--no-password",
            ],
            timeout=timeout,
            what=f"pg_basebackup of {self.name} into {name}",
        )
        replica.configure(
            primary_conninfo=self.upstream_conninfo(name), primary_slot_name=slot
        )
        replica._write_owned(replica.data_dir / "standby.signal", "")
        if start:
            replica.start(timeout=timeout)
        return replica

    def reconfigure_upstream(
        self,
        new_primary: PgInstance,
        *,
        create_slot: bool = True,
        timeout: float = 60.0,
    ) -> str:
        """Point this node at ``new_primary`` as a streaming standby; returns what it did.

        Writes ``primary_conninfo``/``primary_slot_name`` and ``standby.signal``.  A running
        standby is reloaded; a running primary is restarted as a standby (its timeline must
        not have diverged: rewinding is the caller's job); a stopped node is only reconfigured.
        """
        slot = slot_name_for(self.name)
        if create_slot:
            new_primary.ensure_slot(slot)
        self.configure(
            primary_conninfo=new_primary.upstream_conninfo(self.name), primary_slot_name=slot
        )
        self._write_owned(self.data_dir / "standby.signal", "")
        if not self.is_running():
            return f"{self.name} reconfigured to follow {new_primary.name} (not running)"
        if self.is_in_recovery():
            self.reload()
            return f"{self.name} reloaded to follow {new_primary.name}"
        self.stop(timeout=timeout)
        self.start(timeout=timeout)
        return f"{self.name} restarted as a standby of {new_primary.name}"
