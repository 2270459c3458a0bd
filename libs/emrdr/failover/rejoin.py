"""Bring a former primary back as a replica of the new primary.

First ``pg_rewind`` (data checksums / wal_log_hints are on in every emrdr node), which copies
only what diverged; if that fails, a fresh ``pg_basebackup`` from the new primary (the old data
directory is kept aside as ``data.before-rejoin``). Either way the node then follows the new
primary through its own replication slot, starts in recovery, and has any read-only fence
removed (it is a replica now; the fence would bite if it were promoted later).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Literal

from emrdr.pg.instance import PgError, PgInstance
from emrdr.pg.osuser import run_as

__all__ = ["RejoinResult", "drop_read_only_fence", "rejoin_as_replica"]

Method = Literal["pg_rewind", "basebackup"]


@dataclass(frozen=True)
class RejoinResult:
    node: str
    primary: str
    method: Method
    detail: str
    seconds: float


def drop_read_only_fence(text: str) -> str:
    """``postgresql.auto.conf`` without ``default_transaction_read_only`` (set by a fence)."""
    return "".join(
        line for line in text.splitlines(keepends=True)
        if not line.strip().startswith("default_transaction_read_only")
    )


def _clean_auto_conf(node: PgInstance) -> None:
    path = node.data_dir / "postgresql.auto.conf"
    if path.exists():
        text = path.read_text()
        cleaned = drop_read_only_fence(text)
        if cleaned != text:
            path.write_text(cleaned)


def _rewind(node: PgInstance, primary: PgInstance, timeout: float) -> str:
    # Single-user crash recovery (run by pg_rewind for an uncleanly stopped node) refuses
    # standby mode; the node is stopped, so the signal file is rewritten right after.
    (node.data_dir / "standby.signal").unlink(missing_ok=True)
    try:
        proc = run_as(
            node.user,
            [
                node.bin("pg_rewind"),
                f"--target-pgdata={node.data_dir}",
                f"--source-server={primary.conninfo}",
            ],
            cwd=node.base_dir,
            timeout=timeout,
        )
    except subprocess.CalledProcessError as exc:
        raise PgError(
            f"pg_rewind of {node.name} from {primary.name} failed (exit {exc.returncode}): "
            f"{(exc.stderr or exc.stdout or '').strip()[-800:]}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise PgError(f"pg_rewind of {node.name} ran over {timeout}s") from exc
    out = (proc.stdout + proc.stderr).strip().splitlines()
    return out[-1] if out else "pg_rewind done"


def _basebackup(node: PgInstance, primary: PgInstance, timeout: float) -> str:
    aside = node.base_dir / "data.before-rejoin"
    if aside.exists():
        shutil.rmtree(aside)
    if node.data_dir.exists():
        node.data_dir.rename(aside)
    primary.create_replica(node.base_dir, node.name, node.port, start=False, timeout=timeout)
    return f"fresh base backup from {primary.name} (old data kept in {aside.name})"


def rejoin_as_replica(
    node: PgInstance,
    primary: PgInstance,
    *,
    allow_basebackup: bool = True,
    timeout: float = 300.0,
) -> RejoinResult:
    """Stop ``node``, rewind it (or re-clone it) from ``primary``, start it as its standby.

    Blocking (run it in a thread). Raises PgError naming what failed when neither works.
    """
    started = time.perf_counter()
    if node.name == primary.name:
        raise ValueError(f"{node.name} cannot rejoin itself")
    node.stop("fast", timeout=60)
    method: Method = "pg_rewind"
    try:
        detail = _rewind(node, primary, timeout)
    except PgError as exc:
        if not allow_basebackup:
            raise
        method = "basebackup"
        detail = f"pg_rewind failed ({str(exc)[:300]}); " + _basebackup(node, primary, timeout)
    _clean_auto_conf(node)
    follow = node.reconfigure_upstream(primary)
    node.start(timeout=60)
    if not node.is_in_recovery():
        raise PgError(f"{node.name} started but is not in recovery after rejoining")
    return RejoinResult(
        node.name, primary.name, method, f"{detail}; {follow}; started in recovery",
        round(time.perf_counter() - started, 3),
    )
