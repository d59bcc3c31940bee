"""Deployment shapes of more than one process (``U2SERVE_WORKERS`` > 1): the supervisor
(:mod:`.supervisor`), the inference worker (:mod:`.worker`), a front's proxies for the
worker's queue and caches (:mod:`.remote`), the messages between them (:mod:`.protocol`) and what
they share (:mod:`.shared`)."""
