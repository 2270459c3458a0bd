"""Failure detection: is the primary dead? Judged from repeated observations, never one probe.

A :class:`HealthHistory` is a frozen record of timestamped checks (one
:class:`~emrdr.messages.events.NodeObservation` per node per poll, per monitor) and of external
alerts. :func:`judge_primary` is pure: the primary is failed only when a quorum (majority) of the
monitors each saw ``failures_required`` consecutive failed checks spanning at least ``window_s``.
Alerts (Alertmanager webhooks, bus health events) raise suspicion, so the caller can probe now,
but never fail a primary by themselves.

    h = HealthHistory().observed(now, "monitor-1", observations)
    j = judge_primary(h, "pg-primary", now, FailoverSettings())
    j.failed, j.reason
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from emrdr.config import PgNode
from emrdr.failover.settings import FailoverSettings
from emrdr.messages.events import NodeHealthChanged, NodeObservation
from emrdr.pg.lsn import parse_lsn

__all__ = [
    "AlertSignal",
    "AlertmanagerAlert",
    "AlertmanagerWebhook",
    "Check",
    "HealthHistory",
    "Judgement",
    "MonitorVerdict",
    "alert_signals",
    "judge_monitor",
    "judge_primary",
    "node_for_alert",
    "observation_lsn",
    "parse_alertmanager",
    "signal_from_health_event",
]


def observation_lsn(obs: NodeObservation) -> int | None:
    """The furthest WAL position a node reported: current LSN (primary) or received/replayed."""
    values = [parse_lsn(v) for v in (obs.current_lsn, obs.receive_lsn, obs.replay_lsn) if v]
    return max(values) if values else None


@dataclass(frozen=True)
class Check:
    """One observation of one node by one monitor at time ``at`` (seconds, caller's clock)."""

    at: float
    monitor: str
    observation: NodeObservation

    @property
    def node(self) -> str:
        return self.observation.name

    @property
    def failed(self) -> bool:
        """A check fails when the node does not answer."""
        return not self.observation.reachable


@dataclass(frozen=True)
class AlertSignal:
    """An external alert about one node, as received at ``at`` (caller's clock)."""

    at: float
    source: Literal["alertmanager", "bus"]
    name: str
    node: str
    firing: bool
    summary: str = ""


@dataclass(frozen=True)
class HealthHistory:
    """Recent checks and alerts; methods return a new history (it is never mutated)."""

    checks: tuple[Check, ...] = ()
    alerts: tuple[AlertSignal, ...] = ()
    keep: int = 20
    """Checks kept per (monitor, node); alerts kept: ``keep`` per node."""

    def observed(
        self, at: float, monitor: str, observations: Iterable[NodeObservation]
    ) -> HealthHistory:
        """Add one poll of a monitor (one observation per node)."""
        added = tuple(Check(at, monitor, o) for o in observations)
        return replace(self, checks=_trim(self.checks + added, self.keep, _check_key))

    def alerted(self, *signals: AlertSignal) -> HealthHistory:
        """Add external alerts."""
        return replace(
            self, alerts=_trim(self.alerts + tuple(signals), self.keep, lambda a: a.node)
        )

    def checks_of(self, node: str, monitor: str | None = None) -> list[Check]:
        """Checks of ``node`` (by one monitor, or all), oldest first."""
        found = [
            c for c in self.checks if c.node == node and (monitor is None or c.monitor == monitor)
        ]
        return sorted(found, key=lambda c: c.at)

    def monitors(self) -> list[str]:
        """Every monitor that ever reported, sorted."""
        return sorted({c.monitor for c in self.checks})

    def latest(self) -> dict[str, NodeObservation]:
        """The newest observation of each node, across monitors."""
        out: dict[str, Check] = {}
        for c in self.checks:
            if c.node not in out or c.at >= out[c.node].at:
                out[c.node] = c
        return {name: c.observation for name, c in out.items()}

    def last_known_lsn(self, node: str) -> int | None:
        """The highest WAL position ``node`` was seen at while reachable (None if never)."""
        values = [
            lsn
            for c in self.checks
            if c.node == node and not c.failed
            for lsn in [observation_lsn(c.observation)]
            if lsn is not None
        ]
        return max(values) if values else None


T = TypeVar("T")


def _check_key(c: Check) -> tuple[str, str]:
    return (c.monitor, c.node)


def _trim(items: tuple[T, ...], keep: int, key: Any) -> tuple[T, ...]:
    """Keep the last ``keep`` items per key, in their original order."""
    counts: dict[Any, int] = {}
    kept: list[T] = []
    for item in reversed(items):
        k = key(item)
        counts[k] = counts.get(k, 0) + 1
        if counts[k] <= keep:
            kept.append(item)
    return tuple(reversed(kept))


# --- judgement ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MonitorVerdict:
    """What one monitor's checks of a node say."""

    monitor: str
    failures: int
    """Trailing consecutive failed checks."""
    span_s: float
    """Seconds from the first to the last of those failed checks."""
    fresh: bool
    """Whether the newest check is recent enough to vote."""
    failed: bool
    last_error: str | None = None
    age_s: float | None = None
    """Age of the newest check."""

    def progress(self, settings: FailoverSettings) -> str:
        """Why this monitor has not (yet) declared the node failed, as a sentence fragment."""
        if self.failures == 0:
            return "answered its last check"
        if self.failures < settings.failures_required:
            return (
                f"failed {self.failures} of {settings.failures_required} consecutive checks "
                "needed"
            )
        return (
            f"failed {self.failures} consecutive checks over only {self.span_s:.1f} s "
            f"of the {settings.window_s:.1f} s needed"
        )


def judge_monitor(
    checks: Sequence[Check], monitor: str, now: float, settings: FailoverSettings
) -> MonitorVerdict:
    """One monitor's verdict from its checks of one node (oldest first; later than ``now``
    ignored)."""
    seen = [c for c in checks if c.at <= now]
    if not seen:
        return MonitorVerdict(monitor, 0, 0.0, fresh=False, failed=False)
    age = now - seen[-1].at
    streak: list[Check] = []
    for c in reversed(seen):
        if not c.failed:
            break
        streak.append(c)
    streak.reverse()
    span = streak[-1].at - streak[0].at if streak else 0.0
    fresh = age <= settings.stale_after_s
    failed = (
        fresh and len(streak) >= settings.failures_required and span >= settings.window_s
    )
    last_error = streak[-1].observation.error if streak else None
    return MonitorVerdict(
        monitor, len(streak), span, fresh=fresh, failed=failed, last_error=last_error, age_s=age
    )


@dataclass(frozen=True)
class Judgement:
    """Whether the primary is failed, and why, in one sentence."""

    failed: bool
    reason: str
    node: str | None = None
    suspected: bool = False
    """Something is wrong (a failed check or a firing alert): probe again soon."""
    agreeing: int = 0
    quorum: int = 1
    monitors: int = 0
    verdicts: tuple[MonitorVerdict, ...] = field(default=())


def _firing_alerts(
    history: HealthHistory, node: str, now: float, settings: FailoverSettings
) -> list[AlertSignal]:
    """Alerts about ``node`` whose latest state (per source and name) is firing and recent."""
    latest: dict[tuple[str, str], AlertSignal] = {}
    for a in sorted(history.alerts, key=lambda a: a.at):
        if a.node == node and a.at <= now:
            latest[(a.source, a.name)] = a
    return [
        a for a in latest.values() if a.firing and now - a.at <= settings.alert_max_age_s
    ]


def _alert_note(alerts: Sequence[AlertSignal]) -> str:
    names = ", ".join(sorted({f"{a.name} ({a.source})" for a in alerts}))
    return f"alert {names} fires"


def judge_primary(
    history: HealthHistory, primary: str, now: float, settings: FailoverSettings
) -> Judgement:
    """Judge whether ``primary`` has failed, from every monitor's checks and the alerts."""
    monitors = history.monitors()
    expected = max(settings.expected_monitors or 0, len(monitors))
    alerts = _firing_alerts(history, primary, now, settings)
    if expected == 0 or not history.checks_of(primary):
        reason = f"no observation of {primary} yet; cannot judge"
        if alerts:
            reason = f"{_alert_note(alerts)} for {primary}, but {reason}; probing"
        return Judgement(False, reason, primary, suspected=bool(alerts), monitors=expected)
    quorum = expected // 2 + 1
    verdicts = tuple(
        judge_monitor(history.checks_of(primary, m), m, now, settings) for m in monitors
    )
    fresh = [v for v in verdicts if v.fresh]
    agreeing = [v for v in fresh if v.failed]

    def judgement(failed: bool, reason: str, suspected: bool) -> Judgement:
        return Judgement(
            failed, reason, primary, suspected=suspected, agreeing=len(agreeing),
            quorum=quorum, monitors=expected, verdicts=verdicts,
        )

    if len(agreeing) >= quorum:
        best = max(agreeing, key=lambda v: (v.failures, v.span_s))
        reason = (
            f"{primary} failed {best.failures} consecutive checks over {best.span_s:.1f} s"
        )
        if best.last_error:
            reason += f" (last error: {best.last_error})"
        if expected > 1:
            reason += f"; {len(agreeing)} of {expected} monitors agree (quorum {quorum})"
        if alerts:
            reason += f"; {_alert_note(alerts)} too"
        return judgement(True, reason, suspected=True)

    if not fresh:
        newest = min(v.age_s for v in verdicts if v.age_s is not None)
        reason = (
            f"no fresh observation of {primary} from any monitor (newest is {newest:.1f} s "
            f"old, limit {settings.stale_after_s:.1f} s); cannot judge"
        )
        if alerts:
            reason = f"{_alert_note(alerts)} for {primary}, but {reason}"
        return judgement(False, reason, suspected=bool(alerts))

    failing = [v for v in fresh if v.failures > 0]
    suspected = bool(failing) or bool(alerts)
    if agreeing:  # some monitors say failed, not enough of them
        reason = (
            f"only {len(agreeing)} of {expected} monitors see {primary} failed "
            f"(quorum {quorum}); not failed"
        )
    elif failing:
        worst = max(failing, key=lambda v: (v.failures, v.span_s))
        reason = f"{primary} {worst.progress(settings)}"
        if expected > 1:
            reason += f" (monitor {worst.monitor})"
        reason += "; not failed yet"
    else:
        reason = f"{primary} answered its last check"
    if alerts and not agreeing:
        reason = (
            f"{_alert_note(alerts)} for {primary}, but {reason}; "
            "an alert alone never fails a primary"
        )
    return judgement(False, reason, suspected=suspected)


# --- external alerts ---------------------------------------------------------------------------


class AlertmanagerAlert(BaseModel):
    """One alert in an Alertmanager webhook (version 4)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    status: Literal["firing", "resolved"]
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: datetime = Field(alias="startsAt")
    ends_at: datetime | None = Field(
        default=None, alias="endsAt", description="0001-01-01T00:00:00Z while firing."
    )
    generator_url: str = Field(default="", alias="generatorURL")
    fingerprint: str = ""

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "(unnamed alert)")

    @property
    def instance(self) -> str | None:
        return self.labels.get("instance")

    @property
    def severity(self) -> str | None:
        return self.labels.get("severity")

    @property
    def node(self) -> str | None:
        return self.labels.get("node")

    @property
    def summary(self) -> str:
        return self.annotations.get("summary") or self.annotations.get("description", "")


class AlertmanagerWebhook(BaseModel):
    """The JSON body Alertmanager POSTs to a webhook receiver (``version`` "4")."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    version: str
    group_key: str = Field(default="", alias="groupKey")
    truncated_alerts: int = Field(default=0, alias="truncatedAlerts")
    status: Literal["firing", "resolved"]
    receiver: str
    group_labels: dict[str, str] = Field(default_factory=dict, alias="groupLabels")
    common_labels: dict[str, str] = Field(default_factory=dict, alias="commonLabels")
    common_annotations: dict[str, str] = Field(default_factory=dict, alias="commonAnnotations")
    external_url: str = Field(default="", alias="externalURL")
    alerts: list[AlertmanagerAlert] = Field(default_factory=list)

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: str) -> str:
        if v != "4":
            raise ValueError(f"unsupported Alertmanager webhook version {v!r} (expected '4')")
        return v


def parse_alertmanager(body: bytes | str | Mapping[str, Any]) -> AlertmanagerWebhook:
    """Parse a webhook body; raises ``pydantic.ValidationError`` (or ValueError on bad JSON)."""
    if isinstance(body, bytes | str):
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Alertmanager webhook body is not JSON: {exc}") from exc
    else:
        data = dict(body)
    return AlertmanagerWebhook.model_validate(data)


NodeLike = PgNode | NodeObservation


def node_for_alert(alert: AlertmanagerAlert, nodes: Sequence[NodeLike]) -> str | None:
    """The node an alert is about: its ``node`` label, else an ``instance`` naming a node or its
    ``host:port``, else a bare host only one node has. None when it cannot be told."""
    names = {n.name for n in nodes}
    if alert.node:
        return alert.node if alert.node in names else None
    instance = alert.instance
    if not instance:
        return None
    if instance in names:
        return instance
    for n in nodes:
        if instance == f"{n.host}:{n.port}":
            return n.name
    host = instance.rsplit(":", 1)[0] if ":" in instance else instance
    on_host = [n.name for n in nodes if n.host == host]
    return on_host[0] if len(on_host) == 1 else None


def alert_signals(
    payload: AlertmanagerWebhook, received_at: float, nodes: Sequence[NodeLike]
) -> list[AlertSignal]:
    """Alerts of a webhook that name a known node (others are dropped: they cannot be judged)."""
    out: list[AlertSignal] = []
    for alert in payload.alerts:
        node = node_for_alert(alert, nodes)
        if node is None:
            continue
        out.append(
            AlertSignal(
                at=received_at,
                source="alertmanager",
                name=alert.alertname,
                node=node,
                firing=alert.status == "firing",
                summary=alert.summary,
            )
        )
    return out


def signal_from_health_event(event: NodeHealthChanged, received_at: float) -> AlertSignal:
    """A bus ``NodeHealthChanged`` as an alert signal (unhealthy = firing)."""
    return AlertSignal(
        at=received_at,
        source="bus",
        name="NodeHealthChanged",
        node=event.node,
        firing=not event.healthy,
        summary=event.reason,
    )
