"""Re-linearised attribution: score, remove the weakest edges, re-score in the patched model.

Gradient scores linearise the metric at the clean run, but a circuit is evaluated far from it,
with most edges ablated. `iterative` alternates: score every remaining edge *in the model with
the edges removed so far already patched* (their destinations read the ablated values), then
remove the lowest-scored ones, until `n_edges` remain. The keep counts fall geometrically from
all valid edges to `n_edges` over `rounds` rounds.

The score of a remaining edge `e = src -> d` in the patched model is the EAP score there,
`(a_abl[src] - a[src]) . g[d]`, with `a` and `g` the activations and gradients of the patched
run. It is read as the gradient of the patched metric with respect to a probe coefficient `v_e`
(`x_d -= v_e D[src]`, `v = 0`, `D = a - a_abl` of the patched run at the clean input): one
backward pass fills every score, patching and scoring in one pass. `ig_steps > 1` averages the
gradient over runs whose token embedding is `e_abl + alpha (e_clean - e_abl)` (with the removed
edges still patched), the points and weights of a `gimlens.quadrature` rule (`quadrature`,
default `"riemann_left"`: `alpha = k / ig_steps`, `k = 0..ig_steps-1`, EAP-IG's rule). `D` is
always read at `alpha = 1`; a rule without that node costs one extra forward per round and batch.
With `rounds=1` and the same rule the scores equal `attribute(..., method="EAP-IG-inputs")` and
the circuit is its top-n.

Cost: one corrupted forward per batch (the [`Run`][circuits.run.Run]'s), then per round and batch
`ig_steps` forward-and-backward passes of the patched model (`rounds * ig_steps` in all), plus one
forward when the rule has no node at `alpha = 1`.

Examples:
    >>> from gimlens.testing import tiny_model
    >>> from circuits.graph import Graph
    >>> model = tiny_model("gpt2")
    >>> clean, corrupted = model.to_tokens(["When Mary and John went"]), model.to_tokens(["When Anna and John went"])
    >>> metric = lambda logits, idx: logits[:, -1, 0] - logits[:, -1, 1]
    >>> g = iterative(model, Graph.from_model(model), clean, corrupted, metric, n_edges=20, rounds=3)
    >>> 0 < g.n_edges_in_graph <= 20
    True
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from gimlens.errors import GimlensError
from gimlens.quadrature import Quadrature, nodes_and_weights
from gimlens.runtime import coerce_enum, prepared, progress as progress_bar

from ._engine.masked import check_n_edges, check_run, patched_logits, patched_metric
from .graph import Graph
from .run import Run

__all__ = ["iterative", "iterative_run", "patched_scores", "keep_counts"]


def keep_counts(n_valid: int, n_edges: int, rounds: int) -> list[int]:
    """Edges kept after each round: geometric from `n_valid` down to `n_edges`.

    Examples:
        >>> keep_counts(1000, 10, 2)
        [100, 10]
    """
    ratio = n_edges / n_valid
    counts = [max(n_edges, round(n_valid * ratio ** ((r + 1) / rounds))) for r in range(rounds)]
    counts[-1] = n_edges
    return counts


def patched_scores(run: Run, kept: Tensor, ig_steps: int = 1, bar=None,
                   quadrature: Quadrature | str = Quadrature.RIEMANN_LEFT
                   ) -> Float[Tensor, "n_fwd n_bwd"]:
    """EAP scores (mean over examples, float32) of every valid edge in the model whose edges
    outside `kept` are patched; `ig_steps` points of the embedding path drawn from
    `gimlens.quadrature` (`quadrature` rule; `ig_steps=1` is EAP at the clean point)."""
    spec, graph = run.spec, run.graph
    valid = graph.valid.to(spec.device)
    removed = valid & ~kept.to(spec.device)
    missing = removed.float()
    if ig_steps == 1:
        alphas, weights = [1.0], [1.0]
    else:
        a, w = nodes_and_weights(ig_steps, quadrature)
        alphas, weights = a.tolist(), w.tolist()
    scores = torch.zeros(graph.n_forward, graph.n_backward, device=spec.device)
    for i in range(len(run.batches)):
        direction = None
        if 1.0 not in alphas:  # D = a - a_abl of the patched run at the clean input
            with torch.no_grad():
                direction = patched_logits(run, i, removed)[1].recorded()
        order = sorted(range(len(alphas)), key=lambda k: -alphas[k])  # alpha = 1 first
        with torch.enable_grad():
            for k in order:
                probe = torch.zeros_like(scores, requires_grad=True)
                values, patcher = patched_metric(run, i, missing, probe=probe, direction=direction,
                                                 alpha=alphas[k])
                if direction is None:
                    direction = patcher.recorded()
                (grad,) = torch.autograd.grad(values.sum(), probe)
                scores += grad * weights[k]
                if bar is not None:
                    bar.update(1)
    # x_d -= v D: d metric / d v = -(a - a_abl) . g = (a_abl - a) . g, the EAP score
    return (scores / run.n_examples).masked_fill(~valid, 0.0)


def iterative(model, graph: Graph, clean, corrupted=None, metric=None, *, n_edges: int,
              rounds: int = 5, ig_steps: int = 5, quadrature: Quadrature | str = "riemann_left",
              gim=None, ablation="corrupted",
              batch_size: int | None = None, attention_mask: Tensor | None = None,
              progress: bool = False, max_memory: int | str | None = None) -> Graph:
    """Select a circuit of at most `n_edges` edges by re-linearised attribution.

    Args:
        model: a TransformerLens model (left as found).
        graph: a `kv_edges="grouped"` graph of `model`; its scores and selection are replaced.
        clean, corrupted, metric, attention_mask, ablation, batch_size, max_memory: as in
            `circuits.attribute`.
        n_edges: edges kept before pruning (dangling edges are then removed).
        rounds: scoring rounds (1: EAP-IG top-n); each removes a geometric share of edges.
        ig_steps: embedding-path points per round (1: EAP in the patched model).
        quadrature: the `gimlens.quadrature` rule of those points (default `"riemann_left"`,
            `alpha = k / ig_steps`, `k = 0..ig_steps-1`, the default of EAP-IG-inputs).
        gim: GIM's backward rules for the gradients (`True`, a `GIMConfig` or a dict).
        progress: progress bar over the forward-and-backward passes.

    Returns:
        `graph`, `in_graph` the circuit; `scores` the last score of every edge (the round's
        in which it was removed, the last round's for the circuit).
    """
    check_n_edges(graph, n_edges)
    run = Run.build(model, graph, clean, corrupted, metric, ablation=ablation, gim=gim,
                    batch_size=batch_size, attention_mask=attention_mask, max_memory=max_memory,
                    keep_sources=True)
    return iterative_run(run, n_edges=n_edges, rounds=rounds, ig_steps=ig_steps,
                         quadrature=quadrature, progress=progress)


def iterative_run(run: Run, graph: Graph | None = None, *, n_edges: int, rounds: int = 5,
                  ig_steps: int = 5, quadrature: Quadrature | str = "riemann_left",
                  progress: bool = False) -> Graph:
    """[`iterative`][circuits.iterative.iterative] on a [`Run`][circuits.run.Run] (best built with
    `keep_sources=True`: every round reuses its ablated sources); `graph` (default the run's)
    gets the circuit."""
    graph = run.check_graph(graph)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise GimlensError(f"rounds must be an int >= 1, got {rounds!r}")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise GimlensError(f"ig_steps must be an int >= 1, got {ig_steps!r}")
    check_n_edges(graph, n_edges)
    check_run(run)
    quadrature = coerce_enum(Quadrature, quadrature, "quadrature")
    with prepared(run.model):
        kept = graph.valid.clone()
        last = torch.zeros(graph.n_forward, graph.n_backward)
        counts = keep_counts(graph.n_valid_edges, n_edges, rounds)
        with progress_bar(rounds * ig_steps * len(run.batches), show=progress,
                          desc="EAP-IG-iterative", unit="pass") as bar:
            for target in counts:
                scores = patched_scores(run, kept, ig_steps, bar, quadrature).cpu()
                last = torch.where(kept, scores, last)
                ranked = graph.copy()
                ranked.scores = torch.where(kept, scores.abs(), torch.full_like(scores, -1.0))
                ranked.apply_topn(target, absolute=False, prune=False)
                kept = ranked.in_graph & kept
                bar.set_postfix(edges=int(kept.sum()))
    graph.scores = last.to(graph.scores.device)
    graph.in_graph = kept
    graph.prune()
    return graph

