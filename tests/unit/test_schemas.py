"""schemas/ is generated from the models; this fails when they drift."""

from __future__ import annotations

from pathlib import Path

from emrdr.messages.export import schema_files

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_schemas_match_models() -> None:
    """Every generated file is committed, identical, and nothing stale is left."""
    expected = schema_files()
    on_disk = {p.name: p.read_text() for p in SCHEMAS.glob("*.json")}
    missing = sorted(set(expected) - set(on_disk))
    stale = sorted(set(on_disk) - set(expected))
    changed = sorted(n for n in expected if n in on_disk and on_disk[n] != expected[n])
    hint = "regenerate with: python -m emrdr.messages.export schemas"
    assert not missing, f"missing schema files {missing}; {hint}"
    assert not stale, f"stale schema files {stale}; {hint}"
    assert not changed, f"schemas drifted from the models: {changed}; {hint}"


def test_every_message_has_a_schema_with_its_subject() -> None:
    import json

    from emrdr.messages import REGISTRY

    for cls in REGISTRY:
        schema = json.loads((SCHEMAS / f"{cls.__name__}.v{cls.current_version}.json").read_text())
        assert schema["x-subject"] == cls.subject
        assert schema["properties"]["type"]["const"] == cls.__name__
        for field in (
            "event_id",
            "occurred_at",
            "schema_version",
            "correlation_id",
            "causation_id",
        ):
            assert field in schema["properties"], (cls.__name__, field)
