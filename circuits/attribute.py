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

Ablations (:class:`~circuits._model.Ablation`): ``corrupted`` (the corrupted example's
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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gimlens.errors import GimlensError
from gimlens.gim import GIMConfig, gim_hooks

from ._model import (Ablation, Hook, ModelSpec, NormStats, Site, check_norm, head_input_grads,
                     run_model, source_hooks)
from .graph import Graph, KVEdges

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

    def batches(self, batch_size: int | None) -> list[Tensor]:
        """Example indices per batch (CPU ``LongTensor``s)."""
        n = len(self)
        if batch_size is None:
            batch_size = n
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise GimlensError(f"batch_size must be a positive int or None, got {batch_size!r}")
        return list(torch.arange(n).split(batch_size))

    def tokens(self, which: str, idx: Tensor, device) -> tuple[Tensor, Tensor | None]:
        toks = getattr(self, which)[idx].to(device)
        mask = None if self.attention_mask is None else self.attention_mask[idx].to(device)
        return toks, mask

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


# ---------------------------------------------------------------------------- ablated activations


def mean_sources(model, spec: ModelSpec, ex: Examples, batch_size) -> Float[Tensor, "n_fwd S d"]:
    """Per-position mean of every source activation over the corrupted examples (mask-weighted)."""
    n_pos = ex.clean.shape[1]
    total = torch.zeros(spec.n_forward, n_pos, spec.d_model, device=spec.device)
    count = torch.zeros(n_pos, 1, device=spec.device)
    for idx in ex.batches(batch_size):
        toks, mask = ex.tokens("corrupted", idx, spec.device)
        w = torch.ones(toks.shape, device=spec.device) if mask is None else mask.float()

        def add(rows, values, w=w):
            total[rows] += torch.einsum("nbsd,bs->nsd", values, w)

        with torch.no_grad():
            run_model(model, toks, mask, source_hooks(spec, add))
        count += w.sum(0)[:, None]
    return total / count.clamp(min=1)


def ablated_sources(model, spec: ModelSpec, ex: Examples, idx: Tensor, ablation: Ablation,
                    mean: Tensor | None) -> tuple[Float[Tensor, "n_fwd B S d"], Tensor | None]:
    """The ablated value of every source for the examples ``idx`` (float32), and the corrupted
    run's logits when ``ablation`` is ``corrupted`` (else ``None``)."""
    B, S = len(idx), ex.clean.shape[1]
    acts = torch.zeros(spec.n_forward, B, S, spec.d_model, device=spec.device)
    if ablation is Ablation.ZERO:
        return acts, None
    if ablation is Ablation.MEAN:
        return acts.copy_(mean[:, None]), None
    toks, mask = ex.tokens("corrupted", idx, spec.device)

    def put(rows, values):
        acts[rows] = values

    with torch.no_grad():
        logits = run_model(model, toks, mask, source_hooks(spec, put))
    return acts, logits


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
    scores: Float[Tensor, "n_fwd n_bwd"]
    diff: Float[Tensor, "n_fwd B S d"]
    frozen: bool
    split_kv: bool  # per-query-head k/v slots on a grouped-KV model
    keep_clean: bool  # keep the clean destination inputs (activation interpolation follows)
    stats: dict = field(default_factory=dict)  # layer -> NormStats of this run's ln1 input
    clean_in: dict = field(default_factory=dict)  # destination site -> clean input (activations IG)
    shift: dict = field(default_factory=dict)  # destination site -> x_abl - x_clean
    kept: dict = field(default_factory=dict)  # (layer, name) -> tensors for split k/v
    leaf: Tensor | None = None
    ln1_x0: Tensor | None = None

    def hooks(self, point: _Point, check_norm_once: bool) -> list[Hook]:
        spec, clean = self.spec, point.alpha == 1.0
        hooks: list[Hook] = []
        if clean:
            hooks += source_hooks(spec, self._subtract)
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
                x, Site.LN2_IN.at(l), self.graph.backward_index(l), spec.upstream(l, True), point)))
        hooks.append((Site.LN_FINAL_IN.at(), lambda x, hook: self._dest(
            x, Site.LN_FINAL_IN.at(), self.graph.n_backward - 1, spec.n_forward, point)))
        if check_norm_once:
            hooks.append((Site.LN1_OUT.at(0), lambda x, hook: check_norm(
                spec.ln1[0], self.ln1_x0, x, "blocks.0.ln1")))
        return hooks

    # -- forward side
    def _subtract(self, rows: slice, values: Tensor) -> None:
        self.diff[rows] -= values

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
            x.register_hook(lambda g: self._head_grads(g, layer, qkv))
        return x

    def _keep(self, x: Tensor, layer: int, site: Site) -> Tensor:
        self.kept[layer, site] = x
        x.register_hook(lambda g: self.kept.__setitem__((layer, site, "grad"), g))
        return x

    def _dest(self, x: Tensor, site: str, col: int, n_up: int, point: _Point) -> Tensor:
        y = self._interpolated(x, site, point)
        y = y.view_as(y) if y is x else y  # a tensor of its own: its gradient is this input's
        y.register_hook(lambda g: self._accumulate(n_up, slice(col, col + 1), g.float()[None]))
        return y

    # -- backward side
    def _accumulate(self, n_up: int, cols: slice, grads: Float[Tensor, "n B S d"]) -> None:
        d = self.diff[:n_up].reshape(n_up, -1)
        self.scores[:n_up, cols].addmm_(d, grads.reshape(grads.shape[0], -1).T)

    def _head_grads(self, g: Tensor, layer: int, qkv: str, cols: slice | None = None) -> None:
        W = getattr(self.spec.attn[layer], f"W_{qkv.upper()}")
        grads = head_input_grads(g, W, self.spec.ln1[layer], self.stats[layer], self.frozen)
        self._accumulate(self.spec.upstream(layer), cols or self.graph.backward_slice(layer, qkv), grads)

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
                    self._head_grads(part, l, qkv, slice(start + r, start + H, rep))
        self.kept.clear()


# ------------------------------------------------------------------------------------ attribute


def attribute(model, graph: Graph, clean, corrupted=None, metric=None, *, method: Method | str = "EAP",
              ig_steps: int = 5, gim: GIMConfig | bool | dict | None = None,
              batch_size: int | None = None, ablation: Ablation | str = "corrupted",
              attention_mask: Tensor | None = None, progress: bool = False) -> Graph:
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
        progress: show a progress bar.

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
    batches = ex.batches(batch_size)
    points = _POINTS[method](ig_steps)
    split_kv = graph.kv_edges is KVEdges.PER_QUERY_HEAD and spec.n_kv_heads < spec.n_heads

    scores = torch.zeros(graph.n_forward, graph.n_backward, device=spec.device)
    with torch.enable_grad():
        mean = mean_sources(model, spec, ex, batch_size) if ablation is Ablation.MEAN else None
        bar = _progress(len(batches) * len(points), progress)
        for i, idx in enumerate(batches):
            diff, _ = ablated_sources(model, spec, ex, idx, ablation, mean)
            scorer = _Scorer(spec, graph, scores, diff, config.freeze_norm, split_kv,
                             keep_clean=any(not p.inputs for p in points))
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
        bar.close()
    graph.scores = (scores / len(ex)).to(graph.scores.device)
    return graph


def _progress(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, desc="attribute")
