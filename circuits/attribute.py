"""Edge attribution patching: score every edge of a circuit :class:`~circuits.graph.Graph`.

The score of edge ``src -> dst`` estimates how the mean metric changes when ``dst`` reads the
ablated instead of the clean value of ``src``: ``(a_abl[src] - a_clean[src]) . g[dst]``, summed over
positions and ``d_model`` and averaged over examples, where ``g[dst]`` is the gradient of the
metric at ``dst``'s input. One forward and backward pass per batch (per IG step) fills all
scores; per-head destination inputs need no split mode:

- sources: ``input`` = ``hook_embed``; head ``h`` = ``z[h] @ W_O[h]`` (from ``hook_z``); MLP =
  ``hook_mlp_out``;
- q/k/v inputs: ``g_in[h] = LN1_backward(g_q[h] @ W_Q[h]^T)`` from the gradient at ``hook_q/k/v``
  (k/v per KV head), with the exact or, under GIM's ``freeze_norm``, the frozen norm Jacobian;
- MLP input: the gradient at ``ln2.hook_in`` (which feeds only the MLP); logits: at
  ``ln_final.hook_in``.

Methods (:class:`Method`), with ``alpha = k / ig_steps``, ``k = 1..ig_steps`` (``alpha = 1`` is
the clean run):

- ``EAP``: gradients of the clean run.
- ``EAP-IG-inputs``: gradients averaged over runs whose token embeddings are
  ``e_abl + alpha (e_clean - e_abl)`` (``e_abl``: the ablated ``input`` activation).
- ``EAP-IG-activations``: gradients averaged over runs in which *every destination's input* is
  ``x_abl + alpha (x_clean - x_abl)`` (equivalently every source activation is interpolated; the
  gradient passes each replacement straight through). ``x_abl - x_clean`` is the sum of the
  upstream sources' ``a_abl - a_clean``, so the path is the same for every ablation.
- ``clean-corrupted``: the mean of the clean-run gradient and the gradient at ``alpha = 0`` of
  the previous path (for ``ablation="corrupted"`` that is the corrupted run's).

Ablations (:class:`~circuits.model.Ablation`): ``corrupted`` (the corrupted example's
activations), ``mean`` (per position, the mean over all given corrupted examples, weighted by
``attention_mask``), ``zero``.

**Metric signature.** ``metric(logits, indices) -> Tensor[b]``: ``logits`` ``[b, pos, vocab]`` of
the examples ``indices`` (a CPU ``LongTensor [b]`` of positions in the full example set; use it to
pick per-example labels), one differentiable float value per example. ``Task.metric`` of
:mod:`circuits.tasks` has this signature.

**Grouped KV heads.** With ``kv_edges="per_query_head"`` the k/v score of query head ``h`` is its
exact share: the gradient that reaches the KV head through ``h``'s attention scores (k) or
pattern (v) alone, obtained by differentiating that layer's scores / ``z`` with the other heads'
gradients masked out. Summed over a group they equal the grouped score.

**Cost.** Per batch: the ablated run (no grad; none for ``zero``/``mean``) and one forward and
backward pass per gradient point, plus per-head projections of the gradients and one score GEMM
per group of layers (``diff [n_forward, B, S, d]`` against the destination gradients, float32).
Each example's GEMM covers only positions from its first differing clean/corrupted token (before
it the causal runs agree) to the last position with a gradient. The IG methods sum gradients over
their steps and multiply once, holding ``[n_backward, B, S, d]`` float32 gradients meanwhile.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gimlens.distributed import all_reduce_sum, is_main_process, shard_range
from gimlens.errors import GimlensError
from gimlens.gim import GIMConfig, gim_hooks

from .model import (Ablation, Hook, ModelSpec, Site, Sources, ablated_sources, check_norm,
                     head_input_grads, head_outputs, mean_sources, run_model, source_hooks)
from .graph import Graph, KVEdges
from .memory import estimate_memory, fit_batch_size

__all__ = ["attribute", "Method", "Examples"]


class Method(str, Enum):
    """Edge-scoring methods (see the module docstring)."""

    EAP = "EAP"
    EAP_IG_INPUTS = "EAP-IG-inputs"
    EAP_IG_ACTIVATIONS = "EAP-IG-activations"
    CLEAN_CORRUPTED = "clean-corrupted"

    @classmethod
    def coerce(cls, value: "Method | str") -> "Method":
        try:
            return cls(value)
        except ValueError:
            raise GimlensError(f"unknown method {value!r}; known: {[m.value for m in cls]}") from None


# --------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Examples:
    """Validated clean / corrupted token batches, their metric and optional attention mask."""

    clean: Int[Tensor, "n pos"]
    corrupted: Int[Tensor, "n pos"]
    metric: Callable[[Tensor, Tensor], Tensor]
    attention_mask: Int[Tensor, "n pos"] | None = None

    @classmethod
    def resolve(cls, model, clean, corrupted=None, metric=None, attention_mask=None) -> "Examples":
        """Accept tensors or a task object with ``.clean``, ``.corrupted``, ``.metric`` (and
        optionally ``.attention_mask``)."""
        if all(hasattr(clean, a) for a in ("clean", "corrupted", "metric")):
            if corrupted is not None:
                raise GimlensError("pass either a task or clean and corrupted tokens, not both")
            task = clean
            clean, corrupted = task.clean, task.corrupted
            metric = task.metric if metric is None else metric
            if attention_mask is None:
                attention_mask = getattr(task, "attention_mask", None)
        for name, t in (("clean", clean), ("corrupted", corrupted)):
            if not isinstance(t, Tensor) or t.ndim != 2 or t.dtype.is_floating_point \
                    or t.dtype.is_complex or t.dtype == torch.bool or t.numel() == 0:
                raise GimlensError(f"{name} must be a non-empty integer token tensor [batch, pos], got "
                                   f"{_describe(t)}")
        if clean.shape != corrupted.shape:
            raise GimlensError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} "
                               "tokens must have the same shape [batch, pos]")
        vocab = getattr(model.cfg, "d_vocab", None)
        for name, t in (("clean", clean), ("corrupted", corrupted)):
            if int(t.min()) < 0 or (vocab is not None and int(t.max()) >= int(vocab)):
                raise GimlensError(f"{name} tokens must lie in [0, {vocab}), got "
                                   f"[{int(t.min())}, {int(t.max())}]")
        if not callable(metric):
            raise GimlensError(f"metric must be callable as metric(logits, indices) -> Tensor[b], "
                               f"got {metric!r}")
        if attention_mask is not None and (not isinstance(attention_mask, Tensor)
                                           or attention_mask.shape != clean.shape):
            raise GimlensError(f"attention_mask must be a tensor of shape {tuple(clean.shape)}, got "
                               f"{_describe(attention_mask)}")
        return cls(clean.long(), corrupted.long(), metric,
                   None if attention_mask is None else attention_mask.long())

    def __len__(self) -> int:
        return self.clean.shape[0]

    def batches(self, batch_size: int | None, n: int | None = None) -> list[Tensor]:
        """Example indices per batch (CPU ``LongTensor``s) of the first ``n`` (default all)."""
        n = len(self) if n is None else n
        if batch_size is None:
            batch_size = max(n, 1)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise GimlensError(f"batch_size must be a positive int or None, got {batch_size!r}")
        return list(torch.arange(n).split(batch_size))

    def tokens(self, which: str, idx: Tensor, device) -> tuple[Tensor, Tensor | None]:
        toks = getattr(self, which)[idx].to(device)
        mask = None if self.attention_mask is None else self.attention_mask[idx].to(device)
        return toks, mask

    def mean_sources(self, model, spec: ModelSpec, batch_size) -> Sources:
        """Per-position mean source activations over all corrupted examples."""
        return mean_sources(model, spec, (self.tokens("corrupted", idx, spec.device)
                                          for idx in self.batches(batch_size)))

    def score(self, logits: Tensor, idx: Tensor) -> Float[Tensor, " b"]:
        """``metric(logits, idx)``, checked: a finite float tensor ``[b]``."""
        values = self.metric(logits, idx)
        if not isinstance(values, Tensor) or values.shape != (len(idx),) \
                or not values.dtype.is_floating_point:
            raise GimlensError(f"metric must return a float tensor of shape [{len(idx)}] (one value "
                               f"per example), got {_describe(values)}")
        if not bool(torch.isfinite(values.detach()).all()):
            raise GimlensError("metric returned NaN or inf for some examples; expected finite values")
        return values


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return repr(x) if not hasattr(x, "__len__") else type(x).__name__


# ------------------------------------------------------------------------------- gradient points


@dataclass(frozen=True)
class _Point:
    """One forward-and-backward pass: interpolation ``alpha`` (1 = clean) of the token embedding
    (``inputs``) or of every destination input (``not inputs``), and its weight in the average."""

    weight: float
    alpha: float = 1.0
    inputs: bool = True


_POINTS: dict[Method, Callable[[int], list[_Point]]] = {
    Method.EAP: lambda m: [_Point(1.0)],
    Method.EAP_IG_INPUTS: lambda m: [_Point(1 / m, k / m, True) for k in range(m, 0, -1)],
    Method.EAP_IG_ACTIVATIONS: lambda m: [_Point(1 / m, k / m, False) for k in range(m, 0, -1)],
    Method.CLEAN_CORRUPTED: lambda m: [_Point(0.5), _Point(0.5, 0.0, False)],
}


# ----------------------------------------------------------------------------------- the scorer


@dataclass
class _Scorer:
    """Hooks for one batch: record ``diff = a_abl - a_clean`` in the clean run and, as gradients
    arrive at each destination in the backward pass, add ``diff . g`` to ``scores``."""

    spec: ModelSpec
    graph: Graph
    ablated: Sources  # its ``resid`` becomes diff = a_abl - a_clean in the clean run
    frozen: bool
    split_kv: bool  # per-query-head k/v slots on a grouped-KV model
    keep_clean: bool  # keep the clean destination inputs (activation interpolation follows)
    stats: dict = field(default_factory=dict)  # layer -> NormStats of this run's ln1 input
    clean_in: dict = field(default_factory=dict)  # destination site -> clean input (activations IG)
    shift: dict = field(default_factory=dict)  # destination site -> x_abl - x_clean
    kept: dict = field(default_factory=dict)  # (layer, name) -> tensors for split k/v
    acc: "_Accumulator" = None
    leaf: Tensor | None = None
    ln1_x0: Tensor | None = None

    def hooks(self, point: _Point, check_norm_once: bool) -> list[Hook]:
        spec, clean = self.spec, point.alpha == 1.0
        hooks: list[Hook] = []
        if clean:
            hooks += source_hooks(spec, self._subtract, self._heads)
        hooks.append((Site.EMBED.at(), lambda x, hook: self._embed(x, point)))
        for l in range(spec.n_layers):
            hooks.append((Site.LN1_IN.at(l), lambda x, hook, l=l: self._ln1_in(x, l, point)))
            for qkv in "qkv":
                site = Site(f"blocks.{{l}}.attn.hook_{qkv}")
                hooks.append((site.at(l), lambda x, hook, l=l, qkv=qkv: self._qkv(x, l, qkv)))
            if self.split_kv:
                for site in (Site.SCORES, Site.Z):
                    hooks.append((site.at(l), lambda x, hook, l=l, s=site: self._keep(x, l, s)))
            hooks.append((Site.LN2_IN.at(l), lambda x, hook, l=l: self._dest(
                x, Site.LN2_IN.at(l), l, self.graph.backward_index(l), point)))
        hooks.append((Site.LN_FINAL_IN.at(), lambda x, hook: self._dest(
            x, Site.LN_FINAL_IN.at(), spec.n_layers - 1, self.graph.n_backward - 1, point)))
        if check_norm_once:
            hooks.append((Site.LN1_OUT.at(0), lambda x, hook: check_norm(
                spec.ln1[0], self.ln1_x0, x, "blocks.0.ln1")))
        return hooks

    # -- forward side
    @property
    def diff(self) -> Float[Tensor, "n_fwd B S d"]:
        return self.ablated.resid

    def _subtract(self, row: int, values: Tensor) -> None:
        self.diff[row] -= values

    def _heads(self, layer: int, z: Tensor) -> None:
        head_outputs(self.ablated.z[layer], self.spec.attn[layer].W_O, minus=z,
                     out=self.diff[self.spec.head_rows(layer)])

    def _embed(self, x: Tensor, point: _Point) -> Tensor:
        if point.inputs and point.alpha != 1.0:
            x = x + ((1 - point.alpha) * self.diff[0]).to(x.dtype)
        self.leaf = x.detach().requires_grad_(True)
        return self.leaf

    def _interpolated(self, x: Tensor, site: str, point: _Point) -> Tensor:
        """``x`` replaced by ``x_clean + (1 - alpha)(x_abl - x_clean)``, gradient straight through."""
        if point.alpha == 1.0:
            if self.keep_clean:
                self.clean_in[site] = x.detach()
            return x
        if point.inputs:
            return x
        target = self.clean_in[site].float() + (1 - point.alpha) * self._shift(site)
        return target.to(x.dtype) + (x - x.detach())

    def _shift(self, site: str) -> Tensor:
        if not self.shift:  # cumulative sums of diff over each destination's upstream sources
            spec, acc, start = self.spec, torch.zeros_like(self.diff[0]), 0
            for l in range(spec.n_layers + 1):
                last = l == spec.n_layers
                for s, n in ((Site.LN_FINAL_IN.at(), spec.n_forward),) if last else (
                        (Site.LN1_IN.at(l), spec.upstream(l)), (Site.LN2_IN.at(l), spec.upstream(l, True))):
                    acc = acc + self.diff[start:n].sum(0)
                    self.shift[s], start = acc, n
        return self.shift[site]

    def _ln1_in(self, x: Tensor, layer: int, point: _Point) -> Tensor:
        x = self._interpolated(x, Site.LN1_IN.at(layer), point)
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
        out = self.acc.slot(layer, self.graph.backward_slice(layer, qkv))
        self._head_grads(g, layer, qkv, out)
        self.acc.filled(layer)

    def _keep(self, x: Tensor, layer: int, site: Site) -> Tensor:
        self.kept[layer, site] = x
        x.register_hook(lambda g: self.kept.__setitem__((layer, site, "grad"), g))
        return x

    def _dest(self, x: Tensor, site: str, layer: int, col: int, point: _Point) -> Tensor:
        y = self._interpolated(x, site, point)
        y = y.view_as(y) if y is x else y  # a tensor of its own: its gradient is this input's
        y.register_hook(lambda g: self._dest_arrive(g, layer, col))
        return y

    def _dest_arrive(self, g: Tensor, layer: int, col: int) -> None:
        if col == self.graph.n_backward - 1:  # logits: the first gradient of the backward pass
            self.acc.see_logits_grad(g)
        self.acc.slot(layer, slice(col, col + 1))[0] = g
        self.acc.filled(layer)

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


#: Destination columns gathered per score GEMM (thin GEMMs run at a fraction of the speed).
_MIN_COLUMNS = 64


@dataclass
class _Accumulator:
    """Destination gradients -> ``scores``. The gradients of consecutive layers (the last layer's
    with the logits') gather in one buffer of at least ``_MIN_COLUMNS`` destinations; when the
    buffer is complete one GEMM per example adds ``diff . grads`` to its columns (with ``defer``
    the buffers are summed over all gradient points and multiplied once, in :meth:`flush`).
    Entries off ``valid`` collect garbage and are cleared at the end.

    Each example's GEMM spans only positions ``[start, end)``: before ``start`` (its first
    differing clean/corrupted token) the causal runs agree, so ``diff`` is 0; from ``end`` on
    (after the last position whose logits the metric reads) every destination's gradient is 0."""

    scores: Float[Tensor, "n_fwd n_bwd"]
    diff: Float[Tensor, "n_fwd B S d"]
    chunks: list  # (first column, end column, source rows, gradient arrivals)
    chunk_of: list  # layer -> chunk
    starts: list[int]
    defer: bool
    split_kv: bool
    ends: list[int] = field(default_factory=list)
    pending: dict = field(default_factory=dict)  # chunk -> [pooled buffer, arrivals still due]
    summed: dict = field(default_factory=dict)  # chunk -> buffer summed over points
    free: list = field(default_factory=list)  # buffers to reuse (fresh memory is slow to touch)

    @classmethod
    def build(cls, spec: ModelSpec, graph: Graph, scores, diff, *, split_kv: bool,
              starts: list[int], defer: bool) -> "_Accumulator":
        L = spec.n_layers
        per = max(1, math.ceil(_MIN_COLUMNS * L / graph.n_backward))
        chunks, chunk_of = [], []
        for first in range(0, L, per):
            last = min(first + per, L) - 1
            final = last == L - 1
            c1 = graph.n_backward if final else graph.backward_index(last) + 1
            rows = spec.n_forward if final else spec.upstream(last, mlp=True)
            arrivals = (last - first + 1) * (2 if split_kv else 4) + final
            chunk_of += [len(chunks)] * (last - first + 1)
            chunks.append((graph.backward_index(first, 0, "q"), c1, rows, arrivals))
        return cls(scores, diff, chunks, chunk_of, starts, defer, split_kv)

    def see_logits_grad(self, g: Float[Tensor, "B S d"]) -> None:
        """Per example, one past the last position with a gradient (kept as the max over points)."""
        live = g.detach().ne(0).any(-1)  # [B, S]
        S = live.shape[1]
        ends = torch.where(live.any(1), S - live.flip(1).int().argmax(1), 0).tolist()
        self.ends = ends if not self.ends else [max(a, b) for a, b in zip(self.ends, ends)]

    def slot(self, layer: int, cols: slice) -> Float[Tensor, "n B S d"]:
        """The part of ``layer``'s buffer that receives the gradients of columns ``cols``."""
        chunk = self.chunk_of[layer]
        c0, c1, _, arrivals = self.chunks[chunk]
        if chunk not in self.pending:
            self.pending[chunk] = [self._buffer(), arrivals]
            if self.split_kv:  # its k/v columns are never filled here
                self.pending[chunk][0][: c1 - c0].zero_()
        return self.pending[chunk][0][cols.start - c0: cols.stop - c0]

    def _buffer(self) -> Float[Tensor, "n B S d"]:
        """A buffer as wide as the widest chunk (chunks use its leading rows)."""
        if self.free:
            return self.free.pop()
        widest = max(c1 - c0 for c0, c1, _, _ in self.chunks)
        return torch.empty(widest, *self.diff.shape[1:], device=self.diff.device)

    def filled(self, layer: int) -> None:
        """One more of ``layer``'s chunk's gradients is in its slot; multiply when complete."""
        chunk = self.chunk_of[layer]
        entry = self.pending[chunk]
        entry[1] -= 1
        if entry[1] == 0:
            del self.pending[chunk]
            c0, c1, rows, _ = self.chunks[chunk]
            if not self.defer:
                self.gemm(rows, slice(c0, c1), entry[0][: c1 - c0])
            elif chunk not in self.summed:
                self.summed[chunk] = entry[0]
                return
            else:
                self.summed[chunk].add_(entry[0])
            self.free.append(entry[0])

    def flush(self) -> None:
        assert not self.pending, "a destination's gradient never arrived"
        for chunk, grads in self.summed.items():
            c0, c1, rows, _ = self.chunks[chunk]
            self.gemm(rows, slice(c0, c1), grads[: c1 - c0])
        self.summed.clear()

    def gemm(self, rows: int, cols: slice, grads: Float[Tensor, "n B S d"]) -> None:
        """``scores[:rows, cols] += diff[:rows] . grads``, summed over positions and d_model."""
        out, n, S = self.scores[:rows, cols], grads.shape[0], grads.shape[2]
        windows = list(zip(self.starts, self.ends or [S] * len(self.starts)))
        if all(w == (0, S) for w in windows):
            out.addmm_(self.diff[:rows].reshape(rows, -1), grads.reshape(n, -1).T)
            return
        for b, (start, end) in enumerate(windows):
            if start < end:
                out.addmm_(self.diff[:rows, b, start:end].reshape(rows, -1),
                           grads[:, b, start:end].reshape(n, -1).T)


# ------------------------------------------------------------------------------------ attribute


def attribute(model, graph: Graph, clean, corrupted=None, metric=None, *, method: Method | str = "EAP",
              ig_steps: int = 5, gim: GIMConfig | bool | dict | None = None,
              batch_size: int | None = None, ablation: Ablation | str = "corrupted",
              attention_mask: Tensor | None = None, progress: bool = False,
              max_memory: int | str | None = None) -> Graph:
    """Fill ``graph.scores`` with edge attribution scores (float32, mean over examples).

    Args:
        model: a TransformerLens ``TransformerBridge`` (or ``HookedTransformer``); left as found.
        graph: a :class:`Graph` built for this model (``Graph.from_model(model)``); its scores
            are replaced, its selection is untouched.
        clean, corrupted: int tokens ``[n, pos]`` of equal shape, or a task object with
            ``.clean``, ``.corrupted``, ``.metric`` (and ``.attention_mask``) as ``clean``.
        metric: ``metric(logits [b, pos, vocab], indices [b]) -> Tensor[b]`` (module docstring).
        method: ``"EAP"``, ``"EAP-IG-inputs"``, ``"EAP-IG-activations"``, ``"clean-corrupted"``.
        ig_steps: interpolation steps of the IG methods (right Riemann sum; 1 = EAP).
        gim: ``True``, a :class:`~gimlens.gim.GIMConfig` or a dict: gradients follow GIM.
        batch_size: examples per forward pass (``None``: all at once).
        ablation: ``"corrupted"``, ``"mean"`` or ``"zero"``.
        attention_mask: ``[n, pos]`` 1 for real tokens (both runs).
        progress: show a progress bar (and print the memory estimate first).
        max_memory: a budget in bytes (or ``"4GB"``): ``batch_size`` is lowered so the estimate
            of :func:`circuits.memory.estimate_memory` stays within it.

    Under ``torchrun`` (an initialised ``torch.distributed`` process group) each rank scores a
    contiguous shard of the examples and the score sums are all-reduced: every rank returns the
    scores of the whole set.

    Returns:
        ``graph``, with ``graph.scores[src, dst]`` the estimated change of the mean metric when
        edge ``src -> dst`` is ablated.

    Example:
        >>> from gimlens.testing import tiny_model
        >>> from circuits.graph import Graph
        >>> model = tiny_model("llama")
        >>> clean = model.to_tokens(["When Mary and John went to the store, John gave a drink to"])
        >>> corrupted = model.to_tokens(["When Mary and John went to the store, Anna gave a drink to"])
        >>> ids = model.to_single_token(" Mary"), model.to_single_token(" John")
        >>> metric = lambda logits, idx: logits[:, -1, ids[0]] - logits[:, -1, ids[1]]
        >>> g = attribute(model, Graph.from_model(model), clean, corrupted, metric)
        >>> g.scores.shape == (g.n_forward, g.n_backward)
        True
    """
    if not isinstance(graph, Graph):
        raise GimlensError(f"graph must be a circuits.Graph, got {type(graph).__name__}")
    spec = ModelSpec.read(model)
    graph.check_matches(model)
    method, ablation = Method.coerce(method), Ablation.coerce(ablation)
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise GimlensError(f"ig_steps must be an int >= 1, got {ig_steps!r}")
    config = GIMConfig.coerce(gim)
    extra = [] if config.is_off else gim_hooks(model, config)
    ex = Examples.resolve(model, clean, corrupted, metric, attention_mask)
    own = shard_range(len(ex))
    if max_memory is not None:
        batch_size = fit_batch_size(model, graph, ex.clean.shape[1], max_memory,
                                    upper=batch_size or max(len(own), 1))
    batches = [idx + own.start for idx in ex.batches(batch_size, n=len(own))]
    if progress and is_main_process():
        size = batch_size or max(len(own), 1)
        print(f"attribute: {len(ex)} examples in batches of {size}; memory "
              f"{estimate_memory(model, graph, size, ex.clean.shape[1])}", file=sys.stderr)
    points = _POINTS[method](ig_steps)
    split_kv = graph.kv_edges is KVEdges.PER_QUERY_HEAD and spec.n_kv_heads < spec.n_heads

    scores = torch.zeros(graph.n_forward, graph.n_backward, device=spec.device)
    with torch.enable_grad():
        mean = ex.mean_sources(model, spec, batch_size) if ablation is Ablation.MEAN else None
        bar = _progress(len(batches) * len(points), progress and is_main_process())
        for i, idx in enumerate(batches):
            ablated, _ = ablated_sources(model, spec, ablation, *ex.tokens("corrupted", idx, spec.device),
                                         mean)
            acc = _Accumulator.build(spec, graph, scores, ablated.resid, split_kv=split_kv,
                                     defer=len(points) > 1, starts=_first_differences(ex, idx, ablation))
            scorer = _Scorer(spec, graph, ablated, config.freeze_norm, split_kv,
                             keep_clean=any(not p.inputs for p in points), acc=acc)
            toks, mask = ex.tokens("clean", idx, spec.device)
            for j, point in enumerate(points):
                hooks = scorer.hooks(point, check_norm_once=i == 0 and j == 0) + extra
                logits = run_model(model, toks, mask, hooks)
                values = ex.score(logits, idx)
                if not values.requires_grad:
                    raise GimlensError("metric must be a differentiable function of the logits")
                torch.autograd.backward(point.weight * values.sum(), inputs=[scorer.leaf],
                                        retain_graph=split_kv)
                if split_kv:
                    scorer.split_kv_grads()
                del logits, values
                bar.update(1)
            acc.flush()
        bar.close()
    all_reduce_sum(scores)
    graph.scores = (scores / len(ex)).to(graph.scores.device)
    return graph


def _first_differences(ex: Examples, idx: Tensor, ablation: Ablation) -> list[int]:
    """Per example, the first position whose clean and corrupted tokens differ (0 unless
    ``ablation`` is ``corrupted``): the (causal) runs agree before it."""
    if ablation is not Ablation.CORRUPTED:
        return [0] * len(idx)
    differ = ex.clean[idx] != ex.corrupted[idx]
    return torch.where(differ.any(1), differ.int().argmax(1), differ.shape[1]).tolist()


def _progress(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, desc="attribute")
