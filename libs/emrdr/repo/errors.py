"""The one exception hierarchy of the backup repository.

Every error names what is wrong (the object key, the object kind and id, the data key, the
path) so that an operator reading a log line knows where to look.
"""

from __future__ import annotations


class RepoError(Exception):
    """Base of every backup-repository error."""


class InvalidKey(RepoError, ValueError):
    """An object key that is not a safe relative '/'-separated name."""

    def __init__(self, key: object, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"invalid object key {key!r}: {reason}")


class ObjectNotFound(RepoError, KeyError):
    """The object does not exist in the repository."""

    def __init__(self, key: str, where: str = "") -> None:
        self.key = key
        self.where = where
        suffix = f" in {where}" if where else ""
        super().__init__(f"object {key!r} not found{suffix}")

    def __str__(self) -> str:  # KeyError would quote the whole message again
        return str(self.args[0])


class ObjectExists(RepoError):
    """Immutability violation: different content under a key that already exists."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"object {key!r} already exists with different content; repository objects are "
            "immutable and are never overwritten"
        )


class IntegrityError(RepoError):
    """An object failed authentication or its content does not match its identity."""

    def __init__(self, kind: str, id: str, detail: str) -> None:
        self.kind = kind
        self.id = id
        self.detail = detail
        super().__init__(f"{kind} {id}: {detail}")


class WrongKeyError(RepoError):
    """The key-encryption key does not unwrap a data key (wrong passphrase or key file)."""

    def __init__(self, key_id: str, source: str = "passphrase") -> None:
        self.key_id = key_id
        self.source = source
        super().__init__(
            f"wrong {source}: key-encryption key does not unwrap data key {key_id}; "
            "nothing was changed"
        )


class StorageFullError(RepoError):
    """No space left where an object was being written; no partial object was left behind."""

    def __init__(self, path: str, detail: str = "no space left on device") -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {detail}; the object was not written")


class WeakKdfError(RepoError, ValueError):
    """A passphrase KDF weaker than the repository accepts."""


class KeyringError(RepoError):
    """The keyring is missing, already initialised, or was changed concurrently."""


class UnknownDataKey(KeyringError, KeyError):
    """A data-key id that is not in the key ring."""

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        super().__init__(f"data key {key_id!r} is not in the key ring")

    def __str__(self) -> str:
        return str(self.args[0])
