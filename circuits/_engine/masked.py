"""Patched runs of a [`Run`][circuits.run.Run]'s batches as a function of float edge coefficients.

The shared engine of `edge_pruning` and `iterative`: the exact patching forward of
`circuits._engine.patching` with missing coefficients `w = 1 - m` that may require grad, GIM's
hooks of the run, and the token embedding optionally interpolated between its ablated and
clean values (the IG path). The batches' ablated sources and references come from the run.

Examples:
    >>> import torch
    >>> from gimlens.testing import tiny_model
    >>> from circuits.graph import Graph
    >>> from circuits.run import Run
    >>> model = tiny_model("gpt2")
    >>> clean, corrupted = model.to_tokens(["When Mary and John went"]), model.to_tokens(["When Anna and John went"])
    >>> graph = Graph.from_model(model)
    >>> run = Run.build(model, graph, clean, corrupted, lambda logits, idx: logits[:, -1, 0], keep_sources=True)
    >>> w = torch.zeros(graph.n_forward, graph.n_backward, requires_grad=True)
    >>> with torch.enable_grad():
    ...     value = patched_metric(run, 0, w)[0].sum()
    >>> torch.allclose(value, run.reference(0).clean_metric.sum(), atol=1e-5)
    True
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from gimlens.errors import GimlensError

from ..graph import Graph
from ..layout import KVEdges
from .model import run_model
from .patching import Patcher, blocks

__all__ = ["check_run", "patched_logits", "patched_metric", "gap", "check_n_edges", "check_sizes"]


def check_run(run) -> None:
    """Raise unless the learned and re-linearised circuits can run on `run` (a
    [`Run`][circuits.run.Run]): one process, one coefficient per key/value projection."""
    run.require_single_process("edge pruning and iterative attribution")
    spec = run.spec
    if run.graph.kv_edges is KVEdges.PER_QUERY_HEAD and spec.n_kv_heads < spec.n_heads:
        raise GimlensError("learned and re-linearised circuits need one coefficient per key/value "
                           "projection: use a kv_edges='grouped' graph (graph.as_kv_edges('grouped'))")


def patched_logits(run, i: int, missing: Tensor, *, probe: Tensor | None = None,
                   direction: Tensor | None = None, alpha: float = 1.0) -> tuple[Tensor, Patcher]:
    """Logits of batch `i` of `run` with missing coefficients `missing` (`[n_fwd, n_bwd]`,
    float or bool; zero off `graph.valid`), the probe `probe` along `direction`, and the token
    embedding at `e_abl + alpha (e_clean - e_abl)`; and the run's `Patcher` (its `recorded()`
    direction)."""
    spec, batch = run.spec, run.batches[i]
    ablated, _ = run.ablated(i)
    fixed = missing.dtype == torch.bool and probe is None and not torch.is_grad_enabled()
    plan = blocks(spec, run.graph, missing.cpu()) if fixed else run.all_blocks
    patcher = Patcher(spec, missing.to(spec.device), plan, ablated, frozen=run.frozen,
                      probe=probe, direction=direction)
    hooks = []
    if alpha != 1.0:
        e_abl = ablated.resid[0]
        hooks.append(("hook_embed", lambda x, hook: (e_abl + alpha * (x.float() - e_abl)).to(x.dtype)))
    hooks += patcher.hooks() + list(run.hooks)
    return run_model(run.model, batch.tokens, batch.mask, hooks), patcher  # HookedTransformer: hook_mlp_in on


def patched_metric(run, i: int, missing: Tensor, **kwargs) -> tuple[Float[Tensor, " b"], Patcher]:
    """The task metric of every example of batch `i` in the patched run (`patched_logits`'
    arguments), and the run's `Patcher`."""
    logits, patcher = patched_logits(run, i, missing, **kwargs)
    values = run.examples.score(logits, run.batches[i].idx)
    if torch.is_grad_enabled() and not values.requires_grad:
        raise GimlensError("metric must be a differentiable function of the logits")
    return values, patcher


def gap(run) -> float:
    """`mean(m_clean) - mean(m_ablated)` over all examples of `run`."""
    refs = [run.reference(i) for i in range(len(run.batches))]
    clean = torch.cat([r.clean_metric for r in refs]).mean()
    base = torch.cat([r.base_metric for r in refs]).mean()
    return float(clean - base)


def check_n_edges(graph: Graph, n_edges) -> None:
    """Raise `GimlensError` unless `graph` is a `Graph` and `1 <= n_edges <= graph.n_valid_edges`."""
    if not isinstance(graph, Graph):
        raise GimlensError(f"graph must be a circuits.Graph, got {type(graph).__name__}")
    if isinstance(n_edges, bool) or not isinstance(n_edges, int) or not 0 < n_edges <= graph.n_valid_edges:
        raise GimlensError(f"n_edges must be an int in [1, {graph.n_valid_edges}] (the graph's valid "
                           f"edges), got {n_edges!r}")


def check_sizes(graph: Graph, sizes) -> list[int]:
    """`sizes` as distinct valid edge counts, largest first (raise `GimlensError` otherwise)."""
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__") or not list(sizes):
        raise GimlensError(f"sizes must be a non-empty list of edge counts, got {sizes!r}")
    for n in sizes:
        check_n_edges(graph, n)
    if len(set(sizes)) != len(list(sizes)):
        raise GimlensError(f"sizes must be distinct, got {list(sizes)!r}")
    return sorted((int(n) for n in sizes), reverse=True)
