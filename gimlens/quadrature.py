"""Quadrature rules on [0, 1] for path integrals (integrated gradients and its layer-wise form).

Every rule returns nodes `alpha` and weights `w` with `sum(w) == 1` exactly (up to float
rounding), so a constant integrand integrates exactly. Gauss-Legendre with `n` nodes is exact
for polynomials of degree `2n - 1`; it is the default.

`gauss_legendre_graded` is composite Gauss-Legendre on the geometrically graded panels
`[0, 1e-6, 1e-5, ..., 1e-1, 1]`. Use it when the integrand changes almost entirely in a thin
layer near `alpha = 0` — e.g. a zero baseline seen through an RMSNorm, where the normalised
input is constant once `alpha * |x|` exceeds `sqrt(eps)`: plain Gauss-Legendre nodes never
land in that layer.

Examples:
    >>> import torch
    >>> alpha, w = nodes_and_weights(4)
    >>> round(float((w * alpha**7).sum()), 12)  # integral of a^7 on [0, 1] is 1/8
    0.125
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .errors import GimlensError
from .validation import check_int
from .runtime import coerce_enum

__all__ = ["Quadrature", "nodes_and_weights"]


class Quadrature(str, Enum):
    """Rules for integrating over `alpha` in [0, 1]."""

    GAUSS_LEGENDRE = "gauss_legendre"
    RIEMANN_LEFT = "riemann_left"
    RIEMANN_RIGHT = "riemann_right"
    RIEMANN_MIDDLE = "riemann_middle"
    TRAPEZOID = "trapezoid"
    GAUSS_LEGENDRE_GRADED = "gauss_legendre_graded"


#: Panel edges of the graded rule: each panel is ten times wider than the one before.
GRADED_EDGES = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def nodes_and_weights(
    steps: int,
    rule: Quadrature | str = Quadrature.GAUSS_LEGENDRE,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[Float[Tensor, " steps"], Float[Tensor, " steps"]]:
    """Nodes in [0, 1] and weights summing to 1 for `steps` evaluations of the integrand.

    Args:
        steps: number of integrand evaluations (`>= 1`; `>= 2` for the trapezoid rule;
            `>= 7`, one per panel, for the graded rule, whose nodes go to the wider panels
            first when `steps` is not a multiple of 7).
        rule: a `Quadrature` member or its value.

    Returns:
        `(alpha, weights)`, both of shape `[steps]`.
    """
    check_int("steps", steps, minimum=1)
    rule = coerce_enum(Quadrature, rule, "quadrature rule")
    if rule is Quadrature.GAUSS_LEGENDRE:
        x, w = np.polynomial.legendre.leggauss(steps)
        alpha, weights = (x + 1.0) / 2.0, w / 2.0
    elif rule is Quadrature.GAUSS_LEGENDRE_GRADED:
        panels = len(GRADED_EDGES) - 1
        if steps < panels:
            raise GimlensError(f"the graded Gauss-Legendre rule needs steps >= {panels}, got {steps}")
        per_panel = [steps // panels + (1 if i >= panels - steps % panels else 0) for i in range(panels)]
        parts = []
        for (lo, hi), n in zip(zip(GRADED_EDGES[:-1], GRADED_EDGES[1:]), per_panel):
            x, w = np.polynomial.legendre.leggauss(n)
            parts.append((lo + (x + 1.0) * (hi - lo) / 2.0, w * (hi - lo) / 2.0))
        alpha = np.concatenate([a for a, _ in parts])
        weights = np.concatenate([w for _, w in parts])
    elif rule is Quadrature.TRAPEZOID:
        if steps < 2:
            raise GimlensError("the trapezoid rule needs steps >= 2")
        alpha = np.linspace(0.0, 1.0, steps)
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2.0
    else:
        offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule.value]
        alpha = (np.arange(steps) + offset) / steps
        weights = np.full(steps, 1.0 / steps)
    return (
        torch.as_tensor(alpha, dtype=dtype, device=device),
        torch.as_tensor(weights, dtype=dtype, device=device),
    )
