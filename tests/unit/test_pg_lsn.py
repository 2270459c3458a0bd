"""LSN text <-> integer, differences, and WAL file names."""

from __future__ import annotations

import pytest

from emrdr.pg.lsn import (
    format_lsn,
    history_name,
    is_history_name,
    is_segment_name,
    lsn_diff,
    parse_lsn,
    parse_segment_name,
    segment_name,
    segment_start_lsn,
    timeline_of,
)


class TestParseFormat:
    @pytest.mark.parametrize(
        ("text", "value"),
        [("0/0", 0), ("0/3000060", 0x3000060), ("16/B374D848", (0x16 << 32) | 0xB374D848),
         ("FFFFFFFF/FFFFFFFF", (1 << 64) - 1)],
    )
    def test_round_trip(self, text: str, value: int) -> None:
        """Parsing gives the byte position; formatting gives PostgreSQL's spelling back."""
        assert parse_lsn(text) == value
        assert format_lsn(value) == text

    def test_lower_case_and_spaces_accepted(self) -> None:
        assert parse_lsn(" 16/b374d848 ") == parse_lsn("16/B374D848")

    @pytest.mark.parametrize("bad", ["", "16", "16/", "/1", "G/1", "123456789/0", "1/2/3"])
    def test_rejects_garbage_naming_it(self, bad: str) -> None:
        with pytest.raises(ValueError, match="not an LSN"):
            parse_lsn(bad)

    def test_format_range(self) -> None:
        with pytest.raises(ValueError):
            format_lsn(-1)
        with pytest.raises(ValueError):
            format_lsn(1 << 64)


def test_lsn_diff_is_signed_and_accepts_both_forms() -> None:
    """Like pg_wal_lsn_diff: a - b in bytes."""
    assert lsn_diff("0/3000060", "0/3000000") == 0x60
    assert lsn_diff("1/0", "0/FFFFFFFF") == 1
    assert lsn_diff("0/0", "0/10") == -16
    assert lsn_diff(100, "0/10") == 84


class TestSegments:
    def test_segment_name_matches_postgres(self) -> None:
        """Same names PostgreSQL gives its WAL files (16 MiB segments)."""
        assert segment_name(1, "0/3000060") == "000000010000000000000003"
        assert segment_name(2, "16/B374D848") == "0000000200000016000000B3"
        assert segment_name(1, "1/0") == "000000010000000100000000"

    def test_other_segment_size(self) -> None:
        """With 64 MiB segments there are 64 segments per log id."""
        assert segment_name(1, "0/FC000000", 64 * 1024 * 1024) == "00000001000000000000003F"

    def test_parse_round_trip(self) -> None:
        name = "0000000200000016000000B3"
        tli, segno = parse_segment_name(name)
        assert tli == 2
        assert segment_start_lsn(name) == parse_lsn("16/B3000000")
        assert segment_name(tli, segment_start_lsn(name)) == name
        assert segno == 0x16 * 256 + 0xB3

    def test_rejects_bad_names(self) -> None:
        with pytest.raises(ValueError, match="not a WAL segment"):
            parse_segment_name("00000001000000000000003")
        with pytest.raises(ValueError, match="too large"):
            parse_segment_name("000000010000000000000100")
        with pytest.raises(ValueError, match="power of two"):
            segment_name(1, 0, seg_size=3)
        with pytest.raises(ValueError, match="timeline"):
            segment_name(0, 0)

    def test_classification(self) -> None:
        assert is_segment_name("000000010000000000000003")
        assert not is_segment_name("000000010000000000000003.partial")
        assert is_history_name("00000002.history")
        assert history_name(10) == "0000000A.history"
        assert timeline_of("0000000A.history") == 10
        assert timeline_of("000000030000000000000003") == 3
        with pytest.raises(ValueError):
            timeline_of("backup_label")
