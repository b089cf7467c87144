"""Baselines of layer-wise IG and LIG's two ratio corrections of the input-token baseline.

| baseline         | baseline set `z'` for target `j` |
|------------------|----------------------------------|
| `zero`           | every position 0 |
| `input_token`    | every position set to the target's own input `z_j` (LIG's "ITB", `self_input_token`), so `z'_j = z_j` and the self term `IG_{j→j}` is 0 |
| `itb_zero_ratio` | `input_token`, then the self term re-estimated from the `zero` run's self-to-other ratio and the column rescaled to keep its sum (LIG 0.1.0) |
| `itb_map_ratio`  | `input_token`, then the self term re-estimated from the attention weight `a_jj` of the target on itself and the column rescaled (LIG 0.1.0) |

The ratio corrections act on one column (one target `j`; matrices are `[source, target]`)
with `S = sum_{i != j} IG^ITB_{i→j}` (LIG 0.1.0, `itb_self_contrib.py` and
`layer_itb_zero_ratio.py`; eps = 1e-8):

- zero ratio: `self = IG^zero_{j→j} * S / sum_{i != j} IG^zero_{i→j}` (0 if that sum is ~0);
- map ratio: `self = S * a_jj / (1 - a_jj)` (0 if `1 - a_jj` is ~0);

then the self entry is replaced by `self` and the column multiplied by
`gamma = sum_i IG^ITB_{i→j} / (S + self)` (1 if the denominator is ~0), so every column keeps
the ITB column sum and with it the ITB completeness target.

Examples:
    >>> import torch
    >>> itb = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # [source, target]; column 1: IG_{0→1}=1
    >>> zero = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    >>> zero_ratio(itb, zero)[:, 1]  # self = 3 * 1 / 1 = 3, then rescaled to keep the sum 1
    tensor([0.2500, 0.7500])
"""

from __future__ import annotations

from enum import Enum

import torch
from jaxtyping import Float
from torch import Tensor

from ..runtime import coerce_enum

__all__ = ["Baseline", "zero_ratio", "map_ratio"]

_EPS = 1e-8


class Baseline(str, Enum):
    """Baseline sets `z'` (see the module docstring). LIG's names are accepted as aliases."""

    ZERO = "zero"
    INPUT_TOKEN = "input_token"
    ITB_ZERO_RATIO = "itb_zero_ratio"
    ITB_MAP_RATIO = "itb_map_ratio"

    @classmethod
    def parse(cls, value) -> "Baseline":
        """A member, its value or one of LIG's names (`self_input_token` and `att_itb_a0` mean
        `input_token`), else a [`GimlensError`][gimlens.errors.GimlensError]."""
        name = _ALIASES.get(value, value) if isinstance(value, str) else value
        return coerce_enum(cls, name, "baseline")

    @property
    def is_ratio(self) -> bool:
        return self in (Baseline.ITB_ZERO_RATIO, Baseline.ITB_MAP_RATIO)


#: LIG 0.1.0 spellings -> ours.
_ALIASES = {"self_input_token": "input_token", "itb": "input_token", "att_itb_a0": "input_token"}


def _self_and_rest(itb: Tensor) -> tuple[Tensor, Tensor]:
    diag = torch.diagonal(itb, dim1=-2, dim2=-1)
    return diag, itb.sum(-2) - diag


def _rescale(itb: Tensor, est_self: Tensor) -> Tensor:
    diag, rest = _self_and_rest(itb)
    provisional = itb.clone()
    torch.diagonal(provisional, dim1=-2, dim2=-1).copy_(est_self)
    denom = rest + est_self
    safe = denom.abs() > _EPS
    gamma = torch.where(safe, itb.sum(-2) / torch.where(safe, denom, 1.0), 1.0)
    return provisional * gamma.unsqueeze(-2)


def zero_ratio(
    itb: Float[Tensor, "*batch src tgt"], zero: Float[Tensor, "*batch src tgt"]
) -> Float[Tensor, "*batch src tgt"]:
    """LIG's ITB-zeroRatio correction, column by column (square `[source, target]` matrices)."""
    assert itb.shape == zero.shape and itb.shape[-1] == itb.shape[-2]
    itb64, zero64 = itb.double(), zero.double()
    _, rest = _self_and_rest(itb64)
    zero_self, zero_rest = _self_and_rest(zero64)
    safe = zero_rest.abs() > _EPS
    est = torch.where(safe, zero_self * rest / torch.where(safe, zero_rest, 1.0), 0.0)
    return _rescale(itb64, est).to(itb.dtype)


def map_ratio(
    itb: Float[Tensor, "*batch src tgt"], self_attention: Float[Tensor, "*batch tgt"]
) -> Float[Tensor, "*batch src tgt"]:
    """LIG's ITB-mapRatio correction; `self_attention[..., j]` is the weight `a_jj`."""
    assert itb.shape[-1] == itb.shape[-2] and self_attention.shape[-1] == itb.shape[-1]
    itb64, a = itb.double(), self_attention.double()
    _, rest = _self_and_rest(itb64)
    safe = (1.0 - a).abs() > _EPS
    est = rest * torch.where(safe, a / torch.where(safe, 1.0 - a, 1.0), 0.0)
    return _rescale(itb64, est).to(itb.dtype)
