"""PostgreSQL 15 plumbing: local servers, sandbox clusters, observation, synthetic EMR data.

Modules (import the one you need; this package imports nothing, so ``emrdr.pg.lsn`` stays cheap
for the ``archive_command`` path):

* :mod:`emrdr.pg.lsn` - LSN parsing/formatting/diff and WAL file names (stdlib only).
* :mod:`emrdr.pg.osuser` - the unprivileged OS user PostgreSQL runs as when emrdr is root.
* :mod:`emrdr.pg.instance` - :class:`~emrdr.pg.instance.PgInstance`, one server (initdb, start,
  stop, kill -9, SIGSTOP, promote, clone a replica, re-point a standby).
* :mod:`emrdr.pg.sandbox` - :class:`~emrdr.pg.sandbox.SandboxCluster`, primary + N replicas that
  resume from their base directory.
* :mod:`emrdr.pg.observe` - :func:`~emrdr.pg.observe.observe_cluster`: role, timeline, LSNs, lag.
* :mod:`emrdr.pg.emr_seed` - the synthetic ``emr`` schema, its deterministic data and the canary.
"""
