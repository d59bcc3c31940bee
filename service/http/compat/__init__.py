"""The APIs other background-removal tools already speak, answered by this service's own
pipeline, so that moving to it is a change of base URL:

- :mod:`service.http.compat.removebg`: remove.bg's ``POST /v1.0/removebg`` and ``GET /v1.0/account``
  (what its clients, and CarveKit's server, speak);
- :mod:`service.http.compat.rembg`: ``rembg s``'s ``GET``/``POST /api/remove``.

Each translates its API's request into a :class:`~service.core.request.Submission` (the parameters
into
:class:`~service.params.SegmentParams`), has :meth:`~service.core.pipeline.Pipeline.answer` answer
it, and translates the :class:`~service.images.encode.Rendered` answer back, errors included. No
second
pipeline: the limits, queue, memory budget, map cache and metrics are the service's, and
``service/http/routes.py`` serves them as it serves ``/segment``
(:func:`service.http.routes.serve`). A
parameter that cannot be honoured is refused with 400, never ignored.
"""

from __future__ import annotations

from service.http.compat import rembg, removebg
from service.http.schema import Offer, Operation

__all__ = ["TAGS", "operations"]

TAGS = [
    # Swagger UI's group for untagged operations (/segment and the probes, which keep their
    # document as it was), named first so that /docs shows the service's own API first.
    {"name": "default", "description": "u2serve's own API, and its probes"},
    {
        "name": removebg.TAG,
        "description": "remove.bg's API, as remove.bg documents it, on this service's pipeline: "
        "point a remove.bg client at this service's /v1.0. Self-hosted: no credits are charged "
        '(X-Credits-Charged: 0). Errors are remove.bg\'s: {"errors": [{"title", "code"}]}',
    },
    {
        "name": rembg.TAG,
        "description": "rembg's server (`rembg s`) API, on this service's pipeline and models: "
        "scripts that call /api/remove work unchanged",
    },
]


def operations(offer: Offer) -> list[Operation]:
    """The operations of both APIs, as ``offer`` serves them."""
    return [*removebg.operations(offer), *rembg.operations(offer)]
