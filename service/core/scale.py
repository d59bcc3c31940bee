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

__all__ = ["FULL_FROM_PER_INPUT", "MAX_FACTOR", "MIN_SIDE_PER_INPUT", "decode_tag", "reduction"]

# What kept ``fast``'s bounds against float32 (bench/README.md, "fast's reduced decode"; U2NET's
# int8 maps on the 18 reference photos made 1, 4 and 12 MP, and on ECSSD): the reduced photo's
# short side at least one network side, by at most 1/2, and only for photos whose short side is
# under four network sides. At 1 MP, 1/2 kept every mask (mean MAE 0.0035, none moved; today's
# fast: 0.0013, none). From 4 MP on, every reduction moved one mask of the 18 (rifle1, IoU
# 0.86-0.89, as far with float32 on the reduced input), where today's fast moves none: at 12 MP
# 1/2 gave a mean MAE of 0.0022, 1/4 0.0034, 1/8 0.0058 (four moved). ECSSD's 100 photos made
# 12 MP: 1/2 moved 7 where the full decode moved 5, and 1/4 gave a mean MAE of 0.0047.
MIN_SIDE_PER_INPUT = 1
MAX_FACTOR = 2
FULL_FROM_PER_INPUT = 4


def reduction(precision: str, params: SegmentParams, input_size: int) -> Reduction | None:
    """How much smaller a JPEG may be decoded for this request, or None: in full."""
    if precision != "fast" or params.output == "cutout" or params.refine:
        return None
    return Reduction(
        MIN_SIDE_PER_INPUT * input_size, MAX_FACTOR, full_from=FULL_FROM_PER_INPUT * input_size
    )


def decode_tag(decoded_size: tuple[int, int], full: tuple[int, int] | None) -> str:
    """What names a reduced decode in the map cache's key ("" for a full one, so the keys of
    maps from full decodes are as they were): a map from a reduced photo is another map, never
    served to a request that decodes in full."""
    if full is None:
        return ""
    return f"/decoded-{decoded_size[0]}x{decoded_size[1]}"
