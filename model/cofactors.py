"""``S⁻¹ v`` for a symmetric 3×3 ``S``, pixel by pixel: the colour guided filter's linear solve
(He, Sun and Tang), which the alpha stage's filter (``service/images/matte.py``: the cut-out's
matte, and the map's refinement) runs on numpy arrays."""

from __future__ import annotations

from typing import Any

__all__ = ["solve_symmetric3"]


def solve_symmetric3(
    s00: Any, s01: Any, s02: Any, s11: Any, s12: Any, s22: Any, v0: Any, v1: Any, v2: Any
) -> tuple[Any, Any, Any]:
    """``S⁻¹ v`` where ``S`` has the entries ``sij`` and ``v`` the ``vi``, each an array of any
    shape (only + - * / between them): by cofactors, the determinant once."""
    c00 = s11 * s22 - s12 * s12
    c01 = s02 * s12 - s01 * s22
    c02 = s01 * s12 - s02 * s11
    c11 = s00 * s22 - s02 * s02
    c12 = s01 * s02 - s00 * s12
    c22 = s00 * s11 - s01 * s01
    det = s00 * c00 + s01 * c01 + s02 * c02
    a0 = (c00 * v0 + c01 * v1 + c02 * v2) / det
    a1 = (c01 * v0 + c11 * v1 + c12 * v2) / det
    a2 = (c02 * v0 + c12 * v1 + c22 * v2) / det
    return a0, a1, a2
