"""From configured nodes to controllable local instances (the one place this mapping lives)."""

from __future__ import annotations

from collections.abc import Iterable

from emrdr.config import PgNode, Settings
from emrdr.pg.instance import PgInstance
from emrdr.pg.osuser import OsUser, ensure_os_user

__all__ = ["instances_for"]


def instances_for(
    nodes: Iterable[PgNode], settings: Settings, os_user: OsUser | None = None
) -> dict[str, PgInstance]:
    """A :class:`PgInstance` per node whose data directory is local (``data_dir`` known).

    A sandbox node's base directory is its data directory's parent (see :mod:`emrdr.pg.sandbox`).
    Nodes without ``data_dir`` are remote: they can be observed and fenced by SQL or a hook, but
    not started, stopped or promoted from here.
    """
    user: OsUser | None = os_user
    out: dict[str, PgInstance] = {}
    for n in nodes:
        if n.data_dir is None:
            continue
        if user is None:
            user = ensure_os_user(settings.pg.os_user)
        out[n.name] = PgInstance(
            n.data_dir.parent, n.port, n.name, host=n.host, bindir=settings.pg.bindir,
            os_user=user, superuser=settings.pg.user,
        )
    return out
