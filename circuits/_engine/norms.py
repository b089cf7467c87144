"""The norms edge attribution recomputes: LayerNorm, RMSNorm (Gemma's `1 + w` gain included)
and the absent norm, read from a TransformerLens model, with their forward, backward and the
per-part share of a post-norm's output — the engine's only implementation of each.

Examples:
    >>> import torch
    >>> norm = Norm(NormKind.RMS_NORM, torch.full((4,), 2.0), None, 1e-6)
    >>> x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    >>> norm.forward(x)
    tensor([[ 2.0000, -2.0000,  2.0000, -2.0000]])
    >>> parts = torch.stack([x, 2 * x])  # two parts of the whole 3x: each one's share
    >>> torch.allclose(norm.share(parts, 3 * x).sum(0), norm.forward(3 * x))
    True
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

import torch
from jaxtyping import Float
from torch import Tensor

from gimlens.errors import GimlensError

__all__ = ["Norm", "NormKind", "NormStats", "check_norm", "norm_deltas", "read_norm"]


class NormKind(str, Enum):
    LAYER_NORM = "LN"
    RMS_NORM = "RMS"
    IDENTITY = "none"  #: no norm (OLMo-2's attention and MLP read the residual stream)


@dataclass(frozen=True)
class NormStats:
    """`x_hat = (x - mean) / sigma` (LayerNorm) or `x / rms` (RMSNorm), and `1 / sigma`."""

    x_hat: Float[Tensor, "*batch d"]
    inv_scale: Float[Tensor, "*batch 1"]


@dataclass(frozen=True)
class Norm:
    """A LayerNorm or RMSNorm with its weight (and bias), computed in float32; the only
    implementation of the norm forward in the engine.

    `weight` is the effective gain: Gemma's RMSNorm, which scales by `1 + w`, is read with
    `weight = 1 + w`. `IDENTITY` is the absent norm (weight 1, no bias).
    """

    kind: NormKind
    weight: Float[Tensor, " d"]
    bias: Float[Tensor, " d"] | None
    eps: float

    @classmethod
    def identity(cls, d: int, device=None) -> "Norm":
        return cls(NormKind.IDENTITY, torch.ones(d, device=device), None, 0.0)

    def _centred_scale(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.float()
        if self.kind is NormKind.IDENTITY:
            return x, torch.ones_like(x[..., :1])
        if self.kind is NormKind.LAYER_NORM:
            x = x - x.mean(-1, keepdim=True)
        return x, torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def stats(self, x: Float[Tensor, "*batch d"]) -> NormStats:
        x, inv = self._centred_scale(x)
        return NormStats(x * inv, inv)

    def forward(self, x: Float[Tensor, "*batch d"], frozen: bool = False) -> Float[Tensor, "*batch d"]:
        """The norm of `x` (float32, differentiable); with `frozen` (GIM's `freeze_norm`) the
        scale is a constant for the gradient, its value unchanged."""
        if self.kind is NormKind.IDENTITY:
            return x.float()
        x, inv = self._centred_scale(x)
        out = x * (inv.detach() if frozen else inv) * self.weight
        return out if self.bias is None else out + self.bias

    def share(self, part: Float[Tensor, "n *batch d"], whole: Float[Tensor, "*batch d"],
              frozen: bool = False) -> Float[Tensor, "n *batch d"]:
        """Each `part`'s share of `norm(whole)` when `whole = sum(part)` (no bias): the norm is
        linear in its input at a fixed scale, so the shares add up to the norm's output."""
        if self.kind is NormKind.IDENTITY:
            return part.float()
        part = part.float()
        if self.kind is NormKind.LAYER_NORM:
            part = part - part.mean(-1, keepdim=True)
        inv = self._centred_scale(whole)[1]
        return part * (inv.detach() if frozen else inv) * self.weight

    def backward(self, stats: NormStats, g: Float[Tensor, "n *batch d"], frozen: bool
                 ) -> Float[Tensor, "n *batch d"]:
        """Gradient at the norm's input from `g = w * grad` (`grad`: at the norm's output;
        leading dim: heads). Works in place on `g`.

        Exact: `(g - [mean(g)] - x_hat * mean(x_hat * g)) / sigma` (the bracket only for
        LayerNorm). Frozen (GIM): the scale is a constant, so the last term goes.
        """
        if self.kind is NormKind.IDENTITY:
            return g
        if self.kind is NormKind.LAYER_NORM:
            g.sub_(g.mean(-1, keepdim=True))
        if not frozen:
            mean = torch.linalg.vecdot(g, stats.x_hat).unsqueeze(-1) / g.shape[-1]
            g.addcmul_(stats.x_hat, mean, value=-1.0)
        return g.mul_(stats.inv_scale)


def read_norm(bridge_norm, kind: NormKind, cfg, folded: bool = False) -> Norm:
    """The norm `bridge_norm` computes: a bridge's wrapped HuggingFace module (its gain probed
    for Gemma's `1 + w`) or a `HookedTransformer` norm (`w`, `b`; folded: unit weight)."""
    hf = getattr(bridge_norm, "original_component", None)
    inner = bridge_norm if hf is None else hf
    weight = getattr(inner, "weight", None)
    if weight is None:
        weight = getattr(bridge_norm, "w", None)
    if weight is None and folded:  # HookedTransformer's LNPre / RMSPre: the weight is in W_Q/K/V
        weight = torch.ones(int(cfg.d_model))
    if weight is None:
        raise GimlensError(f"cannot read the weight of norm {type(inner).__name__}")
    bias = getattr(inner, "bias", None)
    if bias is None:
        bias = getattr(bridge_norm, "b", None) if kind is NormKind.LAYER_NORM else None
    eps = getattr(inner, "eps", None)
    eps = getattr(inner, "variance_epsilon", None) if eps is None else eps
    eps = getattr(cfg, "eps", 1e-5) if eps is None else eps
    norm = Norm(kind, weight.detach().float(), None if bias is None else bias.detach().float(),
                float(eps))
    # a HookedTransformer's norms hold their effective gain (and would fire hooks if probed)
    return norm if hf is None else _with_offset(norm, hf)


def _with_offset(norm: Norm, module) -> Norm:
    """`norm` with gain `1 + w` if that is what `module` computes (Gemma's RMSNorm), found by
    running the module once on a fixed probe; unchanged otherwise."""
    if not callable(module) or norm.kind is NormKind.IDENTITY:
        return norm
    w = norm.weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, w.shape[0], generator=gen).to(device=w.device)
    try:
        with torch.no_grad():
            dtype = next(module.parameters()).dtype
            y = module(x.to(dtype)).float()
    except Exception:  # not a plain norm module: keep what was read (check_norm still checks)
        return norm
    shifted = replace(norm, weight=w + 1)
    if (shifted.forward(x) - y).abs().max() < (norm.forward(x) - y).abs().max():
        return shifted
    return norm


def norm_deltas(x: Float[Tensor, "B S d"], correction: Float[Tensor, "n B S d"], norm: Norm,
                frozen: bool = False) -> Float[Tensor, "n B S d"]:
    """How the norm's output changes when its input `x` becomes `x - correction[h]`:
    `norm(x - c_h) - norm(x)` (differentiable; with `frozen` the scale is a constant for the
    gradient; no bias needed; 0 where `c_h = 0`)."""
    x = x.float()
    return norm.forward(x - correction, frozen) - norm.forward(x, frozen)


def check_norm(norm: Norm, x: Tensor, out: Tensor, where: str) -> None:
    """Raise if `norm` (as read here) does not reproduce the model's own norm output."""
    # the model's output is rounded to its dtype: allow a few units of that rounding (bf16: ~3%)
    tol = max(1e-3, 4 * torch.finfo(out.dtype).eps) if out.dtype.is_floating_point else 1e-3
    mine, out = norm.forward(x.detach()), out.detach().float()
    if out.ndim == mine.ndim + 1:  # a HookedTransformer in a split-input mode: one copy per head
        mine = mine.unsqueeze(-2)
    err = float((mine - out).abs().max())
    ref = float(out.abs().max()) + 1e-6
    if not err <= tol * ref:
        raise GimlensError(
            f"{where}: the norm read from the model does not reproduce its output (max error "
            f"{err:.3g}); this normalisation variant is not supported by edge attribution"
        )
