"""The live cluster as recovery procedures see it: which node is the primary, and running
``pg_dump`` / ``pg_restore`` against it or against a temporary restored instance."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from emrdr.config import PgNode, Settings
from emrdr.engine.pitr import RecoveryTarget
from emrdr.engine.repository import Repository
from emrdr.engine.restore import RestoreResult, restore_backup, restore_to_point
from emrdr.verify.drill import resolve_backup_id
from emrdr.verify.pgcheck import PgCheckError, StepCallback, client_env, psql
from emrdr.verify.sandbox import TempInstance

__all__ = ["RecoveryError", "StepRecorder", "find_primary", "run_client", "sandbox_restore"]


class RecoveryError(RuntimeError):
    """A recovery step failed or was refused; the message says which and why."""


def find_primary(settings: Settings, node: PgNode | None = None) -> PgNode:
    """The node to act on: ``node`` if given, else the configured node that answers and is not
    in recovery (RecoveryError if there is none, or more than one)."""
    if node is not None:
        return node
    nodes = settings.resolved_pg_nodes()
    if not nodes:
        raise RecoveryError("no PostgreSQL nodes are configured (pg.nodes, or `emrdr up`)")
    primaries: list[PgNode] = []
    for n in nodes:
        try:
            if psql(settings, n.port, "SELECT pg_is_in_recovery()", host=n.host,
                    timeout=15) == "f":
                primaries.append(n)
        except PgCheckError:
            continue
    if len(primaries) != 1:
        found = ", ".join(p.name for p in primaries) or "none answers"
        raise RecoveryError(f"expected exactly one live primary among "
                            f"{', '.join(n.name for n in nodes)}; found: {found}")
    return primaries[0]


def run_client(
    settings: Settings, program: str, args: Sequence[str], what: str, timeout: float = 3600.0
) -> str:
    """Run a PostgreSQL client program (pg_dump, pg_restore); RecoveryError names ``what``."""
    cmd = [str(settings.pg.bindir / program), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=client_env(settings), check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise RecoveryError(f"{what}: {program} did not finish within {timeout}s") from exc
    if proc.returncode != 0:
        raise RecoveryError(f"{what}: {program} failed (exit {proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return proc.stdout



class StepRecorder:
    """Collects ``(step, ok, detail)`` and forwards each to the caller's ``on_step``."""

    def __init__(self, on_step: StepCallback | None) -> None:
        self.steps: list[tuple[str, bool, str]] = []
        self._on_step = on_step

    def __call__(self, name: str, ok: bool, detail: str) -> None:
        self.steps.append((name, ok, detail))
        if self._on_step is not None:
            self._on_step(name, ok, detail)

    def fail(self, name: str, exc: BaseException) -> RecoveryError:
        """Report ``name`` as failed with ``exc`` and return the error to raise."""
        self(name, False, str(exc))
        if isinstance(exc, RecoveryError):
            return exc
        return RecoveryError(f"{name}: {exc}")


def sandbox_restore(
    settings: Settings,
    repo: Repository,
    inst: TempInstance,
    backup_id: str | None,
    target: RecoveryTarget | None,
    workers: int,
    timeout: float,
) -> RestoreResult:
    """Restore into the temporary instance and start it: ``backup_id`` to consistency, or the
    backup chosen for ``target`` (or ``backup_id``) recovered to ``target``."""
    if target is None or target.kind == "immediate":
        bid = backup_id or resolve_backup_id("latest", repo.backup_ids())
        return restore_backup(settings, repo, bid, inst.data_dir, workers=workers, start=True,
                              port=inst.port, timeout=timeout)
    return restore_to_point(settings, repo, target, inst.data_dir, backup_id=backup_id,
                            workers=workers, start=True, port=inst.port, timeout=timeout)
