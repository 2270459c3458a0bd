"""decide(): one rule per case, each asserted by its reason sentence."""

from __future__ import annotations

from dataclasses import replace

import pytest

from emrdr.failover.decide import (
    Action,
    Decision,
    Snapshot,
    choose_candidate,
    decide,
    format_bytes,
)
from emrdr.failover.execute import FailoverAborted, execute_failover
from emrdr.failover.judge import HealthHistory, Judgement
from emrdr.failover.settings import MIB, FailoverSettings
from emrdr.messages.events import NodeObservation
from emrdr.pg.lsn import format_lsn

P, R1, R2 = "pg-primary", "pg-replica-1", "pg-replica-2"
BASE = 0x50000000  # the failed primary's last known position
FAILED = Judgement(True, "pg-primary failed 3 consecutive checks over 2.0 s", P, suspected=True)


def primary(up: bool = True, name: str = P) -> NodeObservation:
    if not up:
        return NodeObservation(name=name, host="h", port=1, reachable=False, error="refused")
    return NodeObservation(
        name=name, host="h", port=1, reachable=True, role="primary", current_lsn=format_lsn(BASE)
    )


def replica(name: str, behind: int = 0, up: bool = True, replay_behind: int | None = None,
            timeline: int = 1) -> NodeObservation:
    if not up:
        return NodeObservation(name=name, host="h", port=2, reachable=False, error="refused")
    replay = BASE - (replay_behind if replay_behind is not None else behind)
    return NodeObservation(
        name=name, host="h", port=2, reachable=True, role="replica", timeline=timeline,
        receive_lsn=format_lsn(BASE - behind), replay_lsn=format_lsn(replay),
    )


def snap(*nodes: NodeObservation, **kw: object) -> Snapshot:
    args: dict[str, object] = {
        "nodes": nodes or (primary(up=False), replica(R1), replica(R2)),
        "primary": P,
        "judgement": FAILED,
        "primary_lsn": BASE,
        "lease_held": True,
        "epoch": 7,
    }
    args.update(kw)
    return Snapshot(**args)  # type: ignore[arg-type]


class TestWhoActs:
    def test_only_the_lease_holder_acts(self) -> None:
        d = decide(snap(lease_held=False))
        assert d.action is Action.NONE
        assert d.reason == "not the lease holder; another coordinator decides"

    def test_no_epoch_no_action(self) -> None:
        d = decide(snap(epoch=None))
        assert (d.action, d.reason) == (
            Action.NONE, "lease held but no fencing epoch known; not acting"
        )

    def test_an_action_in_progress_is_waited_for(self) -> None:
        d = decide(snap(in_progress="failover to pg-replica-1 (epoch 7)"))
        assert d.action is Action.WAIT
        assert d.reason == (
            "failover to pg-replica-1 (epoch 7) is in progress; waiting for it to finish"
        )


class TestPrimaryState:
    def test_healthy_primary_means_nothing_to_do(self) -> None:
        ok = Judgement(False, "pg-primary answered its last check", P)
        d = decide(snap(primary(), replica(R1), judgement=ok))
        assert (d.action, d.reason, d.target) == (
            Action.NONE, "pg-primary answered its last check", None
        )

    def test_suspected_primary_means_wait(self) -> None:
        j = Judgement(False, "pg-primary failed 1 of 3 consecutive checks needed; not failed yet",
                      P, suspected=True)
        d = decide(snap(primary(up=False), replica(R1), judgement=j))
        assert d.action is Action.WAIT
        assert d.reason == j.reason

    def test_two_running_primaries_page(self) -> None:
        d = decide(snap(primary(), primary(name=R1), replica(R2)))
        assert d.action is Action.PAGE
        assert d.reason == (
            "pg-primary and pg-replica-1 both run as primary; not acting automatically"
        )

    def test_unrecorded_primary_is_adopted_not_promoted(self) -> None:
        d = decide(snap(primary(), replica(R1), primary=None))
        assert (d.action, d.reason) == (
            Action.NONE, "no primary recorded; pg-primary runs as primary (record it)"
        )

    def test_no_primary_anywhere_pages(self) -> None:
        d = decide(snap(replica(R1), replica(R2), primary=None))
        assert (d.action, d.reason) == (
            Action.PAGE, "no primary recorded and none runs; not choosing one automatically"
        )

    def test_recorded_primary_unknown_pages(self) -> None:
        d = decide(snap(replica(R1), primary="pg-gone"))
        assert d.action is Action.PAGE
        assert d.reason == "recorded primary pg-gone is not among the observed nodes"

    def test_failed_primary_already_replaced(self) -> None:
        d = decide(snap(primary(up=False), primary(name=R1), replica(R2)))
        assert d.action is Action.NONE
        assert d.reason.endswith(
            "; but pg-replica-1 already runs as primary (record it, do not promote another)"
        )


class TestCandidate:
    def test_most_advanced_replica_is_promoted(self) -> None:
        d = decide(snap(primary(up=False), replica(R1, behind=4096), replica(R2, behind=0)))
        assert (d.action, d.target) == (Action.FAILOVER, R2)
        assert d.reason == (
            "pg-primary failed 3 consecutive checks over 2.0 s; promoting pg-replica-2, the "
            "replica with the most WAL (0/50000000, 0 bytes behind the failed primary)"
        )

    def test_received_wal_counts_even_if_not_yet_replayed(self) -> None:
        """Received WAL is on the replica's disk and is replayed at promotion."""
        d = decide(snap(primary(up=False), replica(R1, behind=0, replay_behind=8 * MIB),
                        replica(R2, behind=1024)))
        assert d.target == R1

    def test_unreachable_replica_is_skipped(self) -> None:
        d = decide(snap(primary(up=False), replica(R1, up=False), replica(R2, behind=2 * MIB)))
        assert d.target == R2
        assert d.reason.endswith("(0/4FE00000, 2 MiB behind the failed primary)")

    def test_no_replica_within_max_lag_pages(self) -> None:
        d = decide(snap(primary(up=False), replica(R1, behind=200 * MIB), max_lag_bytes=16 * MIB))
        assert d.action is Action.PAGE and d.target is None
        assert d.reason == (
            "pg-primary failed 3 consecutive checks over 2.0 s; no replica within 16 MiB of the "
            "failed primary: pg-replica-1 is 200 MiB behind; not promoting"
        )

    def test_the_lagging_replica_is_passed_over_for_one_within_bounds(self) -> None:
        d = decide(snap(primary(up=False), replica(R1, behind=200 * MIB),
                        replica(R2, behind=10 * MIB)))
        assert d.target == R2

    def test_no_reachable_replica_pages(self) -> None:
        d = decide(snap(primary(up=False), replica(R1, up=False)))
        assert d.action is Action.PAGE
        assert d.reason.endswith("; no reachable replica to promote (pg-replica-1 unreachable)")

    def test_unknown_primary_position_compares_replicas_with_each_other(self) -> None:
        d = decide(snap(primary(up=False), replica(R1, behind=100 * MIB), replica(R2),
                        primary_lsn=None))
        assert d.target == R2
        assert d.reason.endswith("0 bytes behind the most advanced replica)")
        d = decide(snap(primary(up=False), replica(R1, behind=100 * MIB), replica(R2, up=False),
                        primary_lsn=None))
        assert d.target == R1  # nothing to compare with: it is the most advanced

    def test_a_tie_goes_to_the_first_name(self) -> None:
        d = decide(snap(primary(up=False), replica(R2), replica(R1)))
        assert d.target == R1

    def test_a_higher_timeline_wins(self) -> None:
        d = decide(snap(primary(up=False), replica(R1, timeline=1),
                        replica(R2, behind=1, timeline=2)))
        assert d.target == R2

    def test_replica_without_positions_is_not_promoted(self) -> None:
        blank = NodeObservation(name=R1, host="h", port=2, reachable=True, role="replica")
        d = decide(snap(primary(up=False), blank))
        assert d.action is Action.PAGE
        assert d.reason.endswith(
            "; no replica reports a WAL position (pg-replica-1); not promoting"
        )


class TestSyncMode:
    def test_only_a_synchronous_standby_is_promoted(self) -> None:
        d = decide(snap(primary(up=False), replica(R1, behind=0), replica(R2, behind=4096),
                        sync_mode=True, sync_standbys=frozenset({R2})))
        assert (d.action, d.target) == (Action.FAILOVER, R2)
        assert "promoting pg-replica-2, the synchronous standby with the most WAL" in d.reason

    def test_no_reachable_synchronous_standby_pages(self) -> None:
        d = decide(snap(primary(up=False), replica(R1), replica(R2, up=False),
                        sync_mode=True, sync_standbys=frozenset({R2})))
        assert d.action is Action.PAGE
        assert d.reason.endswith(
            "; synchronous mode: no reachable synchronous standby (synchronous: pg-replica-2); "
            "promoting an asynchronous replica could lose acknowledged commits"
        )

    def test_sync_standbys_are_ignored_outside_sync_mode(self) -> None:
        d = decide(snap(primary(up=False), replica(R1), replica(R2, behind=4096),
                        sync_standbys=frozenset({R2})))
        assert d.target == R1


class TestSnapshotBuild:
    def test_from_history(self) -> None:
        h = HealthHistory()
        for t in range(4):
            h = h.observed(float(t), "m1", [primary(up=t == 0), replica(R1), replica(R2, behind=9)])
        s = Snapshot.build(h, P, 3.0, FailoverSettings(), lease_held=True, epoch=3)
        assert s.judgement.failed
        assert s.primary_lsn == BASE
        assert [n.name for n in s.nodes] == [P, R1, R2]
        d = decide(s)
        assert (d.action, d.target) == (Action.FAILOVER, R1)

    def test_snapshot_is_frozen(self) -> None:
        s = snap()
        assert replace(s, epoch=9).epoch == 9 and s.epoch == 7


class TestChooseCandidate:
    def test_returns_the_candidate_with_its_lag(self) -> None:
        c, why = choose_candidate(snap(primary(up=False), replica(R1, behind=3 * MIB)))
        assert c is not None and (c.name, c.lag_bytes) == (R1, 3 * MIB)
        assert why.startswith("promoting pg-replica-1")


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 bytes"
    assert format_bytes(1) == "1 byte"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(16 * MIB) == "16 MiB"
    assert format_bytes(200 * MIB) == "200 MiB"
    assert format_bytes(3 * 1024 * MIB) == "3 GiB"


async def test_execute_refuses_what_is_not_a_failover() -> None:
    with pytest.raises(FailoverAborted, match="not a failover decision: page: no replica"):
        await execute_failover(Decision(Action.PAGE, "no replica"), {}, old_primary=P, epoch=1)
    with pytest.raises(FailoverAborted, match="failover target pg-x is not a known node"):
        await execute_failover(
            Decision(Action.FAILOVER, "x", target="pg-x"), {}, old_primary=P, epoch=1
        )
