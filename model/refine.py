"""Edge refinement: a fast colour guided filter with the photo as guide, then a contrast stretch.

The network sees 320×320 pixels, so at a photo's own size its map is a bilinear upscale whose
edges are soft ramps that ignore the photo's edges. A guided filter (He, Sun and Tang, 2010)
fits the map, in each small window, as a linear function of the photo's colour, which pulls the
ramps onto the colour edges. The fast variant (He and Sun, 2015) fits the coefficients at a
working resolution of at most ``WORK_SIDE`` pixels and applies them to the full-resolution photo.

Two choices keep it fast and make it better on ground truth (bench/README.md has the figures):
- Only a band is computed at full resolution: pixels near those whose map or whose fit at the
  working resolution is not within ``SETTLED`` of 0 or 1. Elsewhere both are sent to exactly 0
  or 1 by the stretch below, so the stretched map is kept (a few percent of a photo is in the
  band; the rest costs one pass).
- A contrast stretch by ``STRETCH`` around 0.5 (clamped) follows: the filter's fit spreads values
  over its window, and the authors' map is near binary away from edges.

At full resolution the band is computed run by run (the pixels that share a nearest working
column), in pieces of bounded size, so that its temporaries stay small and are reused rather than
mapped and faulted in; ``tests/test_refine.py`` holds it to the same filter computed densely.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.cofactors import solve_symmetric3
from model.preprocess import resize_weights

__all__ = ["EPS", "RADIUS", "STRETCH", "WORK_SIDE", "refine"]

WORK_SIDE = 640  # longest side at which the coefficients are fitted
RADIUS = 2  # window radius at the working resolution
EPS = 1e-3  # regularisation: larger keeps more of the map, smaller follows colour more
STRETCH = 2.0
SETTLED = 0.5 / STRETCH  # values this close to 0 or 1 are stretched to exactly 0 or 1
# The most that one temporary of the full-resolution pass may hold. The service has glibc map
# every block of 2 MiB or more (service/core/budget.py), and a mapped block is faulted in afresh
# each
# time: with the whole band at once and the fit on 16 working planes at once, a 12 MP photo took
# 133 ms there, against 50 ms with the band in pieces of 1 MiB and the fit one working plane
# (at most 1.6 MB) at a time.
_CHUNK_BYTES = 1 << 20


def _box(x: Tensor, r: int) -> Tensor:
    """Mean over a (2r+1)² window, clipped at the borders, of each ``h×w`` plane of ``C×h×w``.

    Sums of shifted slices: for the small radii used here, several times faster than
    ``avg_pool2d`` with ``count_include_pad=False``.
    """
    _, h, w = x.shape
    padded = F.pad(x, (r, r, r, r))
    rows = padded[:, 0:h].clone()
    for d in range(1, 2 * r + 1):
        rows += padded[:, d : d + h]
    out = rows[:, :, 0:w].clone()
    for d in range(1, 2 * r + 1):
        out += rows[:, :, d : d + w]

    def counts(n: int) -> Tensor:
        i = torch.arange(n, device=x.device)
        return ((i + r).clamp(max=n - 1) - (i - r).clamp(min=0) + 1).to(x.dtype)

    return out.div_(counts(h).view(-1, 1) * counts(w).view(1, -1))


def _coefficients(guide: Tensor, p: Tensor, r: int, eps: float) -> Tensor:
    """Per-pixel ``a`` (3 channels) and ``b`` of ``q = a·I + b``, box-averaged: ``h×w×4``.

    One plane at a time, so that no temporary is larger than a plane (see ``_CHUNK_BYTES``).
    """

    def box(x: Tensor) -> Tensor:
        return _box(x[None], r)[0]

    i = [guide[k] for k in range(3)]
    mean_i = [box(x) for x in i]
    mean_p = box(p)
    cov_ip = [box(x * p).sub_(m * mean_p) for x, m in zip(i, mean_i, strict=True)]

    def cov_ii(a: int, b: int) -> Tensor:
        return box(i[a] * i[b]).sub_(mean_i[a] * mean_i[b])

    s00, s01, s02 = cov_ii(0, 0).add_(eps), cov_ii(0, 1), cov_ii(0, 2)
    s11, s12, s22 = cov_ii(1, 1).add_(eps), cov_ii(1, 2), cov_ii(2, 2).add_(eps)
    a0, a1, a2 = solve_symmetric3(s00, s01, s02, s11, s12, s22, *cov_ip)
    b = mean_p - a0 * mean_i[0] - a1 * mean_i[1] - a2 * mean_i[2]
    return torch.stack([box(a0), box(a1), box(a2), box(b)], dim=-1)


def _stretch(x: Tensor, out: Tensor | None = None) -> Tensor:
    return torch.mul(x, STRETCH, out=out).sub_(0.5 * STRETCH - 0.5).clamp_(0, 1)


@torch.inference_mode()
def refine(
    prob: Tensor,
    image: Tensor,
    *,
    radius: int = RADIUS,
    eps: float = EPS,
    out: Tensor | None = None,
) -> Tensor:
    """A refined ``H×W`` float map in [0, 1] from ``prob`` (``H×W`` float32 in [0, 1]) and the
    photo ``image`` (``H×W×3`` uint8), on ``prob``'s device.

    ``out``, where to write it, may be ``prob`` itself, for a caller that has no further use
    for the unrefined map: at 12 MP a new map is 48 MB, whose first touch costs as much as the
    stretch over it.
    """
    h, w = prob.shape
    device = prob.device
    scale = min(1.0, WORK_SIDE / max(h, w))
    lh, lw = max(1, round(h * scale)), max(1, round(w * scale))
    image = image.to(device).contiguous()  # read through strided windows below
    if (lh, lw) == (h, w):
        guide, p_low = image.permute(2, 0, 1).float().div_(255), prob.clone()
    else:
        small = F.interpolate(
            image.permute(2, 0, 1)[None], (lh, lw), mode="bilinear", antialias=True
        )
        guide = small[0].float().div_(255)
        p_low = F.interpolate(prob[None, None], (lh, lw), mode="bilinear", antialias=True)[0, 0]
    coef = _coefficients(guide, p_low, radius, eps)
    # Full resolution is computed only where the result may be other than the stretched map's
    # 0 or 1: near pixels whose map or whose fit at the working resolution is unsettled (one
    # working pixel around them covers the bilinear interpolation of the coefficients).
    q_low = torch.addcmul(coef[..., 3], coef[..., 0], guide[0])
    q_low.addcmul_(coef[..., 1], guide[1]).addcmul_(coef[..., 2], guide[2])
    unsettled = ((p_low > SETTLED) & (p_low < 1 - SETTLED)) | (
        (q_low > SETTLED) & (q_low < 1 - SETTLED)
    )
    band = F.max_pool2d(unsettled.float()[None], 3, stride=1, padding=1)[0] > 0
    out = _stretch(prob, out)  # p_low and guide are copies: prob may be overwritten now
    y0, y1, wy = (t.to(device) for t in resize_weights(lh, h))
    x0, x1, wx = (t.to(device) for t in resize_weights(lw, w))
    # Each full-resolution column belongs to its nearest working column (the larger bilinear
    # weight), in runs of at most ``k`` columns. The band is taken as (full-resolution row,
    # working column) pairs, and each pair's run is computed as one dense row of ``k`` pixels:
    # no per-pixel index arithmetic, and gathers of whole runs rather than single values.
    nx = torch.where(wx < 0.5, x0, x1)
    ys, js = band.index_select(0, torch.where(wy < 0.5, y0, y1)).nonzero().unbind(1)
    if ys.numel() == 0:
        return out
    count = torch.bincount(nx, minlength=lw)
    k = int(count.max())
    # The window of working column j starts at its run (moved left at the right edge so that
    # it stays inside the photo); the pixels in it that are not j's are left to their own.
    start = (torch.cumsum(count, 0) - count).clamp_(max=w - k)
    cols = start[:, None] + torch.arange(k, device=device)  # lw×k
    mine = nx[cols] == torch.arange(lw, device=device)[:, None]
    # The working columns a window's bilinear interpolation reads: ``span`` from ``lo``, and
    # where each of its pixels reads them (offsets from ``lo``, weight of the right one).
    lo = x0[start]
    span = int((x1[cols[:, -1]] - lo).max()) + 1
    lo = lo.clamp_(max=lw - span)
    left, right, fx = x0[cols] - lo[:, None], x1[cols] - lo[:, None], wx[cols]
    coef[..., :3] /= 255  # ``a`` for the photo's 8-bit values
    windows = coef.as_strided((lh, lw - span + 1, span, 4), (lw * 4, 4, 4, 1))
    pixels = image.as_strided((h, w - k + 1, k, 3), (w * 3, 3, 3, 1))
    flat = out.view(-1)
    step = max(1, _CHUNK_BYTES // (16 * k))  # pairs at a time: (step·k)×4 floats
    for at in range(0, ys.numel(), step):
        y, j = ys[at : at + step], js[at : at + step]
        # The coefficients of each pair's rows, interpolated between working rows...
        rows = torch.lerp(windows[y0[y], lo[j]], windows[y1[y], lo[j]], wy[y].view(-1, 1, 1))
        # ... then between working columns, for each pixel of each pair's window: (n·k)×4.
        base = (torch.arange(y.numel(), device=device) * span)[:, None]
        rows = rows.view(-1, 4)
        c = torch.lerp(
            rows.index_select(0, (base + left[j]).view(-1)),
            rows.index_select(0, (base + right[j]).view(-1)),
            fx[j].view(-1, 1),
        )
        rgb = pixels[y, start[j]].view(-1, 3).float()
        q = torch.addcmul(c[:, 3], c[:, 0], rgb[:, 0])
        q = _stretch(q.addcmul_(c[:, 1], rgb[:, 1]).addcmul_(c[:, 2], rgb[:, 2]), q)
        own = mine[j].view(-1).nonzero().squeeze(1)
        where = ((y * w)[:, None] + cols[j]).view(-1)
        flat.index_put_((where.index_select(0, own),), q.index_select(0, own))
    return out
