"""The scale a photo is decoded at for one request: in full, or (``fast`` only) reduced inside
libjpeg-turbo's IDCT to what the network's input needs.

The network reads S×S points of the photo (S = 320). Under ``faithful`` and ``float32`` those
points are the photo's own pixels, as the authors' pipeline samples them, so the photo is decoded
in full: a decode that averages blocks of pixels is a different input (issue 34's probe: U2NET's
mean MAE against the authors' maps 0.0010 with the short side decoded at ≥ 640, 0.0039 at ≥ 320,
against 0.0003). ``fast`` already trades fidelity for speed within its own bounds, and a reduced
decode is one more such trade, for the answers made from the map alone (masks, soft maps, boxes):
a cut-out shows the photo's pixels, and ``refine`` reads them, so both decode in full.

The choice keys on the precision the request's map is made at (the model's, as
``Model.precision`` gives it): a second look at another precision, such as an ``auto`` level's
float32 look at an int8 map, asks again with its own precision and gets its own decode.
"""

from __future__ import annotations

from service.images.decode import Reduction
from service.params import SegmentParams

__all__ = ["MAX_FACTOR", "MIN_SIDE_PER_INPUT", "decode_tag", "reduction"]

# The reduced photo's short side, in network input sides, and the largest reduction: what kept
# ``fast``'s bounds (bench/README.md, "fast's reduced decode").
MIN_SIDE_PER_INPUT = 1
MAX_FACTOR = 8


def reduction(precision: str, params: SegmentParams, input_size: int) -> Reduction | None:
    """How much smaller a JPEG may be decoded for this request, or None: in full."""
    if precision != "fast" or params.output == "cutout" or params.refine:
        return None
    return Reduction(MIN_SIDE_PER_INPUT * input_size, MAX_FACTOR)


def decode_tag(decoded_size: tuple[int, int], full: tuple[int, int] | None) -> str:
    """What names a reduced decode in the map cache's key ("" for a full one, so the keys of
    maps from full decodes are as they were): a map from a reduced photo is another map, never
    served to a request that decodes in full."""
    if full is None:
        return ""
    return f"/decoded-{decoded_size[0]}x{decoded_size[1]}"
