"""The HTTP face: the FastAPI app (:mod:`.app`), its routes (``/segment``, the probes and
``/metrics``; remove.bg's and rembg's APIs in :mod:`.compat`), reading uploads
(:mod:`.upload`, :mod:`.multipart`), connection limits and the page. It reads a request into
the core's typed request and writes the core's answer."""
