"""GIM's backward rules as pure functions and autograd Functions on raw tensors.

Every rule leaves the forward value untouched and changes only the gradient:

- `freeze` — a normalisation scale (σ of LayerNorm, the RMS of RMSNorm) is a constant in
  the backward pass.
- `ScaleGrad` — identity forward, gradient multiplied by a constant (Q/K/V, gate/up).
- `TemperatureSoftmaxGrad` — returns the model's own attention pattern, but routes the
  gradient to the pre-softmax scores through the softmax at temperature `T`:
  `dL/ds = s_T * (g - sum(g * s_T, -1))` with `s_T = softmax(s / T)` and no `1/T` factor.

These are mapped to TransformerLens hook points in `gimlens.gim`.

Examples:
    >>> import torch
    >>> from gimlens.rules import temperature_softmax_backward
    >>> s = torch.tensor([[1.0, 2.0, 3.0]])
    >>> temperature_softmax_backward(s, torch.tensor([[1.0, 0.0, 0.0]]), 1.0).sum().abs() < 1e-7
    tensor(True)
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "freeze",
    "ScaleGrad",
    "scale_grad",
    "TemperatureSoftmaxGrad",
    "temperature_softmax",
    "temperature_softmax_backward",
]


def freeze(x: Tensor) -> Tensor:
    """Same values, no gradient: the tensor is a constant of the backward pass."""
    return x.detach()


class ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """`x` unchanged; its gradient multiplied by `scale`."""
    return ScaleGrad.apply(x, scale)


def temperature_softmax_backward(
    scores: Float[Tensor, "... k"], grad_pattern: Float[Tensor, "... k"], temperature: float
) -> Float[Tensor, "... k"]:
    """GIM's score gradient: `s_T * (g - sum(g * s_T, -1))` with `s_T = softmax(s / T)`.

    Masked scores (`-inf` or the dtype's minimum) get zero weight; a row with no visible key
    (all `-inf`) gets a zero gradient instead of NaN. Computed in float32, returned in the
    scores' dtype. At `T = 1` this is the exact softmax Jacobian-vector product.
    """
    s_t = torch.softmax(scores.float() / temperature, dim=-1)
    s_t = torch.nan_to_num(s_t, nan=0.0)
    g = grad_pattern.float()
    out = s_t * (g - (g * s_t).sum(dim=-1, keepdim=True))
    return out.to(scores.dtype)


class TemperatureSoftmaxGrad(torch.autograd.Function):
    """Forward: the given `pattern` (the model's own softmax output, bit for bit).

    Backward: the gradient reaches `scores` through `temperature_softmax_backward`;
    `pattern` itself receives none (pass it detached so the model's softmax is bypassed).
    """

    @staticmethod
    def forward(ctx, scores: Tensor, pattern: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return pattern.view_as(pattern)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (scores,) = ctx.saved_tensors
        return temperature_softmax_backward(scores, grad, ctx.temperature), None, None


def temperature_softmax(scores: Tensor, pattern: Tensor, temperature: float) -> Tensor:
    """`pattern` with GIM's temperature gradient routed to `scores` (see the class)."""
    return TemperatureSoftmaxGrad.apply(scores, pattern.detach(), temperature)
