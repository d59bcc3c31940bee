"""u2serve from Python: U²-Net salient-object segmentation in this process, or from a running
service over HTTP.

In process, as ``rembg.remove`` is used (the model loaded once; the answers are the service's
bytes for the same parameters)::

    import u2serve

    cutout = u2serve.remove(open("photo.jpg", "rb").read())          # PNG bytes
    mask = u2serve.remove(pil_image, output="mask")                 # a PIL image
    with u2serve.Remover("u2netp", device="cpu") as remover:        # one model, many calls
        soft = remover.remove(array, output="probability")          # a numpy array

Over HTTP, from a service started with ``make serve`` or ``u2serve serve``::

    with u2serve.Client("http://localhost:8000") as client:
        first = client.segment("photo.jpg", output="mask")           # 503s waited out
        cutout = client.again(first, output="cutout")               # not uploaded again
        for outcome in client.segment_many(paths, output="cutout"):  # as they complete
            print(paths[outcome.index], outcome.get().box)

Every option is a parameter of ``POST /segment``, of the same name and validation; a refusal
is a :class:`U2ServeError` carrying the service's status, code and message.
"""

from u2serve.client import AsyncClient, Box, Client, Outcome, Result
from u2serve.errors import (
    ConnectionFailed,
    ImageNotFound,
    ImageTooLarge,
    InvalidParameter,
    Overloaded,
    U2ServeError,
    Unauthorized,
    UnsupportedImage,
)
from u2serve.images import ImageInput
from u2serve.remover import Remover, remove

__all__ = [
    "AsyncClient",
    "Box",
    "Client",
    "ConnectionFailed",
    "ImageInput",
    "ImageNotFound",
    "ImageTooLarge",
    "InvalidParameter",
    "Outcome",
    "Overloaded",
    "Remover",
    "Result",
    "U2ServeError",
    "Unauthorized",
    "UnsupportedImage",
    "remove",
]
