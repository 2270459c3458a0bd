"""Lag thresholds from the seed's alert table, as pure functions with reasons."""

from __future__ import annotations

from dataclasses import dataclass

from emrdr.config import ThresholdSettings
from emrdr.messages.events import NodeObservation, Severity

ORDER: dict[Severity, int] = {"ok": 0, "warning": 1, "critical": 2, "emergency": 3}


def classify_lag(lag_seconds: float | None, t: ThresholdSettings) -> Severity:
    """Severity of a replication lag; an unknown lag is not a lag (health is judged apart)."""
    if lag_seconds is None:
        return "ok"
    if lag_seconds >= t.lag_emergency_s:
        return "emergency"
    if lag_seconds >= t.lag_critical_s:
        return "critical"
    if lag_seconds >= t.lag_warning_s:
        return "warning"
    return "ok"


@dataclass(frozen=True)
class LagTransition:
    node: str
    previous: Severity
    severity: Severity
    reason: str


def lag_transitions(
    previous: dict[str, Severity], observations: list[NodeObservation], t: ThresholdSettings
) -> list[LagTransition]:
    """Replicas whose lag severity changed since the last poll (crossed or cleared)."""
    out: list[LagTransition] = []
    for obs in observations:
        if obs.role != "replica" or not obs.reachable:
            continue
        before = previous.get(obs.name, "ok")
        now = classify_lag(obs.lag_seconds, t)
        if now == before:
            continue
        direction = "rose" if ORDER[now] > ORDER[before] else "fell"
        out.append(
            LagTransition(
                obs.name,
                before,
                now,
                f"replication lag of {obs.name} {direction} to {obs.lag_seconds:.0f}s: "
                f"{before} -> {now}",
            )
        )
    return out
