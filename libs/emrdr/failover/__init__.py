"""The failover brain: judge a primary's health, decide, hold the lease, fence, execute.

Modules (import the one you need):

* :mod:`emrdr.failover.settings` - :class:`FailoverSettings` (detector and candidate limits).
* :mod:`emrdr.failover.judge` - pure failure detector over repeated observations, with quorum
  across monitors; Alertmanager webhook payloads as typed models.
* :mod:`emrdr.failover.decide` - pure ``decide(Snapshot) -> Decision`` with a plain-sentence reason.
* :mod:`emrdr.failover.lease` - the coordinator lease in JetStream KV (compare-and-set, TTL, epoch).
* :mod:`emrdr.failover.fencing` - fencing epochs recorded in PostgreSQL; fencing an old primary.
* :mod:`emrdr.failover.execute` - performs a FAILOVER decision on real nodes, step by step.
"""
