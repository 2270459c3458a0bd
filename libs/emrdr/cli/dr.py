"""``emrdr dr ...``, ``emrdr failover promote NODE`` and ``emrdr switchover --to NODE``."""

from __future__ import annotations

import argparse
from typing import Any

from emrdr.cli.common import add_json, issue


def register(sub: Any) -> None:
    dr = sub.add_parser("dr", help="disaster-recovery runbooks")
    drs = dr.add_subparsers(dest="action", required=True)
    rc = drs.add_parser("recover-corruption", help="seed scenario 3, as one command")
    rc.add_argument("--to", dest="to_time", required=True, help="point in time to recover to")
    rc.add_argument("--dry-run", action="store_true")
    rc.add_argument("--timeout", type=float, default=6 * 3600.0)
    add_json(rc)
    rc.set_defaults(func=run_recover)
    act = drs.add_parser("activate-site", help="seed scenario 2: new primary at the DR site")
    act.add_argument("--target-dir")
    act.add_argument("--port", type=int)
    act.add_argument("--timeout", type=float, default=6 * 3600.0)
    add_json(act)
    act.set_defaults(func=run_activate)

    fo = sub.add_parser("failover", help="manual failover")
    fos = fo.add_subparsers(dest="action", required=True)
    pr = fos.add_parser("promote", help="promote NODE (fencing the old primary first)")
    pr.add_argument("node")
    pr.add_argument("--timeout", type=float, default=600.0)
    add_json(pr)
    pr.set_defaults(func=run_promote)

    sw = sub.add_parser("switchover", help="planned change of primary, no data loss")
    sw.add_argument("--to", dest="to_node", required=True)
    sw.add_argument("--timeout", type=float, default=600.0)
    add_json(sw)
    sw.set_defaults(func=run_switchover)


def run_recover(args: argparse.Namespace) -> int:
    from emrdr.cli.times import parse_time
    from emrdr.messages.commands import RecoverCorruption

    to_time = parse_time(args.to_time)
    return issue(
        args, lambda issuer: RecoverCorruption(issuer=issuer, to_time=to_time, dry_run=args.dry_run)
    )


def run_activate(args: argparse.Namespace) -> int:
    from emrdr.messages.commands import ActivateDrSite

    return issue(
        args,
        lambda issuer: ActivateDrSite(issuer=issuer, target_dir=args.target_dir, port=args.port),
    )


def run_promote(args: argparse.Namespace) -> int:
    from emrdr.messages.commands import PromoteNode

    return issue(args, lambda issuer: PromoteNode(issuer=issuer, node=args.node))


def run_switchover(args: argparse.Namespace) -> int:
    from emrdr.messages.commands import Switchover

    return issue(args, lambda issuer: Switchover(issuer=issuer, to_node=args.to_node))
