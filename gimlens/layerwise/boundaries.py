"""The maps `Φ` of layer-wise IG, one per granularity, evaluated on TransformerLens hook points.

For a pre-norm decoder layer `l` with boundaries `z` (`blocks.l.hook_resid_pre`), `u`
(`hook_resid_mid`) and `z'` (`hook_resid_post`):

| name    | input → output | `Φ_j` (one objective per target `j`; `T` positions) |
|---------|----------------|------------------------------------------------------|
| `layer` | z → z'         | the block output at `j`: `z'_j` (residual included); a `[T, T]` source-to-target matrix, causal |
| `att`   | z → u          | head `h`'s own output at `j`: `hook_z[j, h] @ W_O[h]` (not a slice of the projected sum), one `[T, T]` matrix per head, plus the whole attention output `sum_h hook_z[j, h] @ W_O[h]` (`u_j - z_j` up to the constant `b_O`; residual excluded) |
| `mlp`   | u → z'         | `z'_j = u_j + MLP(u_j)` (residual included, as LIG's default); the MLP acts on each position alone, so the attribution is per hidden (residual-stream) dimension `d` of `u_j`: `[T, d_model]` |

A batch of interpolated inputs is evaluated by running the model on the prompt (batch 1) and
replacing the input hook's tensor by the batch; earlier blocks run once on batch 1 and a private
exception raised at the output hook stops the forward (no later block, norm or unembedding runs).
`mlp`: replacing `hook_resid_mid` feeds the MLP (`ln2.hook_in`) but not, on
`TransformerBridge`, the residual addition, so `Φ` adds `u` itself to `hook_mlp_out`.

Examples:
    >>> BOUNDARIES[Granularity.ATT].output_hook.format(l=3)
    'blocks.3.attn.hook_z'
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

from jaxtyping import Float
from torch import Tensor

from ..runtime import run_hooked

__all__ = ["Granularity", "HeadScores", "Boundary", "BOUNDARIES", "run_block"]


class Granularity(str, Enum):
    """What `Φ` maps (see the module docstring)."""

    LAYER = "layer"
    ATT = "att"
    MLP = "mlp"


class HeadScores(str, Enum):
    """How `att` scores heads.

    - `own`: each head is scalarised by the L2 norm of its own output change (LIG's
      definition); each head's column sums to its own `||ΔΦ_{j,h}||`.
    - `shared`: every head is credited, along its own gradient path, with the L2 objective of
      the whole attention output, so the heads sum exactly to the whole-attention matrix.
    """

    OWN = "own"
    SHARED = "shared"


@dataclass(frozen=True)
class Boundary:
    """Where `Φ` starts and ends: hook templates with `{l}` for the layer."""

    input_hook: str
    output_hook: str


BOUNDARIES: dict[Granularity, Boundary] = {
    Granularity.LAYER: Boundary("blocks.{l}.hook_resid_pre", "blocks.{l}.hook_resid_post"),
    Granularity.ATT: Boundary("blocks.{l}.hook_resid_pre", "blocks.{l}.attn.hook_z"),
    Granularity.MLP: Boundary("blocks.{l}.hook_resid_mid", "blocks.{l}.hook_mlp_out"),
}


class _Stop(Exception):
    """Raised by the capture hook: the block output is in hand, the rest of the forward is waste."""


def run_block(
    model,
    tokens: Tensor,
    input_hook: str,
    x: Float[Tensor, "batch pos d_model"],
    output_hook: str,
    hooks: list[tuple[str, Callable]] = (),
) -> Tensor:
    """The tensor at `output_hook` when the tensor at `input_hook` is replaced by `x`.

    `tokens` is the prompt `[1, T]`; its forward runs on batch 1 up to `input_hook` and on
    `x`'s batch after it. `hooks` (e.g. GIM's) are active for the pass. Every hook is removed
    afterwards, also after an exception.
    """
    captured: list[Tensor] = []

    def patch(tensor, hook):
        return x

    def capture(tensor, hook):
        captured.append(tensor)
        raise _Stop

    try:
        run_hooked(model, tokens, fwd_hooks=[*hooks, (input_hook, patch), (output_hook, capture)])
    except _Stop:
        pass
    assert captured, f"the forward pass never reached {output_hook}"
    return captured[0]
