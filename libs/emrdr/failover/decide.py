"""What the coordinator does next: a pure function over one frozen snapshot.

:func:`decide` reads a :class:`Snapshot` (the latest observation of every node, the recorded
primary, the failure judgement, sync mode, the lease) and returns a :class:`Decision`: an action,
the node to promote when failing over, and a plain sentence saying why. Side effects happen
elsewhere (:mod:`emrdr.failover.execute`); tests assert the sentences.

Rules, in order: only the lease holder acts; an action in progress is waited for; two running
primaries page; an unrecorded primary is adopted or paged; a primary not judged failed is left
alone; a failed primary is replaced by the reachable replica with the most WAL within
``max_lag_bytes`` of the primary's last known position (in sync mode: a synchronous standby
only); no such replica pages instead of promoting.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from emrdr.failover.judge import HealthHistory, Judgement, judge_primary, observation_lsn
from emrdr.failover.settings import MIB, FailoverSettings
from emrdr.messages.events import NodeObservation
from emrdr.pg.lsn import format_lsn

__all__ = [
    "Action",
    "Candidate",
    "Decision",
    "Snapshot",
    "choose_candidate",
    "decide",
    "format_bytes",
]


class Action(StrEnum):
    NONE = "none"
    WAIT = "wait"
    FAILOVER = "failover"
    PAGE = "page"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    target: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything one decision reads, taken once per cycle."""

    nodes: tuple[NodeObservation, ...]
    primary: str | None
    """The primary as recorded (topology), whatever it answers now."""
    judgement: Judgement
    primary_lsn: int | None = None
    """The recorded primary's last known WAL position (for replica lag at failure)."""
    sync_mode: bool = False
    sync_standbys: frozenset[str] = frozenset()
    max_lag_bytes: int = 16 * MIB
    lease_held: bool = False
    epoch: int | None = None
    in_progress: str | None = None
    """A sentence naming an action under way (e.g. "failover to pg-replica-1 (epoch 7)")."""

    @classmethod
    def build(
        cls,
        history: HealthHistory,
        primary: str | None,
        now: float,
        settings: FailoverSettings,
        *,
        lease_held: bool,
        epoch: int | None,
        sync_standbys: Iterable[str] = (),
        in_progress: str | None = None,
    ) -> Snapshot:
        """A snapshot from a health history: latest observations, judgement, last LSN."""
        latest = history.latest()
        judgement = (
            judge_primary(history, primary, now, settings)
            if primary is not None
            else Judgement(False, "no primary recorded")
        )
        return cls(
            nodes=tuple(latest[name] for name in sorted(latest)),
            primary=primary,
            judgement=judgement,
            primary_lsn=history.last_known_lsn(primary) if primary is not None else None,
            sync_mode=settings.sync_mode,
            sync_standbys=frozenset(sync_standbys),
            max_lag_bytes=settings.max_lag_bytes,
            lease_held=lease_held,
            epoch=epoch,
            in_progress=in_progress,
        )

    def node(self, name: str) -> NodeObservation | None:
        for n in self.nodes:
            if n.name == name:
                return n
        return None

    def running_primaries(self) -> list[str]:
        """Reachable nodes that are not in recovery."""
        return sorted(n.name for n in self.nodes if n.reachable and n.role == "primary")


def format_bytes(n: int) -> str:
    """``16777216`` -> ``"16 MiB"``; whole units without decimals."""
    if n < 1024:
        return f"{n} bytes" if n != 1 else "1 byte"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            text = f"{value:.0f}" if value == int(value) else f"{value:.1f}"
            return f"{text} {unit}"
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Candidate:
    name: str
    lsn: int
    lag_bytes: int
    timeline: int


def _replica_list(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def choose_candidate(s: Snapshot) -> tuple[Candidate | None, str]:
    """The replica to promote and why, or None and why not (a sentence either way)."""
    others = [n for n in s.nodes if n.name != s.primary]
    reachable = [n for n in others if n.reachable and n.role == "replica"]
    if not reachable:
        down = ", ".join(f"{n.name} unreachable" for n in others if not n.reachable)
        return None, f"no reachable replica to promote ({down or 'no replicas known'})"
    kind = "replica"
    if s.sync_mode:
        kind = "synchronous standby"
        sync = [n for n in reachable if n.name in s.sync_standbys]
        if not sync:
            return None, (
                "synchronous mode: no reachable synchronous standby (synchronous: "
                f"{_replica_list(s.sync_standbys)}); promoting an asynchronous replica could "
                "lose acknowledged commits"
            )
        reachable = sync
    positioned = [(n, observation_lsn(n)) for n in reachable]
    unknown = [n.name for n, lsn in positioned if lsn is None]
    known = [(n, lsn) for n, lsn in positioned if lsn is not None]
    if not known:
        return None, f"no {kind} reports a WAL position ({_replica_list(unknown)}); not promoting"
    reference = s.primary_lsn if s.primary_lsn is not None else max(lsn for _, lsn in known)
    what = "the failed primary" if s.primary_lsn is not None else "the most advanced replica"
    scored = [
        Candidate(n.name, lsn, max(0, reference - lsn), n.timeline or 0) for n, lsn in known
    ]
    within = [c for c in scored if c.lag_bytes <= s.max_lag_bytes]
    if not within:
        behind = ", ".join(
            f"{c.name} is {format_bytes(c.lag_bytes)} behind"
            for c in sorted(scored, key=lambda c: c.lag_bytes)
        )
        return None, (
            f"no {kind} within {format_bytes(s.max_lag_bytes)} of {what}: {behind}; "
            "not promoting"
        )
    best = max(within, key=lambda c: (c.timeline, c.lsn, _neg_name(c.name)))
    return best, (
        f"promoting {best.name}, the {kind} with the most WAL ({format_lsn(best.lsn)}, "
        f"{format_bytes(best.lag_bytes)} behind {what})"
    )


def _neg_name(name: str) -> tuple[int, ...]:
    """Sort key making the alphabetically first name win a tie under max()."""
    return tuple(-ord(ch) for ch in name)


def decide(s: Snapshot) -> Decision:
    """The next action for this snapshot, with its reason."""
    if not s.lease_held:
        return Decision(Action.NONE, "not the lease holder; another coordinator decides")
    if s.epoch is None:
        return Decision(Action.NONE, "lease held but no fencing epoch known; not acting")
    if s.in_progress:
        return Decision(Action.WAIT, f"{s.in_progress} is in progress; waiting for it to finish")
    running = s.running_primaries()
    if len(running) > 1:
        return Decision(
            Action.PAGE,
            f"{' and '.join(running)} both run as primary; not acting automatically",
        )
    if s.primary is None:
        if running:
            return Decision(
                Action.NONE, f"no primary recorded; {running[0]} runs as primary (record it)"
            )
        return Decision(
            Action.PAGE, "no primary recorded and none runs; not choosing one automatically"
        )
    if s.node(s.primary) is None:
        return Decision(
            Action.PAGE, f"recorded primary {s.primary} is not among the observed nodes"
        )
    if not s.judgement.failed:
        action = Action.WAIT if s.judgement.suspected else Action.NONE
        return Decision(action, s.judgement.reason)
    if running:
        return Decision(
            Action.NONE,
            f"{s.judgement.reason}; but {running[0]} already runs as primary (record it, "
            "do not promote another)",
        )
    candidate, why = choose_candidate(s)
    if candidate is None:
        return Decision(Action.PAGE, f"{s.judgement.reason}; {why}")
    return Decision(Action.FAILOVER, f"{s.judgement.reason}; {why}", target=candidate.name)
