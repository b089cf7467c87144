"""The hook points edge attribution reads and writes, named per model kind.

**Two model kinds** (`ModelKind`). On the `TransformerBridge` each
norm's input has a hook of its own (`ln1.hook_in`, `ln2.hook_in`, `ln_final.hook_in`) that feeds
only the norm. TransformerLens 3.x's `HookedTransformer` has none, so
`site_name` (and `ModelSpec.hook`)
name other sites there:

- ln1's input: `blocks.{l}.hook_resid_pre`. It also carries the residual stream on, so it is only
  read there, except for joint activation interpolation, which replaces it with a
  straight-through gradient: every norm input is replaced anyway, so no destination's value or
  gradient changes.
- the MLP's input: `blocks.{l}.hook_mlp_in`, a copy of `hook_resid_mid` that feeds only ln2; it
  fires only with `use_hook_mlp_in`, which `hook_modes` (used by
  `run_model`) switches on for each run and restores.
- the logits' input: the last `blocks.{L-1}.hook_resid_post` (it feeds only `ln_final`).

Folded norms (`LNPre`, `RMSPre`: `fold_ln=True`) read as a unit weight.

**Block layouts** (`BlockLayout`, bridge only; see `docs/concepts/models.md`). Most families run
attention on `ln1` and the MLP on `ln2`. Where a block has no such norm the destination moves:
GPT-J and Phi-1.5/2 run attention and MLP in parallel on *one* norm (no `ln2`): the MLP's input
edge is realised at `mlp.hook_in` (the norm's output) through ln1's own norm; OLMo-2 has no
pre-norms: attention reads `attn.hook_in` and the MLP `mlp.hook_in` directly. Gemma 2/3 and
OLMo-2 normalise each sublayer's output (`ln1_post`, `ln2_post`) before adding it to the
residual stream: a head's output is its share of the normalised attention output (read at
`ln1_post.hook_in`).

Examples:
    >>> site_name(ModelKind.HOOKED_TRANSFORMER, Site.LN1_IN, 2, 12)
    'blocks.2.hook_resid_pre'
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator

from gimlens.errors import GimlensError
from gimlens.runtime import list_names, require_lens_model

__all__ = ["BlockLayout", "CORE_SITES", "HOOKED_SITES", "ModelKind", "Site", "block_layout",
           "hook_modes", "model_kind", "require_hooks", "site_name"]


class Site(str, Enum):
    """The hook points edge attribution reads and writes, by their `TransformerBridge` names
    (`site_name` gives a model's own)."""

    EMBED = "hook_embed"  #: token embedding: the `input` node
    LN1_IN = "blocks.{l}.ln1.hook_in"  #: residual stream entering ln1 (feeds only attention)
    LN1_OUT = "blocks.{l}.ln1.hook_out"  #: used once to check the norm read here is the model's
    Q = "blocks.{l}.attn.hook_q"  #: [B, S, H, dh], before RoPE
    K = "blocks.{l}.attn.hook_k"  #: [B, S, H_kv, dh]
    V = "blocks.{l}.attn.hook_v"
    SCORES = "blocks.{l}.attn.hook_attn_scores"  #: [B, H, Q, K]
    Z = "blocks.{l}.attn.hook_z"  #: [B, S, H, dh]
    LN2_IN = "blocks.{l}.ln2.hook_in"  #: residual stream entering ln2 (feeds only the MLP)
    MLP_OUT = "blocks.{l}.hook_mlp_out"
    LN_FINAL_IN = "ln_final.hook_in"  #: the `logits` destination
    ATTN_IN = "blocks.{l}.attn.hook_in"  #: attention's input where there is no ln1 (OLMo-2)
    MLP_IN = "blocks.{l}.mlp.hook_in"  #: the MLP's input where there is no ln2 (GPT-J, OLMo-2)
    ATTN_POST_IN = "blocks.{l}.ln1_post.hook_in"  #: attention output before its post-norm

    def at(self, layer: int | None = None) -> str:
        return self.value.format(l=layer)


#: Sites every attribution / evaluation run needs.
CORE_SITES = (Site.EMBED, Site.LN1_IN, Site.LN1_OUT, Site.Q, Site.K, Site.V, Site.Z, Site.LN2_IN,
              Site.MLP_OUT, Site.LN_FINAL_IN)


class ModelKind(str, Enum):
    """Which hook points a model offers for the norm inputs (see the module docstring)."""

    BRIDGE = "bridge"  #: `TransformerBridge`: `ln1/ln2/ln_final.hook_in`
    HOOKED_TRANSFORMER = "hooked_transformer"  #: TransformerLens 3.x `HookedTransformer`


#: The sites a `HookedTransformer` names differently (`{last}`: its last layer).
HOOKED_SITES = {
    Site.LN1_IN: "blocks.{l}.hook_resid_pre",  # ln1's input and the residual stream: read only
    Site.LN1_OUT: "blocks.{l}.ln1.hook_normalized",  # x_hat, before the norm's weight
    Site.LN2_IN: "blocks.{l}.hook_mlp_in",  # feeds only ln2; needs use_hook_mlp_in
    Site.LN_FINAL_IN: "blocks.{last}.hook_resid_post",  # feeds only ln_final
}


def model_kind(model) -> ModelKind:
    """`HOOKED_TRANSFORMER` for a model with `hook_resid_pre` / `hook_mlp_in` but neither
    `ln1.hook_in` nor `attn.hook_in` (and a `set_use_hook_mlp_in` switch), else `BRIDGE`.

    Examples:
        >>> from gimlens.testing import tiny_model
        >>> model_kind(tiny_model("gpt2")).value
        'bridge'
    """
    hook_dict = model.hook_dict
    if Site.LN1_IN.at(0) not in hook_dict and Site.ATTN_IN.at(0) not in hook_dict \
            and HOOKED_SITES[Site.LN2_IN].format(l=0) in hook_dict \
            and "blocks.0.hook_resid_pre" in hook_dict and hasattr(model, "set_use_hook_mlp_in"):
        return ModelKind.HOOKED_TRANSFORMER
    return ModelKind.BRIDGE


def site_name(kind: ModelKind, site: Site, layer: int | None, n_layers: int) -> str:
    """The hook name of `site` (at `layer`) on a model of `kind` with `n_layers` layers.

    Examples:
        >>> site_name(ModelKind.HOOKED_TRANSFORMER, Site.LN_FINAL_IN, None, 12)
        'blocks.11.hook_resid_post'
        >>> [site_name(kind, Site.LN2_IN, 3, 12) for kind in ModelKind]
        ['blocks.3.ln2.hook_in', 'blocks.3.hook_mlp_in']
    """
    if kind is ModelKind.HOOKED_TRANSFORMER and site in HOOKED_SITES:
        return HOOKED_SITES[site].format(l=layer, last=n_layers - 1)
    return site.at(layer)


@dataclass(frozen=True)
class BlockLayout:
    """How a model's blocks read and write the residual stream (see the module docstring).

    Attributes:
        remap: sites this model names differently (`None`: the site does not exist).
        shared_norm: attention and MLP read one norm (`ln1`); the MLP's input edges are
            realised at `mlp.hook_in` through that norm.
        post_norm: each sublayer's output is normalised before it joins the residual stream.
    """

    remap: dict = field(default_factory=dict)
    shared_norm: bool = False
    post_norm: bool = False

    def site(self, site: Site) -> Site | None:
        return self.remap.get(site, site)


def block_layout(model) -> BlockLayout:
    """The block layout of `model`, read from its hook points (plain on a `HookedTransformer`).

    Examples:
        >>> from gimlens.testing import tiny_model
        >>> block_layout(tiny_model("gptj")).shared_norm, block_layout(tiny_model("olmo2")).remap[Site.LN1_IN]
        (True, <Site.ATTN_IN: 'blocks.{l}.attn.hook_in'>)
    """
    if model_kind(model) is ModelKind.HOOKED_TRANSFORMER:
        return BlockLayout()
    hook_dict = model.hook_dict
    has = lambda site: site.at(0) in hook_dict  # noqa: E731
    remap: dict = {}
    if not has(Site.LN1_IN) and has(Site.ATTN_IN):  # no pre-norm (OLMo-2)
        remap.update({Site.LN1_IN: Site.ATTN_IN, Site.LN1_OUT: None})
    shared = has(Site.LN1_IN) and not has(Site.LN2_IN) and has(Site.MLP_IN)
    if not has(Site.LN2_IN) and has(Site.MLP_IN):
        remap[Site.LN2_IN] = Site.MLP_IN
    return BlockLayout(remap, shared, has(Site.ATTN_POST_IN))


def require_hooks(model, sites=CORE_SITES) -> None:
    """Raise [`GimlensError`][gimlens.errors.GimlensError] naming the hook points `model` lacks
    (or, on a `HookedTransformer`, the configuration edge attribution cannot follow)."""
    require_lens_model(model)
    kind, cfg = model_kind(model), model.cfg
    L = int(cfg.n_layers)
    if kind is ModelKind.HOOKED_TRANSFORMER:
        _check_hooked_config(cfg)
    hook_dict = model.hook_dict
    layout = block_layout(model)
    sites = [layout.site(s) for s in sites] + ([Site.ATTN_POST_IN] if layout.post_norm else [])
    names = {site_name(kind, s, l, L) for s in sites if s is not None for l in range(L)}
    missing = sorted(n for n in names if n not in hook_dict)
    if missing:
        shown = list_names(missing, limit=6)
        raise GimlensError(
            f"this model lacks hook points that edge attribution needs: {shown}. Expected a "
            "TransformerLens model (TransformerBridge or HookedTransformer) with separate ln1/ln2 "
            "norms and per-head attention hooks (hook_q/k/v/z)."
        )


def _check_hooked_config(cfg) -> None:
    """A `HookedTransformer` whose head outputs are `z @ W_O` added to the residual stream, with
    pre-norms and an MLP in every block, and KV heads as `cfg.n_key_value_heads` says."""
    flags = ("attn_only", "use_normalization_before_and_after", "ungroup_grouped_query_attention")
    bad = [name for name in flags if getattr(cfg, name, False)]
    arch = str(getattr(cfg, "original_architecture", "") or "")
    if arch.startswith(("Olmo2", "Olmo3")):  # post-norm blocks: ln1 / ln2 act on the outputs
        bad.append(f"post-norm architecture {arch}")
    if bad:
        raise GimlensError(
            "edge attribution on a HookedTransformer needs pre-norm blocks with an MLP and "
            f"grouped KV heads as configured; this model has {', '.join(bad)}"
        )


@contextlib.contextmanager
def hook_modes(model) -> Iterator[None]:
    """On a `HookedTransformer`, `hook_mlp_in` switched on for the duration (the MLP input's own
    hook); restored exactly on exit, also after an exception. Nothing on the bridge."""
    if model_kind(model) is not ModelKind.HOOKED_TRANSFORMER:
        yield
        return
    before = model.cfg.use_hook_mlp_in
    try:
        model.set_use_hook_mlp_in(True)
        yield
    finally:
        model.set_use_hook_mlp_in(before)
