"""Recovery procedures built on restore: copy one database under another name
(:mod:`.dbcopy`), restore one table as of a point in time (:mod:`.table`) and the
data-corruption runbook (:mod:`.corruption`).  Library functions, no NATS: a service calls
them in a thread and publishes each step reported through ``on_step(name, ok, detail)``."""
