"""Who may do what: Ed25519-signed commands, a trust store of enrolled keys, and role policy.

Every command carries its issuer (actor, role, key id) and a signature over the canonical JSON of
the command without the signature.  Each service verifies, before acting, that:

1. the key id is enrolled in the trust store, for that actor and role;
2. the signature is valid (so nothing in the command was changed in transit);
3. the role may issue that command type (:data:`POLICY`);
4. the command is not stale (a replayed old command is refused).

Every decision, allowed or denied, is published as ``CommandReceived`` and so lands in the audit
trail.  Break-glass elevation (an emergency responder acting as DBA) is a time-limited trust
record with ``expires_at``; it is refused after expiry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from emrdr.messages.base import Command, Issuer

ALL_COMMANDS = frozenset(
    {
        "StartBackup",
        "StartRestore",
        "RestoreTable",
        "EnforceRetention",
        "SetLegalHold",
        "RotateKeys",
        "StartVerification",
        "CheckIntegrity",
        "ObserveCluster",
        "PromoteNode",
        "Switchover",
        "ActivateDrSite",
        "RecoverCorruption",
    }
)

POLICY: dict[str, frozenset[str]] = {
    "admin": ALL_COMMANDS,
    "system": ALL_COMMANDS,
    "dba": ALL_COMMANDS - {"ActivateDrSite"},
    "backup_operator": frozenset(
        {"StartBackup", "StartVerification", "CheckIntegrity", "EnforceRetention", "ObserveCluster"}
    ),
    "emergency_responder": frozenset(
        {
            "PromoteNode",
            "Switchover",
            "ActivateDrSite",
            "RecoverCorruption",
            "StartVerification",
            "CheckIntegrity",
            "ObserveCluster",
        }
    ),
    # Read-only: the compliance officer reads and proves the audit trail, issues no commands.
    "compliance_officer": frozenset(),
}

MAX_COMMAND_AGE = timedelta(hours=24)
MAX_CLOCK_SKEW = timedelta(minutes=5)


def canonical_bytes(cmd: Command) -> bytes:
    body = cmd.model_dump(mode="json", exclude={"signature"})
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def key_id_of(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Identity:
    """A signing identity: the private key of one actor under one role."""

    actor: str
    role: str
    private_key: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return key_id_of(self.private_key.public_key())

    @property
    def issuer(self) -> Issuer:
        return Issuer.model_validate(
            {"actor": self.actor, "role": self.role, "key_id": self.key_id}
        )

    def sign(self, cmd: Command) -> Command:
        """Return ``cmd`` issued and signed by this identity."""
        issued = cmd.model_copy(update={"issuer": self.issuer, "signature": None})
        sig = self.private_key.sign(canonical_bytes(issued))
        return issued.model_copy(update={"signature": base64.b64encode(sig).decode()})


@dataclass(frozen=True)
class TrustRecord:
    key_id: str
    actor: str
    role: str
    public_key: Ed25519PublicKey
    expires_at: datetime | None = None


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str


class TrustStore:
    """Enrolled public keys, one JSON file each in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def records(self) -> list[TrustRecord]:
        """Every enrolment; one key may be enrolled under several roles."""
        out: list[TrustRecord] = []
        if not self.directory.is_dir():
            return out
        for path in sorted(self.directory.glob("*.json")):
            data = json.loads(path.read_text())
            pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(data["public_key"]))
            expires = data.get("expires_at")
            out.append(
                TrustRecord(
                    key_id=data["key_id"],
                    actor=data["actor"],
                    role=data["role"],
                    public_key=pub,
                    expires_at=datetime.fromisoformat(expires) if expires else None,
                )
            )
        return out

    def enroll(
        self, actor: str, role: str, public: Ed25519PublicKey, expires_at: datetime | None = None
    ) -> TrustRecord:
        if role not in POLICY:
            raise ValueError(f"unknown role {role!r}; roles are {', '.join(sorted(POLICY))}")
        self.directory.mkdir(parents=True, exist_ok=True)
        kid = key_id_of(public)
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        record: dict[str, Any] = {
            "key_id": kid,
            "actor": actor,
            "role": role,
            "public_key": base64.b64encode(raw).decode(),
            "expires_at": expires_at.isoformat() if expires_at else None,
        }
        name = kid.replace(":", "_") + f".{role}.json"
        tmp = self.directory / (name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.chmod(tmp, 0o644)
        tmp.replace(self.directory / name)
        return TrustRecord(kid, actor, role, public, expires_at)

    def verify(self, cmd: Command, now: datetime | None = None) -> Verdict:
        """Decide whether ``cmd`` may run; the reason names what is wrong."""
        now = now or datetime.now(UTC)
        issuer = cmd.issuer
        if not cmd.signature or not issuer.key_id:
            return Verdict(False, f"{cmd.type} from {issuer.actor} is not signed")
        candidates = [
            r for r in self.records() if r.key_id == issuer.key_id and r.role == issuer.role
        ]
        if not candidates:
            return Verdict(
                False,
                f"key {issuer.key_id} of {issuer.actor} is not enrolled for role {issuer.role}",
            )
        record = candidates[0]
        if record.actor != issuer.actor:
            return Verdict(
                False, f"key {issuer.key_id} belongs to {record.actor}, not {issuer.actor}"
            )
        if record.expires_at is not None and now > record.expires_at:
            return Verdict(
                False,
                f"elevation of {issuer.actor} to {issuer.role} expired at "
                f"{record.expires_at.isoformat()}",
            )
        try:
            record.public_key.verify(base64.b64decode(cmd.signature), canonical_bytes(cmd))
        except (InvalidSignature, ValueError):
            return Verdict(False, f"signature of {cmd.type} from {issuer.actor} is invalid")
        if cmd.type not in POLICY.get(issuer.role, frozenset()):
            return Verdict(False, f"role {issuer.role} may not issue {cmd.type}")
        age = now - cmd.occurred_at
        if age < -MAX_CLOCK_SKEW:
            return Verdict(
                False, f"{cmd.type} claims to be issued {-age} in the future; refusing it"
            )
        if age > MAX_COMMAND_AGE:
            return Verdict(False, f"{cmd.type} was issued {age} ago; refusing a stale command")
        return Verdict(True, f"{issuer.actor} ({issuer.role}) may issue {cmd.type}")


def _identity_path(keys_dir: Path, actor: str, role: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in actor)
    return keys_dir / "identities" / f"{safe}.{role}.pem"


def load_identity(keys_dir: Path, actor: str, role: str) -> Identity:
    path = _identity_path(keys_dir, actor, role)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PermissionError(
            f"no signing key for {actor} as {role} (expected {path}); "
            "ask an administrator to enroll one"
        ) from None
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return Identity(actor, role, key)


def ensure_identity(keys_dir: Path, actor: str, role: str, trust: TrustStore) -> Identity:
    """Load an identity, creating and enrolling it if missing (embedded single-host use)."""
    path = _identity_path(keys_dir, actor, role)
    if path.exists():
        return load_identity(keys_dir, actor, role)
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    trust.enroll(actor, role, key.public_key())
    return Identity(actor, role, key)
