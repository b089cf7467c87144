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
from functools import cached_property
from enum import Enum
from typing import Callable

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from gimlens.errors import GimlensError
from gimlens.heads import head_outputs as shared_head_outputs
from gimlens.runtime import run_hooked

from ..layout import Layout

from .norms import Norm, NormKind, NormStats, check_norm, norm_deltas, read_norm  # noqa: F401
from .sites import (CORE_SITES, HOOKED_SITES, BlockLayout, ModelKind, Site,  # noqa: F401
                    block_layout, hook_modes, model_kind, require_hooks, site_name)

__all__ = [
    "Ablation", "AttnWeights", "Hook", "ModelSpec", "Norm", "NormKind", "NormStats", "Sources",
    "ablated_sources", "check_norm", "head_input_grads", "head_outputs", "head_projection_deltas",
    "mean_sources", "norm_deltas", "post_head_outputs", "recorded_sources", "run_model", "source_hooks",
]

Hook = tuple[str, Callable]


class Ablation(str, Enum):
    """What an edge outside the circuit carries instead of its clean value."""

    CORRUPTED = "corrupted"  #: the source's activation on the corrupted example
    MEAN = "mean"  #: per position, its mean over the given corrupted examples (mask-weighted)
    ZERO = "zero"  #: zero


@dataclass(frozen=True)
class AttnWeights:
    """One layer's per-head projections (detached, model dtype)."""

    W_Q: Float[Tensor, "H d dh"]
    W_K: Float[Tensor, "Hk d dh"]
    W_V: Float[Tensor, "Hk d dh"]
    W_O: Float[Tensor, "H dh d"]


@dataclass(frozen=True)
class ModelSpec:
    """Shape, ln1 norms and attention weights of a model, read once per call.

    `ln1[l]` is the norm that attention (and, with `layout.shared_norm`, the MLP) reads
    (`IDENTITY` where there is none); `post[l]` the norm after attention (`None` without one):
    head `h`'s output is then its share `post.share(z_h W_O[h], attention output)`.
    """

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
    post: tuple[Norm | None, ...] = ()
    layout: BlockLayout = BlockLayout()

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
        layout = block_layout(model)
        ln1, attn, post = [], [], []
        for l, block in enumerate(model.blocks[:L]):
            if layout.site(Site.LN1_OUT) is None:  # no pre-norm
                ln1.append(Norm.identity(int(cfg.d_model)))
            else:
                ln1.append(read_norm(block.ln1, kinds[norm_type], cfg, norm_type.endswith("Pre")))
            post.append(read_norm(block.ln1_post, kinds[norm_type], cfg) if layout.post_norm
                        else None)
            b_O = getattr(block.attn, "b_O", None)
            if layout.post_norm and (post[-1].bias is not None or (
                    b_O is not None and bool(b_O.detach().ne(0).any()))):
                raise GimlensError(
                    f"blocks.{l}: a norm after attention with a bias (in the norm or in the "
                    "output projection) has no per-head split; edge attribution supports "
                    "post-norms without biases (Gemma 2/3, OLMo-2)")
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
        post = tuple(None if n is None else replace(n, weight=n.weight.to(W_O.device))
                     for n in post)
        parallel = bool(getattr(cfg, "parallel_attn_mlp", False)) or layout.shared_norm
        return cls(L, H, Hk, int(cfg.d_model), parallel, ln1, tuple(attn), W_O.device,
                   W_O.dtype, model_kind(model), post, layout)

    def hook(self, site: Site, layer: int | None = None) -> str | None:
        """The hook name of `site` at `layer` on this model (see `HOOKED_SITES` for a
        `HookedTransformer` and `BlockLayout` for blocks without ln1 / ln2); `None` where the
        model has no such site."""
        site = self.layout.site(site)
        return None if site is None else site_name(self.kind, site, layer, self.n_layers)

    def ln1_out_norm(self, layer: int) -> "Norm":
        """The norm whose output `Site.LN1_OUT` shows: ln1 itself on the bridge
        (`ln1.hook_out`), ln1 without weight and bias on a `HookedTransformer`
        (`ln1.hook_normalized`)."""
        norm = self.ln1[layer]
        if self.kind is ModelKind.HOOKED_TRANSFORMER:
            return replace(norm, weight=torch.ones_like(norm.weight), bias=None)
        return norm

    # ---- the graph's index arithmetic is the layout's (circuits.layout.Layout)
    @cached_property
    def graph_layout(self) -> Layout:
        """The graph layout of this shape (grouped k/v slots)."""
        return Layout.of(self.n_layers, self.n_heads, self.n_kv_heads, self.parallel_attn_mlp)

    @property
    def n_forward(self) -> int:
        return self.graph_layout.n_forward

    def head_rows(self, layer: int) -> slice:
        """Rows of the heads of `layer` in the graph's forward (source) index."""
        return self.graph_layout.forward_slice(layer)

    def mlp_row(self, layer: int) -> int:
        return self.graph_layout.forward_index(layer)

    def upstream(self, layer: int | None, mlp: bool = False) -> int:
        """How many sources (a prefix of the forward index) feed layer `layer`'s attention
        inputs, its MLP input (`mlp`), or the logits (`layer=None`)."""
        return self.graph_layout.upstream(layer, mlp=mlp)

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
                           W: Float[Tensor, "n d dh"], norm: Norm, frozen: bool = False
                           ) -> Float[Tensor, "B S n dh"]:
    """How each head's projection changes when its input `x` becomes `x - correction[h]`:
    `(norm(x - c_h) - norm(x)) @ W[h]` (the one implementation, fast and differentiable)."""
    n, B, S, d = correction.shape
    delta = norm_deltas(x, correction, norm, frozen)
    out = torch.bmm(delta.reshape(n, B * S, d), W.float())
    return out.view(n, B, S, -1).permute(1, 2, 0, 3)


def post_head_outputs(spec: "ModelSpec", layer: int, z: Float[Tensor, "B S H dh"],
                      attn_out: Float[Tensor, "B S d"], frozen: bool = False
                      ) -> Float[Tensor, "H B S d"]:
    """Each head's output on a post-norm model: its share of the normalised attention output
    (float32, differentiable). `attn_out` is the attention output before the norm."""
    raw = shared_head_outputs(z.float(), spec.attn[layer].W_O.float())
    return spec.post[layer].share(raw, attn_out, frozen)


@dataclass
class Sources:
    """Source activations of one batch in the graph's forward order: the `input` and MLP rows
    of `resid` (float32; head rows are left for the caller) and each layer's `z`, from which
    head `h`'s output is `z[..., h, :] @ W_O[h]`."""

    resid: Float[Tensor, "n_fwd B S d"]
    z: list[Float[Tensor, "B S H dh"]]



def source_hooks(spec: ModelSpec, resid: Callable[[int | slice, Tensor], None],
                 z: Callable[[int, Tensor], None]) -> list[Hook]:
    """Forward hooks handing over each source activation: `resid(row, [B, S, d] float32)` for
    the token embedding (`input`, row 0) and each MLP output, `z(layer, hook_z value)`, and on
    a post-norm layer also `resid(head rows, [H, B, S, d])`, the heads' normalised outputs."""
    hooks: list[Hook] = [(spec.hook(Site.EMBED), lambda x, hook: resid(0, x.detach().float()))]
    kept: dict = {}

    def heads(layer: int, x: Tensor) -> None:
        out = post_head_outputs(spec, layer, kept.pop(layer), x.detach())
        resid(spec.head_rows(layer), out)

    def take_z(layer: int, x: Tensor) -> None:
        if spec.post and spec.post[layer] is not None:
            kept[layer] = x.detach()
        z(layer, x.detach())

    for l in range(spec.n_layers):
        hooks.append((spec.hook(Site.Z, l), lambda x, hook, l=l: take_z(l, x)))
        if spec.post and spec.post[l] is not None:
            hooks.append((spec.hook(Site.ATTN_POST_IN, l), lambda x, hook, l=l: heads(l, x)))
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
