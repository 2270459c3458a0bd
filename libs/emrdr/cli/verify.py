"""``emrdr verify latest|BACKUP_ID`` and ``emrdr integrity-check``.

Both publish a command the verifier service executes.  With ``--local`` they run in this
process instead (no NATS needed: useful when the bus is down during an incident) and print
the whole report; the exit status is non-zero on any failed check or problem.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from emrdr.cli.common import EXIT_FAILED, EXIT_OK, add_json, issue
from emrdr.cli.errors import CliError


def register(sub: Any) -> None:
    p = sub.add_parser("verify", help="restore drill of a backup into a temporary PostgreSQL")
    p.add_argument("backup_id", nargs="?", default="latest")
    p.add_argument("--timeout", type=float, default=3 * 3600.0)
    p.add_argument("--local", action="store_true", help="run the drill in this process")
    add_json(p)
    p.set_defaults(func=run_verify)

    ic = sub.add_parser("integrity-check", help="check the whole repository")
    ic.add_argument("--comprehensive", action="store_true", help="authenticate every object")
    ic.add_argument("--timeout", type=float, default=6 * 3600.0)
    ic.add_argument("--local", action="store_true", help="run the check in this process")
    add_json(ic)
    ic.set_defaults(func=run_integrity)


def _repo() -> Any:
    from emrdr.config import get_settings
    from emrdr.engine.repository import open_repository

    try:
        return open_repository(get_settings())
    except Exception as exc:
        raise CliError(f"cannot open the repository: {type(exc).__name__}: {exc}") from None


def run_verify(args: argparse.Namespace) -> int:
    from emrdr.messages.commands import StartVerification

    if not getattr(args, "local", False):
        return issue(
            args, lambda issuer: StartVerification(issuer=issuer, backup_id=args.backup_id)
        )
    from emrdr.config import get_settings
    from emrdr.verify.drill import DrillError, run_drill

    def show(check: Any) -> None:
        if not args.json:
            print(f"  {'ok  ' if check.passed else 'FAIL'} {check.name}: {check.detail}")

    try:
        report = run_drill(get_settings(), _repo(), args.backup_id, on_check=show)
    except DrillError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(report.to_record(), indent=2))
    else:
        print(report.summary())
    return EXIT_OK if report.passed else EXIT_FAILED


def run_integrity(args: argparse.Namespace) -> int:
    from emrdr.messages.commands import CheckIntegrity

    if not getattr(args, "local", False):
        return issue(
            args, lambda issuer: CheckIntegrity(issuer=issuer, comprehensive=args.comprehensive)
        )
    from emrdr.config import get_settings
    from emrdr.verify.integrity import check_repository

    report = check_repository(get_settings(), _repo(), args.comprehensive)
    print(json.dumps(report.to_json(), indent=2) if args.json else "\n".join(report.lines()))
    return EXIT_OK if report.ok else EXIT_FAILED
