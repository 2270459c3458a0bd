"""Object-key validation shared by every storage backend."""

from __future__ import annotations

import pytest

from emrdr.repo.errors import InvalidKey
from emrdr.repo.storage import validate_key, validate_prefix


class TestValidateKey:
    @pytest.mark.parametrize(
        "key",
        [
            "chunks/3f/3fa2",
            "keys/k-0001-ab12cd34.000001.json",
            "wal/000000010000000000000001",
            "wal/00000002.history",
            "wal/000000010000000000000003.partial",
            "manifests/b-2025-06-22T02:00:00Z".replace(":", "-"),
            "a+b=c@d",
        ],
    )
    def test_accepts_repository_names(self, key: str) -> None:
        assert validate_key(key) == key

    @pytest.mark.parametrize(
        ("key", "reason"),
        [
            ("", "empty"),
            ("/abs", "absolute"),
            ("..", "'..'"),
            ("a/../b", "'..'"),
            ("a//b", "''"),
            ("a/.", "'.'"),
            (".tmp", "not start with '.'"),
            ("a b", "must use only"),
            ("ä", "must use only"),
        ],
    )
    def test_rejects_with_a_reason(self, key: str, reason: str) -> None:
        with pytest.raises(InvalidKey, match=reason):
            validate_key(key)

    def test_rejects_non_strings(self) -> None:
        with pytest.raises(InvalidKey, match="must be a str"):
            validate_key(b"chunks/x")

    def test_prefixes(self) -> None:
        assert validate_prefix("") == ""
        assert validate_prefix("chunks/") == "chunks/"
        assert validate_prefix("chunks/3") == "chunks/3"
        for bad in ("/", "../", "/x"):
            with pytest.raises(InvalidKey):
                validate_prefix(bad)
