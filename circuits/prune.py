"""Circuit selection over a scored graph: top-n, threshold, greedy, pruning.

Every selection works on the dense tensors (`graph.scores`, `graph.layout.valid`) and replaces
`graph.in_graph`; with `prune=True` (default) it then removes dangling edges and nodes. This module
knows no `Graph` class: it reads a [`ScoredGraph`][circuits.prune.ScoredGraph] (anything with
`scores`, `in_graph` and a [`Layout`][circuits.layout.Layout]), so `circuits.graph` can call it
without an import circle.

**Pruning rule** ([`prune_dangling`][circuits.prune.prune_dangling], a vectorised fixed point on the
edge list, no recursion). From `E = in_graph & valid`, repeat until `E` stops changing:

1. a source node is *alive* if it has an outgoing edge in `E` **and** it is `input` or one of its
   input slots has an incoming edge in `E` (a head's q, k and v slots all count as its inputs; a
   grouped k/v slot counts as an input of every query head of its group);
2. a slot is *alive* if it is `logits` or it feeds an alive node (a grouped k/v slot: any head of
   its group);
3. `E &= alive_source[:, None] & alive_slot[None, :]`.

At the fixed point every remaining edge lies on a path `input -> ... -> logits` and every such
edge of the selection is kept; `nodes_in_graph` is the final alive set.

**Greedy** ([`select_greedy`][circuits.prune.select_greedy]): start with only `logits` in the
circuit; repeatedly add the best-scoring valid edge not yet taken whose destination node is already
in the circuit (a grouped k/v slot's destination is in when any head of its group is); its source
node joins, opening its input slots. Stops at `n` edges (before pruning, which may remove edges that
never reach `input`). Implemented with a heap over the open slots, each slot's entries in the order
of one stable descending sort per column. Ties: lower destination index first, then lower source
index.

**Node level** (`level="node"`, EAP-IG's definition): the graph carries one score per source node
(`graph.node_scores`, NaN = not scored). Top-n takes the `n` scored nodes of highest (absolute)
score (ties: lower index first), threshold those with (absolute) score `>= t`; unscored nodes are
always in. Every valid edge leaving a selected node joins, then pruning keeps the edges between
selected nodes (and into `logits`) that lie on an input -> logits path.

**Neuron level** (`level="neuron"`, EAP-IG's definition): one score per residual-stream dimension
of each source node's output (`graph.neuron_scores`, `[n_forward, d_model]`, NaN = not scored).
Top-n / threshold pick neurons the same way (unscored ones always in); a node is in when any of its
neurons is, and the edges follow as at node level. Pruning then drops the neurons of removed nodes.
"""

from __future__ import annotations

import heapq
import math
from enum import Enum
from numbers import Real
from typing import Callable, Protocol

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from gimlens.errors import GimlensError
from gimlens.validation import check_int
from gimlens.runtime import coerce_enum

from .layout import Layout

__all__ = ["Selection", "Level", "ScoredGraph", "select", "select_topn", "select_threshold", "select_greedy",
           "select_nodes", "prune_dangling"]


class ScoredGraph(Protocol):
    """What selection reads and writes: a [`Graph`][circuits.graph.Graph] is one."""

    layout: Layout
    scores: Tensor
    in_graph: Tensor
    nodes_in_graph: Tensor
    node_scores: Tensor | None
    neuron_scores: Tensor | None
    neurons_in_graph: Tensor | None

    def prune(self) -> "ScoredGraph": ...


class Selection(str, Enum):
    """Edge-selection strategies (one registry entry each)."""

    TOPN = "topn"  #: the n highest-scoring valid edges
    THRESHOLD = "threshold"  #: every valid edge with score >= t
    GREEDY = "greedy"  #: n edges grown from logits, best edge into the circuit first


class Level(str, Enum):
    """What a selection ranks: edges (by `scores`) or source nodes (by `node_scores`)."""

    EDGE = "edge"  #: edges by their scores
    NODE = "node"  #: source nodes by their scores; the edges between selected nodes follow
    NEURON = "neuron"  #: the output dimensions of source nodes; their nodes and edges follow


def _ranked_scores(graph: ScoredGraph, absolute: bool) -> Tensor:
    """Scores to rank by (`|s|` if absolute); invalid entries `-inf`. Rejects non-finite scores."""
    scores, valid = graph.scores, graph.layout.valid.to(graph.scores.device)
    bad = 0 if bool(torch.isfinite(scores).all()) else int((~torch.isfinite(scores) & valid).sum())
    if bad:
        raise GimlensError(f"graph.scores holds {bad} non-finite values (NaN or inf) on valid edges; "
                           "selection needs finite scores")
    ranked = scores.abs() if absolute else scores
    return ranked.masked_fill(~valid, -math.inf)


def _edge_count(graph: ScoredGraph, n: object) -> int:
    return check_int("n", n, minimum=0, maximum=graph.layout.n_valid_edges, note="the graph's valid edges")


def select_topn(graph: ScoredGraph, n: int, absolute: bool = True) -> Bool[Tensor, "n_forward n_backward"]:
    """Mask of the `n` valid edges with the largest (absolute) scores.

    Examples:
        >>> from circuits.graph import Graph
        >>> g = Graph(n_layers=1, n_heads=1, d_model=4)
        >>> g.scores[0, -1], g.scores[1, -1] = -3.0, 2.0
        >>> select_topn(g, 1).nonzero().tolist()
        [[0, 4]]
    """
    n = _edge_count(graph, n)
    ranked = _ranked_scores(graph, absolute)
    if n and not bool(graph.scores.ne(0).any()):
        raise GimlensError("apply_topn: every edge score is 0 (the graph was never scored, or its scores carry no "
                           "signal): score it first with circuits.attribute or circuits.discover, or set graph.scores")
    mask = torch.zeros(ranked.numel(), dtype=torch.bool, device=ranked.device)
    mask[torch.topk(ranked.flatten(), n, sorted=False).indices] = True
    return mask.view_as(ranked)


def select_threshold(graph: ScoredGraph, t: float, absolute: bool = True) -> Bool[Tensor, "n_forward n_backward"]:
    """Mask of the valid edges with (absolute) score `>= t`."""
    if isinstance(t, bool) or not isinstance(t, Real) or math.isnan(t):
        raise GimlensError(f"threshold must be a real number (not NaN), got {t!r}")
    ranked = _ranked_scores(graph, absolute)
    return (ranked >= float(t)) & graph.layout.valid.to(ranked.device)


def select_greedy(graph: ScoredGraph, n: int, absolute: bool = True) -> Bool[Tensor, "n_forward n_backward"]:
    """Mask of `n` edges grown greedily from `logits` (rule in the module docstring).

    Examples:
        >>> from circuits.graph import Graph
        >>> g = Graph(n_layers=1, n_heads=1, d_model=4)
        >>> g.scores[1, -1], g.scores[0, 0] = 1.0, 5.0  # a0.h0 -> logits opens a0.h0's inputs
        >>> [g.edges[n].index for n in ("a0.h0->logits", "input->a0.h0<q>")]
        [(1, 4), (0, 0)]
        >>> select_greedy(g, 2).nonzero().tolist()
        [[0, 0], [1, 4]]
    """
    n = _edge_count(graph, n)
    lay = graph.layout
    ranked = _ranked_scores(graph, absolute).cpu()
    n_fwd, n_bwd = ranked.shape
    counts = lay.n_upstream.tolist()  # valid rows of column c are exactly [0, counts[c])
    values, slots_of = ranked.numpy(), lay.input_slots
    by_column = np.ascontiguousarray(-values.T)
    order: dict[int, np.ndarray] = {}  # column -> its valid rows by score, descending (ties: row order)
    chosen_rows: list[int] = []
    chosen_cols: list[int] = []
    node_in = [False] * n_fwd
    opened = [False] * n_bwd
    ptr = [0] * n_bwd
    heap: list[tuple[float, int, int]] = []  # (-score, column, row): ties -> lower column first

    def push(col: int, k: int) -> None:
        if k < counts[col]:
            if k == 0:  # one stable sort per column, when the column opens
                order[col] = np.argsort(by_column[col, : counts[col]], kind="stable")
            row = int(order[col][k])
            heapq.heappush(heap, (-float(values[row, col]), col, row))

    def open_slot(col: int) -> None:
        if not opened[col]:
            opened[col] = True
            push(col, 0)

    if n:
        open_slot(n_bwd - 1)
    while len(chosen_rows) < n:
        _, col, row = heapq.heappop(heap)
        chosen_rows.append(row)
        chosen_cols.append(col)
        ptr[col] += 1
        push(col, ptr[col])
        if not node_in[row]:
            node_in[row] = True
            for slot in slots_of[row]:
                open_slot(slot)
    mask = torch.zeros(n_fwd, n_bwd, dtype=torch.bool)
    mask[chosen_rows, chosen_cols] = True
    return mask.to(graph.scores.device)


def _select_scored(scores: Tensor | None, method: Selection | str, value: float, absolute: bool,
                   what: str) -> Tensor:
    """Mask over `scores` (any shape) of a top-n or threshold selection; NaN entries (unscored) in."""
    method = coerce_enum(Selection, method, "selection method")
    if scores is None:
        raise GimlensError(f"{what}-level selection needs {what} scores: set graph.{what}_scores (NaN for "
                           f"unscored) or score {what}s first")
    if bool(torch.isinf(scores).any()):
        raise GimlensError(f"graph.{what}_scores holds inf; selection needs finite scores (NaN = unscored)")
    scored = ~torch.isnan(scores)
    ranked = (scores.abs() if absolute else scores).masked_fill(~scored, -math.inf)
    if method is Selection.THRESHOLD:
        if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
            raise GimlensError(f"threshold must be a real number (not NaN), got {value!r}")
        return (ranked >= float(value)) | ~scored
    if method is not Selection.TOPN:
        raise GimlensError(f"{what}-level selection supports 'topn' and 'threshold', got {method.value!r}")
    n_scored = int(scored.sum())
    check_int("n", value, minimum=0, maximum=n_scored, note=f"the scored {what}s")
    keep = torch.zeros(scored.numel(), dtype=torch.bool, device=scored.device)
    keep[torch.sort(ranked.flatten(), descending=True, stable=True).indices[:value]] = True
    return keep.view_as(scored) | ~scored


def select_neurons(graph: ScoredGraph, method: Selection | str, value: float,
                   absolute: bool = True) -> Bool[Tensor, "n_forward d_model"]:
    """Mask of the neurons a neuron-level top-n or threshold keeps (ties: lower flat index first).

    Examples:
        >>> from circuits.graph import Graph
        >>> g = Graph(n_layers=1, n_heads=1, d_model=2)
        >>> g.neuron_scores = torch.tensor([[float("nan"), float("nan")], [0.1, -3.0], [2.0, 0.0]])
        >>> select_neurons(g, "topn", 2).int().tolist()
        [[1, 1], [0, 1], [1, 0]]
    """
    return _select_scored(graph.neuron_scores, method, value, absolute, "neuron")


def select_nodes(graph: ScoredGraph, method: Selection | str, value: float,
                 absolute: bool = True) -> Bool[Tensor, " n_forward"]:
    """Mask of the source nodes a node-level top-n or threshold keeps (rule in the module docstring).

    Examples:
        >>> from circuits.graph import Graph
        >>> g = Graph(n_layers=1, n_heads=2, d_model=4)
        >>> g.node_scores = torch.tensor([float("nan"), 0.5, -2.0, 1.0])  # input unscored
        >>> select_nodes(g, "topn", 2).tolist(), select_nodes(g, "threshold", 0.9, absolute=False).tolist()
        ([True, False, True, True], [True, False, False, True])
    """
    return _select_scored(graph.node_scores, method, value, absolute, "node")


def prune_dangling(graph: ScoredGraph) -> tuple[Bool[Tensor, "n_forward n_backward"], Bool[Tensor, " n_forward"]]:
    """`(in_graph, nodes_in_graph)` with everything off an input -> logits path removed.

    Examples:
        >>> from circuits.graph import Graph
        >>> g = Graph(n_layers=1, n_heads=1, d_model=4).reset()
        >>> g.in_graph[1, -1] = True  # a0.h0 -> logits, but nothing feeds a0.h0
        >>> prune_dangling(g)[0].any().item()
        False
    """
    device = graph.in_graph.device
    n_fwd, n_bwd = graph.layout.n_forward, graph.layout.n_backward
    slots = graph.layout.input_slots  # slot pair_b[i] feeds node pair_f[i]
    pair_f = np.repeat(np.arange(n_fwd), [len(x) for x in slots])
    pair_b = np.fromiter((b for x in slots for b in x), dtype=np.int64, count=len(pair_f))
    # The fixed point runs on the in-graph edge list in numpy: its cost follows the number of
    # edges, and small index operations stay single-threaded (torch's thread pool costs more
    # than the work here, badly so on a busy machine).
    rows, cols = np.nonzero((graph.in_graph & graph.layout.valid.to(device)).cpu().numpy())
    while True:
        has_out = np.zeros(n_fwd, dtype=bool)
        has_out[rows] = True
        fed = np.zeros(n_bwd, dtype=bool)
        fed[cols] = True
        has_in = np.zeros(n_fwd, dtype=bool)
        has_in[pair_f[fed[pair_b]]] = True
        has_in[0] = True
        alive = has_out & has_in
        slot_alive = np.zeros(n_bwd, dtype=bool)
        slot_alive[pair_b[alive[pair_f]]] = True
        slot_alive[-1] = True
        keep = alive[rows] & slot_alive[cols]
        if keep.all():
            break
        rows, cols = rows[keep], cols[keep]
    edges = np.zeros((n_fwd, n_bwd), dtype=bool)
    edges[rows, cols] = True
    return torch.from_numpy(edges).to(device), torch.from_numpy(alive).to(device)


#: One entry per strategy: (graph, n-or-threshold, absolute) -> in_graph mask.
SELECTORS: dict[Selection, Callable[[ScoredGraph, float, bool], Tensor]] = {
    Selection.TOPN: select_topn,
    Selection.THRESHOLD: select_threshold,
    Selection.GREEDY: select_greedy,
}


def select(graph: ScoredGraph, method: Selection | str, value: float, *, absolute: bool = True,
           prune: bool = True, level: Level | str = "edge") -> ScoredGraph:
    """Set `graph.in_graph` by a strategy, then (`prune`) remove dangling edges and nodes.

    Without pruning, `nodes_in_graph` marks the sources of the selected edges (edge level) or the
    selected nodes (node level). Returns the graph (changed in place).

    Examples:
        >>> from circuits.graph import Graph
        >>> g = Graph(n_layers=2, n_heads=2, d_model=8)
        >>> g.scores = torch.randn(g.n_forward, g.n_backward)
        >>> select(g, "topn", 10, prune=False).n_edges_in_graph
        10
    """
    method = coerce_enum(Selection, method, "selection method")
    if not isinstance(absolute, bool):
        raise GimlensError(f"absolute must be True or False, got {absolute!r}")
    level = coerce_enum(Level, level, "selection level")
    if level is Level.NEURON:
        graph.neurons_in_graph = select_neurons(graph, method, value, absolute)
        nodes = graph.neurons_in_graph.any(1)
        mask = graph.layout.valid.to(nodes.device) & nodes[:, None]
    elif level is Level.NODE:
        nodes = select_nodes(graph, method, value, absolute)
        mask = graph.layout.valid.to(nodes.device) & nodes[:, None]
    else:
        mask = SELECTORS[method](graph, value, absolute)
        nodes = mask.any(1)
    graph.in_graph = mask
    if prune:
        graph.prune()
    else:
        graph.nodes_in_graph = nodes
    return graph
