"""A local PostgreSQL 15 cluster: one primary and N streaming replicas on loopback.

Used by ``emrdr up`` when no PostgreSQL is configured, by restore drills and by the tests.
Layout under ``base_dir``::

    cluster.json        node names and ports (so a restart resumes the same nodes)
    pg-primary/         a PgInstance base dir (data/, run/, postgresql.log)
    pg-replica-1/ ...

Starting a cluster whose data directories already exist resumes them (same names, same ports
unless a port was taken meanwhile); missing nodes are cloned from whichever node is primary now,
and existing nodes beyond ``n_replicas`` are kept (a cluster never shrinks by itself).
Roles are always read from the live servers, so after a failover ``primary`` is the promoted one.

    with SandboxCluster(base, n_replicas=1) as cluster:
        cluster.wait_replicas_streaming()
        print(cluster.nodes())
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from emrdr.config import PgNode
from emrdr.pg.instance import PgError, PgInstance, child_pids, process_alive
from emrdr.pg.osuser import OsUser, current_user, ensure_os_user, make_dir

__all__ = [
    "PRIMARY_NAME",
    "STATE_FILE",
    "SandboxCluster",
    "kill_strays",
    "port_is_free",
    "replica_name",
]

STATE_FILE = "cluster.json"
PRIMARY_NAME = "pg-primary"

Role = Literal["primary", "replica", "unknown"]


def replica_name(index: int) -> str:
    """Name of the ``index``-th replica (1-based)."""
    return f"pg-replica-{index}"


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``host:port`` now (TIME_WAIT leftovers do not count,
    as PostgreSQL binds with SO_REUSEADDR too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _reserved_ports(n: int, host: str) -> Iterator[list[int]]:
    """``n`` distinct free ports (sockets held open while choosing, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        yield [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def kill_strays(base_dir: Path) -> int:
    """SIGKILL every postmaster whose command line names a path under ``base_dir``, with its
    children.  Returns how many processes were signalled."""
    marker = str(Path(base_dir).absolute()) + os.sep
    victims: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace"
            )
        except OSError:
            continue
        if marker in cmd and "postgres" in cmd and process_alive(int(entry)):
            victims.append(int(entry))
            victims.extend(child_pids(int(entry)))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(victims)


class SandboxCluster:
    """Primary + ``n_replicas`` streaming replicas under ``base_dir``."""

    def __init__(
        self,
        base_dir: Path,
        n_replicas: int = 1,
        ports: Sequence[int] | None = None,
        archive_command: str | None = None,
        *,
        archive_timeout: int | None = None,
        host: str = "127.0.0.1",
        bindir: Path | None = None,
        os_user: OsUser | str | None = None,
    ) -> None:
        if n_replicas < 0:
            raise ValueError("n_replicas must be >= 0")
        self.base_dir = Path(base_dir).absolute()
        self.n_replicas = n_replicas
        self.explicit_ports = list(ports) if ports is not None else None
        self.archive_command = archive_command
        self.archive_timeout = archive_timeout
        self.host = host
        self.bindir = bindir
        self._os_user = os_user
        self._instances: list[PgInstance] = []

    # --- state --------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.base_dir / STATE_FILE

    def _load_state(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return []
        except json.JSONDecodeError as exc:
            raise PgError(f"{self.state_file} is not valid JSON: {exc}") from exc
        nodes = data.get("nodes", [])
        if not isinstance(nodes, list):
            raise PgError(f"{self.state_file}: 'nodes' must be a list")
        return [dict(n) for n in nodes]

    def _save_state(self) -> None:
        data = {
            "version": 1,
            "nodes": [{"name": i.name, "port": i.port} for i in self._instances],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.state_file)

    def _resolve_user(self) -> OsUser:
        if isinstance(self._os_user, OsUser):
            return self._os_user
        name = self._os_user
        if name is None:
            from emrdr.config import get_settings

            name = get_settings().pg.os_user
        user = ensure_os_user(name)
        self._os_user = user
        return user

    def _plan(self) -> list[tuple[str, int | None]]:
        """(name, wanted port) for every node: persisted ones first, then new replicas."""
        planned: list[tuple[str, int | None]] = [
            (str(n["name"]), int(n["port"]) if n.get("port") else None) for n in self._load_state()
        ]
        names = {name for name, _ in planned}
        wanted = [PRIMARY_NAME] + [replica_name(i) for i in range(1, self.n_replicas + 1)]
        for name in wanted:
            if name not in names:
                planned.append((name, None))
        if self.explicit_ports:
            planned = [
                (name, self.explicit_ports[i] if i < len(self.explicit_ports) else port)
                for i, (name, port) in enumerate(planned)
            ]
        return planned

    def _attached(self) -> list[PgInstance]:
        """Instances of this object, else those persisted in ``cluster.json`` (not started):
        another process can stop or inspect a cluster that ``emrdr up`` started."""
        if not self._instances and self.state_file.exists():
            user = self._resolve_user()
            self._instances = [
                PgInstance(
                    self.base_dir / str(n["name"]), int(n["port"]), str(n["name"]),
                    host=self.host, bindir=self.bindir, os_user=user,
                )
                for n in self._load_state()
            ]
        return self._instances

    def refresh(self) -> None:
        """Forget the nodes held in memory and re-read ``cluster.json``."""
        self._instances = []
        self._attached()

    # --- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> SandboxCluster:
        """Create or resume every node and start it; returns self."""
        make_dir(self.base_dir, current_user(), 0o755)
        user = self._resolve_user()
        plan = self._plan()
        with _reserved_ports(len(plan), self.host) as spare:
            instances: list[PgInstance] = []
            for (name, port), fallback in zip(plan, spare, strict=True):
                inst = PgInstance(
                    self.base_dir / name, port or fallback, name, host=self.host,
                    bindir=self.bindir, os_user=user,
                )
                if port is not None and not inst.is_running() and not port_is_free(port, self.host):
                    inst.port = fallback  # taken meanwhile by something else
                instances.append(inst)
        self._instances = instances
        self._save_state()
        existing = [i for i in instances if i.is_initialized]
        if not existing:
            first = instances[0]
            first.initdb()
            existing = [first]
        for inst in existing:
            inst.configure(
                archive_command=self.archive_command, archive_timeout=self.archive_timeout
            )
            inst.start(timeout=timeout)
        primary = self.primary
        for inst in instances:
            if not inst.is_initialized:
                clone = primary.create_replica(
                    inst.base_dir, inst.name, inst.port, start=False, timeout=max(timeout, 120)
                )
                clone.configure(
                    archive_command=self.archive_command, archive_timeout=self.archive_timeout
                )
                clone.start(timeout=timeout)
        self._save_state()
        return self

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Stop every node (the primary first, so replicas receive its shutdown checkpoint)."""
        errors: list[str] = []
        ordered = sorted(self._attached(), key=lambda i: self.role_of(i) != "primary")
        for inst in ordered:
            try:
                inst.stop(mode=mode, timeout=timeout)
            except PgError as exc:
                errors.append(str(exc))
                inst.kill9()
        if errors:
            raise PgError("some nodes did not stop cleanly:\n" + "\n".join(errors))

    def destroy(self) -> None:
        """Stop everything (forcibly if needed) and delete ``base_dir``."""
        with contextlib.suppress(PgError):
            self.stop(mode="immediate", timeout=20)
        for inst in self._attached():
            inst.kill9()
        kill_strays(self.base_dir)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> SandboxCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- views --------------------------------------------------------------------------
    @property
    def instances(self) -> list[PgInstance]:
        """Every node, in stable order (``pg-primary`` first as created)."""
        return list(self._attached())

    def instance(self, name: str) -> PgInstance:
        for inst in self._attached():
            if inst.name == name:
                return inst
        raise KeyError(f"no node named {name!r} in {self.base_dir}")

    @staticmethod
    def role_of(inst: PgInstance) -> Role:
        """Live role of one node; "unknown" if it is down or does not answer."""
        if not inst.is_running():
            return "unknown"
        try:
            return "replica" if inst.psql("SELECT pg_is_in_recovery()", timeout=5) == "t" else (
                "primary"
            )
        except PgError:
            return "unknown"

    @property
    def primary(self) -> PgInstance:
        """The running node that is not in recovery (the first one, should there be several)."""
        for inst in self._attached():
            if self.role_of(inst) == "primary":
                return inst
        raise PgError(
            f"no running primary among {[i.name for i in self._instances]} in {self.base_dir}"
        )

    @property
    def replicas(self) -> list[PgInstance]:
        """Every node except the current primary."""
        primary = self.primary
        return [i for i in self._instances if i is not primary]

    def nodes(self) -> list[PgNode]:
        """Nodes as configuration records, role read from each live server."""
        return [
            PgNode(
                name=i.name, host=i.host, port=i.port, data_dir=i.data_dir, role=self.role_of(i)
            )
            for i in self._attached()
        ]

    def wait_replicas_streaming(self, timeout: float = 30.0) -> None:
        """Wait until the primary streams to every replica; TimeoutError names the missing."""
        deadline = time.monotonic() + timeout
        missing: set[str] = set()
        while True:
            try:
                primary = self.primary
                out = primary.psql(
                    "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
                    timeout=5,
                )
                streaming = set(out.splitlines())
                missing = {i.name for i in self._instances if i is not primary} - streaming
                if not missing:
                    return
            except PgError as exc:
                missing = {f"(primary not answering: {exc})"}
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"replicas not streaming after {timeout}s: {', '.join(sorted(missing))}"
                )
            time.sleep(0.1)
