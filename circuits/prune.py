"""Circuit selection over a scored :class:`~circuits.graph.Graph`: top-n, threshold, greedy, pruning.

Every selection works on the dense tensors (``graph.scores``, ``graph.valid``) and replaces
``graph.in_graph``; with ``prune=True`` (default) it then removes dangling edges and nodes.

**Pruning rule** (:func:`prune_dangling`, a vectorised fixed point on the edge list, no
recursion). From ``E = in_graph & valid``, repeat until ``E`` stops changing:

1. a source node is *alive* if it has an outgoing edge in ``E`` **and** it is ``input`` or one of its
   input slots has an incoming edge in ``E`` (a head's q, k and v slots all count as its inputs; a
   grouped k/v slot counts as an input of every query head of its group);
2. a slot is *alive* if it is ``logits`` or it feeds an alive node (a grouped k/v slot: any head of
   its group);
3. ``E &= alive_source[:, None] & alive_slot[None, :]``.

At the fixed point every remaining edge lies on a path ``input -> ... -> logits`` and every such
edge of the selection is kept; ``nodes_in_graph`` is the final alive set.

**Greedy** (:func:`select_greedy`): start with only ``logits`` in the circuit; repeatedly add the
best-scoring valid edge not yet taken whose destination node is already in the circuit (a grouped
k/v slot's destination is in when any head of its group is); its source node joins, opening its
input slots. Stops at ``n`` edges (before pruning, which may remove edges that never reach
``input``). Implemented with a heap over the open slots, each slot's best entries fetched lazily
by ``topk`` on exact order keys. Ties: lower destination index first, then lower source index.
"""

from __future__ import annotations

import heapq
import math
from enum import Enum
from numbers import Real
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from gimlens.errors import GimlensError

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["Selection", "select", "select_topn", "select_threshold", "select_greedy", "prune_dangling"]


class Selection(str, Enum):
    """Edge-selection strategies (one registry entry each)."""

    TOPN = "topn"  #: the n highest-scoring valid edges
    THRESHOLD = "threshold"  #: every valid edge with score >= t
    GREEDY = "greedy"  #: n edges grown from logits, best edge into the circuit first


def _ranked_scores(graph: "Graph", absolute: bool) -> Tensor:
    """Scores to rank by (``|s|`` if absolute); invalid entries ``-inf``. Rejects non-finite scores."""
    scores, valid = graph.scores, graph.valid.to(graph.scores.device)
    bad = 0 if bool(torch.isfinite(scores).all()) else int((~torch.isfinite(scores) & valid).sum())
    if bad:
        raise GimlensError(f"graph.scores holds {bad} non-finite values (NaN or inf) on valid edges; "
                           "selection needs finite scores")
    ranked = scores.abs() if absolute else scores
    return ranked.masked_fill(~valid, -math.inf)


def _edge_count(graph: "Graph", n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= graph.n_valid_edges:
        raise GimlensError(f"n must be an integer in [0, {graph.n_valid_edges}] (the graph's valid "
                           f"edges), got {n!r}")
    return n


def select_topn(graph: "Graph", n: int, absolute: bool = True) -> Bool[Tensor, "n_forward n_backward"]:
    """Mask of the ``n`` valid edges with the largest (absolute) scores.

    Example:
        >>> from circuits.graph import Graph
        >>> g = Graph(n_layers=1, n_heads=1, d_model=4)
        >>> g.scores[0, -1], g.scores[1, -1] = -3.0, 2.0
        >>> select_topn(g, 1).nonzero().tolist()
        [[0, 4]]
    """
    n = _edge_count(graph, n)
    ranked = _ranked_scores(graph, absolute)
    mask = torch.zeros(ranked.numel(), dtype=torch.bool, device=ranked.device)
    mask[torch.topk(ranked.flatten(), n, sorted=False).indices] = True
    return mask.view_as(ranked)


def select_threshold(graph: "Graph", t: float, absolute: bool = True) -> Bool[Tensor, "n_forward n_backward"]:
    """Mask of the valid edges with (absolute) score ``>= t``."""
    if isinstance(t, bool) or not isinstance(t, Real) or math.isnan(t):
        raise GimlensError(f"threshold must be a real number (not NaN), got {t!r}")
    ranked = _ranked_scores(graph, absolute)
    return (ranked >= float(t)) & graph.valid.to(ranked.device)


def _order_keys(ranked: Tensor) -> Tensor:
    """int64 keys ordering entries by (value descending, row ascending): unique per column,
    so ``topk`` on them is exact even with tied scores."""
    bits = (ranked + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # monotone in value
    rows = torch.arange(ranked.shape[0], device=ranked.device)[:, None]
    return (ordered << 20) + ((1 << 20) - 1 - rows)


def select_greedy(graph: "Graph", n: int, absolute: bool = True) -> Bool[Tensor, "n_forward n_backward"]:
    """Mask of ``n`` edges grown greedily from ``logits`` (rule in the module docstring)."""
    n = _edge_count(graph, n)
    ranked = _ranked_scores(graph, absolute).cpu()
    n_fwd, n_bwd = ranked.shape
    assert n_fwd < 1 << 20, "row index must fit the order key"
    counts = graph.upstream_counts.tolist()  # valid rows of column c are exactly [0, counts[c])
    keys = _order_keys(ranked).T.contiguous()  # [n_bwd, n_fwd]
    # Each column's best entries, fetched lazily: a small batch for all, more on demand.
    first = min(n, n_fwd, 8)
    head = torch.topk(keys, first, dim=1).indices.numpy() if first else None
    keys_np, values = keys.numpy(), ranked.numpy()
    more: dict[int, np.ndarray] = {}  # columns whose first batch ran out: full descending order
    slots_of = graph.input_slots

    def entry(col: int, k: int) -> int:  # row of the k-th best valid entry of column col
        if k < first:
            return int(head[col, k])
        if col not in more:
            more[col] = np.argsort(-keys_np[col, : counts[col]])
        return int(more[col][k])

    chosen_rows: list[int] = []
    chosen_cols: list[int] = []
    node_in = [False] * n_fwd
    opened = [False] * n_bwd
    ptr = [0] * n_bwd
    heap: list[tuple[float, int, int]] = []  # (-score, column, row): ties -> lower column first

    def push(col: int, k: int) -> None:
        if k < counts[col]:
            row = entry(col, k)
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


def prune_dangling(graph: "Graph") -> tuple[Bool[Tensor, "n_forward n_backward"], Bool[Tensor, " n_forward"]]:
    """``(in_graph, nodes_in_graph)`` with everything off an input -> logits path removed.

    Example:
        >>> from circuits.graph import Graph
        >>> g = Graph(n_layers=1, n_heads=1, d_model=4).reset()
        >>> g.in_graph[1, -1] = True  # a0.h0 -> logits, but nothing feeds a0.h0
        >>> prune_dangling(g)[0].any().item()
        False
    """
    device = graph.in_graph.device
    n_fwd, n_bwd = graph.n_forward, graph.n_backward
    slots = graph.input_slots  # slot pair_b[i] feeds node pair_f[i]
    pair_f = np.repeat(np.arange(n_fwd), [len(x) for x in slots])
    pair_b = np.fromiter((b for x in slots for b in x), dtype=np.int64, count=len(pair_f))
    # The fixed point runs on the in-graph edge list in numpy: its cost follows the number of
    # edges, and small index operations stay single-threaded (torch's thread pool costs more
    # than the work here, badly so on a busy machine).
    rows, cols = np.nonzero((graph.in_graph & graph.valid.to(device)).cpu().numpy())
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
SELECTORS: dict[Selection, Callable[["Graph", float, bool], Tensor]] = {
    Selection.TOPN: select_topn,
    Selection.THRESHOLD: select_threshold,
    Selection.GREEDY: select_greedy,
}


def select(graph: "Graph", method: Selection | str, value: float, *, absolute: bool = True,
           prune: bool = True) -> "Graph":
    """Set ``graph.in_graph`` by a strategy, then (``prune``) remove dangling edges and nodes.

    Without pruning, ``nodes_in_graph`` marks the sources of the selected edges.
    Returns the graph (changed in place).

    Example:
        >>> from circuits.graph import Graph
        >>> g = Graph(n_layers=2, n_heads=2, d_model=8)
        >>> g.scores = torch.randn(g.n_forward, g.n_backward)
        >>> select(g, "topn", 10, prune=False).n_edges_in_graph
        10
    """
    try:
        method = Selection(method)
    except ValueError:
        raise GimlensError(f"method must be one of {[m.value for m in Selection]}, got {method!r}") from None
    if not isinstance(absolute, bool):
        raise GimlensError(f"absolute must be True or False, got {absolute!r}")
    mask = SELECTORS[method](graph, value, absolute)
    graph.in_graph = mask
    if prune:
        graph.prune()
    else:
        graph.nodes_in_graph = mask.any(1)
    return graph
