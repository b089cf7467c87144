"""The circuit graph: dense edge-score and membership tensors over a transformer's residual graph.

Index layout (shared by every circuits module; EAP-IG / MIB compatible for ``per_query_head``):

* **Forward (source) nodes**, ``n_forward = 1 + L*(H+1)``: ``0 = input``, then per layer ``l`` the
  heads ``a{l}.h{0..H-1}`` at ``1 + l*(H+1) + h`` and the MLP ``m{l}`` at ``1 + l*(H+1) + H``.
* **Backward (destination input) slots**, ``n_backward = L*(H + 2*Hk + 1) + 1``: per layer a block
  of ``H`` q-inputs, ``Hk`` k-inputs, ``Hk`` v-inputs and the MLP input; ``logits`` last. With
  ``kv_edges="grouped"`` (default) ``Hk = n_kv_heads`` (one k/v slot per KV head, named
  ``a{l}.g{g}<k>`` when ``n_kv_heads < n_heads``); with ``"per_query_head"`` ``Hk = H`` (one per
  query head, ``a{l}.h{h}<k>``, the EAP-IG / MIB layout). Query head ``h`` reads KV head
  ``h // (H // n_kv_heads)``.
* ``valid[f, b]`` marks real edges: a slot at layer ``l`` receives from ``input`` and every head and
  MLP of layers ``< l``; the MLP of layer ``l`` also from the heads of layer ``l`` (unless
  ``parallel_attn_mlp``); ``logits`` from everything.

State: ``scores`` (float32), ``in_graph`` (bool, never True off ``valid``) and ``nodes_in_graph``
(bool per forward node; logits is always in). A fresh graph holds the **whole model**: every valid
edge and every node in. ``edges`` / ``nodes`` are read-only views built on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property, lru_cache
from typing import Any, Literal, Mapping

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from gimlens.errors import GimlensError

from . import prune as _prune

__all__ = ["Graph", "Node", "Edge", "NodeKind", "KVEdges", "QKV"]

QKV = Literal["q", "k", "v"]


class KVEdges(str, Enum):
    """How the key/value inputs of grouped-query attention become destination slots."""

    GROUPED = "grouped"  #: one k and one v slot per KV head: the computation as the model runs it
    PER_QUERY_HEAD = "per_query_head"  #: one per query head: the EAP-IG / MIB layout

    @classmethod
    def coerce(cls, value: "KVEdges | str") -> "KVEdges":
        try:
            return cls(value)
        except ValueError:
            raise GimlensError(
                f"kv_edges must be one of {[m.value for m in cls]}, got {value!r}"
            ) from None


class NodeKind(str, Enum):
    """What a node of the circuit graph is."""

    INPUT = "input"  #: the token embedding (``hook_embed``); a source only
    ATTENTION = "attention"  #: one attention head ``a{l}.h{h}``
    KV_GROUP = "kv_group"  #: the shared k/v input of a KV head ``a{l}.g{g}`` (grouped layout only)
    MLP = "mlp"  #: one MLP ``m{l}``
    LOGITS = "logits"  #: the unembedding input; a destination only, always in the graph


@dataclass(frozen=True)
class Node:
    """A read-only view of one node. ``head`` holds the KV-head index for ``KV_GROUP`` nodes."""

    name: str
    kind: NodeKind
    layer: int | None
    head: int | None
    in_graph: bool


@dataclass(frozen=True)
class Edge:
    """A read-only view of one edge ``src -> dst`` (``qkv`` set for attention inputs)."""

    name: str
    src: str
    dst: str
    qkv: QKV | None
    score: float
    in_graph: bool
    index: tuple[int, int]  #: (forward index, backward index) into the dense tensors


@dataclass(frozen=True)
class _Layout:
    """Index arithmetic and constant masks of one graph shape (cached and shared by graphs)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel_attn_mlp: bool
    kv_edges: KVEdges

    @property
    def n_slot_kv(self) -> int:  # Hk: k (and v) slots per layer
        return self.n_kv_heads if self.kv_edges is KVEdges.GROUPED else self.n_heads

    @property
    def block(self) -> int:
        return self.n_heads + 2 * self.n_slot_kv + 1

    @property
    def n_forward(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_backward(self) -> int:
        return self.n_layers * self.block + 1

    @property
    def group_names(self) -> bool:  # k/v slots named per KV group (a{l}.g{g})
        return self.kv_edges is KVEdges.GROUPED and self.n_kv_heads < self.n_heads

    @cached_property
    def slot_layer(self) -> Tensor:  # [n_backward] layer of each slot, n_layers for logits
        return torch.cat([torch.arange(self.n_layers).repeat_interleave(self.block),
                          torch.tensor([self.n_layers])])

    @cached_property
    def n_upstream(self) -> Tensor:  # [n_backward] valid sources form the prefix [0, n_upstream)
        counts = 1 + self.slot_layer * (self.n_heads + 1)
        if not self.parallel_attn_mlp:
            mlp = torch.arange(self.n_layers) * self.block + self.block - 1
            counts[mlp] += self.n_heads
        counts[-1] = self.n_forward
        return counts

    @cached_property
    def valid(self) -> Tensor:
        return torch.arange(self.n_forward)[:, None] < self.n_upstream[None, :]

    @cached_property
    def slot_nodes(self) -> Tensor:  # [n_backward, n_forward] bool: which node a slot feeds
        m = torch.zeros(self.n_backward, self.n_forward, dtype=torch.bool)
        H, Hk, rep = self.n_heads, self.n_slot_kv, self.n_heads // self.n_slot_kv
        for layer in range(self.n_layers):
            base, first = layer * self.block, 1 + layer * (H + 1)
            heads = torch.arange(H)
            m[base + heads, first + heads] = True
            for off in (H, H + Hk):
                m[base + off + heads // rep, first + heads] = True
            m[base + H + 2 * Hk, first + H] = True
        return m

    @cached_property
    def input_slots(self) -> tuple[tuple[int, ...], ...]:  # per forward node, the slots feeding it
        out: list[list[int]] = [[] for _ in range(self.n_forward)]
        for b, f in self.slot_nodes.nonzero().tolist():
            out[f].append(b)
        return tuple(tuple(x) for x in out)

    @cached_property
    def forward_names(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return names

    @cached_property
    def backward_names(self) -> list[str]:
        kv = "g" if self.group_names else "h"
        names = []
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}<q>" for h in range(self.n_heads)]
            for letter in "kv":
                names += [f"a{layer}.{kv}{g}<{letter}>" for g in range(self.n_slot_kv)]
            names.append(f"m{layer}")
        return names + ["logits"]

    @cached_property
    def forward_lookup(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.forward_names)}

    @cached_property
    def backward_lookup(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.backward_names)}

    @cached_property
    def edge_index(self) -> tuple[Tensor, Tensor]:  # rows, cols of valid edges, row-major
        rows, cols = self.valid.nonzero(as_tuple=True)
        return rows, cols

    @cached_property
    def edge_names(self) -> list[str]:
        fwd, bwd = self.forward_names, self.backward_names
        rows, cols = self.edge_index
        return [f"{fwd[r]}->{bwd[c]}" for r, c in zip(rows.tolist(), cols.tolist())]


@lru_cache(maxsize=32)
def _layout(n_layers: int, n_heads: int, n_kv_heads: int, parallel: bool, kv: KVEdges) -> _Layout:
    return _Layout(n_layers, n_heads, n_kv_heads, parallel, kv)


def _kv_column_map(grouped: _Layout) -> Tensor:
    """For each column of the per-query-head layout, the matching column of ``grouped``."""
    H, Hk, L = grouped.n_heads, grouped.n_kv_heads, grouped.n_layers
    rep, j = H // Hk, torch.arange(3 * H + 1)
    within = torch.where(j < H, j, torch.where(j < 2 * H, H + (j - H) // rep,
                         torch.where(j < 3 * H, H + Hk + (j - 2 * H) // rep, H + 2 * Hk)))
    cols = (torch.arange(L)[:, None] * grouped.block + within[None, :]).flatten()
    return torch.cat([cols, torch.tensor([grouped.n_backward - 1])])


def _export():
    from . import export  # export imports this module: import on use

    return export


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GimlensError(f"{what} must be a positive integer, got {value!r}")
    return value


class Graph:
    """Edge scores and circuit membership over one model's residual graph (layout: module doc).

    Args:
        n_layers, n_heads, d_model: the model's shape.
        n_kv_heads: KV heads (grouped-query attention); ``None`` means ``n_heads``.
        parallel_attn_mlp: attention and MLP read the same residual stream (GPT-J style).
        kv_edges: ``"grouped"`` (one k/v slot per KV head) or ``"per_query_head"`` (EAP-IG / MIB).
        model_name: kept in ``cfg`` and in exported files.

    Example:
        >>> g = Graph(n_layers=2, n_heads=4, n_kv_heads=2, d_model=32)
        >>> g.n_forward, g.n_backward, g.n_valid_edges
        (11, 19, 82)
        >>> g.backward_index(1, head=1, qkv="k"), g.edges["a0.h3->a1.g1<k>"].in_graph
        (14, True)
    """

    def __init__(self, *, n_layers: int, n_heads: int, d_model: int, n_kv_heads: int | None = None,
                 parallel_attn_mlp: bool = False, kv_edges: KVEdges | str = "grouped",
                 model_name: str | None = None) -> None:
        n_layers = _positive_int(n_layers, "n_layers")
        n_heads = _positive_int(n_heads, "n_heads")
        n_kv = n_heads if n_kv_heads is None else _positive_int(n_kv_heads, "n_kv_heads")
        if n_heads % n_kv:
            raise GimlensError(f"n_kv_heads ({n_kv}) must divide n_heads ({n_heads})")
        if not isinstance(parallel_attn_mlp, bool):
            raise GimlensError(f"parallel_attn_mlp must be a bool, got {parallel_attn_mlp!r}")
        self._d_model = _positive_int(d_model, "d_model")
        self._model_name = model_name if isinstance(model_name, str) else None
        self._layout = _layout(n_layers, n_heads, n_kv, parallel_attn_mlp, KVEdges.coerce(kv_edges))
        valid = self._layout.valid
        self._scores = torch.zeros(valid.shape, dtype=torch.float32)
        self._in_graph = valid.clone()
        self._nodes_in_graph = torch.ones(self.n_forward, dtype=torch.bool)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: Any, *, kv_edges: KVEdges | str = "grouped") -> "Graph":
        """The full graph of a model (or its ``cfg``, or a mapping with the same fields).

        Reads ``n_layers``, ``n_heads``, ``d_model`` (required), ``n_key_value_heads`` (or
        ``n_kv_heads``; ``None`` -> ``n_heads``), ``parallel_attn_mlp`` (absent -> ``False``) and
        ``model_name``.

        Example:
            >>> from types import SimpleNamespace
            >>> Graph.from_model(SimpleNamespace(n_layers=1, n_heads=2, d_model=8)).n_valid_edges
            13
        """
        cfg = getattr(model, "cfg", model)

        def get(key: str, default: Any = None) -> Any:
            if isinstance(cfg, Mapping):
                return cfg.get(key, default)
            return getattr(cfg, key, default)

        missing = [k for k in ("n_layers", "n_heads", "d_model") if get(k) is None]
        if missing:
            raise GimlensError(
                f"model cfg lacks {missing}; expected a TransformerLens model or a cfg with "
                "n_layers, n_heads, d_model (and optionally n_key_value_heads, parallel_attn_mlp)"
            )
        n_kv = get("n_key_value_heads")
        n_kv = get("n_kv_heads") if n_kv is None else n_kv
        return cls(n_layers=get("n_layers"), n_heads=get("n_heads"), d_model=get("d_model"),
                   n_kv_heads=n_kv, parallel_attn_mlp=bool(get("parallel_attn_mlp", False)),
                   kv_edges=kv_edges, model_name=get("model_name"))

    def copy(self) -> "Graph":
        """An independent copy (state tensors cloned; the constant layout is shared)."""
        new = object.__new__(Graph)
        new._d_model, new._model_name, new._layout = self._d_model, self._model_name, self._layout
        new._scores = self._scores.clone()
        new._in_graph = self._in_graph.clone()
        new._nodes_in_graph = self._nodes_in_graph.clone()
        return new

    # ------------------------------------------------------------------ shape and config
    @property
    def cfg(self) -> dict[str, Any]:
        """n_layers, n_heads, n_kv_heads, d_model, parallel_attn_mlp, kv_edges, model_name."""
        lay = self._layout
        return {"n_layers": lay.n_layers, "n_heads": lay.n_heads, "n_kv_heads": lay.n_kv_heads,
                "d_model": self._d_model, "parallel_attn_mlp": lay.parallel_attn_mlp,
                "kv_edges": lay.kv_edges.value, "model_name": self._model_name}

    @property
    def kv_edges(self) -> KVEdges:
        return self._layout.kv_edges

    @property
    def n_forward(self) -> int:
        return self._layout.n_forward

    @property
    def n_backward(self) -> int:
        return self._layout.n_backward

    @property
    def n_kv_slots(self) -> int:
        """k (and v) slots per layer: ``n_kv_heads`` (grouped) or ``n_heads`` (per query head)."""
        return self._layout.n_slot_kv

    @property
    def valid(self) -> Bool[Tensor, "n_forward n_backward"]:
        """Which edges exist (shared constant: do not modify)."""
        return self._layout.valid

    @property
    def slot_nodes(self) -> Bool[Tensor, "n_backward n_forward"]:
        """``[b, f]`` True when slot ``b`` is an input of node ``f`` (a grouped k/v slot feeds
        every query head of its group; logits feeds no forward node). Shared constant."""
        return self._layout.slot_nodes

    @property
    def upstream_counts(self) -> Tensor:
        """``[n_backward]`` int: slot ``b``'s valid sources are exactly rows ``[0, counts[b])``."""
        return self._layout.n_upstream

    @property
    def input_slots(self) -> tuple[tuple[int, ...], ...]:
        """For each forward node, the backward slots that are its inputs (empty for input)."""
        return self._layout.input_slots

    @property
    def n_valid_edges(self) -> int:
        return int(self._layout.n_upstream.sum())

    @property
    def n_edges_in_graph(self) -> int:
        return int(self._in_graph.sum())

    @property
    def forward_names(self) -> list[str]:
        return list(self._layout.forward_names)

    @property
    def backward_names(self) -> list[str]:
        return list(self._layout.backward_names)

    # ------------------------------------------------------------------ indices
    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self._layout.n_layers:
            raise GimlensError(f"layer must be in [0, {self._layout.n_layers}), got {layer!r}")

    def forward_index(self, layer: int | None = None, head: int | None = None) -> int:
        """Row of a source node: ``layer=None`` -> input (0); ``head=None`` -> the layer's MLP."""
        if layer is None:
            return 0
        self._check_layer(layer)
        H = self._layout.n_heads
        if head is None:
            return 1 + layer * (H + 1) + H
        if not 0 <= head < H:
            raise GimlensError(f"head must be in [0, {H}), got {head!r}")
        return 1 + layer * (H + 1) + head

    def backward_index(self, layer: int | None = None, head: int | None = None,
                       qkv: QKV | None = None) -> int:
        """Column of a destination slot: ``layer=None`` -> logits; ``head=None`` -> MLP input.

        For ``qkv="q"`` ``head`` is the query head; for ``"k"``/``"v"`` it is the slot within the
        k/v block: the KV head (grouped) or the query head (per_query_head); see :meth:`kv_slot`.
        """
        lay = self._layout
        if layer is None:
            return lay.n_backward - 1
        self._check_layer(layer)
        base = layer * lay.block
        if head is None and qkv is None:
            return base + lay.n_heads + 2 * lay.n_slot_kv
        if qkv not in ("q", "k", "v") or head is None:
            raise GimlensError(f"an attention slot needs qkv in 'q', 'k', 'v' and a head, got "
                               f"qkv={qkv!r}, head={head!r}")
        size = lay.n_heads if qkv == "q" else lay.n_slot_kv
        if not 0 <= head < size:
            raise GimlensError(f"{qkv} slot index must be in [0, {size}), got {head!r}")
        offset = {"q": 0, "k": lay.n_heads, "v": lay.n_heads + lay.n_slot_kv}[qkv]
        return base + offset + head

    def kv_slot(self, head: int) -> int:
        """The k/v slot index (within a layer's k or v block) that query head ``head`` reads."""
        return head // (self._layout.n_heads // self._layout.n_slot_kv)

    def forward_slice(self, layer: int) -> slice:
        """Rows of the heads of ``layer`` (contiguous, in head order)."""
        start = self.forward_index(layer, 0)
        return slice(start, start + self._layout.n_heads)

    def backward_slice(self, layer: int, qkv: QKV) -> slice:
        """Columns of the q, k or v block of ``layer``."""
        start = self.backward_index(layer, 0, qkv)
        return slice(start, start + (self._layout.n_heads if qkv == "q" else self._layout.n_slot_kv))

    def n_upstream(self, layer: int | None = None, *, mlp: bool = False) -> int:
        """How many sources feed a slot: the valid rows are exactly ``[0, n_upstream)``.
        ``layer=None`` -> logits; ``mlp`` selects the layer's MLP input over its attention inputs."""
        col = self.backward_index(layer) if (layer is None or mlp) else self.backward_index(layer, 0, "q")
        return int(self._layout.n_upstream[col])

    def forward_index_of(self, name: str) -> int:
        """Row of a source node by name (``"input"``, ``"a0.h1"``, ``"m2"``)."""
        try:
            return self._layout.forward_lookup[name]
        except KeyError:
            raise GimlensError(f"no source node named {name!r} in this graph") from None

    def backward_index_of(self, name: str) -> int:
        """Column of a destination slot by name (``"a1.h0<q>"``, ``"a1.g0<k>"``, ``"m0"``, ``"logits"``)."""
        try:
            return self._layout.backward_lookup[name]
        except KeyError:
            raise GimlensError(f"no destination slot named {name!r} in this graph") from None

    def edge_index(self, name: str) -> tuple[int, int]:
        """``(row, column)`` of an edge by name (``"a0.h1->m2"``, ``"input->a1.h0<q>"``)."""
        src, sep, dst = name.partition("->")
        if not sep:
            raise GimlensError(f"edge names look like 'src->dst', got {name!r}")
        row, col = self.forward_index_of(src), self.backward_index_of(dst)
        if not self.valid[row, col]:
            raise GimlensError(f"{name!r} is not an edge of this graph (source after destination)")
        return row, col

    # ------------------------------------------------------------------ state
    @property
    def scores(self) -> Float[Tensor, "n_forward n_backward"]:
        """Edge scores, float32 (0 off ``valid``). Assigning converts to float32 and zeroes
        entries off ``valid``; in-place writes are taken as they are."""
        return self._scores

    @scores.setter
    def scores(self, value: Tensor) -> None:
        value = self._checked(value, "scores")
        self._scores = value.to(torch.float32).masked_fill(~self.valid.to(value.device), 0.0)

    @property
    def in_graph(self) -> Bool[Tensor, "n_forward n_backward"]:
        """Edge membership. Assigning masks it with ``valid`` (nodes are not updated: call
        :meth:`prune` for a consistent circuit)."""
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

    def _checked(self, value: Any, what: str) -> Tensor:
        shape = (self.n_forward, self.n_backward)
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            raise GimlensError(f"{what} must be a tensor of shape {shape}, got "
                               f"{tuple(value.shape) if isinstance(value, Tensor) else type(value)}")
        return value

    def reset(self, empty: bool = True) -> "Graph":
        """Take every edge and node out (``empty=True``) or put every valid one in."""
        self._in_graph = torch.zeros_like(self._in_graph) if empty else self.valid.to(self._in_graph.device).clone()
        self._nodes_in_graph = torch.full_like(self._nodes_in_graph, not empty)
        return self

    def to(self, device: torch.device | str) -> "Graph":
        """Move the state tensors (in place); returns ``self``."""
        self._scores, self._in_graph = self._scores.to(device), self._in_graph.to(device)
        self._nodes_in_graph = self._nodes_in_graph.to(device)
        return self

    # ------------------------------------------------------------------ selection (prune.py)
    def apply_topn(self, n: int, absolute: bool = True, *, prune: bool = True) -> "Graph":
        """Keep the ``n`` best-scoring valid edges, then (``prune``) drop dangling ones."""
        return _prune.select(self, _prune.Selection.TOPN, n, absolute=absolute, prune=prune)

    def apply_threshold(self, t: float, absolute: bool = True, *, prune: bool = True) -> "Graph":
        """Keep valid edges with score ``>= t`` (``|score| >= t`` if ``absolute``), then prune."""
        return _prune.select(self, _prune.Selection.THRESHOLD, t, absolute=absolute, prune=prune)

    def apply_greedy(self, n: int, absolute: bool = True, *, prune: bool = True) -> "Graph":
        """Grow ``n`` edges from logits, best edge into the current circuit first, then prune."""
        return _prune.select(self, _prune.Selection.GREEDY, n, absolute=absolute, prune=prune)

    def prune(self) -> "Graph":
        """Drop edges and nodes not on an input -> logits path (fixed point); updates nodes."""
        self._in_graph, self._nodes_in_graph = _prune.prune_dangling(self)
        return self

    def as_kv_edges(self, kv_edges: KVEdges | str) -> "Graph":
        """A new graph in another k/v layout (a copy if it is already in it).

        ``grouped -> per_query_head`` copies each KV-head edge (score and membership) to every
        query head of its group; ``per_query_head -> grouped`` takes the mean score (in float64,
        so copies come back exactly) and the any-membership over the group's query heads.
        """
        kv = KVEdges.coerce(kv_edges)
        if kv is self.kv_edges:
            return self.copy()
        new = Graph(**{**self.cfg, "kv_edges": kv})
        grouped = new if kv is KVEdges.GROUPED else self
        colmap = _kv_column_map(grouped._layout).to(self._scores.device)  # per-query col -> grouped col
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
        return new

    # ------------------------------------------------------------------ files (thin: export.py)
    def to_networkx(self, *, weight: str = "score", include: str = "all"):
        """networkx ``MultiDiGraph``, one edge per graph edge (:func:`circuits.export.to_networkx`)."""
        return _export().to_networkx(self, weight=weight, include=include)

    @classmethod
    def from_networkx(cls, G: Any, *, weight: str = "score", model: Any = None) -> "Graph":
        return _export().from_networkx(G, weight=weight, model=model)

    def to_json(self, path: str) -> Any:
        """Own compact JSON, exact float32 round trip (:func:`circuits.export.to_json`)."""
        return _export().to_json(self, path)

    @classmethod
    def from_json(cls, path: str, *, model: Any = None) -> "Graph":
        return _export().from_json(path, model=model)

    def to_eap_json(self, path: str) -> Any:
        """EAP-IG / MIB JSON; GQA k/v edges copied to each query head of the group."""
        return _export().to_eap_json(self, path)

    @classmethod
    def from_eap_json(cls, path: str, *, model: Any = None, kv_edges: KVEdges | str = "per_query_head") -> "Graph":
        return _export().from_eap_json(path, model=model, kv_edges=kv_edges)

    def to_graphml(self, path: str, **kwargs: Any) -> Any:
        return _export().to_graphml(self, path, **kwargs)

    @classmethod
    def from_graphml(cls, path: str, **kwargs: Any) -> "Graph":
        return _export().from_graphml(path, **kwargs)

    def to_dot(self, path: str | None = None, **kwargs: Any) -> str:
        """Graphviz DOT text of the in-graph edges (written to ``path`` if given)."""
        return _export().to_dot(self, path, **kwargs)

    def render(self, path: str, **kwargs: Any) -> Any:
        """Draw the circuit to .png/.svg/.pdf with matplotlib (:func:`circuits.export.render`)."""
        return _export().render(self, path, **kwargs)

    def save(self, path: str, format: str | None = None, **kwargs: Any) -> Any:
        """Write by suffix (.json, .graphml, .dot, .png, .svg, .pdf) or ``format`` ("eap-json")."""
        return _export().save(self, path, format, **kwargs)

    @classmethod
    def load(cls, path: str, format: str | None = None, *, model: Any = None) -> "Graph":
        """Read own / EAP-IG JSON (told apart by content) or GraphML."""
        return _export().load(path, format, model=model)

    # ------------------------------------------------------------------ views and comparison
    @property
    def nodes(self) -> dict[str, Node]:
        """Name -> :class:`Node` (sources, KV-group nodes when grouped, and ``logits``)."""
        lay, inn = self._layout, self._nodes_in_graph.tolist()
        out: dict[str, Node] = {"input": Node("input", NodeKind.INPUT, None, None, inn[0])}
        for layer in range(lay.n_layers):
            for h in range(lay.n_heads):
                name = f"a{layer}.h{h}"
                out[name] = Node(name, NodeKind.ATTENTION, layer, h, inn[self.forward_index(layer, h)])
            if lay.group_names:
                rep = lay.n_heads // lay.n_kv_heads
                first = self.forward_index(layer, 0)
                for g in range(lay.n_kv_heads):
                    name = f"a{layer}.g{g}"
                    out[name] = Node(name, NodeKind.KV_GROUP, layer, g,
                                     any(inn[first + g * rep: first + (g + 1) * rep]))
            out[f"m{layer}"] = Node(f"m{layer}", NodeKind.MLP, layer, None, inn[self.forward_index(layer)])
        out["logits"] = Node("logits", NodeKind.LOGITS, None, None, True)
        return out

    @property
    def edges(self) -> dict[str, Edge]:
        """Name -> :class:`Edge` for every valid edge (slow on big graphs: not for hot paths)."""
        lay = self._layout
        rows, cols = lay.edge_index
        scores = self._scores.cpu()[rows, cols].tolist()
        ing = self._in_graph.cpu()[rows, cols].tolist()
        fwd, bwd = lay.forward_names, lay.backward_names
        dst = [n[:-3] if n.endswith(">") else n for n in bwd]
        qkv = [n[-2] if n.endswith(">") else None for n in bwd]
        return {name: Edge(name, fwd[r], dst[c], qkv[c], s, i, (r, c))
                for name, r, c, s, i in zip(lay.edge_names, rows.tolist(), cols.tolist(), scores, ing)}

    def same_layout(self, other: "Graph") -> bool:
        """Same shape and kv layout (so the dense tensors index the same edges)."""
        return isinstance(other, Graph) and self._layout == other._layout

    def equals(self, other: "Graph") -> bool:
        """Same config and exactly equal scores, edge and node membership."""
        return (isinstance(other, Graph) and self.cfg == other.cfg
                and torch.equal(self._scores.cpu(), other._scores.cpu())
                and torch.equal(self._in_graph.cpu(), other._in_graph.cpu())
                and torch.equal(self._nodes_in_graph.cpu(), other._nodes_in_graph.cpu()))

    def check_matches(self, model: Any) -> None:
        """Raise :class:`GimlensError` unless ``model`` (a model, cfg, mapping or Graph) has this
        graph's n_layers, n_heads, n_kv_heads, d_model and parallel_attn_mlp."""
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
