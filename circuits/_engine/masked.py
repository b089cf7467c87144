"""Patched runs of a set of examples as a function of float edge coefficients.

The shared engine of `edge_pruning` and
`iterative`: it validates the inputs once, keeps each batch's ablated
sources and its clean and ablated metrics, and runs the exact patching forward of
`circuits._engine.patching` with missing coefficients `w = 1 - m` that may require
grad, optionally with GIM's hooks and with the token embedding interpolated between its
ablated and clean values (the IG path).

Examples:
    >>> import torch
    >>> from gimlens.testing import tiny_model
    >>> from circuits.graph import Graph
    >>> model = tiny_model("gpt2")
    >>> clean, corrupted = model.to_tokens(["When Mary and John went"]), model.to_tokens(["When Anna and John went"])
    >>> graph = Graph.from_model(model)
    >>> ctx = prepare(model, graph, clean, corrupted, lambda logits, idx: logits[:, -1, 0])
    >>> w = torch.zeros(graph.n_forward, graph.n_backward, requires_grad=True)
    >>> with torch.enable_grad():
    ...     value = ctx.metric(ctx.batches[0], w).sum()
    >>> torch.allclose(value, ctx.batches[0].clean_metric.sum(), atol=1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from gimlens.distributed import shard_range
from gimlens.errors import GimlensError
from gimlens.validation import coerce_enum
from gimlens.gim import GIMConfig, gim_hooks
from gimlens.runtime import run_hooked

from .examples import Examples
from ..graph import Graph, KVEdges
from .memory import fit_batch_size
from .model import Ablation, ModelSpec, Sources, ablated_sources, run_model
from .patching import Patcher, blocks

__all__ = ["Batch", "Context", "prepare", "check_n_edges"]


@dataclass
class Batch:
    """One batch of examples with everything its patched runs reuse."""

    idx: Tensor
    tokens: Tensor
    mask: Tensor | None
    ablated: Sources
    clean_metric: Float[Tensor, " b"]
    base_metric: Float[Tensor, " b"]  # the corrupted run (or the empty circuit)
    clean_logprobs: Float[Tensor, "b vocab"]  # at each example's last real position
    last: Tensor  # [b] that position


@dataclass
class Context:
    """Validated inputs of one discovery call (build it with `prepare`)."""

    model: object
    spec: ModelSpec
    graph: Graph
    ex: Examples
    batches: list[Batch]
    extra: list  # GIM's forward hooks
    frozen: bool
    all_blocks: dict

    @property
    def n_examples(self) -> int:
        return len(self.ex)

    def logits(self, batch: Batch, missing: Tensor, *, probe: Tensor | None = None,
               direction: Tensor | None = None, alpha: float = 1.0, patcher_out: list | None = None
               ) -> Tensor:
        """Logits of `batch` with missing coefficients `missing` (`[n_fwd, n_bwd]`, float or
        bool; zero off `graph.valid`), the probe `probe` along `direction`, and the token
        embedding at `e_abl + alpha (e_clean - e_abl)`."""
        spec = self.spec
        fixed = missing.dtype == torch.bool and probe is None and not torch.is_grad_enabled()
        plan = blocks(spec, self.graph, missing.cpu()) if fixed else self.all_blocks
        patcher = Patcher(spec, missing.to(spec.device), plan, batch.ablated, frozen=self.frozen,
                          probe=probe, direction=direction)
        hooks = []
        if alpha != 1.0:
            e_abl = batch.ablated.resid[0]
            hooks.append(("hook_embed", lambda x, hook: (e_abl + alpha * (x.float() - e_abl)).to(x.dtype)))
        hooks += patcher.hooks() + self.extra
        if patcher_out is not None:
            patcher_out.append(patcher)
        return run_model(self.model, batch.tokens, batch.mask, hooks)  # HookedTransformer: hook_mlp_in on

    def metric(self, batch: Batch, missing: Tensor, **kwargs) -> Float[Tensor, " b"]:
        """The task metric of every example of `batch` in the patched run."""
        values = self.ex.score(self.logits(batch, missing, **kwargs), batch.idx)
        if torch.is_grad_enabled() and not values.requires_grad:
            raise GimlensError("metric must be a differentiable function of the logits")
        return values

    def gap(self) -> float:
        """`mean(m_clean) - mean(m_ablated)` over all examples."""
        clean = torch.cat([b.clean_metric for b in self.batches]).mean()
        base = torch.cat([b.base_metric for b in self.batches]).mean()
        return float(clean - base)


def prepare(model, graph: Graph, clean, corrupted=None, metric=None, *,
            ablation: Ablation | str = "corrupted", batch_size: int | None = None,
            attention_mask: Tensor | None = None, gim: GIMConfig | bool | dict | None = None,
            max_memory: int | str | None = None) -> Context:
    """Check the inputs and run, per batch, the ablated and the clean forward (no grad).

    Cost: per batch one corrupted forward (none for `zero` / `mean`, which read one pass over
    the corrupted examples first) and one clean forward. Memory: every batch's ablated sources
    are kept (`4 * n_forward * pos * d_model` bytes per example). The call is expected to run
    inside `gimlens.runtime.prepared(model)`.
    """
    if not isinstance(graph, Graph):
        raise GimlensError(f"graph must be a circuits.Graph, got {type(graph).__name__}")
    spec = ModelSpec.read(model)
    graph.check_matches(model)
    if graph.kv_edges is KVEdges.PER_QUERY_HEAD and spec.n_kv_heads < spec.n_heads:
        raise GimlensError("learned and re-linearised circuits need one coefficient per key/value "
                           "projection: use a kv_edges='grouped' graph (graph.as_kv_edges('grouped'))")
    ablation = coerce_enum(Ablation, ablation, "ablation")
    config = GIMConfig.coerce(gim)
    extra = [] if config.is_off else gim_hooks(model, config)
    ex = Examples.resolve(model, clean, corrupted, metric, attention_mask)
    if shard_range(len(ex)) != range(len(ex)):
        raise GimlensError("edge pruning and iterative attribution run in one process; "
                           "torch.distributed sharding is not supported for them")
    if max_memory is not None:
        batch_size = fit_batch_size(model, graph, ex.clean.shape[1], max_memory,
                                    upper=batch_size or max(len(ex), 1))
    valid = graph.valid.cpu()
    ctx = Context(model, spec, graph, ex, [], extra, config.freeze_norm, blocks(spec, graph, valid))
    with torch.no_grad():
        mean = ex.mean_sources(model, spec, batch_size) if ablation is Ablation.MEAN else None
        for idx in ex.batches(batch_size):
            ablated, corrupted_logits = ablated_sources(
                model, spec, ablation, *ex.tokens("corrupted", idx, spec.device), mean)
            toks, mask = ex.tokens("clean", idx, spec.device)
            logits = run_hooked(model, toks, attention_mask=mask)
            last = (torch.full((len(idx),), toks.shape[1] - 1) if mask is None
                    else mask.cpu().cumsum(1).argmax(1))
            logprobs = logits[torch.arange(len(idx)), last.to(logits.device)].float().log_softmax(-1)
            batch = Batch(idx, toks, mask, ablated, ex.score(logits, idx).float(),
                          torch.zeros(len(idx)), logprobs, last)
            if corrupted_logits is None:
                batch.base_metric = ctx.metric(batch, valid.to(spec.device)).float()
            else:
                batch.base_metric = ex.score(corrupted_logits, idx).float()
            ctx.batches.append(batch)
    return ctx


def check_n_edges(graph: Graph, n_edges) -> None:
    """Raise `GimlensError` unless `graph` is a `Graph` and `1 <= n_edges <= graph.n_valid_edges`."""
    if not isinstance(graph, Graph):
        raise GimlensError(f"graph must be a circuits.Graph, got {type(graph).__name__}")
    if isinstance(n_edges, bool) or not isinstance(n_edges, int) or not 0 < n_edges <= graph.n_valid_edges:
        raise GimlensError(f"n_edges must be an int in [1, {graph.n_valid_edges}] (the graph's valid "
                           f"edges), got {n_edges!r}")
