"""The hook side of edge attribution: what one forward-and-backward pass records and where each
destination gradient goes.

In the clean run the source hooks turn the ablated activations into `diff = a_abl - a_clean`;
in every gradient pass the destination hooks hand each destination input's gradient (per head
for q/k/v, through the ln1 backward of `circuits._engine.model.head_input_grads`) to the
`Accumulator`. A `Point` says how a
pass is interpolated: the token embedding, every destination input at once (joint), or one node
group's output (per node: `node` 0 is the input, `1 + 2 l` layer `l`'s attention, `2 + 2 l` its
MLP), whose output is then a constant for the backward pass (no gradient flows through it).

Examples:
    >>> Point(weight=0.5, alpha=0.25, inputs=True).clean
    False
    >>> Point(weight=0.1, alpha=1.0, inputs=False, node=3).clean  # layer 1's attention, held fixed
    False
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from ..graph import Graph
from .accumulate import Accumulator
from .model import (Hook, ModelSpec, Sources, check_norm, head_input_grads, head_outputs,
                    source_hooks)
from .sites import Site

__all__ = ["Point", "Scorer"]


@dataclass(frozen=True)
class Point:
    """One gradient pass: interpolation `alpha` (1 = clean, 0 = ablated) of the token embedding
    (`inputs`), of every destination input (`not inputs`, `node` None) or of one node group's
    output (`node`), and its weight in the average."""

    weight: float
    alpha: float = 1.0
    inputs: bool = True
    node: int | None = None

    @property
    def clean(self) -> bool:
        """The plain clean run (it also records `diff`)."""
        return self.alpha == 1.0 and self.node is None


@dataclass
class Scorer:
    """Hooks for one batch: record `diff = a_abl - a_clean` in the clean run and, as gradients
    arrive at each destination in the backward pass, put them where the accumulator wants them."""

    spec: ModelSpec
    graph: Graph
    ablated: Sources  # its `resid` becomes diff = a_abl - a_clean in the clean run
    frozen: bool
    split_kv: bool  # per-query-head k/v slots on a grouped-KV model
    keep_clean: bool  # keep the clean destination inputs (activation interpolation follows)
    acc: Accumulator
    stats: dict = field(default_factory=dict)  # layer -> NormStats of this run's ln1 input
    clean_in: dict = field(default_factory=dict)  # destination site -> clean input (activations IG)
    shift: dict = field(default_factory=dict)  # destination site -> x_abl - x_clean
    kept: dict = field(default_factory=dict)  # (layer, name) -> tensors for split k/v
    keep_nodes: bool = False  # keep the clean node outputs (per-node interpolation follows)
    clean_z: dict = field(default_factory=dict)  # layer -> clean hook_z (per node)
    clean_mlp: dict = field(default_factory=dict)  # layer -> clean MLP output, float32 (per node)
    leaf: Tensor | None = None
    ln1_x0: Tensor | None = None

    def record_hooks(self) -> list[Hook]:
        """Hooks of a clean pass without backward: `diff` (and the clean destination inputs or
        node outputs)."""
        hooks = source_hooks(self.spec, self._subtract, self._heads)
        if self.keep_clean:
            spec = self.spec
            sites = [spec.hook(Site.LN1_IN, l) for l in range(spec.n_layers)]
            sites += [spec.hook(Site.LN2_IN, l) for l in range(spec.n_layers)]
            sites.append(spec.hook(Site.LN_FINAL_IN))
            hooks += [(s, lambda x, hook, s=s: self.clean_in.__setitem__(s, x.detach())) for s in sites]
        return hooks

    def hooks(self, point: Point, check_norm_once: bool) -> list[Hook]:
        """Hooks of one gradient pass at `point` (the clean one also records `diff`)."""
        spec = self.spec
        hooks: list[Hook] = []
        if point.clean:
            hooks += source_hooks(spec, self._subtract, self._heads)
        hooks.append((spec.hook(Site.EMBED), lambda x, hook: self._embed(x, point)))
        for l in range(spec.n_layers):
            if point.node == 1 + 2 * l:
                hooks.append((spec.hook(Site.Z, l), lambda x, hook, l=l: self._fixed(
                    x, self.clean_z[l].float() + (1 - point.alpha) * (
                        self.ablated.z[l].float() - self.clean_z[l].float()))))
            if point.node == 2 + 2 * l:
                hooks.append((spec.hook(Site.MLP_OUT, l), lambda x, hook, l=l: self._fixed(
                    x, self.clean_mlp[l] + (1 - point.alpha) * self.diff[spec.mlp_row(l)])))
            hooks.append((spec.hook(Site.LN1_IN, l), lambda x, hook, l=l: self._ln1_in(x, l, point)))
            for qkv in "qkv":
                site = spec.hook(Site(f"blocks.{{l}}.attn.hook_{qkv}"), l)
                hooks.append((site, lambda x, hook, l=l, qkv=qkv: self._qkv(x, l, qkv)))
            if self.split_kv:
                for site in (Site.SCORES, Site.Z):
                    hooks.append((spec.hook(site, l), lambda x, hook, l=l, s=site: self._keep(x, l, s)))
            mlp_in = spec.hook(Site.LN2_IN, l)
            if spec.layout.shared_norm:  # the MLP reads ln1: its input is ln1's output
                hooks.append((mlp_in, lambda x, hook, l=l, s=mlp_in: self._shared_dest(
                    x, s, l, self.graph.backward_index(l), point)))
            else:
                hooks.append((mlp_in, lambda x, hook, l=l, s=mlp_in: self._dest(
                    x, s, l, self.graph.backward_index(l), point)))
        final = spec.hook(Site.LN_FINAL_IN)
        hooks.append((final, lambda x, hook: self._dest(
            x, final, spec.n_layers - 1, self.graph.n_backward - 1, point)))
        if check_norm_once and spec.hook(Site.LN1_OUT, 0) is not None:
            hooks.append((spec.hook(Site.LN1_OUT, 0), lambda x, hook: check_norm(
                spec.ln1_out_norm(0), self.ln1_x0, x, "blocks.0.ln1")))
        return hooks

    # -- forward side
    @property
    def diff(self) -> Float[Tensor, "n_fwd B S d"]:
        return self.ablated.resid

    def _subtract(self, row: int, values: Tensor) -> None:
        self.diff[row] -= values
        if self.keep_nodes and isinstance(row, int) and row > 0:
            self.clean_mlp[(row - 1) // (self.spec.n_heads + 1)] = values

    def _heads(self, layer: int, z: Tensor) -> None:
        if self.keep_nodes:
            self.clean_z[layer] = z
        if self.spec.post and self.spec.post[layer] is not None:
            return  # a post-norm layer's head rows arrive through `_subtract`
        head_outputs(self.ablated.z[layer], self.spec.attn[layer].W_O, minus=z,
                     out=self.diff[self.spec.head_rows(layer)])

    @staticmethod
    def _fixed(x: Tensor, value: Tensor) -> Tensor:
        """`value` in place of `x`; the gradient reaching `x` through it is zero."""
        return value.to(x.dtype) + x * 0

    def _embed(self, x: Tensor, point: Point) -> Tensor:
        if (point.inputs or point.node == 0) and point.alpha != 1.0:
            x = x + ((1 - point.alpha) * self.diff[0]).to(x.dtype)
        self.leaf = x.detach().requires_grad_(True)
        return self.leaf

    def _interpolated(self, x: Tensor, site: str, point: Point) -> Tensor:
        """`x` replaced by `x_clean + (1 - alpha)(x_abl - x_clean)`, gradient straight through."""
        if point.clean:
            if self.keep_clean:
                self.clean_in[site] = x.detach()
            return x
        if point.inputs or point.node is not None:
            return x
        target = self.clean_in[site].float() + (1 - point.alpha) * self._shift(site)
        return target.to(x.dtype) + (x - x.detach())

    def _shift(self, site: str) -> Tensor:
        if not self.shift:  # cumulative sums of diff over each destination's upstream sources
            spec, acc, start = self.spec, torch.zeros_like(self.diff[0]), 0
            for l in range(spec.n_layers + 1):
                last = l == spec.n_layers
                for s, n in ((spec.hook(Site.LN_FINAL_IN), spec.n_forward),) if last else (
                        (spec.hook(Site.LN1_IN, l), spec.upstream(l)),
                        (spec.hook(Site.LN2_IN, l), spec.upstream(l, True))):
                    acc = acc + self.diff[start:n].sum(0)
                    self.shift[s], start = acc, n
        return self.shift[site]

    def _ln1_in(self, x: Tensor, layer: int, point: Point) -> Tensor:
        x = self._interpolated(x, self.spec.hook(Site.LN1_IN, layer), point)
        self.stats[layer] = self.spec.ln1[layer].stats(x.detach())
        if layer == 0:
            self.ln1_x0 = x.detach()
        return x

    def _qkv(self, x: Tensor, layer: int, qkv: str) -> Tensor:
        if self.split_kv and qkv != "q":
            self.kept[layer, qkv] = x
        else:
            x.register_hook(lambda g: self._head_grads_arrive(g, layer, qkv))
        return x

    def _head_grads_arrive(self, g: Tensor, layer: int, qkv: str) -> None:
        self._head_grads(g, layer, qkv, self.acc.slot(layer, self.graph.backward_slice(layer, qkv)))

    def _keep(self, x: Tensor, layer: int, site: Site) -> Tensor:
        self.kept[layer, site] = x
        x.register_hook(lambda g: self.kept.__setitem__((layer, site, "grad"), g))
        return x

    def _dest(self, x: Tensor, site: str, layer: int, col: int, point: Point) -> Tensor:
        y = self._interpolated(x, site, point)
        y = y.view_as(y) if y is x else y  # a tensor of its own: its gradient is this input's
        y.register_hook(lambda g: self._dest_arrive(g, layer, col))
        return y

    def _shared_dest(self, x: Tensor, site: str, layer: int, col: int, point: Point) -> Tensor:
        """The MLP destination of a block whose attention and MLP read one norm (ln1): `x` is
        ln1's output; its gradient goes back through ln1 (exact or frozen) to the MLP's own
        copy of the residual stream."""
        if not (point.clean or point.inputs or point.node is not None):  # joint interpolation
            resid = self.clean_in[self.spec.hook(Site.LN1_IN, layer)].float()
            target = self.spec.ln1[layer].forward(resid + (1 - point.alpha) * self._shift(site))
            x = target.to(x.dtype) + (x - x.detach())
        y = x.view_as(x)
        norm, stats = self.spec.ln1[layer], self.stats[layer]

        def arrive(g: Tensor) -> None:
            g = (g.float() * norm.weight)[None]
            self.acc.slot(layer, slice(col, col + 1))[0] = norm.backward(stats, g, self.frozen)[0]

        y.register_hook(arrive)
        return y

    def _dest_arrive(self, g: Tensor, layer: int, col: int) -> None:
        self.acc.slot(layer, slice(col, col + 1))[0] = g

    def _head_grads(self, g: Tensor, layer: int, qkv: str, out: Tensor | None = None
                    ) -> Float[Tensor, "n B S d"]:
        W = getattr(self.spec.attn[layer], f"W_{qkv.upper()}")
        return head_input_grads(g, W, self.spec.ln1[layer], self.stats[layer], self.frozen, out)

    def split_kv_grads(self) -> None:
        """Per-query-head k/v scores: differentiate each layer's scores (k) and z (v) with the
        gradient of one query head per KV group at a time."""
        H, Hk = self.spec.n_heads, self.spec.n_kv_heads
        rep = H // Hk
        for l in range(self.spec.n_layers):
            for qkv, out, head_dim in (("k", Site.SCORES, 1), ("v", Site.Z, 2)):
                y, g = self.kept[l, out], self.kept[l, out, "grad"]
                start = self.graph.backward_slice(l, qkv).start
                for r in range(rep):
                    shape = [1] * g.ndim
                    shape[head_dim] = H
                    mask = (torch.arange(H, device=g.device) % rep == r).view(shape)
                    (part,) = torch.autograd.grad(y, self.kept[l, qkv], g * mask.to(g.dtype),
                                                  retain_graph=True)
                    self.acc.gemm(self.spec.upstream(l), slice(start + r, start + H, rep),
                                  self._head_grads(part, l, qkv))
        self.kept.clear()
