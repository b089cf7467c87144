"""Exact edge patching hooks, with edge coefficients that may be float and differentiable.

One patched run of a batch reads, at every destination `d`,

    x_d = (its input in this run) - sum over sources src of w[src, d] (a[src] - a_abl[src])

where `a` are the source activations of this same run (token embedding, per-head outputs
`z[h] @ W_O[h]`, MLP outputs), `a_abl` the ablated ones and `w = 1 - m` the *missing*
coefficient of each edge (`m` its mask: 1 in the circuit). With a boolean `w` this is
`circuits.evaluate`'s patching (fast path: a preallocated buffer, no autograd); with a float `w`
that requires grad, the correction is differentiable in `w` and in the sources (two custom
autograd nodes over one shared buffer: one GEMM per destination block in the forward, one per
destination and one per source chunk in the backward), so the patched metric is
differentiable in `w` (edge pruning optimises it; its gradient at `w = 0` is minus the EAP
score). A *probe* adds a second term `- v[src, d] D[src]` with `v = 0` requiring grad and a fixed
direction `D` (the `a - a_abl` of a reference run): its gradient is the EAP score of the patched
model, which re-linearised attribution uses at interpolated inputs.

Per-head q/k/v inputs are realised by recomputing each head's projection from its own
corrected residual stream with the layer's ln1: `hook_q[h] += (ln1(x - c_h) - ln1(x)) @ W_Q[h]`
(before RoPE); with `frozen` (GIM's `freeze_norm`) the norm's scale is a constant for the
gradient. The MLP input is corrected at `ln2.hook_in` (without ln2: at `mlp.hook_in`, through
ln1 where attention and MLP share it), the logits' at `ln_final.hook_in`. On a post-norm layer a
head's output is its share of the normalised attention output, read at `ln1_post.hook_in`.

Examples:
    >>> import torch
    >>> from gimlens.testing import tiny_model
    >>> from circuits.graph import Graph
    >>> from circuits._engine.model import ModelSpec, recorded_sources
    >>> from gimlens.runtime import run_hooked
    >>> model = tiny_model("gpt2")
    >>> spec, graph = ModelSpec.read(model), Graph.from_model(model)
    >>> clean, corrupted = model.to_tokens(["When Mary and John went"]), model.to_tokens(["When Anna and John went"])
    >>> ablated, corrupted_logits = recorded_sources(model, spec, corrupted, None)
    >>> missing = graph.valid  # every edge ablated: the corrupted run
    >>> patcher = Patcher(spec, missing, blocks(spec, graph, missing), ablated)
    >>> with torch.no_grad():
    ...     logits = run_hooked(model, clean, fwd_hooks=patcher.hooks())
    >>> torch.allclose(logits, corrupted_logits, atol=1e-4)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from gimlens.errors import GimlensError
from gimlens.heads import head_outputs

from ..graph import Graph, KVEdges
from .model import (Hook, ModelSpec, Site, Sources, head_projection_deltas, norm_deltas,
                    post_head_outputs)

__all__ = ["Patcher", "blocks"]


@dataclass
class _Buffers:
    """What the custom autograd nodes of one run share (no reference back to the `Patcher`, so
    no reference cycle through the autograd graph)."""

    delta: Tensor
    grads: Tensor
    missing: Tensor


class _Source(torch.autograd.Function):
    """Writes one source chunk `d` (rows `rows` of the run's `a - a_abl`) into the run's shared
    buffer and returns a 1-element token that every downstream `_Correction` takes as input.

    Backward (it runs after every downstream destination's, since they consume the token): the
    gradient of `d` is one GEMM, `w[rows, first:] @ G[first:]`, with `G` the gradients of the
    corrections that the destinations stored (the transpose of the forward's structure)."""

    @staticmethod
    def forward(ctx, d, run, rows, first):
        run.delta[rows] = d.detach()
        ctx.run, ctx.rows, ctx.first = run, rows, first
        return d.new_zeros(1)

    @staticmethod
    def backward(ctx, _):
        run, rows, first = ctx.run, ctx.rows, ctx.first
        w = run.missing[rows, first:].to(run.grads.dtype)
        g = w @ run.grads[first:]
        return g.view(rows.stop - rows.start, *run.delta.shape[1:]), None, None, None


class _Correction(torch.autograd.Function):
    """`c = coef.T @ delta[:n_up]` at one destination block (one GEMM over the run's buffer);
    backward stores `dL/dc` in the run's `G[cols]` for the sources and returns `dL/dcoef`."""

    @staticmethod
    def forward(ctx, coef, run, n_up, cols, *tokens):
        ctx.run, ctx.n_up, ctx.cols = run, n_up, cols
        flat = run.delta[:n_up].reshape(n_up, -1)
        return (coef.T.to(flat.dtype) @ flat).view(coef.shape[1], *run.delta.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        run, n_up = ctx.run, ctx.n_up
        g = grad.reshape(grad.shape[0], -1).float()
        run.grads[ctx.cols] = g
        coef_grad = run.delta[:n_up].reshape(n_up, -1) @ g.T if ctx.needs_input_grad[0] else None
        return (coef_grad, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 4)


@dataclass
class Patcher:
    """Hooks for one patched run of one batch.

    Args (fields):
        spec: the model's `ModelSpec`.
        missing: `[n_fwd, n_bwd]` missing coefficients `w` (bool, or float in [0, 1]; zero off
            `graph.valid`), on the model's device.
        blocks: destination blocks to correct, from `blocks`.
        ablated: the batch's ablated sources.
        frozen: GIM's frozen norm scale in the recomputed q/k/v norms (gradient only).
        probe: optional `[n_fwd, n_bwd]` float coefficients `v` (normally zeros requiring grad).
        direction: the probe's fixed `a - a_abl` per source row, `[n_fwd, B, S, d]`; `None`:
            recorded (detached) from this run, for the reference run itself.

    Both paths keep this run's `a - a_abl` of every source in one buffer `delta` (written once
    per source, as it arrives), so each destination's correction is one GEMM over its upstream
    rows. The differentiable path routes gradients through `_Source` / `_Correction`: a
    destination stores `dL/dc` in `grads`, and each source reads its gradient from there in one
    GEMM, so a patched backward has as many GEMMs as the forward instead of one per edge block.
    """

    spec: ModelSpec
    missing: Tensor
    blocks: dict  # (layer | None, part) -> (n_up, cols, W or None)
    ablated: Sources
    frozen: bool = False
    probe: Tensor | None = None
    direction: Tensor | None = None
    delta: Float[Tensor, "n_fwd B S d"] | None = None  # a - a_abl of this run
    grads: Tensor | None = None  # differentiable path: [n_bwd, B*S*d] dL/dc of each destination
    tokens: list = field(default_factory=list)  # differentiable path: one per source chunk
    first: Tensor | None = None  # first non-zero column of each source row of `missing`
    shared: _Buffers | None = None
    pending: dict = field(default_factory=dict)
    fast: bool = True  # set by hooks(): bool coefficients, no probe, grad off
    neuron_mask: Tensor | None = None  # fast path: [n_fwd, d] 1 where a source's dim is ablated
    masked: int = 0  # rows of delta already multiplied by neuron_mask

    def recorded(self) -> Float[Tensor, "n_fwd B S d"]:
        """This (differentiable) run's `a - a_abl` of every source, detached: the probe's
        direction for later runs."""
        return self.delta

    def hooks(self) -> list[Hook]:
        self.fast = (self.missing.dtype == torch.bool and self.probe is None
                     and not torch.is_grad_enabled())
        self.tokens, self.pending, self.masked = [], {}, 0
        if self.neuron_mask is not None and not self.fast:
            raise GimlensError("a neuron mask needs boolean edge coefficients, no probe, grad off")
        self.delta = torch.empty_like(self.ablated.resid)
        if not self.fast:
            n_bwd = self.missing.shape[1]
            self.grads = self.delta.new_zeros(n_bwd, self.delta[0].numel())
            nz = self.missing.detach() != 0
            self.first = torch.where(nz.any(1), nz.float().argmax(1), n_bwd).cpu()
            self.shared = _Buffers(self.delta, self.grads, self.missing.detach())
        spec = self.spec
        hooks: list[Hook] = [(spec.hook(Site.EMBED), lambda x, hook: self._record(0, x))]
        for l in range(spec.n_layers):
            post = bool(spec.post) and spec.post[l] is not None
            hooks.append((spec.hook(Site.Z, l), lambda x, hook, l=l: self._record_heads(l, x)))
            if post:
                hooks.append((spec.hook(Site.ATTN_POST_IN, l),
                              lambda x, hook, l=l: self._record_post_heads(l, x)))
            hooks.append((spec.hook(Site.MLP_OUT, l), lambda x, hook, l=l: self._record(spec.mlp_row(l), x)))
            shared = spec.layout.shared_norm and (l, "mlp") in self.blocks
            if any((l, p) in self.blocks for p in "qkv") or shared:
                hooks.append((spec.hook(Site.LN1_IN, l), lambda x, hook, l=l: self._heads(x, l)))
                for p in "qkv":
                    hooks.append((spec.hook(Site(f"blocks.{{l}}.attn.hook_{p}"), l),
                                  lambda x, hook, l=l, p=p: self._add(x, l, p)))
            if (l, "mlp") in self.blocks:
                patch = self._patch_shared if spec.layout.shared_norm else self._patch
                hooks.append((spec.hook(Site.LN2_IN, l), lambda x, hook, l=l, f=patch: f(x, l, "mlp")))
        if (None, "logits") in self.blocks:
            hooks.append((spec.hook(Site.LN_FINAL_IN), lambda x, hook: self._patch(x, None, "logits")))
        return hooks

    # -- sources
    def _record(self, row: int, x: Tensor) -> None:
        if self.fast:
            torch.sub(x.detach().float(), self.ablated.resid[row], out=self.delta[row])
            return
        self._keep(slice(row, row + 1), (x.float() - self.ablated.resid[row])[None])

    def _record_heads(self, layer: int, z: Tensor) -> None:
        if self.spec.post and self.spec.post[layer] is not None:  # heads: at the post-norm
            self.pending[layer, "z"] = z
            return
        W_O, rows = self.spec.attn[layer].W_O.float(), self.spec.head_rows(layer)
        if self.fast:
            head_outputs(z.detach().float() - self.ablated.z[layer].float(), W_O,
                         out=self.delta[rows])
            return
        self._keep(rows, head_outputs(z.float() - self.ablated.z[layer].float(), W_O))

    def _record_post_heads(self, layer: int, attn_out: Tensor) -> None:
        """A post-norm layer's heads: each one's share of the normalised attention output."""
        rows, z = self.spec.head_rows(layer), self.pending.pop((layer, "z"))
        if self.fast:
            out = post_head_outputs(self.spec, layer, z.detach(), attn_out.detach())
            torch.sub(out, self.ablated.resid[rows], out=self.delta[rows])
            return
        out = post_head_outputs(self.spec, layer, z, attn_out, self.frozen)
        self._keep(rows, out - self.ablated.resid[rows])

    def _keep(self, rows: slice, d: Tensor) -> None:
        first = int(self.first[rows].min())
        if d.requires_grad and first < self.missing.shape[1]:
            self.tokens.append(_Source.apply(d, self.shared, rows, first))
        else:
            self.delta[rows] = d.detach()

    # -- destinations
    def _correction(self, n_up: int, cols: slice) -> Float[Tensor, "n B S d"]:
        if self.fast:
            if self.neuron_mask is not None and self.masked < n_up:  # neuron level: rows done
                self.delta[self.masked:n_up] *= self.neuron_mask[self.masked:n_up, None, None]
                self.masked = n_up
            m = self.missing[:n_up, cols].to(self.delta.dtype)
            c = m.T @ self.delta[:n_up].reshape(n_up, -1)
            return c.view(m.shape[1], *self.delta.shape[1:])
        coef = self.missing[:n_up, cols].float()
        if self.probe is not None and self.direction is None:  # this run is the reference
            coef = coef + self.probe[:n_up, cols]
        c = _Correction.apply(coef, self.shared, n_up, cols, *self.tokens)
        if self.probe is not None and self.direction is not None:
            D = self.direction[:n_up]
            c = c + (self.probe[:n_up, cols].T @ D.reshape(n_up, -1)).view_as(c)
        return c

    def _patch(self, x: Tensor, layer: int | None, part: str) -> Tensor:
        n_up, cols, _ = self.blocks[layer, part]
        return x - self._correction(n_up, cols).squeeze(0).to(x.dtype)

    def _patch_shared(self, x: Tensor, layer: int, part: str) -> Tensor:
        """The MLP input of a block whose attention and MLP read one norm: `x` is that norm's
        output; the MLP's own copy of the residual stream is corrected through the norm."""
        n_up, cols, _ = self.blocks[layer, part]
        resid = self.pending.pop((layer, "resid"))
        c = self._correction(n_up, cols)
        return x + norm_deltas(resid, c, self.spec.ln1[layer], self.frozen)[0].to(x.dtype)

    def _heads(self, x: Tensor, layer: int) -> None:
        """The q/k/v corrections of `layer`: one GEMM for each run of adjacent column blocks."""
        if self.spec.layout.shared_norm and (layer, "mlp") in self.blocks:
            self.pending[layer, "resid"] = x
        parts = [p for p in "qkv" if (layer, p) in self.blocks]
        runs: list[list[str]] = []
        for p in parts:
            prev = self.blocks[layer, runs[-1][-1]][1] if runs else None
            cols = self.blocks[layer, p][1]
            if prev is not None and prev.step in (None, 1) and cols.step in (None, 1) \
                    and prev.stop == cols.start:
                runs[-1].append(p)
            else:
                runs.append([p])
        norm = self.spec.ln1[layer]
        for run in runs:
            n_up = self.blocks[layer, run[0]][0]
            if len(run) == 1:
                c = self._correction(n_up, self.blocks[layer, run[0]][1])
            else:
                c = self._correction(n_up, slice(self.blocks[layer, run[0]][1].start,
                                                 self.blocks[layer, run[-1]][1].stop))
            at = 0
            for p in run:
                _, cols, W = self.blocks[layer, p]
                n = len(range(*cols.indices(self.missing.shape[1])))
                cp, at = c[at:at + n], at + n
                self.pending[layer, p] = head_projection_deltas(x, cp, W, norm,
                                                                not self.fast and self.frozen)

    def _add(self, x: Tensor, layer: int, part: str):
        d = self.pending.pop((layer, part), None)
        return None if d is None else x + d.to(x.dtype)


def blocks(spec: ModelSpec, graph: Graph, missing_cpu: Bool[Tensor, "n_fwd n_bwd"]) -> dict:
    """Destination blocks with at least one edge in `missing_cpu` (pass `graph.valid` for every
    block), with their upstream count, columns and projection weight.

    Raises `GimlensError` for a `per_query_head` graph of a grouped-KV model whose query heads
    of one KV group differ in their k or v edges (they share one projection)."""
    H, Hk = spec.n_heads, spec.n_kv_heads
    split = graph.kv_edges is KVEdges.PER_QUERY_HEAD and Hk < H
    out = {}
    for l in range(spec.n_layers):
        n_up = spec.upstream(l)
        for p in "qkv":
            cols = graph.backward_slice(l, p)
            if p != "q" and split:
                shared = missing_cpu[:, cols].reshape(-1, Hk, H // Hk)
                if not bool((shared == shared[..., :1]).all()):
                    raise GimlensError(
                        f"layer {l}: query heads of one KV group have different {p} edges in this "
                        "per_query_head graph, but they share one key/value projection, so exact "
                        "patching cannot give them different inputs. Use "
                        "graph.as_kv_edges('grouped') (an edge stays if any head of the group "
                        "keeps it) or select the circuit on a kv_edges='grouped' graph."
                    )
                cols = slice(cols.start, cols.stop, H // Hk)
            if bool(missing_cpu[:n_up, cols].any()):
                out[l, p] = (n_up, cols, getattr(spec.attn[l], f"W_{p.upper()}"))
        col = graph.backward_index(l)
        n_up = spec.upstream(l, mlp=True)
        if bool(missing_cpu[:n_up, col].any()):
            out[l, "mlp"] = (n_up, slice(col, col + 1), None)
    col = graph.n_backward - 1
    if bool(missing_cpu[:, col].any()):
        out[None, "logits"] = (spec.n_forward, slice(col, col + 1), None)
    return out
