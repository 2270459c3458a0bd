"""``emrdr restore full|pitr|table``."""

from __future__ import annotations

import argparse
from typing import Any

from emrdr.cli.common import add_json, issue
from emrdr.cli.errors import CliError


def register(sub: Any) -> None:
    p = sub.add_parser("restore", help="restore a backup, to a point in time, or one table")
    rs = p.add_subparsers(dest="mode", required=True)

    full = rs.add_parser("full", help="restore a whole backup")
    full.add_argument("backup_id")
    tgt = full.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--target-dir")
    tgt.add_argument("--target-db")
    full.add_argument("--replace", action="store_true")
    full.add_argument("--timeout", type=float, default=6 * 3600.0)
    add_json(full)
    full.set_defaults(func=run_restore)

    pitr = rs.add_parser("pitr", help="point-in-time recovery")
    pitr.add_argument(
        "time",
        nargs="?",
        help='e.g. "2025-06-22 14:30:00"; without a zone: this machine\'s local time zone',
    )
    pitr.add_argument("--lsn")
    pitr.add_argument("--xid", type=int)
    pitr.add_argument("--name")
    tgt2 = pitr.add_mutually_exclusive_group(required=True)
    tgt2.add_argument("--target-dir")
    tgt2.add_argument("--target-db")
    pitr.add_argument("--replace", action="store_true")
    pitr.add_argument("--timeout", type=float, default=6 * 3600.0)
    add_json(pitr)
    pitr.set_defaults(func=run_restore)

    table = rs.add_parser("table", help="restore one table as of a point in time")
    table.add_argument("table", help="SCHEMA.TABLE")
    table.add_argument("--time", required=True)
    table.add_argument("--target-db", required=True)
    table.add_argument("--as", dest="as_name")
    table.add_argument("--timeout", type=float, default=6 * 3600.0)
    add_json(table)
    table.set_defaults(func=run_table)


def run_restore(args: argparse.Namespace) -> int:
    from emrdr.cli.times import parse_time
    from emrdr.messages.commands import StartRestore

    target_time = None
    if args.mode == "pitr":
        chosen = [x for x in (args.time, args.lsn, args.xid, args.name) if x is not None]
        if len(chosen) != 1:
            raise CliError("give exactly one recovery target: TIME, --lsn, --xid or --name", 2)
        target_time = parse_time(args.time) if args.time else None
    return issue(
        args,
        lambda issuer: StartRestore(
            issuer=issuer,
            mode=args.mode,
            backup_id=getattr(args, "backup_id", None),
            target_dir=args.target_dir,
            target_db=args.target_db,
            target_time=target_time,
            target_lsn=getattr(args, "lsn", None),
            target_xid=getattr(args, "xid", None),
            target_name=getattr(args, "name", None),
            replace=args.replace,
        ),
        label=f"restore {args.mode}",
    )


def run_table(args: argparse.Namespace) -> int:
    from emrdr.cli.times import parse_time
    from emrdr.messages.commands import RestoreTable

    if "." not in args.table:
        raise CliError(f"table {args.table!r} must be SCHEMA.TABLE", 2)
    return issue(
        args,
        lambda issuer: RestoreTable(
            issuer=issuer,
            table=args.table,
            target_time=parse_time(args.time),
            target_db=args.target_db,
            as_name=args.as_name,
        ),
        label="restore table",
    )
