"""The envelope every message shares, and the registry that decodes bytes into models."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


def utcnow() -> datetime:
    return datetime.now(UTC)


class Issuer(BaseModel):
    """Who issued a command: an operator, another system, or an emrdr service."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    actor: str = Field(
        description="Authenticated name of the person or system.", examples=["dba.jane"]
    )
    role: Literal[
        "backup_operator", "dba", "compliance_officer", "emergency_responder", "admin", "system"
    ] = Field(description="Role the command is issued under.", examples=["dba"])
    key_id: str | None = Field(
        default=None, description="Identifier of the signing key (its public-key fingerprint)."
    )


Outcome = Literal["progress", "success", "failure"]


class Message(BaseModel):
    """Fields every command and event carries."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject: ClassVar[str] = ""
    current_version: ClassVar[int] = 1

    type: str = Field(default="", description="Message type name; equals the class name.")
    schema_version: int = Field(default=1, ge=1, description="Version of this message's schema.")
    event_id: uuid.UUID = Field(
        default_factory=uuid.uuid4, description="Unique id of this message."
    )
    occurred_at: datetime = Field(default_factory=utcnow, description="When it happened (UTC).")
    correlation_id: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        description="Shared by every message of one piece of work (a command and its events).",
    )
    causation_id: uuid.UUID | None = Field(
        default=None, description="event_id of the message that caused this one."
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        # Each concrete message's ``type`` defaults to (and must equal) its class name.
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields["type"]
        field.default = cls.__name__
        field.json_schema_extra = {"const": cls.__name__}
        cls.model_rebuild(force=True)

    @model_validator(mode="after")
    def _type_matches_class(self) -> Message:
        if self.type != type(self).__name__:
            raise ValueError(f"type {self.type!r} does not match {type(self).__name__}")
        return self

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    def caused(self) -> dict[str, Any]:
        """Envelope fields for a message caused by this one."""
        return {"correlation_id": self.correlation_id, "causation_id": self.event_id}


class Command(Message):
    """An imperative request; carries the issuer's identity and signature."""

    issuer: Issuer = Field(description="Who issued the command.")
    signature: str | None = Field(
        default=None,
        description="Base64 Ed25519 signature over the canonical command without this field.",
    )


class Event(Message):
    """A fact, named in the past tense."""

    source: str = Field(
        description="Service (and instance) that published it.", examples=["backup-worker"]
    )
    outcome: ClassVar[Outcome | None] = None


class DecodeError(ValueError):
    """A message that cannot be turned into a known model; names what is wrong."""


class Registry:
    """Type name -> model class, with the schema versions each accepts."""

    def __init__(self) -> None:
        self._types: dict[str, type[Message]] = {}

    def register(self, cls: type[Message]) -> type[Message]:
        if cls.__name__ in self._types:
            raise ValueError(f"message type {cls.__name__} registered twice")
        if not cls.subject:
            raise ValueError(f"message type {cls.__name__} has no subject")
        self._types[cls.__name__] = cls
        return cls

    def __iter__(self) -> Any:
        return iter(sorted(self._types.values(), key=lambda c: c.__name__))

    def get(self, name: str) -> type[Message]:
        try:
            return self._types[name]
        except KeyError:
            raise DecodeError(f"unknown message type {name!r}") from None

    def decode(self, data: bytes | str) -> Message:
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DecodeError(f"message is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise DecodeError("message is not a JSON object")
        name = raw.get("type")
        if not isinstance(name, str):
            raise DecodeError("message has no 'type' field")
        cls = self.get(name)
        version = raw.get("schema_version", 1)
        if version != cls.current_version:
            raise DecodeError(
                f"{name} schema_version {version!r} is not supported "
                f"(this build reads version {cls.current_version})"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise DecodeError(
                f"{name} is malformed: {where or 'message'}: {first.get('msg')} "
                f"({exc.error_count()} error(s))"
            ) from None


REGISTRY = Registry()


M = TypeVar("M", bound=type[Message])


def register(cls: M) -> M:
    REGISTRY.register(cls)
    return cls
