"""Rendering and reading emrdr's PostgreSQL configuration file; slot names."""

from __future__ import annotations

from pathlib import Path

import pytest

from emrdr.pg.instance import (
    GucValue,
    parse_conf,
    quote_guc,
    render_conf,
    sandbox_gucs,
    slot_name_for,
)


class TestQuote:
    def test_values(self) -> None:
        assert quote_guc(True) == "on"
        assert quote_guc(False) == "off"
        assert quote_guc(10) == "10"
        assert quote_guc("128MB") == "'128MB'"
        assert quote_guc("it's") == "'it''s'"


class TestRenderParse:
    def test_round_trip_keeps_order_and_text(self) -> None:
        """Every value read back is the text that was written (quotes, %-signs, spaces)."""
        gucs: dict[str, GucValue] = {
            "port": 5433,
            "hot_standby": True,
            "archive_command": "/opt/x/bin/emrdr wal push '%p' # not a comment",
            "primary_conninfo": "host=127.0.0.1 port=5432 application_name=pg-replica-1",
        }
        text = render_conf(gucs)
        assert text.index("port =") < text.index("hot_standby =") < text.index("archive_command")
        assert parse_conf(text) == {
            "port": "5433",
            "hot_standby": "on",
            "archive_command": "/opt/x/bin/emrdr wal push '%p' # not a comment",
            "primary_conninfo": "host=127.0.0.1 port=5432 application_name=pg-replica-1",
        }

    def test_parse_ignores_comments_and_later_lines_win(self) -> None:
        text = "# header\n\nport = 1\nshared_buffers = 64MB  # trailing\nport=2\n"
        assert parse_conf(text) == {"port": "2", "shared_buffers": "64MB"}

    def test_rejects_bad_names(self) -> None:
        with pytest.raises(ValueError, match="not a PostgreSQL setting name"):
            render_conf({"port; DROP": 1})


def test_sandbox_gucs_are_replication_ready() -> None:
    """A sandbox node listens on loopback only and is ready to stream and archive."""
    g = sandbox_gucs(name="pg-primary", port=6000, socket_dir=Path("/x/run"))
    assert g["listen_addresses"] == "127.0.0.1"
    assert g["port"] == 6000
    assert g["unix_socket_directories"] == "/x/run"
    assert g["wal_level"] == "replica"
    assert g["archive_mode"] is True
    assert g["archive_command"] == "true"
    assert g["wal_log_hints"] is True
    assert g["cluster_name"] == "pg-primary"


@pytest.mark.parametrize(
    ("name", "slot"),
    [("pg-replica-1", "pg_replica_1"), ("Ward.B", "ward_b"), ("", "replica")],
)
def test_slot_names(name: str, slot: str) -> None:
    assert slot_name_for(name) == slot
