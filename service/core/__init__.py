"""The service without HTTP: what a request's answer is made of, whichever face asked for it.

:mod:`service.core.service` builds it from the settings (the models and their batchers, the
codec pool, the caches, the memory budget, the URL fetcher) and drains and closes it;
:mod:`service.core.pipeline` takes a typed request (:mod:`service.core.request`) through the
stages to its typed answer. Nothing here imports a web framework.
"""
