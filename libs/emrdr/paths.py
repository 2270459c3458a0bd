"""Where emrdr keeps its state; importable without pydantic (the WAL fast path uses it)."""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    """``EMRDR_HOME`` or a per-user default.

    As root the default is ``/var/lib/emrdr`` rather than ``~root``: the sandbox PostgreSQL runs
    as an unprivileged user whose ``archive_command`` must reach the spool and repository.
    """
    env = os.environ.get("EMRDR_HOME")
    if env:
        return Path(env).expanduser().resolve()
    if os.geteuid() == 0:
        return Path("/var/lib/emrdr")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "emrdr"


def wal_spool(home: Path) -> Path:
    return home / "spool" / "wal"
