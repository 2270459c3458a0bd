"""``emrdr backup full|incremental`` and ``emrdr backups list``."""

from __future__ import annotations

import argparse
from typing import Any

from emrdr.cli.common import add_json, issue


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
    for verb, held, text in (
        ("hold", True, "place a legal hold (kept whatever retention says)"),
        ("release", False, "lift a legal hold"),
    ):
        h = lst_sub.add_parser(verb, help=text)
        h.add_argument("backup_id")
        h.add_argument("--reason", required=True, help="case number, request, ...")
        h.add_argument("--timeout", type=float, default=300.0)
        add_json(h)
        h.set_defaults(func=run_hold, held=held)


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


def list_backups() -> list[dict[str, Any]]:
    """Every complete backup (read from the repository), oldest first."""
    from emrdr.config import get_settings
    from emrdr.engine.repository import open_repository
    from emrdr.verify.drill import verification_records

    repo = open_repository(get_settings())
    verifications = verification_records(repo)
    rows: list[dict[str, Any]] = []
    for backup_id in repo.backup_ids():
        m = repo.read_manifest(backup_id)
        record = verifications.get(backup_id)
        rows.append(
            {
                "backup_id": m.backup_id,
                "kind": m.kind,
                "parent_id": m.parent_id,
                "started_at": m.started_at.isoformat(),
                "stopped_at": m.stopped_at.isoformat(),
                "duration_s": round((m.stopped_at - m.started_at).total_seconds(), 1),
                "timeline": m.timeline,
                "start_lsn": m.start_lsn,
                "stop_lsn": m.stop_lsn,
                "wal": [m.start_wal, m.stop_wal],
                "bytes_source": m.bytes_source,
                "bytes_stored": m.bytes_stored,
                "files": len(m.files),
                "degraded": m.degraded,
                "problems": m.problems,
                "legal_hold": repo.is_held(backup_id),
                "retention_days": m.retention_days,
                "key_id": m.key_id,
                "source_node": m.source_node,
                "last_verification": _verification_summary(record),
            }
        )
    return rows


def _verification_summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The last restore drill of a backup, as ``backups list`` shows it."""
    if record is None:
        return None
    return {
        "at": record.get("started_at"),
        "passed": record.get("passed") is True,
        "restore_seconds": record.get("restore_seconds"),
        "failed_checks": [c.get("name") for c in record.get("checks", []) if not c.get("passed")],
        "error": record.get("error"),
        "record": record.get("key"),
    }


def _verification_text(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "never"
    when = str(summary.get("at") or "")[:16].replace("T", " ")
    if summary["passed"]:
        return f"passed {when} ({summary.get('restore_seconds') or 0:.0f} s)"
    return f"FAILED {when}"


def run_list(args: argparse.Namespace) -> int:
    import json

    from emrdr.cli.errors import CliError

    try:
        rows = list_backups()
    except Exception as exc:
        raise CliError(f"cannot read the repository: {type(exc).__name__}: {exc}") from None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no complete backups in the repository")
        return 0
    print(
        f"{'backup':<22} {'kind':<11} {'stopped (UTC)':<20} {'source MB':>10} "
        f"{'stored MB':>10} {'tl':>3}  {'last verification':<30} flags"
    )
    for r in rows:
        flags = ",".join(
            f for f, on in (("DEGRADED", r["degraded"]), ("HOLD", r["legal_hold"])) if on
        )
        print(
            f"{r['backup_id']:<22} {r['kind']:<11} {r['stopped_at'][:19]:<20} "
            f"{r['bytes_source'] / 1e6:>10.1f} {r['bytes_stored'] / 1e6:>10.1f} "
            f"{r['timeline']:>3}  {_verification_text(r['last_verification']):<30} {flags}"
        )
    return 0


def run_hold(args: argparse.Namespace) -> int:
    from emrdr.messages.commands import SetLegalHold

    return issue(
        args,
        lambda issuer: SetLegalHold(
            issuer=issuer, backup_id=args.backup_id, held=args.held, reason=args.reason
        ),
    )
