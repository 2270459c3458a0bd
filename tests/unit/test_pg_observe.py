"""Replication lag rules and turning raw node facts into observations (no servers needed)."""

from __future__ import annotations

from emrdr.config import PgNode
from emrdr.pg.observe import (
    NodeFacts,
    derive_observation,
    pick_primary,
    replica_lag_bytes,
    replica_lag_seconds,
)


def lag_s(**kw: object) -> float | None:
    args: dict[str, object] = {
        "receive_lsn": 1000, "replay_lsn": 1000, "primary_lsn": 1000,
        "replay_age_s": 7200.0, "receiver_streaming": True, "upstream_replay_lag_s": None,
    }
    args.update(kw)
    return replica_lag_seconds(**args)  # type: ignore[arg-type]


class TestLagSeconds:
    def test_idle_caught_up_is_zero_however_old_the_last_commit(self) -> None:
        """The classic bug: now() - last replay timestamp grows forever on an idle primary."""
        assert lag_s() == 0.0
        assert lag_s(primary_lsn=None) == 0.0

    def test_replay_backlog_uses_age_of_last_replayed_commit(self) -> None:
        assert lag_s(receive_lsn=2000, primary_lsn=2000, replay_age_s=12.5) == 12.5

    def test_primary_measurement_wins_when_behind(self) -> None:
        assert lag_s(receive_lsn=2000, primary_lsn=2000, upstream_replay_lag_s=0.8) == 0.8

    def test_only_in_flight_wal_while_streaming_is_zero(self) -> None:
        """Primary a few bytes ahead, everything received is replayed: WAL is on the wire."""
        assert lag_s(primary_lsn=1100) == 0.0

    def test_disconnected_and_behind_primary_uses_replay_age(self) -> None:
        assert lag_s(primary_lsn=5000, receiver_streaming=False, replay_age_s=300.0) == 300.0

    def test_unknown_without_replay_position(self) -> None:
        assert lag_s(replay_lsn=None) is None
        assert lag_s(receive_lsn=2000, replay_age_s=None) is None


class TestLagBytes:
    def test_against_primary_when_known(self) -> None:
        assert replica_lag_bytes(receive_lsn=900, replay_lsn=800, primary_lsn=1000) == 200

    def test_received_minus_replayed_otherwise(self) -> None:
        assert replica_lag_bytes(receive_lsn=900, replay_lsn=800, primary_lsn=None) == 100

    def test_never_negative_and_none_when_unknown(self) -> None:
        assert replica_lag_bytes(receive_lsn=None, replay_lsn=1200, primary_lsn=1000) == 0
        assert replica_lag_bytes(receive_lsn=None, replay_lsn=None, primary_lsn=1000) is None
        assert replica_lag_bytes(receive_lsn=None, replay_lsn=5, primary_lsn=None) is None


def primary_facts(name: str = "p", timeline: int = 1, lsn: int = 0x3000060) -> NodeFacts:
    return NodeFacts(
        node=PgNode(name=name, port=1), reachable=True, in_recovery=False, timeline=timeline,
        current_lsn=lsn, standby_replay_lag={"r": 2.0},
    )


class TestDerive:
    def test_unreachable_keeps_error(self) -> None:
        obs = derive_observation(
            NodeFacts(node=PgNode(name="x", port=9), reachable=False, error="refused")
        )
        assert (obs.reachable, obs.role, obs.error, obs.port) == (False, "unknown", "refused", 9)

    def test_primary(self) -> None:
        obs = derive_observation(primary_facts())
        assert (obs.role, obs.timeline, obs.current_lsn) == ("primary", 1, "0/3000060")
        assert obs.lag_bytes is None and obs.lag_seconds is None

    def test_replica_measured_against_primary(self) -> None:
        facts = NodeFacts(
            node=PgNode(name="r", port=2), reachable=True, in_recovery=True, timeline=1,
            receive_lsn=0x3000000, replay_lsn=0x3000000, replay_age_s=99.0,
            receiver_streaming=True,
        )
        obs = derive_observation(facts, primary_facts())
        assert obs.role == "replica"
        assert obs.receive_lsn == obs.replay_lsn == "0/3000000"
        assert obs.lag_bytes == 0x60
        assert obs.lag_seconds == 2.0  # the primary's pg_stat_replication.replay_lag for "r"

    def test_pick_primary_prefers_newest_timeline(self) -> None:
        old, new = primary_facts("old", 1, 10**9), primary_facts("new", 2, 10)
        down = NodeFacts(node=PgNode(name="d"), reachable=False)
        assert pick_primary([old, new, down]) is new
        assert pick_primary([down]) is None
