"""Per-head quantities both packages read from a TransformerLens model.

Examples:
    >>> import torch
    >>> z, W_O = torch.randn(2, 5, 3, 4), torch.randn(3, 4, 6)  # [B, S, H, d_head], [H, d_head, d]
    >>> out = head_outputs(z, W_O)
    >>> out.shape, torch.allclose(out.sum(0), torch.einsum("bshe,hed->bsd", z, W_O), atol=1e-5)
    (torch.Size([3, 2, 5, 6]), True)
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["head_outputs"]


def head_outputs(z: Float[Tensor, "*batch H dh"], W_O: Float[Tensor, "H dh d"], *,
                 out: Float[Tensor, "H *batch d"] | None = None) -> Float[Tensor, "H *batch d"]:
    """Each head's own contribution `z[..., h, :] @ W_O[h]` to the attention output (`b_O`
    belongs to no head), heads first, in `z`'s dtype; differentiable unless `out` (a
    contiguous buffer to write into) is given.

    Args:
        z: the values at `attn.hook_z`, any leading batch dimensions.
        W_O: the layer's per-head output projection.
        out: optional buffer of the result's shape.
    """
    H, dh = z.shape[-2:]
    batch = z.shape[:-2]
    flat = z.movedim(-2, 0).reshape(H, -1, dh)
    W = W_O.to(flat.dtype)
    d = W.shape[-1]
    if out is None:
        return (flat @ W).view(H, *batch, d)
    torch.bmm(flat, W, out=out.view(H, -1, d))
    return out
