"""``emrdr keys rotate|list``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from emrdr.cli.common import add_json, issue
from emrdr.cli.errors import CliError


def register(sub: Any) -> None:
    p = sub.add_parser("keys", help="repository encryption keys")
    ks = p.add_subparsers(dest="action", required=True)
    rot = ks.add_parser("rotate", help="new data key; old backups stay restorable")
    rot.add_argument("--timeout", type=float, default=600.0)
    add_json(rot)
    rot.set_defaults(func=run_rotate)
    lst = ks.add_parser("list", help="key ids and their state")
    add_json(lst)
    lst.set_defaults(func=run_list)

    new = ks.add_parser("new-identity", help="create a signing key for an operator or service")
    new.add_argument("actor")
    new.add_argument("--role", required=True)
    new.add_argument("--out", help="also write the public key (PEM) here, for enrolment")
    new.set_defaults(func=run_new_identity)

    enr = ks.add_parser("enroll", help="trust a public key for an actor and role (admin)")
    enr.add_argument("actor")
    enr.add_argument("--role", required=True)
    enr.add_argument("--public-key", required=True, help="PEM file")
    enr.add_argument(
        "--expires-in",
        type=float,
        default=None,
        metavar="MINUTES",
        help="time-limited (break-glass) enrolment",
    )
    enr.set_defaults(func=run_enroll)


def run_rotate(args: argparse.Namespace) -> int:
    from emrdr.messages.commands import RotateKeys

    return issue(args, lambda issuer: RotateKeys(issuer=issuer))


def run_list(args: argparse.Namespace) -> int:
    """Data keys of the repository (ids, order, creation, which is active) — no secrets."""
    import json
    from dataclasses import asdict

    from emrdr.config import get_settings
    from emrdr.engine.repository import open_repository

    try:
        repo = open_repository(get_settings())
    except Exception as exc:
        raise CliError(f"cannot open the repository: {type(exc).__name__}: {exc}") from None
    keys = repo.keyring.list_keys()
    if args.json:
        print(json.dumps([asdict(k) for k in keys], indent=2))
        return 0
    print(f"key ring generation {repo.keyring.generation}")
    for k in keys:
        print(f"  {k.id:<24} #{k.seq:<3} created {k.created_at}  {'ACTIVE' if k.active else ''}")
    return 0


def run_new_identity(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from emrdr.config import get_settings
    from emrdr.security import POLICY, TrustStore, ensure_identity

    if args.role not in POLICY:
        raise CliError(f"unknown role {args.role!r}; roles are {', '.join(sorted(POLICY))}", 2)
    settings = get_settings()
    scratch = TrustStore(settings.keys_dir / "pending")
    ident = ensure_identity(settings.keys_dir, args.actor, args.role, scratch)
    pem = ident.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if args.out:
        Path(args.out).write_bytes(pem)
    print(f"identity {args.actor} as {args.role}: key {ident.key_id}")
    print(pem.decode().strip())
    print(
        "enroll it where the services read their trust store: "
        f"emrdr keys enroll {args.actor} --role {args.role} --public-key FILE"
    )
    return 0


def run_enroll(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from emrdr.config import get_settings
    from emrdr.security import TrustStore

    try:
        key = serialization.load_pem_public_key(Path(args.public_key).read_bytes())
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read public key {args.public_key}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CliError(f"{args.public_key} is not an Ed25519 public key")
    expires = datetime.now(UTC) + timedelta(minutes=args.expires_in) if args.expires_in else None
    try:
        record = TrustStore(get_settings().keys_dir / "trust").enroll(
            args.actor, args.role, key, expires_at=expires
        )
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    until = f" until {expires.isoformat()}" if expires else ""
    print(f"enrolled {record.key_id} for {record.actor} as {record.role}{until}")
    return 0
