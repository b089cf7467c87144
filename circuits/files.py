"""The circuit graph's own files: its JSON schema, networkx views, and `save` / `load` for every format.

[`GraphFiles`][circuits.files.GraphFiles] is the part of [`Graph`][circuits.graph.Graph] that
reads and writes: `to_json()` / `from_json(text)` (own schema, exact float32 round trip),
`to_networkx()` / `from_networkx(G)`, and `save(path, format=None)` / `load(path, format=None)`,
which dispatch through one table of formats, `FORMATS`, naming each format's writer and reader:
[`circuits.export`][circuits.export] (EAP-IG / MIB JSON, GraphML), [`circuits.render`][circuits.render]
(DOT, images) and [`circuits.viewer`][circuits.viewer] (the interactive HTML page). A format's module is
imported when that format is first written or read (so matplotlib loads only for images); nothing
registers itself on import. Every writer goes through `gimlens.runtime.atomic_write` (complete or not at
all, umask honoured).

[`view_edges`][circuits.files.view_edges] is the edge list every view draws (networkx, GraphML, DOT,
images, HTML): on grouped-query models a grouped k/v edge becomes one edge per query head that reads it.
"""

from __future__ import annotations

import base64
import importlib
import json
import math
import os
import re
from enum import Enum
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from gimlens.errors import GimlensError
from gimlens.runtime import atomic_write, coerce_enum, read_text

from .layout import KVEdges, NodeKind

__all__ = ["Format", "Include", "FORMATS", "GraphFiles", "ViewEdge", "view_edges", "format_of"]

Include = Literal["in_graph", "all"]
_FORMAT_TAG, _VERSION = "gimlens.circuit", 1


class Format(str, Enum):
    """File formats of `Graph.save` / `Graph.load` (suffix in brackets)."""

    JSON = "json"  #: own JSON [.json]; loading a .json file also reads EAP-IG files (told apart by content)
    EAP_JSON = "eap-json"  #: EAP-IG / MIB JSON (pass `format="eap-json"` to write it)
    GRAPHML = "graphml"  #: [.graphml]
    DOT = "dot"  #: Graphviz text [.dot, .gv]
    PNG = "png"  #: image [.png]
    SVG = "svg"  #: image [.svg]
    PDF = "pdf"  #: image [.pdf]
    HTML = "html"  #: interactive viewer, one self-contained page [.html]


_SUFFIXES = {".json": Format.JSON, ".graphml": Format.GRAPHML, ".dot": Format.DOT, ".gv": Format.DOT,
             ".png": Format.PNG, ".svg": Format.SVG, ".pdf": Format.PDF, ".html": Format.HTML}
#: Format -> (module under `circuits`, writer name, reader name or None); imported on first use.
FORMATS: dict[Format, tuple[str, str, str | None]] = {
    Format.EAP_JSON: ("export", "to_eap_json", "from_eap_json"),
    Format.GRAPHML: ("export", "to_graphml", "from_graphml"),
    Format.DOT: ("render", "write_dot", None),
    Format.PNG: ("render", "render", None),
    Format.SVG: ("render", "render", None),
    Format.PDF: ("render", "render", None),
    Format.HTML: ("viewer", "to_html", None),
}


def _function(fmt: Format, which: int) -> Any:
    module, *names = FORMATS[fmt]
    return getattr(importlib.import_module(f"{__package__}.{module}"), names[which])


def format_of(path: str | os.PathLike, format: Format | str | None) -> Format:
    """The format given, else the one the suffix names; unknown -> `GimlensError`."""
    if format is not None:
        return coerce_enum(Format, format, "circuit file format")
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise GimlensError(f"unknown file suffix {suffix!r} for {str(path)!r}; expected one of "
                           f"{sorted(_SUFFIXES)} (or pass format=)")
    return _SUFFIXES[suffix]


class ViewEdge(NamedTuple):
    """One edge of a view: between nodes (`input`, `a{l}.h{h}`, `m{l}`, `logits`), never a KV group."""

    key: str  #: per-head name, `src->dst` or `src->a{l}.h{h}<q|k|v>` (the EAP-IG / MIB spelling)
    src: str
    dst: str
    qkv: str | None
    score: float
    in_graph: bool
    kv_group: int | None  #: KV head of a grouped k/v edge (its copies share score and membership)
    name: str  #: the graph's own edge name (`src->a{l}.g{g}<k>` for a grouped k/v edge)


def view_edges(graph: Any, include: Include = "in_graph", top_k: int | None = None) -> list[ViewEdge]:
    """The edges a view shows, in the graph's edge order: the in-graph ones (`"in_graph"`) or all
    valid ones (`"all"`); with `top_k`, only the `top_k` graph edges of largest |score| among them
    (ties: the earlier edge).

    A grouped k/v edge `src->a{l}.g{g}<k>` (GQA model, `kv_edges="grouped"`) is shown as one edge
    `src->a{l}.h{h}<k>` with `kv_group=g` for each query head `h` of group `g` that is in the circuit
    (`nodes_in_graph`; every head of the group with `include="all"`, or when none is in). In a pruned
    circuit every shown edge then lies on a path `input -> logits`.

    Examples:
        >>> from circuits.graph import Graph
        >>> g = Graph(n_layers=2, n_heads=2, n_kv_heads=1, d_model=8).reset()
        >>> for e in ("input->a1.g0<k>", "input->a1.h1<q>", "a1.h1->logits"):
        ...     g.in_graph[g.edge_index(e)] = True
        >>> _ = g.prune()
        >>> [(e.key, e.kv_group) for e in view_edges(g)]
        [('input->a1.h1<q>', None), ('input->a1.h1<k>', 0), ('a1.h1->logits', None)]
    """
    if include not in ("in_graph", "all"):
        raise GimlensError(f"include must be 'in_graph' or 'all', got {include!r}")
    lay = graph.layout
    rows, cols = lay.edge_index
    if include == "in_graph":
        keep = graph.in_graph.cpu()[rows, cols]
        rows, cols = rows[keep], cols[keep]
    scores = graph.scores.cpu()[rows, cols].tolist()
    members = graph.in_graph.cpu()[rows, cols].tolist()
    fwd, bwd = lay.forward_names, lay.backward_names
    alive = graph.nodes_in_graph.cpu().tolist()
    rep = lay.n_heads // lay.n_kv_heads
    out: list[ViewEdge] = []
    for r, c, s, m in zip(rows.tolist(), cols.tolist(), scores, members):
        slot, src = bwd[c], fwd[r]
        name = f"{src}->{slot}"
        if not slot.endswith(">"):
            out.append(ViewEdge(name, src, slot, None, s, m, None, name))
            continue
        dst, qkv = slot[:-3], slot[-2]
        group = re.fullmatch(r"a(\d+)\.g(\d+)", dst)
        if group is None:
            out.append(ViewEdge(name, src, dst, qkv, s, m, None, name))
            continue
        layer, g = int(group[1]), int(group[2])
        heads = list(range(g * rep, (g + 1) * rep))
        if include == "in_graph":
            heads = [h for h in heads if alive[lay.forward_index(layer, h)]] or heads
        out += [ViewEdge(f"{src}->a{layer}.h{h}<{qkv}>", src, f"a{layer}.h{h}", qkv, s, m, g, name) for h in heads]
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise GimlensError(f"top_k must be a non-negative integer or None, got {top_k!r}")
        score = {e.name: e.score for e in out}  # first appearance = edge order
        keep = set(sorted(score, key=lambda n: -abs(score[n]))[:top_k])
        out = [e for e in out if e.name in keep]
    return out


def _edge_name(src: str, dst: str, data: dict) -> str:
    """The graph's edge name of a networkx edge `src -> dst` with attributes `data`."""
    if "kv_group" in data:
        dst = f"{dst.split('.')[0]}.g{int(data['kv_group'])}"
    return f"{src}->{dst}<{data['qkv']}>" if data.get("qkv") else f"{src}->{dst}"


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.tobytes()).decode("ascii")


class GraphFiles:
    """Files and views of a graph (a part of `Graph`: it uses the graph's `cfg`, `layout`,
    tensors, `nodes` / `edges` views, `from_model` and `check_matches`)."""

    def to_networkx(self, *, include: Include = "in_graph", weight: str = "score"):
        """A `networkx.MultiDiGraph` of the circuit: by default only the in-graph edges and the
        nodes they touch; `include="all"` gives every node and valid edge with `in_graph` flags.

        Edges are [`view_edges`][circuits.files.view_edges]: a grouped k/v edge (GQA models,
        `kv_edges="grouped"`) is one edge to each query head of its KV group that is in the circuit,
        with attribute `kv_group`, so every node of a pruned circuit lies on a path `input -> logits`
        and the nodes are exactly `nodes_in_graph` plus `logits`.

        Edge key: the per-head edge name; attributes `weight` (the score), `in_graph`, `qkv`
        (attention inputs), `kv_group` (grouped k/v copies). Node attributes: `kind`, `layer`,
        `head`, `score` (when set), `in_graph` (neurons are not carried: use `to_json` or the EAP-IG
        file for neuron-level circuits). `G.graph` holds the cfg.

        Examples:
            >>> from circuits.graph import Graph
            >>> g = Graph(n_layers=1, n_heads=2, d_model=8).reset()
            >>> g.in_graph[g.edge_index("input->logits")] = True
            >>> sorted(g.to_networkx().nodes), g.to_networkx(include="all").number_of_edges()
            (['input', 'logits'], 13)
        """
        import networkx as nx

        edges = view_edges(self, include)
        touched = {n for e in edges for n in (e.src, e.dst)}
        G = nx.MultiDiGraph(**{k: v for k, v in self.cfg.items() if v is not None})
        for node in self.nodes.values():
            if node.kind is not NodeKind.KV_GROUP and (include == "all" or node.name in touched):
                attrs = {"kind": node.kind.value, "in_graph": node.in_graph}
                attrs.update({k: getattr(node, k) for k in ("layer", "head", "score") if getattr(node, k) is not None})
                G.add_node(node.name, **attrs)
        for e in edges:
            extra = {"qkv": e.qkv} if e.qkv else {}
            if e.kv_group is not None:
                extra["kv_group"] = e.kv_group
            G.add_edge(e.src, e.dst, key=e.key, **{weight: e.score, "in_graph": e.in_graph}, **extra)
        return G

    @classmethod
    def from_networkx(cls, G: Any, *, weight: str = "score", model: Any = None) -> Any:
        """Rebuild a graph from `to_networkx` output (or any graph with the same names).

        The cfg comes from `G.graph` (or `model` when `G.graph` has none); edges absent from `G`
        get score 0 and are out of the circuit; node `in_graph` and `score` attributes are read
        back (a node without a score: NaN, unscored).
        """
        cfg = dict(G.graph)
        if "n_layers" not in cfg:
            if model is None:
                raise GimlensError("networkx graph has no cfg in G.graph; pass model= to give the shape")
            graph = cls.from_model(model, kv_edges=cfg.get("kv_edges", "grouped"))
        else:
            graph = cls._from_cfg(cfg, model)
        index = [graph.edge_index(_edge_name(u, v, d)) for u, v, d in G.edges(data=True)]
        rows, cols = [i[0] for i in index], [i[1] for i in index]
        s = torch.zeros(graph.n_forward, graph.n_backward)
        m = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.bool)
        s[rows, cols] = torch.tensor([float(d.get(weight, 0.0)) for _, _, d in G.edges(data=True)])
        m[rows, cols] = torch.tensor([bool(d.get("in_graph", False)) for _, _, d in G.edges(data=True)])
        graph.scores, graph.in_graph = s, m
        names = graph.layout.forward_names
        graph.nodes_in_graph = torch.tensor([bool(G.nodes[n].get("in_graph", False)) if n in G.nodes else False
                                             for n in names])
        if any("score" in G.nodes[n] for n in names if n in G.nodes):
            graph.node_scores = torch.tensor([float(G.nodes[n].get("score", math.nan)) if n in G.nodes else math.nan
                                              for n in names])
        return graph

    # ------------------------------------------------------------------ own JSON and files
    def to_json(self, *, indent: int | None = None) -> str:
        """The graph in gimlens' own JSON schema: `{"format": "gimlens.circuit", "version": 1,
        "cfg", "scores", "in_graph", "nodes_in_graph"}` (and `"node_scores"`, `"neuron_scores"`,
        `"neurons_in_graph"` when the graph has them), the valid edges in row-major order,
        scores as base64 of little-endian float32 (exact), memberships as base64 `numpy.packbits`.

        Examples:
            >>> from circuits.graph import Graph
            >>> g = Graph(n_layers=1, n_heads=2, d_model=8)
            >>> g.scores[0, -1] = 0.1
            >>> Graph.from_json(g.to_json()).equals(g)
            True
        """
        valid = self.valid
        doc = {
            "format": _FORMAT_TAG, "version": _VERSION, "cfg": self.cfg, "n_valid_edges": self.n_valid_edges,
            "encoding": "valid edges row-major; scores base64 float32 little-endian; in_graph and "
                        "nodes_in_graph base64 numpy.packbits (big bit order)",
            "scores": _b64(self.scores.cpu()[valid].numpy().astype("<f4")),
            "in_graph": _b64(np.packbits(self.in_graph.cpu()[valid].numpy())),
            "nodes_in_graph": _b64(np.packbits(self.nodes_in_graph.cpu().numpy())),
        }
        if self.node_scores is not None:  # optional: one float32 per source node, NaN = unscored
            doc["node_scores"] = _b64(self.node_scores.cpu().numpy().astype("<f4"))
        if self.neuron_scores is not None:  # optional: [n_forward, d_model] float32, row-major
            doc["neuron_scores"] = _b64(self.neuron_scores.cpu().numpy().astype("<f4"))
        if self.neurons_in_graph is not None:  # optional: [n_forward, d_model] packbits, row-major
            doc["neurons_in_graph"] = _b64(np.packbits(self.neurons_in_graph.cpu().numpy()))
        return json.dumps(doc, indent=indent)

    @classmethod
    def from_json(cls, text: str, *, model: Any = None) -> Any:
        """Inverse of `to_json` (JSON text; read a file with `Graph.load`). With `model`, the cfg
        must match it (else `GimlensError`)."""
        if not isinstance(text, str) or not text.lstrip().startswith("{"):
            raise GimlensError("Graph.from_json takes JSON text (to read a file, use Graph.load(path)); "
                               f"got {str(text)[:60]!r}")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise GimlensError(f"circuit JSON does not parse: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT_TAG:
            hint = " (it looks like an EAP-IG file: use circuits.export.from_eap_json)" if (
                isinstance(doc, dict) and "edges" in doc) else ""
            raise GimlensError(f"not a gimlens circuit JSON document{hint}")
        if doc.get("version") != _VERSION:
            raise GimlensError(f"circuit JSON schema version {doc.get('version')!r}; this gimlens reads {_VERSION}")
        graph = cls._from_cfg(doc.get("cfg"), model)
        n = graph.n_valid_edges
        try:
            scores = np.frombuffer(base64.b64decode(doc["scores"]), dtype="<f4")
            members = np.unpackbits(np.frombuffer(base64.b64decode(doc["in_graph"]), np.uint8))[:n]
            nodes = np.unpackbits(np.frombuffer(base64.b64decode(doc["nodes_in_graph"]), np.uint8))[:graph.n_forward]
        except (KeyError, ValueError, TypeError) as e:
            raise GimlensError(f"damaged circuit JSON: {e}") from e
        if len(scores) != n or len(members) != n or len(nodes) != graph.n_forward:
            raise GimlensError(f"circuit JSON holds {len(scores)} scores for a cfg with {n} valid edges")
        s = torch.zeros(graph.n_forward, graph.n_backward)
        m = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.bool)
        s[graph.valid], m[graph.valid] = torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(members.astype(bool))
        graph.scores, graph.in_graph = s, m
        graph.nodes_in_graph = torch.from_numpy(nodes.astype(bool))
        if "node_scores" in doc:
            node_scores = np.frombuffer(base64.b64decode(doc["node_scores"]), dtype="<f4")
            if len(node_scores) != graph.n_forward:
                raise GimlensError(f"circuit JSON holds {len(node_scores)} node scores for {graph.n_forward} nodes")
            graph.node_scores = torch.from_numpy(node_scores.astype(np.float32))
        shape = (graph.n_forward, graph.cfg["d_model"])
        try:
            if "neurons_in_graph" in doc:
                bits = np.unpackbits(np.frombuffer(base64.b64decode(doc["neurons_in_graph"]), np.uint8))
                graph.neurons_in_graph = torch.from_numpy(bits[: shape[0] * shape[1]].astype(bool).reshape(shape))
            if "neuron_scores" in doc:
                values = np.frombuffer(base64.b64decode(doc["neuron_scores"]), dtype="<f4")
                graph.neuron_scores = torch.from_numpy(values.astype(np.float32).reshape(shape))
        except ValueError as e:
            raise GimlensError(f"damaged neuron fields in circuit JSON: {e}") from e
        return graph

    @classmethod
    def _from_cfg(cls, cfg: Any, model: Any, kv_edges: KVEdges | str | None = None) -> Any:
        """A full graph from a file's cfg mapping, checked against `model` when given."""
        if not isinstance(cfg, dict):
            raise GimlensError(f"circuit file has no 'cfg' mapping (got {type(cfg).__name__})")
        graph = cls.from_model(cfg, kv_edges=kv_edges or cfg.get("kv_edges", "grouped"))
        if model is not None:
            graph.check_matches(model)
        return graph

    def save(self, path: str | os.PathLike, format: Format | str | None = None, **kwargs: Any) -> Path:
        """Write the graph atomically (complete or not at all; umask honoured) in `format` or the
        one its suffix names (see `Format`); `kwargs` go to the format's writer. Returns the path.

        Examples:
            >>> import os, tempfile
            >>> from circuits.graph import Graph
            >>> g = Graph(n_layers=1, n_heads=2, d_model=8)
            >>> Graph.load(g.save(os.path.join(tempfile.mkdtemp(), "c.json"))).equals(g)
            True
        """
        fmt = format_of(path, format)
        if fmt is Format.JSON:
            return atomic_write(path, self.to_json(**kwargs))
        _function(fmt, 0)(self, path, **kwargs)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, format: Format | str | None = None, *, model: Any = None) -> Any:
        """Read own or EAP-IG JSON (told apart by content) or GraphML; with `model`, the file's
        cfg must match it."""
        fmt = format_of(path, format)
        if fmt is Format.JSON:
            text = read_text(path, "circuit file")
            if re.search(r'"format"\s*:\s*"' + re.escape(_FORMAT_TAG), text[:64]):
                return cls.from_json(text, model=model)
            fmt = Format.EAP_JSON
        if FORMATS[fmt][2] is None:
            loadable = [Format.JSON.value] + [f.value for f, entry in FORMATS.items() if entry[2]]
            raise GimlensError(f"cannot load {fmt.value} files; loadable: {loadable}")
        return _function(fmt, 1)(path, model=model)

