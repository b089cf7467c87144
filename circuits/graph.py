"""The circuit graph: dense edge-score and membership tensors over a transformer's residual graph.

The index layout (which row is which source node, which column which destination slot, which
edges exist) is [`Layout`][circuits.layout.Layout]'s. State: `scores` (float32), `in_graph` (bool,
never True off `valid`) and `nodes_in_graph` (bool per forward node; logits is always in). A fresh
graph holds the **whole model**: every valid edge and every node in. `edges` / `nodes` are
read-only views built on demand.

Files and views (`to_json`, `from_json`, `save`, `load`, `to_networkx`, `from_networkx`) come
from [`GraphFiles`][circuits.files.GraphFiles]; selection (`apply_topn`, `apply_greedy`,
`apply_threshold`, `prune`) calls [`circuits.prune`][circuits.prune], which knows no `Graph`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from gimlens.errors import GimlensError
from gimlens.validation import check_int, coerce_enum

from . import prune as _prune
from .files import Format, GraphFiles
from .layout import QKV, KVEdges, Layout, NodeKind, config_value

__all__ = ["Graph", "Node", "Edge", "NodeKind", "KVEdges", "QKV", "Format"]


@dataclass(frozen=True)
class Node:
    """A read-only view of one node. `head` holds the KV-head index for `KV_GROUP` nodes."""

    name: str
    kind: NodeKind
    layer: int | None
    head: int | None
    in_graph: bool
    score: float | None = None  #: node score (source nodes of a graph with `node_scores`; NaN = unscored)


@dataclass(frozen=True)
class Edge:
    """A read-only view of one edge `src -> dst` (`qkv` set for attention inputs)."""

    name: str
    src: str
    dst: str
    qkv: QKV | None
    score: float
    in_graph: bool
    index: tuple[int, int]  #: (forward index, backward index) into the dense tensors


def _same_or_none(a: Tensor | None, b: Tensor | None) -> bool:
    """Both None, or equal values with NaN in the same places."""
    if a is None or b is None:
        return a is None and b is None
    a, b = a.cpu(), b.cpu()
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


class Graph(GraphFiles):
    """Edge scores and circuit membership over one model's residual graph.

    Args:
        n_layers: layers of the model.
        n_heads: query heads per layer.
        d_model: width of the residual stream.
        n_kv_heads: KV heads (grouped-query attention); `None` means `n_heads`.
        parallel_attn_mlp: attention and MLP read the same residual stream (GPT-J style).
        kv_edges: `"grouped"` (one k/v slot per KV head) or `"per_query_head"` (EAP-IG / MIB).
        model_name: kept in `cfg` and in exported files.

    Examples:
        >>> g = Graph(n_layers=2, n_heads=4, n_kv_heads=2, d_model=32)
        >>> g.n_forward, g.n_backward, g.n_valid_edges
        (11, 19, 82)
        >>> g.backward_index(1, head=1, qkv="k"), g.edges["a0.h3->a1.g1<k>"].in_graph
        (14, True)
    """

    def __init__(self, *, n_layers: int, n_heads: int, d_model: int, n_kv_heads: int | None = None,
                 parallel_attn_mlp: bool = False, kv_edges: KVEdges | str = "grouped",
                 model_name: str | None = None) -> None:
        self.layout = Layout.of(n_layers, n_heads, n_kv_heads, parallel_attn_mlp, kv_edges)
        check_int("d_model", d_model, minimum=1)
        self._d_model = d_model
        self._model_name = model_name if isinstance(model_name, str) else None
        self._scores = torch.zeros(self.layout.valid.shape, dtype=torch.float32)
        self._in_graph = self.layout.valid.clone()
        self._nodes_in_graph = torch.ones(self.n_forward, dtype=torch.bool)
        self._node_scores: Tensor | None = None
        self._neuron_scores: Tensor | None = None
        self._neurons_in_graph: Tensor | None = None

    @classmethod
    def from_model(cls, model: Any, *, kv_edges: KVEdges | str = "grouped") -> "Graph":
        """The full graph of a model (or its `cfg`, or a mapping with the same fields).

        Reads `n_layers`, `n_heads`, `d_model` (required), `n_key_value_heads` (or `n_kv_heads`;
        `None` -> `n_heads`), `parallel_attn_mlp` (absent -> `False`) and `model_name`.

        Examples:
            >>> from types import SimpleNamespace
            >>> Graph.from_model(SimpleNamespace(n_layers=1, n_heads=2, d_model=8)).n_valid_edges
            13
        """
        cfg = getattr(model, "cfg", model)
        if config_value(cfg, "d_model") is None:
            raise GimlensError("model cfg lacks d_model; expected a TransformerLens model or a cfg with "
                               "n_layers, n_heads, d_model (and optionally n_key_value_heads, parallel_attn_mlp)")
        lay = Layout.from_config(cfg, kv_edges)
        return cls(n_layers=lay.n_layers, n_heads=lay.n_heads, d_model=config_value(cfg, "d_model"),
                   n_kv_heads=lay.n_kv_heads, parallel_attn_mlp=lay.parallel_attn_mlp,
                   kv_edges=lay.kv_edges, model_name=config_value(cfg, "model_name"))

    def copy(self) -> "Graph":
        """An independent copy (state tensors cloned; the constant layout is shared)."""
        new = object.__new__(Graph)
        new.layout, new._d_model, new._model_name = self.layout, self._d_model, self._model_name
        new._scores, new._in_graph = self._scores.clone(), self._in_graph.clone()
        new._nodes_in_graph = self._nodes_in_graph.clone()
        new._copy_optional(self)
        return new

    def _copy_optional(self, other: "Graph") -> None:
        """Take clones of `other`'s node and neuron state (same sources: any k/v layout)."""
        for name in ("_node_scores", "_neuron_scores", "_neurons_in_graph"):
            value = getattr(other, name)
            setattr(self, name, None if value is None else value.clone())

    # ------------------------------------------------------------------ shape (the layout's)
    @property
    def cfg(self) -> dict[str, Any]:
        """n_layers, n_heads, n_kv_heads, d_model, parallel_attn_mlp, kv_edges, model_name."""
        lay = self.layout
        return {"n_layers": lay.n_layers, "n_heads": lay.n_heads, "n_kv_heads": lay.n_kv_heads,
                "d_model": self._d_model, "parallel_attn_mlp": lay.parallel_attn_mlp,
                "kv_edges": lay.kv_edges.value, "model_name": self._model_name}

    kv_edges = property(lambda self: self.layout.kv_edges, doc="The k/v layout.")
    n_forward = property(lambda self: self.layout.n_forward, doc="Source nodes (rows).")
    n_backward = property(lambda self: self.layout.n_backward, doc="Destination slots (columns).")
    n_kv_slots = property(lambda self: self.layout.n_slot_kv, doc="k (and v) slots per layer.")
    slot_nodes = property(lambda self: self.layout.slot_nodes, doc="`[b, f]`: slot `b` feeds node `f` (shared).")
    upstream_counts = property(lambda self: self.layout.n_upstream, doc="Per slot, its valid rows `[0, count)`.")
    input_slots = property(lambda self: self.layout.input_slots, doc="Per forward node, the slots feeding it.")
    n_valid_edges = property(lambda self: self.layout.n_valid_edges, doc="How many edges exist.")
    forward_names = property(lambda self: list(self.layout.forward_names), doc="Source node names by row.")
    backward_names = property(lambda self: list(self.layout.backward_names), doc="Slot names by column.")

    @property
    def valid(self) -> Bool[Tensor, "n_forward n_backward"]:
        """Which edges exist (shared constant: do not modify)."""
        return self.layout.valid

    @property
    def n_edges_in_graph(self) -> int:
        return int(self._in_graph.sum())

    def forward_index(self, layer: int | None = None, head: int | None = None) -> int:
        """Row of a source node: `layer=None` -> input (0); `head=None` -> the layer's MLP."""
        return self.layout.forward_index(layer, head)

    def backward_index(self, layer: int | None = None, head: int | None = None, qkv: QKV | None = None) -> int:
        """Column of a destination slot (see [`Layout.backward_index`][circuits.layout.Layout.backward_index])."""
        return self.layout.backward_index(layer, head, qkv)

    def kv_slot(self, head: int) -> int:
        """The k/v slot index (within a layer's k or v block) that query head `head` reads."""
        return self.layout.kv_slot(head)

    def forward_slice(self, layer: int) -> slice:
        """Rows of the heads of `layer`."""
        return self.layout.forward_slice(layer)

    def backward_slice(self, layer: int, qkv: QKV) -> slice:
        """Columns of the q, k or v block of `layer`."""
        return self.layout.backward_slice(layer, qkv)

    def n_upstream(self, layer: int | None = None, *, mlp: bool = False) -> int:
        """How many sources feed a slot (see [`Layout.upstream`][circuits.layout.Layout.upstream])."""
        return self.layout.upstream(layer, mlp=mlp)

    def forward_index_of(self, name: str) -> int:
        """Row of a source node by name (`"input"`, `"a0.h1"`, `"m2"`)."""
        return self.layout.forward_index_of(name)

    def backward_index_of(self, name: str) -> int:
        """Column of a destination slot by name (`"a1.h0<q>"`, `"a1.g0<k>"`, `"m0"`, `"logits"`)."""
        return self.layout.backward_index_of(name)

    def edge_index(self, name: str) -> tuple[int, int]:
        """`(row, column)` of an edge by name (`"a0.h1->m2"`, `"input->a1.h0<q>"`)."""
        return self.layout.edge_index_of(name)

    # ------------------------------------------------------------------ state
    @property
    def scores(self) -> Float[Tensor, "n_forward n_backward"]:
        """Edge scores, float32 (0 off `valid`). Assigning converts to float32 and zeroes entries
        off `valid`; in-place writes are taken as they are."""
        return self._scores

    @scores.setter
    def scores(self, value: Tensor) -> None:
        value = self._checked(value, "scores")
        self._scores = value.to(torch.float32).masked_fill(~self.valid.to(value.device), 0.0)

    @property
    def in_graph(self) -> Bool[Tensor, "n_forward n_backward"]:
        """Edge membership. Assigning masks it with `valid` (nodes are not updated: call `prune`
        for a consistent circuit)."""
        return self._in_graph

    @in_graph.setter
    def in_graph(self, value: Tensor) -> None:
        value = self._checked(value, "in_graph")
        self._in_graph = value.to(torch.bool) & self.valid.to(value.device)

    @property
    def nodes_in_graph(self) -> Bool[Tensor, " n_forward"]:
        """Source-node membership (logits, not a source, is always in)."""
        return self._nodes_in_graph

    @nodes_in_graph.setter
    def nodes_in_graph(self, value: Tensor) -> None:
        if not isinstance(value, Tensor) or value.shape != (self.n_forward,):
            raise GimlensError(f"nodes_in_graph must be a tensor of shape ({self.n_forward},), "
                               f"got {getattr(value, 'shape', type(value))}")
        self._nodes_in_graph = value.to(torch.bool)

    @property
    def node_scores(self) -> Float[Tensor, " n_forward"] | None:
        """One score per source node (float32; NaN = not scored, kept by node-level selection), or
        `None` (no node scores: the default, as in EAP-IG). Assigning converts to float32."""
        return self._node_scores

    @node_scores.setter
    def node_scores(self, value: Tensor | None) -> None:
        if value is not None and (not isinstance(value, Tensor) or tuple(value.shape) != (self.n_forward,)):
            raise GimlensError(f"node_scores must be None or a tensor of shape ({self.n_forward},), "
                               f"got {getattr(value, 'shape', type(value))}")
        self._node_scores = None if value is None else value.to(torch.float32)

    @property
    def neuron_scores(self) -> Float[Tensor, "n_forward d_model"] | None:
        """One score per output dimension of each source node (float32; NaN = not scored), or
        `None` (the default). Setting scores on a graph without `neurons_in_graph` puts every
        neuron in."""
        return self._neuron_scores

    @neuron_scores.setter
    def neuron_scores(self, value: Tensor | None) -> None:
        self._neuron_scores = None if value is None else self._neuron_shaped(value, "neuron_scores").float()
        if value is not None and self._neurons_in_graph is None:
            self._neurons_in_graph = torch.ones_like(self._neuron_scores, dtype=torch.bool)

    @property
    def neurons_in_graph(self) -> Bool[Tensor, "n_forward d_model"] | None:
        """Neuron membership (`None` unless the graph is neuron-level)."""
        return self._neurons_in_graph

    @neurons_in_graph.setter
    def neurons_in_graph(self, value: Tensor | None) -> None:
        self._neurons_in_graph = None if value is None else self._neuron_shaped(value, "neurons_in_graph").bool()

    def _neuron_shaped(self, value: Any, what: str) -> Tensor:
        shape = (self.n_forward, self._d_model)
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            raise GimlensError(f"{what} must be None or a tensor of shape {shape}, got "
                               f"{tuple(value.shape) if isinstance(value, Tensor) else type(value)}")
        return value

    def _checked(self, value: Any, what: str) -> Tensor:
        shape = (self.n_forward, self.n_backward)
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            raise GimlensError(f"{what} must be a tensor of shape {shape}, got "
                               f"{tuple(value.shape) if isinstance(value, Tensor) else type(value)}")
        return value

    def reset(self, empty: bool = True) -> "Graph":
        """Take every edge and node out (`empty=True`) or put every valid one in."""
        self._in_graph = torch.zeros_like(self._in_graph) if empty else self.valid.to(self._in_graph.device).clone()
        self._nodes_in_graph = torch.full_like(self._nodes_in_graph, not empty)
        if self._neurons_in_graph is not None:
            self._neurons_in_graph = torch.full_like(self._neurons_in_graph, not empty)
        return self

    def to(self, device: torch.device | str) -> "Graph":
        """Move the state tensors (in place); returns `self`."""
        self._scores, self._in_graph = self._scores.to(device), self._in_graph.to(device)
        self._nodes_in_graph = self._nodes_in_graph.to(device)
        for name in ("_node_scores", "_neuron_scores", "_neurons_in_graph"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    # ------------------------------------------------------------------ selection (circuits.prune)
    def apply_topn(self, n: int, absolute: bool = True, *, prune: bool = True, level: str = "edge") -> "Graph":
        """Keep the `n` best-scoring valid edges (or, `level="node"`, source nodes and the edges
        between them: [`circuits.prune`][circuits.prune]), then (`prune`) drop dangling ones; all-zero scores are refused."""
        return _prune.select(self, _prune.Selection.TOPN, n, absolute=absolute, prune=prune, level=level)

    def apply_threshold(self, t: float, absolute: bool = True, *, prune: bool = True, level: str = "edge") -> "Graph":
        """Keep valid edges (or, `level="node"`, source nodes) with score `>= t` (`|score| >= t` if
        `absolute`), then prune."""
        return _prune.select(self, _prune.Selection.THRESHOLD, t, absolute=absolute, prune=prune, level=level)

    def apply_greedy(self, n: int, absolute: bool = True, *, prune: bool = True) -> "Graph":
        """Grow `n` edges from logits, best edge into the current circuit first, then prune."""
        return _prune.select(self, _prune.Selection.GREEDY, n, absolute=absolute, prune=prune)

    def prune(self) -> "Graph":
        """Drop edges and nodes not on an input -> logits path (fixed point); updates nodes."""
        self._in_graph, self._nodes_in_graph = _prune.prune_dangling(self)
        if self._neurons_in_graph is not None:  # a removed node keeps no neurons
            self._neurons_in_graph = self._neurons_in_graph & self._nodes_in_graph[:, None]
        return self

    def as_kv_edges(self, kv_edges: KVEdges | str) -> "Graph":
        """A new graph in another k/v layout (a copy if it is already in it).

        `grouped -> per_query_head` copies each KV-head edge (score and membership) to every query
        head of its group; `per_query_head -> grouped` takes the mean score (in float64, so copies
        come back exactly) and the any-membership over the group's query heads.
        """
        kv = coerce_enum(KVEdges, kv_edges, "kv_edges")
        if kv is self.kv_edges:
            return self.copy()
        new = Graph(**{**self.cfg, "kv_edges": kv})
        colmap = self.layout.kv_column_map.to(self._scores.device)  # per-query col -> grouped col
        if kv is KVEdges.PER_QUERY_HEAD:
            new._scores, new._in_graph = self._scores[:, colmap], self._in_graph[:, colmap]
        else:
            shape = (self.n_forward, new.n_backward)
            total = torch.zeros(shape, dtype=torch.float64, device=colmap.device)
            total.index_add_(1, colmap, self._scores.double())
            counts = torch.bincount(colmap, minlength=new.n_backward).to(torch.float64)
            new._scores = (total / counts).to(torch.float32)
            hits = torch.zeros(shape, dtype=torch.int32, device=colmap.device)
            new._in_graph = hits.index_add_(1, colmap, self._in_graph.int()) > 0
        new._nodes_in_graph = self._nodes_in_graph.clone()
        new._copy_optional(self)
        return new

    # ------------------------------------------------------------------ views
    @property
    def nodes(self) -> dict[str, Node]:
        """Name -> `Node` (sources, KV-group nodes when grouped, and `logits`)."""
        inn = self._nodes_in_graph.tolist()
        score = [None] * self.n_forward if self._node_scores is None else self._node_scores.tolist()
        return {name: Node(name, kind, layer, head, True if not rows else any(inn[r] for r in rows),
                           score[rows[0]] if kind is not NodeKind.KV_GROUP and rows else None)
                for name, kind, layer, head, rows in self.layout.node_specs}

    @property
    def edges(self) -> dict[str, Edge]:
        """Name -> `Edge` for every valid edge (slow on big graphs: not for hot paths)."""
        lay = self.layout
        rows, cols = lay.edge_index
        scores = self._scores.cpu()[rows, cols].tolist()
        ing = self._in_graph.cpu()[rows, cols].tolist()
        fwd, bwd = lay.forward_names, lay.backward_names
        dst = [n[:-3] if n.endswith(">") else n for n in bwd]
        qkv = [n[-2] if n.endswith(">") else None for n in bwd]
        return {name: Edge(name, fwd[r], dst[c], qkv[c], s, i, (r, c))
                for name, r, c, s, i in zip(lay.edge_names, rows.tolist(), cols.tolist(), scores, ing)}

    # ------------------------------------------------------------------ comparison
    def same_layout(self, other: "Graph") -> bool:
        """Same shape and kv layout (so the dense tensors index the same edges)."""
        return isinstance(other, Graph) and self.layout == other.layout

    def equals(self, other: "Graph") -> bool:
        """Same config and exactly equal scores, edge and node membership."""
        return (isinstance(other, Graph) and self.cfg == other.cfg
                and torch.equal(self._scores.cpu(), other._scores.cpu())
                and torch.equal(self._in_graph.cpu(), other._in_graph.cpu())
                and torch.equal(self._nodes_in_graph.cpu(), other._nodes_in_graph.cpu())
                and all(_same_or_none(getattr(self, n), getattr(other, n))
                        for n in ("_node_scores", "_neuron_scores", "_neurons_in_graph")))

    def check_matches(self, model: Any) -> None:
        """Raise `GimlensError` unless `model` (a model, cfg, mapping or Graph) has this graph's
        n_layers, n_heads, n_kv_heads, d_model and parallel_attn_mlp."""
        other = model if isinstance(model, Graph) else Graph.from_model(model)
        keys = ("n_layers", "n_heads", "n_kv_heads", "d_model", "parallel_attn_mlp")
        mine, theirs = self.cfg, other.cfg
        bad = [f"{k}: graph {mine[k]!r} vs model {theirs[k]!r}" for k in keys if mine[k] != theirs[k]]
        if bad:
            raise GimlensError("circuit graph does not match the model (" + "; ".join(bad) + ")")

    def __repr__(self) -> str:
        c = self.cfg
        return (f"Graph(n_layers={c['n_layers']}, n_heads={c['n_heads']}, n_kv_heads={c['n_kv_heads']}, "
                f"kv_edges={c['kv_edges']!r}, edges_in_graph={self.n_edges_in_graph}/{self.n_valid_edges})")
