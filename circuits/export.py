"""EAP-IG / MIB JSON and GraphML files of a [`Graph`][circuits.graph.Graph].

- **EAP-IG / MIB JSON** (`to_eap_json`): `{"cfg", "nodes": {name: {"in_graph"}}, "edges": {name:
  {"score", "in_graph"}}}` with per-query-head k/v edges; a graph with node scores (node-level
  circuits) also writes `"score"` for every source node, as EAP-IG does (NaN = unscored), and a
  neuron-level graph `"neurons"` (membership) and `"neurons_scores"`, one list of `d_model` values per
  source node. A `grouped` GQA graph is written through
  `Graph.as_kv_edges`: **each KV-head edge is copied to every query head of its group** (same
  score, same membership); loading gives a `per_query_head` graph (or, on request, `grouped`
  again: mean score and any-membership over the copies, exact for copies).
- **GraphML** (`to_graphml`): `Graph.to_networkx()` written by networkx: the circuit by default (its
  edges and nodes; a grouped k/v edge as one edge per query head reading it, attribute `kv_group`), or
  with `include="all"` every edge with its `in_graph` flag (an exact round trip).

Both are written atomically by `gimlens.runtime.atomic_write` (complete or not at all, umask
honoured) and are reachable from `graph.save(path, format="eap-json" | "graphml")`; the own JSON
format is `Graph.to_json` / `Graph.from_json`; DOT and images are in [`circuits.render`][circuits.render].
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from gimlens.errors import GimlensError
from gimlens.validation import coerce_enum
from gimlens.runtime import atomic_write, read_text

from .files import Format, Include
from .graph import Graph, KVEdges

__all__ = ["to_eap_json", "from_eap_json", "to_graphml", "from_graphml", "save", "load"]


def _read_json(path: str | os.PathLike) -> Any:
    text = read_text(path, "circuit JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise GimlensError(f"cannot read circuit JSON {str(path)!r}: {e}") from e


def _graph_for(cfg: Any, model: Any) -> Graph:
    """The full per-query-head graph of a file's cfg, checked against `model` when given."""
    if not isinstance(cfg, dict):
        raise GimlensError(f"circuit file has no 'cfg' mapping (got {type(cfg).__name__})")
    graph = Graph.from_model(cfg, kv_edges=KVEdges.PER_QUERY_HEAD)
    if model is not None:
        graph.check_matches(model)
    return graph


# ---------------------------------------------------------------------- EAP-IG / MIB JSON
def _json_float(x: float) -> str:
    return repr(x) if math.isfinite(x) else json.dumps(x)


def to_eap_json(graph: Graph, path: str | os.PathLike) -> Path:
    """Write the EAP-IG / MIB JSON schema (GQA k/v edges per query head, copied from the group).

    Scores are written with 9 significant digits: exact for float32 (the dense tensors' dtype).

    Examples:
        >>> import json, os, tempfile
        >>> g = Graph(n_layers=1, n_heads=2, n_kv_heads=1, d_model=8)
        >>> path = to_eap_json(g, os.path.join(tempfile.mkdtemp(), "mib.json"))
        >>> sorted(json.load(open(path))["edges"])[:3]
        ['a0.h0->logits', 'a0.h0->m0', 'a0.h1->logits']
    """
    pq = graph.as_kv_edges(KVEdges.PER_QUERY_HEAD)
    c = pq.cfg
    cfg = {"n_layers": c["n_layers"], "n_heads": c["n_heads"], "d_model": c["d_model"],
           "parallel_attn_mlp": c["parallel_attn_mlp"]}
    if c["n_kv_heads"] != c["n_heads"]:
        cfg["n_key_value_heads"] = c["n_kv_heads"]
    if c["model_name"]:
        cfg["model_name"] = c["model_name"]
    nodes = {n.name: {"in_graph": n.in_graph, **({} if n.score is None else {"score": n.score})}
             for n in pq.nodes.values()}
    for field, values in (("neurons", pq.neurons_in_graph), ("neurons_scores", pq.neuron_scores)):
        if values is not None:  # neuron-level circuit: one list of d_model values per source node
            for name, row in zip(pq.forward_names, values.cpu().tolist()):
                nodes[name][field] = row
    valid = pq.valid
    scores = pq.scores.cpu()[valid].tolist()
    members = pq.in_graph.cpu()[valid].tolist()
    # 9 significant digits identify a float32 exactly; NaN / inf as Python's json writes them.
    number = "{:.9g}" if bool(torch.isfinite(pq.scores).all()) else "{}"
    scores = scores if number == "{:.9g}" else list(map(_json_float, scores))
    entry = ('"{}": {{"score": ' + number + ', "in_graph": {}}}').format
    edges = ", ".join(map(entry, pq.layout.edge_names, scores, map(("false", "true").__getitem__, members)))
    text = f'{{"cfg": {json.dumps(cfg)}, "nodes": {json.dumps(nodes)}, "edges": {{{edges}}}}}'
    return atomic_write(path, text)


def from_eap_json(path: str | os.PathLike, *, model: Any = None,
                  kv_edges: KVEdges | str = "per_query_head") -> Graph:
    """Load an EAP-IG / MIB JSON circuit (edges absent from the file: score 0, not in the graph).

    Args:
        model: if given, the file's cfg must match it (else `GimlensError`).
        kv_edges: `"per_query_head"` (the file's layout) or `"grouped"` (merge GQA copies:
            mean score, any membership).
    """
    doc = _read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("edges"), dict):
        raise GimlensError(f"{str(path)!r} is not an EAP-IG circuit file (needs 'cfg' and 'edges')")
    graph = _graph_for(doc.get("cfg"), model)
    names, infos = list(doc["edges"].keys()), list(doc["edges"].values())
    try:
        scores = torch.tensor([float(i.get("score") or 0.0) for i in infos], dtype=torch.float32)
        members = torch.tensor([bool(i.get("in_graph", False)) for i in infos], dtype=torch.bool)
    except (AttributeError, TypeError, ValueError) as e:
        raise GimlensError(f"{str(path)!r}: edge entries must be {{'score': float, 'in_graph': bool}} ({e})") from e
    s = torch.zeros(graph.n_forward, graph.n_backward)
    m = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.bool)
    if names == graph.layout.edge_names:  # our own order: no per-name lookup
        s[graph.valid], m[graph.valid] = scores, members
    else:
        idx = torch.tensor([graph.edge_index(n) for n in names], dtype=torch.long).view(-1, 2)
        s[idx[:, 0], idx[:, 1]], m[idx[:, 0], idx[:, 1]] = scores, members
    graph.scores, graph.in_graph = s, m
    nodes = doc.get("nodes")
    if isinstance(nodes, dict):
        entries = [nodes.get(n) or {} for n in graph.forward_names]
        try:
            graph.nodes_in_graph = torch.tensor([bool(e.get("in_graph", False)) for e in entries])
            if any("score" in e for e in entries):  # node-level circuit: unscored nodes NaN
                graph.node_scores = torch.tensor([math.nan if e.get("score") is None else float(e["score"])
                                                  for e in entries])
            d = graph.cfg["d_model"]
            if any("neurons" in e for e in entries):  # neuron-level circuit: absent rows out
                graph.neurons_in_graph = torch.tensor([e.get("neurons") or [False] * d for e in entries])
            if any("neurons_scores" in e for e in entries):  # absent rows unscored (NaN)
                graph.neuron_scores = torch.tensor([[math.nan if v is None else float(v) for v in
                                                     (e.get("neurons_scores") or [None] * d)] for e in entries])
        except (AttributeError, TypeError, ValueError) as e:
            raise GimlensError(f"{str(path)!r}: node entries must be {{'in_graph': bool, 'score': float}} ({e})") from e
    else:
        graph.nodes_in_graph = m.any(1)
    kv = coerce_enum(KVEdges, kv_edges, "kv_edges")
    return graph.as_kv_edges(kv_edges) if kv is not graph.kv_edges else graph


# ---------------------------------------------------------------------- GraphML
def to_graphml(graph: Graph, path: str | os.PathLike, *, weight: str = "score",
               include: Include = "in_graph") -> Path:
    """Write GraphML via networkx (cfg as graph attributes): the circuit (`include="in_graph"`, as
    `Graph.to_networkx()`), or every edge with its `in_graph` flag (`include="all"`, an exact round trip).

    Examples:
        >>> import os, tempfile
        >>> g = Graph(n_layers=1, n_heads=2, d_model=8)
        >>> path = to_graphml(g, os.path.join(tempfile.mkdtemp(), "c.graphml"), include="all")
        >>> from_graphml(path).equals(g)
        True
    """
    import networkx as nx

    G = graph.to_networkx(weight=weight, include=include)
    return atomic_write(path, lambda f: nx.write_graphml(G, f))


def from_graphml(path: str | os.PathLike, *, weight: str = "score", model: Any = None) -> Graph:
    """Load `to_graphml` output."""
    import networkx as nx

    try:
        G = nx.read_graphml(path)
    except Exception as e:  # networkx raises several types for damaged files
        raise GimlensError(f"cannot read GraphML {str(path)!r}: {e}") from e
    return Graph.from_networkx(G, weight=weight, model=model)


# ---------------------------------------------------------------------- dispatch
def save(graph: Graph, path: str | os.PathLike, format: Format | str | None = None, **kwargs: Any) -> Path:
    """`graph.save(path, format, **kwargs)`: write in the format named by `format` or the suffix."""
    return graph.save(path, format, **kwargs)


def load(path: str | os.PathLike, format: Format | str | None = None, *, model: Any = None) -> Graph:
    """`Graph.load(path, format, model=model)`: own or EAP-IG JSON (told apart by content) or GraphML."""
    return Graph.load(path, format, model=model)

