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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.preprocess import resize_weights

__all__ = ["EPS", "RADIUS", "STRETCH", "WORK_SIDE", "refine"]

WORK_SIDE = 640  # longest side at which the coefficients are fitted
RADIUS = 2  # window radius at the working resolution
EPS = 1e-3  # regularisation: larger keeps more of the map, smaller follows colour more
STRETCH = 2.0
SETTLED = 0.5 / STRETCH  # values this close to 0 or 1 are stretched to exactly 0 or 1


def _box(x: Tensor, r: int) -> Tensor:
    """Mean over a (2r+1)² window, clipped at the borders, of each ``h×w`` plane of ``C×h×w``.

    Sums of shifted slices: for the small radii used here, several times faster than
    ``avg_pool2d`` with ``count_include_pad=False``.
    """
    _, h, w = x.shape
    padded = F.pad(x, (r, r, r, r))
    rows = padded[:, 0:h]
    for d in range(1, 2 * r + 1):
        rows = rows + padded[:, d : d + h]
    out = rows[:, :, 0:w]
    for d in range(1, 2 * r + 1):
        out = out + rows[:, :, d : d + w]

    def counts(n: int) -> Tensor:
        i = torch.arange(n, device=x.device)
        return ((i + r).clamp(max=n - 1) - (i - r).clamp(min=0) + 1).to(x.dtype)

    return out / (counts(h).view(-1, 1) * counts(w).view(1, -1))


def _coefficients(guide: Tensor, p: Tensor, r: int, eps: float) -> Tensor:
    """Per-pixel ``a`` (3 channels) and ``b`` of ``q = a·I + b``, box-averaged: ``4×h×w``."""
    i = [guide[k] for k in range(3)]
    pairs = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    stats = _box(torch.stack([*i, p, *(x * p for x in i), *(i[a] * i[b] for a, b in pairs)]), r)
    mean_i, mean_p, corr_ip, corr_ii = stats[:3], stats[3], stats[4:7], stats[7:]
    cov_ip = corr_ip - mean_i * mean_p
    s = [corr_ii[k] - mean_i[a] * mean_i[b] for k, (a, b) in enumerate(pairs)]
    s00, s01, s02, s11, s12, s22 = s[0] + eps, s[1], s[2], s[3] + eps, s[4], s[5] + eps
    # The inverse of the symmetric 3×3 covariance, by cofactors.
    c00 = s11 * s22 - s12 * s12
    c01 = s02 * s12 - s01 * s22
    c02 = s01 * s12 - s02 * s11
    c11 = s00 * s22 - s02 * s02
    c12 = s01 * s02 - s00 * s12
    c22 = s00 * s11 - s01 * s01
    det = s00 * c00 + s01 * c01 + s02 * c02
    a0 = (c00 * cov_ip[0] + c01 * cov_ip[1] + c02 * cov_ip[2]) / det
    a1 = (c01 * cov_ip[0] + c11 * cov_ip[1] + c12 * cov_ip[2]) / det
    a2 = (c02 * cov_ip[0] + c12 * cov_ip[1] + c22 * cov_ip[2]) / det
    b = mean_p - a0 * mean_i[0] - a1 * mean_i[1] - a2 * mean_i[2]
    return _box(torch.stack([a0, a1, a2, b]), r)


def _stretch(x: Tensor) -> Tensor:
    return x.mul(STRETCH).sub_(0.5 * STRETCH - 0.5).clamp_(0, 1)


@torch.inference_mode()
def refine(prob: Tensor, image: Tensor, *, radius: int = RADIUS, eps: float = EPS) -> Tensor:
    """A refined ``H×W`` float map in [0, 1] from ``prob`` (``H×W`` float in [0, 1]) and the
    photo ``image`` (``H×W×3`` uint8), on ``prob``'s device."""
    h, w = prob.shape
    device = prob.device
    scale = min(1.0, WORK_SIDE / max(h, w))
    lh, lw = max(1, round(h * scale)), max(1, round(w * scale))
    image = image.to(device)
    if (lh, lw) == (h, w):
        guide, p_low = image.permute(2, 0, 1).float().div_(255), prob.float()
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
    q_low = (coef[:3] * guide).sum(0).add_(coef[3])
    unsettled = ((p_low > SETTLED) & (p_low < 1 - SETTLED)) | (
        (q_low > SETTLED) & (q_low < 1 - SETTLED)
    )
    band = F.max_pool2d(unsettled.float()[None], 3, stride=1, padding=1)[0] > 0
    out = _stretch(prob.float())
    y0, y1, wy = (t.to(device) for t in resize_weights(lh, h))
    x0, x1, wx = (t.to(device) for t in resize_weights(lw, w))
    # Nearest working pixel of each full-resolution one (the larger bilinear weight): each
    # working column stands for a run of full-resolution columns, ``first[j]`` and ``count[j]``.
    ny = torch.where(wy < 0.5, y0, y1)
    nx = torch.where(wx < 0.5, x0, x1)
    count = torch.bincount(nx, minlength=lw)
    first = torch.cumsum(count, 0) - count
    ys, js = band.index_select(0, ny).nonzero().unbind(1)  # full-res rows × working columns
    if ys.numel() == 0:
        return out
    # Expand each (row, working column) into its run of full-resolution columns.
    runs = count[js]
    ys = ys.repeat_interleave(runs)
    starts = torch.cumsum(runs, 0) - runs
    xs = torch.arange(ys.numel(), device=device) - (starts - first[js]).repeat_interleave(runs)
    # The coefficients interpolated between rows, for the rows that have band pixels only.
    busy, row_of = torch.unique_consecutive(ys, return_inverse=True)
    fy = wy[busy].view(1, -1, 1)
    by_row = coef.index_select(1, y0[busy]) * (1 - fy) + coef.index_select(1, y1[busy]) * fy
    flat = by_row.flatten(1)
    base = row_of * lw
    fx = wx[xs]
    c = flat.index_select(1, base + x0[xs]) * (1 - fx) + flat.index_select(1, base + x1[xs]) * fx
    where = ys * w + xs
    colour = image.reshape(-1, 3).index_select(0, where).T.float().div_(255)
    q = (c[:3] * colour).sum(0).add_(c[3])
    out.view(-1).index_copy_(0, where, _stretch(q))
    return out
