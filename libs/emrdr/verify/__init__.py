"""The verifier's library: restore drills (:mod:`.drill`), repository integrity checks
(:mod:`.integrity`), PostgreSQL checks of a restored copy (:mod:`.pgcheck`) and the temporary
instances they run in (:mod:`.sandbox`)."""
