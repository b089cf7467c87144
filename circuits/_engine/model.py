"""Per-model helpers for edge attribution and patching: hook names, per-head weights, norms.

Everything here reads a TransformerLens model through its hook-point names and its per-head
weight views (`blocks[l].attn.W_Q` `[H, d_model, d_head]`, `W_K`/`W_V` `[H_kv, ...]`,
`W_O` `[H, d_head, d_model]`). Per-head quantities are derived, not read from split modes:

- head `h`'s output `out[h] = z[:, :, h] @ W_O[h]` (the attention output is their sum plus
  `b_O`, which belongs to no head);
- the gradient at head `h`'s *own copy* of the residual stream before `ln1`:
  `g_in[h] = LN1_backward(g_q[h] @ W_Q[h]^T)`, with the norm Jacobian exact or frozen (GIM).

Hook names per model kind (bridge or `HookedTransformer`) live in `circuits._engine.sites`.

Examples:
    >>> import torch
    >>> from gimlens.testing import tiny_model
    >>> spec = ModelSpec.read(tiny_model("llama"))
    >>> spec.attn[0].W_K.shape, spec.ln1[0].kind.value
    (torch.Size([2, 32, 8]), 'RMS')
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Callable

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from gimlens.errors import GimlensError
from gimlens.heads import head_outputs as shared_head_outputs
from gimlens.runtime import run_hooked

from .sites import (CORE_SITES, HOOKED_SITES, ModelKind, Site, hook_modes,  # noqa: F401
                    model_kind, require_hooks, site_name)

__all__ = [
    "Ablation", "AttnWeights", "Hook", "ModelSpec", "Norm", "NormKind", "NormStats", "Sources",
    "ablated_sources", "check_norm", "head_input_grads", "head_outputs", "head_projection_deltas",
    "mean_sources", "recorded_sources", "run_model", "source_hooks",
]

Hook = tuple[str, Callable]


class Ablation(str, Enum):
    """What an edge outside the circuit carries instead of its clean value."""

    CORRUPTED = "corrupted"  #: the source's activation on the corrupted example
    MEAN = "mean"  #: per position, its mean over the given corrupted examples (mask-weighted)
    ZERO = "zero"  #: zero


class NormKind(str, Enum):
    LAYER_NORM = "LN"
    RMS_NORM = "RMS"


@dataclass(frozen=True)
class NormStats:
    """`x_hat = (x - mean) / sigma` (LayerNorm) or `x / rms` (RMSNorm), and `1 / sigma`."""

    x_hat: Float[Tensor, "*batch d"]
    inv_scale: Float[Tensor, "*batch 1"]


@dataclass(frozen=True)
class Norm:
    """A LayerNorm or RMSNorm with its weight (and bias), computed in float32."""

    kind: NormKind
    weight: Float[Tensor, " d"]
    bias: Float[Tensor, " d"] | None
    eps: float

    def stats(self, x: Float[Tensor, "*batch d"]) -> NormStats:
        x = x.float()
        if self.kind is NormKind.LAYER_NORM:
            x = x - x.mean(-1, keepdim=True)
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return NormStats(x * inv, inv)

    def forward(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        out = self.stats(x).x_hat * self.weight
        return out if self.bias is None else out + self.bias

    def backward(self, stats: NormStats, g: Float[Tensor, "n *batch d"], frozen: bool
                 ) -> Float[Tensor, "n *batch d"]:
        """Gradient at the norm's input from `g = w * grad` (`grad`: at the norm's output;
        leading dim: heads). Works in place on `g`.

        Exact: `(g - [mean(g)] - x_hat * mean(x_hat * g)) / sigma` (the bracket only for
        LayerNorm). Frozen (GIM): the scale is a constant, so the last term goes.
        """
        if self.kind is NormKind.LAYER_NORM:
            g.sub_(g.mean(-1, keepdim=True))
        if not frozen:
            mean = torch.linalg.vecdot(g, stats.x_hat).unsqueeze(-1) / g.shape[-1]
            g.addcmul_(stats.x_hat, mean, value=-1.0)
        return g.mul_(stats.inv_scale)


def _read_norm(bridge_norm, kind: NormKind, cfg, folded: bool = False) -> Norm:
    inner = getattr(bridge_norm, "original_component", None)
    inner = bridge_norm if inner is None else inner
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
    return Norm(kind, weight.detach().float(), None if bias is None else bias.detach().float(),
                float(eps))


@dataclass(frozen=True)
class AttnWeights:
    """One layer's per-head projections (detached, model dtype)."""

    W_Q: Float[Tensor, "H d dh"]
    W_K: Float[Tensor, "Hk d dh"]
    W_V: Float[Tensor, "Hk d dh"]
    W_O: Float[Tensor, "H dh d"]


@dataclass(frozen=True)
class ModelSpec:
    """Shape, ln1 norms and attention weights of a model, read once per call."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    parallel_attn_mlp: bool
    ln1: tuple[Norm, ...]
    attn: tuple[AttnWeights, ...]
    device: torch.device
    dtype: torch.dtype
    kind: ModelKind = ModelKind.BRIDGE

    @classmethod
    def read(cls, model) -> "ModelSpec":
        require_hooks(model)
        cfg = model.cfg
        L, H = int(cfg.n_layers), int(cfg.n_heads)
        Hk = int(getattr(cfg, "n_key_value_heads", None) or H)
        norm_type = str(getattr(cfg, "normalization_type", None) or "")
        kinds = {"LN": NormKind.LAYER_NORM, "RMS": NormKind.RMS_NORM,
                 "LNPre": NormKind.LAYER_NORM, "RMSPre": NormKind.RMS_NORM}  # Pre: folded
        if norm_type not in kinds:
            raise GimlensError(
                f"edge attribution supports models with LayerNorm or RMSNorm (normalization_type "
                f"'LN', 'RMS', 'LNPre' or 'RMSPre'); this model has {norm_type!r}"
            )
        ln1, attn = [], []
        for block in model.blocks[:L]:
            ln1.append(_read_norm(block.ln1, kinds[norm_type], cfg, norm_type.endswith("Pre")))
            a = block.attn
            W_K, W_V = a.W_K.detach(), a.W_V.detach()
            if W_K.shape[0] == H != Hk:  # HookedTransformer expands GQA weights per query head
                W_K, W_V = W_K[:: H // Hk], W_V[:: H // Hk]
            attn.append(AttnWeights(a.W_Q.detach(), W_K, W_V, a.W_O.detach()))
        W_O = attn[0].W_O
        if W_O.shape[0] != H or attn[0].W_K.shape[0] != Hk:
            raise GimlensError(f"unexpected attention weight shapes W_O {tuple(W_O.shape)}, "
                               f"W_K {tuple(attn[0].W_K.shape)} for {H} heads / {Hk} KV heads")
        ln1 = tuple(replace(n, weight=n.weight.to(W_O.device)) for n in ln1)
        return cls(L, H, Hk, int(cfg.d_model), bool(getattr(cfg, "parallel_attn_mlp", False)),
                   ln1, tuple(attn), W_O.device, W_O.dtype, model_kind(model))

    def hook(self, site: Site, layer: int | None = None) -> str:
        """The hook name of `site` at `layer` on this model (see
        `HOOKED_SITES` for a `HookedTransformer`)."""
        return site_name(self.kind, site, layer, self.n_layers)

    def ln1_out_norm(self, layer: int) -> "Norm":
        """The norm whose output `Site.LN1_OUT` shows: ln1 itself on the bridge
        (`ln1.hook_out`), ln1 without weight and bias on a `HookedTransformer`
        (`ln1.hook_normalized`)."""
        norm = self.ln1[layer]
        if self.kind is ModelKind.HOOKED_TRANSFORMER:
            return replace(norm, weight=torch.ones_like(norm.weight), bias=None)
        return norm

    # ---- the graph's forward (source) index: input, then per layer its heads and its MLP.
    # The same arithmetic as circuits.graph's layout; it is kept here, in this one block, until
    # ModelSpec reads it from the layout module.

    @property
    def n_forward(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    def head_rows(self, layer: int) -> slice:
        """Rows of the heads of `layer` in the graph's forward (source) index."""
        start = 1 + layer * (self.n_heads + 1)
        return slice(start, start + self.n_heads)

    def mlp_row(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def upstream(self, layer: int | None, mlp: bool = False) -> int:
        """How many sources (a prefix of the forward index) feed layer `layer`'s attention
        inputs, its MLP input (`mlp`), or the logits (`layer=None`)."""
        if layer is None:
            return self.n_forward
        n = 1 + layer * (self.n_heads + 1)
        return n + self.n_heads if mlp and not self.parallel_attn_mlp else n

    # ---- end of the index arithmetic


def head_outputs(z: Float[Tensor, "B S H dh"], W_O: Float[Tensor, "H dh d"],
                 minus: Tensor | None = None, out: Tensor | None = None) -> Float[Tensor, "H B S d"]:
    """Each head's contribution to the attention output of `z - minus`, detached, in float32
    (written into `out` if given)."""
    z = z.detach().float()
    if minus is not None:
        z = z - minus.float()
    return shared_head_outputs(z, W_O.float(), out=out)


def head_input_grads(grad: Float[Tensor, "B S n dh"], W: Float[Tensor, "n d dh"], norm: Norm,
                     stats: NormStats, frozen: bool, out: Tensor | None = None
                     ) -> Float[Tensor, "n B S d"]:
    """Gradient at each head's own copy of the residual stream before `norm` (float32).

    `grad` is the gradient at the head's projection output (`hook_q/k/v`), `W` the head's
    projection `[n, d_model, d_head]`; `stats` describe the norm's input. Written into
    `out` (contiguous) if given.
    """
    B, S, n, dh = grad.shape
    d = W.shape[1]
    weighted = (W.float() * norm.weight[:, None]).transpose(1, 2)  # w * (g @ W^T) = g @ (w W)^T
    g = rearrange(grad, "B S n dh -> n (B S) dh").float()
    if out is None:
        out = torch.empty(n, B, S, d, device=g.device)
    torch.bmm(g, weighted, out=out.view(n, B * S, d))
    return norm.backward(stats, out, frozen)


def head_projection_deltas(x: Float[Tensor, "B S d"], correction: Float[Tensor, "n B S d"],
                           W: Float[Tensor, "n d dh"], norm: Norm) -> Float[Tensor, "B S n dh"]:
    """How each head's projection changes when its input `x` becomes `x - correction[h]`:
    `(norm(x - c_h) - norm(x)) @ W[h]` (exact norm; no bias needed; 0 where `c_h = 0`)."""
    n, B, S, d = correction.shape
    x = x.float()
    delta = norm.forward(x - correction) - norm.forward(x)
    out = torch.bmm(delta.view(n, B * S, d), W.float())
    return out.view(n, B, S, -1).permute(1, 2, 0, 3)


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


@dataclass
class Sources:
    """Source activations of one batch in the graph's forward order: the `input` and MLP rows
    of `resid` (float32; head rows are left for the caller) and each layer's `z`, from which
    head `h`'s output is `z[..., h, :] @ W_O[h]`."""

    resid: Float[Tensor, "n_fwd B S d"]
    z: list[Float[Tensor, "B S H dh"]]



def source_hooks(spec: ModelSpec, resid: Callable[[int, Tensor], None],
                 z: Callable[[int, Tensor], None]) -> list[Hook]:
    """Forward hooks handing over each source activation: `resid(row, [B, S, d] float32)` for
    the token embedding (`input`, row 0) and each MLP output, `z(layer, hook_z value)`."""
    hooks: list[Hook] = [(spec.hook(Site.EMBED), lambda x, hook: resid(0, x.detach().float()))]
    for l in range(spec.n_layers):
        hooks.append((spec.hook(Site.Z, l), lambda x, hook, l=l: z(l, x.detach())))
        hooks.append((spec.hook(Site.MLP_OUT, l),
                      lambda x, hook, l=l: resid(spec.mlp_row(l), x.detach().float())))
    return hooks


def recorded_sources(model, spec: ModelSpec, tokens: Tensor, mask: Tensor | None
                     ) -> tuple[Sources, Tensor]:
    """A no-grad run's `Sources` and logits."""
    B, S = tokens.shape
    src = Sources(torch.empty(spec.n_forward, B, S, spec.d_model, device=spec.device),
                  [None] * spec.n_layers)

    def put(row, x):
        src.resid[row] = x

    def put_z(layer, x):
        src.z[layer] = x

    with torch.no_grad():
        logits = run_model(model, tokens, mask, source_hooks(spec, put, put_z))
    return src, logits


def mean_sources(model, spec: ModelSpec, batches) -> Sources:
    """Per-position means (`B = 1`) of the sources over `batches` of `(tokens, mask)`,
    each example weighted by its attention mask (positions nobody reaches are 0)."""
    total: Sources | None = None
    count = 0
    for tokens, mask in batches:
        src, _ = recorded_sources(model, spec, tokens, mask)
        w = torch.ones(tokens.shape, device=spec.device) if mask is None else mask.float()
        resid = torch.einsum("nbsd,bs->nsd", src.resid, w)[:, None]
        z = [torch.einsum("bshk,bs->shk", x.float(), w)[None] for x in src.z]
        if total is None:
            total = Sources(resid, z)
        else:
            total.resid += resid
            total.z = [a + b for a, b in zip(total.z, z)]
        count = count + w.sum(0)
    count = count.clamp(min=1)
    return Sources(total.resid / count[:, None], [x / count[:, None, None] for x in total.z])


def ablated_sources(model, spec: ModelSpec, ablation: Ablation, tokens: Tensor, mask,
                    mean: Sources | None) -> tuple[Sources, Tensor | None]:
    """The ablated sources of a batch (the corrupted run's, the mean, or zeros) and, for
    `corrupted`, the corrupted run's logits."""
    B, S = tokens.shape
    shape = (spec.n_forward, B, S, spec.d_model)
    if ablation is Ablation.CORRUPTED:
        return recorded_sources(model, spec, tokens, mask)
    if ablation is Ablation.MEAN:
        z = [x.expand(B, -1, -1, -1).to(spec.dtype) for x in mean.z]
        return Sources(mean.resid.expand(shape).contiguous(), z), None
    zero = torch.zeros(B, S, spec.n_heads, spec.attn[0].W_O.shape[1], device=spec.device,
                       dtype=spec.dtype)
    return Sources(torch.zeros(shape, device=spec.device), [zero] * spec.n_layers), None


def run_model(model, tokens: Tensor, attention_mask: Tensor | None, hooks: list[Hook]) -> Tensor:
    """`model(tokens)` with forward `hooks` in place (removed afterwards, also on error) -> logits
    ([`run_hooked`][gimlens.runtime.run_hooked]), in `hook_modes`."""
    with hook_modes(model):
        return run_hooked(model, tokens, fwd_hooks=hooks, attention_mask=attention_mask)
