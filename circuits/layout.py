"""Index arithmetic of the circuit graph, from a model's shape alone (no state, no weights).

The layout (EAP-IG / MIB compatible for `per_query_head`):

- **Forward (source) nodes**, `n_forward = 1 + L*(H+1)`: `0 = input`, then per layer `l` the heads
  `a{l}.h{0..H-1}` at `1 + l*(H+1) + h` and the MLP `m{l}` at `1 + l*(H+1) + H`.
- **Backward (destination input) slots**, `n_backward = L*(H + 2*Hk + 1) + 1`: per layer a block of
  `H` q-inputs, `Hk` k-inputs, `Hk` v-inputs and the MLP input; `logits` last. With
  `kv_edges="grouped"` (default) `Hk = n_kv_heads` (one k/v slot per KV head, named `a{l}.g{g}<k>`
  when `n_kv_heads < n_heads`); with `"per_query_head"` `Hk = H` (one per query head, `a{l}.h{h}<k>`,
  the EAP-IG / MIB layout). Query head `h` reads KV head `h // (H // n_kv_heads)`.
- `valid[f, b]` marks real edges: a slot at layer `l` receives from `input` and every head and MLP
  of layers `< l`; the MLP of layer `l` also from the heads of layer `l` (unless
  `parallel_attn_mlp`); `logits` from everything. The valid sources of every slot are a prefix of
  the forward index: rows `[0, n_upstream[b])`.

Examples:
    >>> lay = Layout.of(n_layers=2, n_heads=4, n_kv_heads=2)
    >>> lay.n_forward, lay.n_backward, lay.forward_index(1), lay.backward_index(1, 1, "k")
    (11, 19, 10, 14)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property, lru_cache
from typing import Any, Literal, Mapping

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from gimlens.errors import GimlensError
from gimlens.validation import check_int
from gimlens.runtime import coerce_enum

__all__ = ["Layout", "KVEdges", "NodeKind", "QKV"]

QKV = Literal["q", "k", "v"]


class KVEdges(str, Enum):
    """How the key/value inputs of grouped-query attention become destination slots."""

    GROUPED = "grouped"  #: one k and one v slot per KV head: the computation as the model runs it
    PER_QUERY_HEAD = "per_query_head"  #: one per query head: the EAP-IG / MIB layout


class NodeKind(str, Enum):
    """What a node of the circuit graph is."""

    INPUT = "input"  #: the token embedding (`hook_embed`); a source only
    ATTENTION = "attention"  #: one attention head `a{l}.h{h}`
    KV_GROUP = "kv_group"  #: the shared k/v input of a KV head `a{l}.g{g}` (grouped layout only)
    MLP = "mlp"  #: one MLP `m{l}`
    LOGITS = "logits"  #: the unembedding input; a destination only, always in the graph


def _positive_int(value: Any, what: str) -> int:
    return check_int(what, value, minimum=1)


def config_value(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg[key]` for a mapping, else `getattr(cfg, key)`; `default` when absent."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


@dataclass(frozen=True)
class Layout:
    """Index arithmetic and constant masks of one graph shape (build with [`Layout.of`][circuits.layout.Layout.of]:
    cached, so graphs of one shape share the masks; treat every tensor here as read-only)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel_attn_mlp: bool
    kv_edges: KVEdges

    @staticmethod
    def of(n_layers: int, n_heads: int, n_kv_heads: int | None = None, parallel_attn_mlp: bool = False,
           kv_edges: KVEdges | str = "grouped") -> "Layout":
        """The (cached) layout of a shape; bad values raise `GimlensError`.

        Examples:
            >>> Layout.of(2, 4) is Layout.of(2, 4, 4, False, "grouped")
            True
        """
        n_layers, n_heads = _positive_int(n_layers, "n_layers"), _positive_int(n_heads, "n_heads")
        n_kv = n_heads if n_kv_heads is None else _positive_int(n_kv_heads, "n_kv_heads")
        if n_heads % n_kv:
            raise GimlensError(f"n_kv_heads ({n_kv}) must divide n_heads ({n_heads})")
        if not isinstance(parallel_attn_mlp, bool):
            raise GimlensError(f"parallel_attn_mlp must be a bool, got {parallel_attn_mlp!r}")
        return _cached(n_layers, n_heads, n_kv, parallel_attn_mlp, coerce_enum(KVEdges, kv_edges, "kv_edges"))

    @staticmethod
    def from_config(cfg: Any, kv_edges: KVEdges | str = "grouped") -> "Layout":
        """The layout of a model config (an object or mapping with `n_layers`, `n_heads`, and
        optionally `n_key_value_heads` or `n_kv_heads`, `parallel_attn_mlp`).

        Examples:
            >>> Layout.from_config({"n_layers": 1, "n_heads": 2, "n_key_value_heads": 1}).n_slot_kv
            1
        """
        missing = [k for k in ("n_layers", "n_heads") if config_value(cfg, k) is None]
        if missing:
            raise GimlensError(f"model cfg lacks {missing}; expected n_layers, n_heads (and optionally "
                               "n_key_value_heads, parallel_attn_mlp)")
        n_kv = config_value(cfg, "n_key_value_heads")
        n_kv = config_value(cfg, "n_kv_heads") if n_kv is None else n_kv
        return Layout.of(config_value(cfg, "n_layers"), config_value(cfg, "n_heads"), n_kv,
                         bool(config_value(cfg, "parallel_attn_mlp", False)), kv_edges)

    # ------------------------------------------------------------------ sizes
    @property
    def n_slot_kv(self) -> int:
        """k (and v) slots per layer: `n_kv_heads` (grouped) or `n_heads` (per query head)."""
        return self.n_kv_heads if self.kv_edges is KVEdges.GROUPED else self.n_heads

    @property
    def block(self) -> int:
        """Backward slots per layer: `H + 2*Hk + 1`."""
        return self.n_heads + 2 * self.n_slot_kv + 1

    @property
    def n_forward(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_backward(self) -> int:
        return self.n_layers * self.block + 1

    @property
    def group_names(self) -> bool:
        """k/v slots are named per KV group (`a{l}.g{g}`): grouped layout with fewer KV heads."""
        return self.kv_edges is KVEdges.GROUPED and self.n_kv_heads < self.n_heads

    # ------------------------------------------------------------------ indices
    def _check_layer(self, layer: Any) -> int:
        return check_int("layer", layer, minimum=0, maximum=self.n_layers - 1)

    def forward_index(self, layer: int | None = None, head: int | None = None) -> int:
        """Row of a source node: `layer=None` -> input (0); `head=None` -> the layer's MLP."""
        if layer is None:
            return 0
        first = 1 + self._check_layer(layer) * (self.n_heads + 1)
        if head is None:
            return first + self.n_heads
        check_int("head", head, minimum=0, maximum=self.n_heads - 1)
        return first + head

    def backward_index(self, layer: int | None = None, head: int | None = None, qkv: QKV | None = None) -> int:
        """Column of a destination slot: `layer=None` -> logits; `head=None` -> the MLP input.

        For `qkv="q"` `head` is the query head; for `"k"`/`"v"` it is the slot within the k/v
        block: the KV head (grouped) or the query head (per query head); see `kv_slot`.
        """
        if layer is None:
            return self.n_backward - 1
        base = self._check_layer(layer) * self.block
        if head is None and qkv is None:
            return base + self.n_heads + 2 * self.n_slot_kv
        if qkv not in ("q", "k", "v") or head is None:
            raise GimlensError(f"an attention slot needs qkv in 'q', 'k', 'v' and a head, got "
                               f"qkv={qkv!r}, head={head!r}")
        size = self.n_heads if qkv == "q" else self.n_slot_kv
        check_int(f"{qkv} slot index", head, minimum=0, maximum=size - 1)
        return base + {"q": 0, "k": self.n_heads, "v": self.n_heads + self.n_slot_kv}[qkv] + head

    def kv_slot(self, head: int) -> int:
        """The k/v slot (within a layer's k or v block) that query head `head` reads."""
        return head // (self.n_heads // self.n_slot_kv)

    def forward_slice(self, layer: int) -> slice:
        """Rows of the heads of `layer` (contiguous, in head order)."""
        start = self.forward_index(layer, 0)
        return slice(start, start + self.n_heads)

    def backward_slice(self, layer: int, qkv: QKV) -> slice:
        """Columns of the q, k or v block of `layer`."""
        start = self.backward_index(layer, 0, qkv)
        return slice(start, start + (self.n_heads if qkv == "q" else self.n_slot_kv))

    def upstream(self, layer: int | None = None, *, mlp: bool = False) -> int:
        """How many sources feed a slot (its valid rows are exactly `[0, upstream)`): `layer=None`
        -> logits; `mlp` selects the layer's MLP input over its attention inputs.

        Examples:
            >>> Layout.of(2, 2).upstream(1), Layout.of(2, 2).upstream(1, mlp=True)
            (4, 6)
        """
        col = self.backward_index(layer) if (layer is None or mlp) else self.backward_index(layer, 0, "q")
        return int(self.n_upstream[col])

    # ------------------------------------------------------------------ constant masks
    @cached_property
    def slot_layer(self) -> Int[Tensor, " n_backward"]:
        """Layer of each slot (`n_layers` for logits)."""
        return torch.cat([torch.arange(self.n_layers).repeat_interleave(self.block),
                          torch.tensor([self.n_layers])])

    @cached_property
    def n_upstream(self) -> Int[Tensor, " n_backward"]:
        """Per slot, how many sources feed it: the valid rows form the prefix `[0, n_upstream)`."""
        counts = 1 + self.slot_layer * (self.n_heads + 1)
        if not self.parallel_attn_mlp:
            counts[torch.arange(self.n_layers) * self.block + self.block - 1] += self.n_heads
        counts[-1] = self.n_forward
        return counts

    @property
    def n_valid_edges(self) -> int:
        return int(self.n_upstream.sum())

    @cached_property
    def valid(self) -> Bool[Tensor, "n_forward n_backward"]:
        """Which edges exist."""
        return torch.arange(self.n_forward)[:, None] < self.n_upstream[None, :]

    @cached_property
    def slot_nodes(self) -> Bool[Tensor, "n_backward n_forward"]:
        """`[b, f]` True when slot `b` is an input of node `f` (a grouped k/v slot feeds every
        query head of its group; logits feeds no forward node)."""
        m = torch.zeros(self.n_backward, self.n_forward, dtype=torch.bool)
        H, Hk, heads = self.n_heads, self.n_slot_kv, torch.arange(self.n_heads)
        for layer in range(self.n_layers):
            base, first = layer * self.block, 1 + layer * (H + 1)
            m[base + heads, first + heads] = True
            for off in (H, H + Hk):
                m[base + off + heads // (H // Hk), first + heads] = True
            m[base + H + 2 * Hk, first + H] = True
        return m

    @cached_property
    def input_slots(self) -> tuple[tuple[int, ...], ...]:
        """Per forward node, the slots that are its inputs (empty for input)."""
        out: list[list[int]] = [[] for _ in range(self.n_forward)]
        for b, f in self.slot_nodes.nonzero().tolist():
            out[f].append(b)
        return tuple(tuple(x) for x in out)

    @cached_property
    def edge_index(self) -> tuple[Tensor, Tensor]:
        """Rows and columns of the valid edges, row-major (the order of every edge list)."""
        rows, cols = self.valid.nonzero(as_tuple=True)
        return rows, cols

    # ------------------------------------------------------------------ names
    @cached_property
    def forward_names(self) -> tuple[str, ...]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return tuple(names)

    @cached_property
    def backward_names(self) -> tuple[str, ...]:
        kv, names = ("g" if self.group_names else "h"), []
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}<q>" for h in range(self.n_heads)]
            for letter in "kv":
                names += [f"a{layer}.{kv}{g}<{letter}>" for g in range(self.n_slot_kv)]
            names.append(f"m{layer}")
        return tuple(names + ["logits"])

    @cached_property
    def edge_names(self) -> list[str]:
        """`src->dst` names of the valid edges, in `edge_index` order."""
        fwd, bwd = self.forward_names, self.backward_names
        rows, cols = self.edge_index
        return [f"{fwd[r]}->{bwd[c]}" for r, c in zip(rows.tolist(), cols.tolist())]

    @cached_property
    def _forward_lookup(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.forward_names)}

    @cached_property
    def _backward_lookup(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.backward_names)}

    def forward_index_of(self, name: str) -> int:
        """Row of a source node by name (`"input"`, `"a0.h1"`, `"m2"`)."""
        try:
            return self._forward_lookup[name]
        except (KeyError, TypeError):
            raise GimlensError(f"no source node named {name!r} in this graph") from None

    def backward_index_of(self, name: str) -> int:
        """Column of a destination slot by name (`"a1.h0<q>"`, `"a1.g0<k>"`, `"m0"`, `"logits"`)."""
        try:
            return self._backward_lookup[name]
        except (KeyError, TypeError):
            raise GimlensError(f"no destination slot named {name!r} in this graph") from None

    def edge_index_of(self, name: str) -> tuple[int, int]:
        """`(row, column)` of an edge by name (`"a0.h1->m2"`, `"input->a1.h0<q>"`)."""
        src, sep, dst = str(name).partition("->")
        if not sep:
            raise GimlensError(f"edge names look like 'src->dst', got {name!r}")
        row, col = self.forward_index_of(src), self.backward_index_of(dst)
        if not self.valid[row, col]:
            raise GimlensError(f"{name!r} is not an edge of this graph (source after destination)")
        return row, col

    @cached_property
    def node_specs(self) -> tuple[tuple[str, NodeKind, int | None, int | None, tuple[int, ...]], ...]:
        """Every node as `(name, kind, layer, head, forward rows)`: sources, KV-group nodes (grouped
        layout with fewer KV heads; rows = the query heads of the group) and `logits` (no rows)."""
        out = [("input", NodeKind.INPUT, None, None, (0,))]
        rep = self.n_heads // self.n_kv_heads
        for layer in range(self.n_layers):
            first = self.forward_index(layer, 0)
            out += [(f"a{layer}.h{h}", NodeKind.ATTENTION, layer, h, (first + h,)) for h in range(self.n_heads)]
            if self.group_names:
                out += [(f"a{layer}.g{g}", NodeKind.KV_GROUP, layer, g, tuple(range(first + g * rep, first + (g + 1) * rep)))
                        for g in range(self.n_kv_heads)]
            out.append((f"m{layer}", NodeKind.MLP, layer, None, (self.forward_index(layer),)))
        return tuple(out + [("logits", NodeKind.LOGITS, None, None, ())])

    # ------------------------------------------------------------------ k/v layouts
    def with_kv_edges(self, kv_edges: KVEdges | str) -> "Layout":
        """The same shape in another k/v layout."""
        return Layout.of(self.n_layers, self.n_heads, self.n_kv_heads, self.parallel_attn_mlp, kv_edges)

    @cached_property
    def kv_column_map(self) -> Int[Tensor, " n_backward_per_query_head"]:
        """For each column of the per-query-head layout, the matching column of the grouped one."""
        grouped = self.with_kv_edges(KVEdges.GROUPED)
        H, Hk = self.n_heads, self.n_kv_heads
        rep, j = H // Hk, torch.arange(3 * H + 1)
        within = torch.where(j < H, j, torch.where(j < 2 * H, H + (j - H) // rep,
                             torch.where(j < 3 * H, H + Hk + (j - 2 * H) // rep, H + 2 * Hk)))
        cols = (torch.arange(self.n_layers)[:, None] * grouped.block + within[None, :]).flatten()
        return torch.cat([cols, torch.tensor([grouped.n_backward - 1])])


@lru_cache(maxsize=32)
def _cached(n_layers: int, n_heads: int, n_kv_heads: int, parallel: bool, kv: KVEdges) -> Layout:
    return Layout(n_layers, n_heads, n_kv_heads, parallel, kv)
