"""Layer-wise integrated gradients: token-to-token flows inside each transformer layer.

For a target `j` and a map `Φ_j` (`gimlens.layerwise.boundaries`), the L2-scalarised
set-to-set IG against a baseline set `z'` (`gimlens.layerwise.baselines`) is

    L_j(α) = ||Φ_j(z' + α (z - z')) - Φ_j(z')||_2,
    IG_{i→j} = sum_d (z_{i,d} - z'_{i,d}) ∫_0^1 ∂L_j/∂z_{i,d} dα,

and completeness reads `sum_i IG_{i→j} = ||Φ_j(z) - Φ_j(z')||_2` (exact up to quadrature error,
reported per target as `Flow.completeness_error`; with GIM switched on the gradient is GIM's,
so the gap is GIM's by design). The integral uses `gimlens.quadrature.nodes_and_weights`
(Gauss-Legendre by default). The gradient of the norm is undefined at `α = 0` (there
`Φ_j = Φ_j(z')`): rules with a node at 0 (trapezoid, left Riemann) replace that node's value by
its linear extrapolation from the next two nodes, folding its weight into theirs, so a gradient
that is constant or linear along the path is still integrated exactly.

Every target, head and quadrature node of a layer is one row of a batched pass; rows are
chunked to `batch_size` and each chunk needs one forward and one backward: since `L_j` of a
row depends only on that row, the gradient of the sum over rows gives every row its own. On
causal models a pass whose last target is `j` runs on the first `j + 1` tokens only (hooks a
caller keeps on the model during the call see those shorter batches).

Examples:
    >>> from gimlens.testing import tiny_model
    >>> model = tiny_model("gpt2", n_layers=2)
    >>> res = layerwise_ig(model, "When Mary and John went to the store", layers=1)
    >>> flow = res.flow(1, "layer")
    >>> flow.matrix.shape  # [source, target]
    torch.Size([9, 9])
    >>> bool((flow.completeness_error.abs() <= 1e-3 * flow.total + 1e-6).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..distributed import is_main_process
from ..validation import check_int, coerce_enum
from ..gim import GIMConfig, gim_hooks
from ..heads import head_outputs
from ..memory import PassKind, fit_rows, resolve_budget, row_bytes
from ..quadrature import Quadrature, nodes_and_weights
from ..runtime import prepared, progress as progress_bar, require_lens_model, run_hooked
from .baselines import Baseline, map_ratio, zero_ratio
from .options import baseline_map, granularity_list, layer_list, prompt_tokens
from .boundaries import BOUNDARIES, Granularity, HeadScores, run_block
from .result import Flow, LayerwiseResult

__all__ = ["layerwise_ig"]

#: Default chunk: about this many residual-stream elements (rows x positions x d_model) per pass.
_ELEMENTS_PER_PASS = 1 << 23
#: On causal models the targets are split over at least this many passes (see _target_chunks).
_MIN_PASSES = 8


def layerwise_ig(
    model,
    text: str | Tensor,
    *,
    layers: int | Sequence[int] | None = None,
    granularity: str | Sequence[str] = "layer",
    baseline: str | Mapping[str, str] = "input_token",
    steps: int = 32,
    quadrature: Quadrature | str | None = None,
    gim: GIMConfig | bool | dict | None = None,
    head_scores: HeadScores | str = HeadScores.OWN,
    batch_size: int | None = None,
    progress: bool = False,
    max_memory: int | str | None = None,
) -> LayerwiseResult:
    """Token-to-token (and, for `mlp`, per-dimension) IG flows inside the given layers.

    Args:
        model: a TransformerLens `TransformerBridge` (or `HookedTransformer`), pre-norm.
        text: a prompt (tokenized with `model.to_tokens`, BOS as the model's default) or
            token ids `[T]` / `[1, T]`.
        layers: a layer index, a list of them, or `None` for every layer.
        granularity: `"layer"`, `"att"`, `"mlp"`, a list of them or `"all"`.
        baseline: one name for every granularity or `{granularity: name}` (missing ones:
            `input_token`); see
            `gimlens.layerwise.baselines.Baseline`. `mlp` takes `zero` or
            `input_token` (`u'_j` = the attention boundary when every position holds
            `z_j`, LIG's "ATT ITB a=0"); `itb_map_ratio` needs attention (`att` only).
        steps: quadrature nodes; `quadrature`: a `gimlens.quadrature.Quadrature`.
            Default: Gauss-Legendre, graded towards `alpha = 0` (`gauss_legendre_graded`)
            when a zero baseline is involved (`zero`, `itb_zero_ratio`): seen through a norm,
            a zero baseline's path changes almost entirely next to `alpha = 0`, where plain
            Gauss-Legendre nodes never land (on SmolLM2: completeness errors of 100-400%).
        gim: `None`/`False` for plain gradients, `True` or a `GIMConfig` for GIM's
            backward rules inside the evaluated block.
        head_scores: `"own"` or `"shared"` (`att`; see
            `gimlens.layerwise.boundaries.HeadScores`).
        batch_size: rows (target x head x node) per forward/backward; default from the size.
        progress: a progress bar over the (layer, granularity) flows and the memory estimate.
        max_memory: bytes or a size like `"4GB"` one pass may add; rows per pass are lowered to
            fit ([`gimlens.memory`][gimlens.memory]). `None`: half the device's free memory.

    Returns:
        A `gimlens.layerwise.result.LayerwiseResult`; `flow(layer, granularity)`
        gives `matrix` (`[source, target]`; `mlp`: `[target, d_model]`), `heads`
        (`att`: `[head, source, target]`), `total` and `completeness_error` per target.
    """
    require_lens_model(model)
    tokens, text_str = prompt_tokens(model, text)
    layer_ids = layer_list(model, layers)
    grans = granularity_list(granularity)
    baselines = baseline_map(baseline, grans)
    if quadrature is None:
        zero_path = any(b in (Baseline.ZERO, Baseline.ITB_ZERO_RATIO) for b in baselines.values())
        graded = zero_path and isinstance(steps, int) and steps >= 7
        quadrature = Quadrature.GAUSS_LEGENDRE_GRADED if graded else Quadrature.GAUSS_LEGENDRE
    alpha, weights = _fold_zero_node(*nodes_and_weights(steps, quadrature))
    gim_cfg = GIMConfig.coerce(gim)
    heads = coerce_enum(HeadScores, head_scores, "head_scores")
    check_int("batch_size", batch_size, minimum=1, allow_none=True)
    all_gim = [] if gim_cfg.is_off else gim_hooks(model, gim_cfg)  # validates the model first
    need_mid = Granularity.MLP in grans
    need_pattern = any(baselines[g] is Baseline.ITB_MAP_RATIO for g in grans)
    show = progress and is_main_process()
    T = tokens.shape[1]
    budget = resolve_budget(max_memory, tokens.device)
    fit_rows("layerwise_ig", per_row=row_bytes(model, T, PassKind.BLOCK, gim=not gim_cfg.is_off), n_rows=_rows_hint(
        model, T, grans, alpha.numel()), max_memory=budget, upper=batch_size, show=show)

    with prepared(model), progress_bar(len(layer_ids) * len(grans), show=show,
                                       desc="layerwise_ig", unit="flow") as bar:
        clean = _clean_pass(model, tokens, layer_ids, need_mid, need_pattern)
        flows: dict = {}
        for l in layer_ids:
            prefix = f"blocks.{l}."
            ctx = _Ctx(
                model=model,
                tokens=tokens,
                layer=l,
                clean=clean,
                alpha=alpha.to(clean[("resid_pre", l)].dtype),
                weights=weights.float(),
                hooks=[h for h in all_gim if h[0].startswith(prefix)],
                heads=heads,
                batch_size=batch_size,
                budget=budget,
            )
            for g in grans:
                flows[(l, g)] = _flow(ctx, g, baselines[g])
                bar.update(1)
    return LayerwiseResult(
        tokens=[str(t) for t in model.to_str_tokens(tokens[0])],
        token_ids=[int(t) for t in tokens[0]],
        flows=flows,
        steps=steps,
        quadrature=Quadrature(quadrature).value,
        gim=None if gim_cfg.is_off else gim_cfg,
        head_scores=heads,
        text=text_str,
        model=getattr(model.cfg, "model_name", None),
    )


# ---------------------------------------------------------------------------------------------
# Quadrature


def _fold_zero_node(
    alpha: Float[Tensor, " steps"], w: Float[Tensor, " steps"]
) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
    """Drop a node at α = 0, giving its value by linear extrapolation from the next two nodes."""
    if alpha.numel() < 2 or float(alpha[0]) != 0.0:
        return alpha, w
    w = w.clone()
    if alpha.numel() >= 3 and torch.isclose(alpha[2] - alpha[1], alpha[1] - alpha[0]):
        w[1] += 2 * w[0]  # g(0) ≈ 2 g(h) - g(2h)
        w[2] -= w[0]
    else:
        w[1] += w[0]
    return alpha[1:], w[1:]


# ---------------------------------------------------------------------------------------------
# Computation


@dataclass(frozen=True)
class _Ctx:
    """What every pass over one layer needs."""

    model: Any
    tokens: Tensor  # [1, T]
    layer: int
    clean: dict  # ("resid_pre" | "resid_mid" | "pattern", layer) -> activation of the prompt
    alpha: Tensor  # quadrature nodes, model dtype
    weights: Tensor  # quadrature weights, float32
    hooks: list  # GIM's forward hooks inside this block
    heads: HeadScores
    batch_size: int | None
    budget: int  # bytes one pass may add (rows per pass lowered to fit)

    def max_rows(self, pos: int, d_model: int) -> int:
        """Rows per pass at `pos` positions: `batch_size` (else ~_ELEMENTS_PER_PASS
        elements), at most what the memory budget allows (at least one row)."""
        size = self.batch_size or max(1, _ELEMENTS_PER_PASS // (pos * d_model))
        return max(1, min(size, self.budget // row_bytes(self.model, pos, PassKind.BLOCK, gim=bool(self.hooks))))


def _clean_pass(model, tokens, layers, need_mid: bool, need_pattern: bool) -> dict:
    """Residual streams (and attention patterns) of the prompt at the requested layers."""
    names = {f"blocks.{l}.hook_resid_pre": ("resid_pre", l) for l in layers}
    if need_mid:
        names.update({f"blocks.{l}.hook_resid_mid": ("resid_mid", l) for l in layers})
    if need_pattern:
        names.update({f"blocks.{l}.attn.hook_pattern": ("pattern", l) for l in layers})
    store: dict = {}

    def keep(tensor, hook, key):
        store[key] = tensor.detach().clone()

    hooks = [(n, lambda t, hook, k=k: keep(t, hook, k)) for n, k in names.items()]
    with torch.no_grad():
        run_hooked(model, tokens, fwd_hooks=hooks)
    assert set(store) == set(names.values()), "a hook point did not fire in the clean pass"
    return store


def _flow(ctx: _Ctx, g: Granularity, baseline: Baseline) -> Flow:
    compute = _mlp_flow if g is Granularity.MLP else _token_flow
    if not baseline.is_ratio:
        return compute(ctx, g, baseline)
    itb = compute(ctx, g, Baseline.INPUT_TOKEN)
    if baseline is Baseline.ITB_ZERO_RATIO:
        zero = compute(ctx, g, Baseline.ZERO)
        matrix = zero_ratio(itb.matrix, zero.matrix)
        heads = None if itb.heads is None else zero_ratio(itb.heads, zero.heads)
    else:
        a = torch.diagonal(ctx.clean[("pattern", ctx.layer)][0], dim1=-2, dim2=-1).float()
        matrix = map_ratio(itb.matrix, a.mean(0))  # whole attention: the heads' mean a_jj
        heads = None if itb.heads is None else map_ratio(itb.heads, a)
    return Flow(ctx.layer, g, baseline, matrix, itb.total, heads, itb.head_total)


def _rows_hint(model, T: int, grans, K: int) -> int:
    """The rows of the largest flow (for the printed estimate)."""
    return max(T * (int(model.cfg.n_heads) + 1) * K if g is Granularity.ATT else T * K
               for g in grans)


def _chunks(n_rows: int, ctx: _Ctx, pos: int, d_model: int):
    size = ctx.max_rows(pos, d_model)
    for start in range(0, n_rows, size):
        yield torch.arange(start, min(start + size, n_rows))


def _target_chunks(ctx: _Ctx, T: int, per_target: int, d_model: int) -> list[tuple[int, int, int]]:
    """`(first row, end row, positions)` per pass; rows are ordered by target.

    On a causal model the outputs at targets `<= j` do not depend on later positions, so a pass
    whose last target is `j` runs on the first `j + 1` positions only (about half the work
    over a prompt). Without `batch_size`, a pass holds about `_ELEMENTS_PER_PASS` elements.
    """
    causal = getattr(ctx.model.cfg, "attention_dir", "causal") == "causal"
    # At most ~1/8 of the targets per pass, so that short prefixes run short: work ~ 1.1x the
    # triangular minimum instead of 2x, for ~8 passes' overhead.
    span = -(-T // _MIN_PASSES) * per_target if causal else T * per_target
    total, chunks, start = T * per_target, [], 0
    while start < total:
        end = start
        while end < total:
            P = end // per_target + 1 if causal else T
            allowed = min(ctx.max_rows(P, d_model), span) - (end - start)
            if allowed <= 0:
                break
            end += min(allowed, (end // per_target + 1) * per_target - end)
        chunks.append((start, end, (end - 1) // per_target + 1 if causal else T))
        start = end
    return chunks


def _token_flow(ctx: _Ctx, g: Granularity, baseline: Baseline) -> Flow:
    """`layer` and `att`: one row per (target, head group, node)."""
    bound = BOUNDARIES[g]
    in_hook, out_hook = bound.input_hook.format(l=ctx.layer), bound.output_hook.format(l=ctx.layer)
    z = ctx.clean[("resid_pre", ctx.layer)][0]  # [T, d]
    T, d = z.shape
    dev = z.device
    if baseline is Baseline.ZERO:
        bases, base_of = torch.zeros_like(z)[None], torch.zeros(T, dtype=torch.long, device=dev)
    else:  # input token: for target j every position holds z_j
        bases, base_of = z[:, None, :].expand(T, T, d), torch.arange(T, device=dev)

    if g is Granularity.LAYER:
        G = 1

        def objective(out, j, gi):
            return out[torch.arange(len(j), device=dev), j]

    else:
        w_o = ctx.model.blocks[ctx.layer].attn.W_O.detach()
        H = w_o.shape[0]
        eye = torch.eye(H, dtype=z.dtype, device=dev)
        if ctx.heads is HeadScores.OWN:  # each head, then the whole attention output
            value_sel = grad_sel = torch.cat([eye, torch.ones(1, H, dtype=z.dtype, device=dev)])
        else:  # every row's value is the whole output; the gradient flows through one head
            value_sel, grad_sel = torch.ones(H, H, dtype=z.dtype, device=dev), eye
        G = value_sel.shape[0]

        def objective(out, j, gi):
            ho = head_outputs(out[torch.arange(len(j), device=dev), j], w_o).movedim(0, -2)  # [n, H, d]
            v, s = value_sel[gi], grad_sel[gi]
            live = torch.einsum("nh,nhd->nd", v * s, ho)
            return live + torch.einsum("nh,nhd->nd", v * (1 - s), ho.detach())

    # Anchor pass: Φ at the prompt and at every baseline, for the references and the totals.
    with torch.no_grad():
        x0 = torch.cat([z[None], bases])
        out = run_block(ctx.model, ctx.tokens, in_hook, x0, out_hook, ctx.hooks)
        if g is Granularity.LAYER:
            phi = out[:, :, None, :]  # [1 + B, T, 1, d]
        else:
            ho = head_outputs(out, w_o).movedim(0, -2)  # [1+B, T, H, d]
            phi = torch.einsum("gh,nthd->ntgd", value_sel, ho)
        ar = torch.arange(T, device=dev)
        ref = phi[1 + base_of, ar]  # [T, G, d]: Φ_j at the baseline of target j
        total = (phi[0] - ref).norm(dim=-1).float()  # [T, G]

    K = ctx.alpha.numel()
    acc = torch.zeros(T * G, T, dtype=torch.float32, device=dev)
    for start, end, P in _target_chunks(ctx, T, G * K, d):
        rows = torch.arange(start, end, device=dev)
        j, gi, k = rows // (G * K), (rows // K) % G, rows % K
        base = bases[base_of[j], :P]
        delta = z[None, :P] - base
        x = (base + ctx.alpha[k][:, None, None] * delta).requires_grad_(True)
        out = run_block(ctx.model, ctx.tokens[:, :P], in_hook, x, out_hook, ctx.hooks)
        loss = (objective(out, j, gi) - ref[j, gi]).norm(dim=-1).sum()
        (grad,) = torch.autograd.grad(loss, x)
        contrib = (grad * delta).sum(-1).float() * ctx.weights[k][:, None]  # [n, P sources]
        acc[:, :P].index_add_(0, j * G + gi, contrib)
    flows = acc.view(T, G, T).permute(1, 2, 0)  # [G, src, tgt]
    if g is Granularity.LAYER:
        return Flow(ctx.layer, g, baseline, flows[0].contiguous(), total[:, 0])
    if ctx.heads is HeadScores.OWN:
        return Flow(
            ctx.layer, g, baseline, flows[-1].contiguous(), total[:, -1],
            flows[:-1].contiguous(), total[:, :-1].T.contiguous(),
        )
    return Flow(ctx.layer, g, baseline, flows.sum(0), total[:, 0], flows.contiguous(), None)


def _mlp_flow(ctx: _Ctx, g: Granularity, baseline: Baseline) -> Flow:
    """`mlp`: position-wise, so one row per node carries every target."""
    l = ctx.layer
    in_hook, out_hook = BOUNDARIES[g].input_hook.format(l=l), BOUNDARIES[g].output_hook.format(l=l)
    u = ctx.clean[("resid_mid", l)]  # [1, T, d]
    T, d = u.shape[1:]
    with torch.no_grad():
        if baseline is Baseline.ZERO:
            base = torch.zeros_like(u)
        else:  # u at j when every position of the block input holds z_j (LIG's ATT ITB a=0)
            z = ctx.clean[("resid_pre", l)][0]
            mids = run_block(
                ctx.model, ctx.tokens, f"blocks.{l}.hook_resid_pre", z[:, None, :].expand(T, T, d),
                f"blocks.{l}.hook_resid_mid", ctx.hooks,
            )
            base = torch.diagonal(mids, dim1=0, dim2=1).T[None].clone()  # [1, T, d]
        x0 = torch.cat([u, base])
        phi = x0 + run_block(ctx.model, ctx.tokens, in_hook, x0, out_hook, ctx.hooks)
        ref = phi[1:2]
        total = (phi[0] - phi[1]).norm(dim=-1).float()
    delta = u - base
    acc = torch.zeros(T, d, dtype=torch.float32, device=u.device)
    for rows in _chunks(ctx.alpha.numel(), ctx, T, d):
        k = rows.to(u.device)
        x = (base + ctx.alpha[k][:, None, None] * delta).requires_grad_(True)
        out = x + run_block(ctx.model, ctx.tokens, in_hook, x, out_hook, ctx.hooks)
        (grad,) = torch.autograd.grad((out - ref).norm(dim=-1).sum(), x)
        acc += ((grad * delta).float() * ctx.weights[k][:, None, None]).sum(0)
    return Flow(l, g, baseline, acc, total)
