"""``emrdr backup full|incremental`` and ``emrdr backups list``."""

from __future__ import annotations

import argparse
from typing import Any

from emrdr.cli.common import add_json, issue, not_available


def register(sub: Any) -> None:
    p = sub.add_parser("backup", help="take a base backup")
    p.add_argument("kind", choices=["full", "incremental"])
    p.add_argument("--verify", action="store_true", help="run a restore drill afterwards")
    p.add_argument("--retention-days", type=int, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--from-node", dest="source_node", default=None)
    p.add_argument("--timeout", type=float, default=6 * 3600.0)
    add_json(p)
    p.set_defaults(func=run_backup)

    lst = sub.add_parser("backups", help="list backups in the repository")
    lst_sub = lst.add_subparsers(dest="action", required=True)
    ls = lst_sub.add_parser("list")
    add_json(ls)
    ls.set_defaults(func=run_list)


def run_backup(args: argparse.Namespace) -> int:
    from emrdr.messages.commands import StartBackup

    return issue(
        args,
        lambda issuer: StartBackup(
            issuer=issuer,
            kind=args.kind,
            verify=args.verify,
            retention_days=args.retention_days,
            dry_run=args.dry_run,
            source_node=args.source_node,
        ),
        label=f"backup {args.kind}",
    )


def run_list(args: argparse.Namespace) -> int:
    return not_available("listing backups", "the backup engine, issue #3")
