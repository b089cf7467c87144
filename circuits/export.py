"""Views and files of a :class:`~circuits.graph.Graph`: networkx, JSON (own and EAP-IG/MIB), GraphML,
DOT, and PNG/SVG/PDF images (matplotlib, no graphviz needed).

The dense tensors stay the source of truth; everything here is built on demand.

* **Own JSON** (``to_json``): ``{"format": "gimlens.circuit", "version": 1, "cfg": ..., "scores",
  "in_graph", "nodes_in_graph"}`` with the valid edges in row-major order: scores as base64 of
  little-endian float32 (exact round trip), memberships as base64 of ``numpy.packbits``.
* **EAP-IG / MIB JSON** (``to_eap_json``): ``{"cfg", "nodes": {name: {"in_graph"}}, "edges":
  {name: {"score", "in_graph"}}}`` with per-query-head k/v edges. A ``grouped`` GQA graph is
  written through :meth:`Graph.as_kv_edges`: **each KV-head edge is copied to every query head of
  its group** (same score, same membership); loading gives a ``per_query_head`` graph (or, on
  request, ``grouped`` again: mean score and any-membership over the copies, exact for copies).
* Every file is written atomically (temporary file in the same folder, then ``os.replace``); an
  unknown suffix raises :class:`GimlensError` before anything is written.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from gimlens.errors import GimlensError

from .graph import Graph, KVEdges, NodeKind

__all__ = ["Format", "atomic_write", "to_networkx", "from_networkx", "to_json", "from_json",
           "to_eap_json", "from_eap_json", "to_graphml", "from_graphml", "to_dot", "render",
           "save", "load"]

Include = Literal["all", "in_graph"]
_FORMAT_TAG, _VERSION = "gimlens.circuit", 1
_CFG_KEYS = ("n_layers", "n_heads", "n_kv_heads", "d_model", "parallel_attn_mlp", "kv_edges", "model_name")
QKV_COLORS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#ff7f0e", None: "#555555"}


class Format(str, Enum):
    """File formats of :func:`save` / :func:`load` (suffix in brackets)."""

    JSON = "json"  #: own JSON [.json]
    EAP_JSON = "eap-json"  #: EAP-IG / MIB JSON (pass ``format="eap-json"``; loading auto-detects)
    GRAPHML = "graphml"  #: [.graphml]
    DOT = "dot"  #: Graphviz text [.dot, .gv]
    PNG = "png"  #: image [.png]
    SVG = "svg"  #: image [.svg]
    PDF = "pdf"  #: image [.pdf]


_SUFFIXES = {".json": Format.JSON, ".graphml": Format.GRAPHML, ".dot": Format.DOT, ".gv": Format.DOT,
             ".png": Format.PNG, ".svg": Format.SVG, ".pdf": Format.PDF}
_IMAGES = (Format.PNG, Format.SVG, Format.PDF)


def _check_include(include: Any) -> None:
    if include not in ("all", "in_graph"):
        raise GimlensError(f"include must be 'all' or 'in_graph', got {include!r}")


def _format_of(path: str | os.PathLike, format: Format | str | None) -> Format:
    if format is not None:
        try:
            return Format(format)
        except ValueError:
            raise GimlensError(f"format must be one of {[f.value for f in Format]}, got {format!r}") from None
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise GimlensError(f"unknown file suffix {suffix!r} for {str(path)!r}; expected one of "
                           f"{sorted(_SUFFIXES)} (or pass format=)")
    return _SUFFIXES[suffix]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then move it into place.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise GimlensError(f"folder {str(path.parent)!r} does not exist (writing {str(path)!r})")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def _read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise GimlensError(f"cannot read circuit JSON {str(path)!r}: {e}") from e


def _graph_from_cfg(cfg: Any, model: Any, kv_edges: KVEdges | str | None = None) -> Graph:
    if not isinstance(cfg, dict):
        raise GimlensError(f"circuit file has no 'cfg' mapping (got {type(cfg).__name__})")
    if kv_edges is not None:
        cfg = {**cfg, "kv_edges": kv_edges}
    graph = Graph.from_model(cfg, kv_edges=cfg.get("kv_edges", "grouped"))
    if model is not None:
        graph.check_matches(model)
    return graph


# ---------------------------------------------------------------------- networkx
def to_networkx(graph: Graph, *, weight: str = "score", include: Include = "all"):
    """A ``networkx.MultiDiGraph``: one edge per graph edge (key = edge name).

    Edge attributes: ``weight`` (the score), ``in_graph``, ``qkv`` (attention inputs only). Node
    attributes: ``kind``, ``layer``, ``head`` (when set), ``in_graph``. ``G.graph`` holds the cfg.
    Grouped k/v inputs end at ``KV_GROUP`` nodes ``a{l}.g{g}``. ``include="in_graph"`` keeps only
    in-graph edges (all nodes stay).

    Example:
        >>> G = to_networkx(Graph(n_layers=1, n_heads=2, d_model=8))
        >>> G.number_of_edges(), G.edges["input", "a0.h1", "input->a0.h1<k>"]
        (13, {'score': 0.0, 'in_graph': True, 'qkv': 'k'})
    """
    import networkx as nx

    _check_include(include)
    G = nx.MultiDiGraph(**{k: v for k, v in graph.cfg.items() if v is not None})
    for node in graph.nodes.values():
        attrs = {"kind": node.kind.value, "in_graph": node.in_graph}
        attrs.update({k: getattr(node, k) for k in ("layer", "head") if getattr(node, k) is not None})
        G.add_node(node.name, **attrs)
    for e in graph.edges.values():
        if include == "in_graph" and not e.in_graph:
            continue
        attrs = {weight: e.score, "in_graph": e.in_graph}
        if e.qkv is not None:
            attrs["qkv"] = e.qkv
        G.add_edge(e.src, e.dst, key=e.name, **attrs)
    return G


def from_networkx(G: Any, *, weight: str = "score", model: Any = None) -> Graph:
    """Rebuild a Graph from :func:`to_networkx` output (or any graph with the same names).

    The cfg comes from ``G.graph`` (or ``model`` when ``G.graph`` has none); edges absent from
    ``G`` get score 0 and are out of the circuit; node ``in_graph`` attributes are read back.
    """
    cfg = {k: G.graph[k] for k in _CFG_KEYS if k in G.graph}
    if "n_layers" not in cfg:
        if model is None:
            raise GimlensError("networkx graph has no cfg in G.graph; pass model= to give the shape")
        graph = Graph.from_model(model, kv_edges=G.graph.get("kv_edges", "grouped"))
    else:
        graph = _graph_from_cfg(cfg, model)
    rows, cols, scores, members = [], [], [], []
    for u, v, data in G.edges(data=True):
        qkv = data.get("qkv")
        row, col = graph.edge_index(f"{u}->{v}<{qkv}>" if qkv else f"{u}->{v}")
        rows.append(row)
        cols.append(col)
        scores.append(float(data.get(weight, 0.0)))
        members.append(bool(data.get("in_graph", False)))
    s = torch.zeros(graph.n_forward, graph.n_backward)
    m = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.bool)
    s[rows, cols] = torch.tensor(scores, dtype=torch.float32)
    m[rows, cols] = torch.tensor(members, dtype=torch.bool)
    graph.scores, graph.in_graph = s, m
    names = graph.forward_names
    graph.nodes_in_graph = torch.tensor([bool(G.nodes[n].get("in_graph", False)) if n in G.nodes else False
                                         for n in names])
    return graph


# ---------------------------------------------------------------------- own JSON
def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.tobytes()).decode("ascii")


def to_json(graph: Graph, path: str | os.PathLike) -> Path:
    """Write the graph in gimlens' own compact JSON schema (exact float32 round trip).

    Example:
        >>> import os, tempfile
        >>> g = Graph(n_layers=1, n_heads=2, d_model=8)
        >>> g.scores[0, -1] = 0.1
        >>> path = to_json(g, os.path.join(tempfile.mkdtemp(), "circuit.json"))
        >>> from_json(path).equals(g)
        True
    """
    valid = graph.valid
    scores = graph.scores.cpu()[valid].numpy().astype("<f4")
    doc = {
        "format": _FORMAT_TAG, "version": _VERSION, "cfg": graph.cfg,
        "n_valid_edges": graph.n_valid_edges,
        "encoding": "valid edges row-major; scores base64 float32 little-endian; in_graph and "
                    "nodes_in_graph base64 numpy.packbits (big bit order)",
        "scores": _b64(scores),
        "in_graph": _b64(np.packbits(graph.in_graph.cpu()[valid].numpy())),
        "nodes_in_graph": _b64(np.packbits(graph.nodes_in_graph.cpu().numpy())),
    }
    return _write_text(path, json.dumps(doc))


def from_json(path: str | os.PathLike, *, model: Any = None) -> Graph:
    """Load :func:`to_json` output; with ``model`` the cfg must match it (else GimlensError)."""
    doc = _read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT_TAG:
        hint = " (it looks like an EAP-IG file: use from_eap_json)" if isinstance(doc, dict) and "edges" in doc else ""
        raise GimlensError(f"{str(path)!r} is not a gimlens circuit JSON file{hint}")
    if doc.get("version") != _VERSION:
        raise GimlensError(f"{str(path)!r} has schema version {doc.get('version')!r}; this gimlens reads {_VERSION}")
    graph = _graph_from_cfg(doc.get("cfg"), model)
    n = graph.n_valid_edges
    try:
        scores = np.frombuffer(base64.b64decode(doc["scores"]), dtype="<f4")
        members = np.unpackbits(np.frombuffer(base64.b64decode(doc["in_graph"]), np.uint8))[:n]
        nodes = np.unpackbits(np.frombuffer(base64.b64decode(doc["nodes_in_graph"]), np.uint8))[:graph.n_forward]
    except (KeyError, ValueError, TypeError) as e:
        raise GimlensError(f"{str(path)!r} is a damaged circuit file: {e}") from e
    if len(scores) != n or len(members) != n or len(nodes) != graph.n_forward:
        raise GimlensError(f"{str(path)!r} holds {len(scores)} scores for a cfg with {n} valid edges")
    s = torch.zeros(graph.n_forward, graph.n_backward)
    m = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.bool)
    s[graph.valid] = torch.from_numpy(scores.astype(np.float32))
    m[graph.valid] = torch.from_numpy(members.astype(bool))
    graph.scores, graph.in_graph = s, m
    graph.nodes_in_graph = torch.from_numpy(nodes.astype(bool))
    return graph


# ---------------------------------------------------------------------- EAP-IG / MIB JSON
def _json_float(x: float) -> str:
    return repr(x) if math.isfinite(x) else json.dumps(x)


def to_eap_json(graph: Graph, path: str | os.PathLike) -> Path:
    """Write the EAP-IG / MIB JSON schema (GQA k/v edges per query head, copied from the group).

    Scores are written with 9 significant digits: exact for float32 (the dense tensors' dtype).

    Example:
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
    nodes = {n.name: {"in_graph": n.in_graph} for n in pq.nodes.values()}
    valid = pq.valid
    scores = pq.scores.cpu()[valid].tolist()
    members = pq.in_graph.cpu()[valid].tolist()
    # 9 significant digits identify a float32 exactly; NaN / inf as Python's json writes them.
    number = "{:.9g}" if bool(torch.isfinite(pq.scores).all()) else "{}"
    scores = scores if number == "{:.9g}" else list(map(_json_float, scores))
    entry = ('"{}": {{"score": ' + number + ', "in_graph": {}}}').format
    edges = ", ".join(map(entry, pq._layout.edge_names, scores, map(("false", "true").__getitem__, members)))
    text = f'{{"cfg": {json.dumps(cfg)}, "nodes": {json.dumps(nodes)}, "edges": {{{edges}}}}}'
    return _write_text(path, text)


def from_eap_json(path: str | os.PathLike, *, model: Any = None,
                  kv_edges: KVEdges | str = "per_query_head") -> Graph:
    """Load an EAP-IG / MIB JSON circuit (edges absent from the file: score 0, not in the graph).

    Args:
        model: if given, the file's cfg must match it (else :class:`GimlensError`).
        kv_edges: ``"per_query_head"`` (the file's layout) or ``"grouped"`` (merge GQA copies:
            mean score, any membership).
    """
    doc = _read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("edges"), dict):
        raise GimlensError(f"{str(path)!r} is not an EAP-IG circuit file (needs 'cfg' and 'edges')")
    graph = _graph_from_cfg(doc.get("cfg"), model, KVEdges.PER_QUERY_HEAD)
    names, infos = list(doc["edges"].keys()), list(doc["edges"].values())
    try:
        scores = torch.tensor([float(i.get("score") or 0.0) for i in infos], dtype=torch.float32)
        members = torch.tensor([bool(i.get("in_graph", False)) for i in infos], dtype=torch.bool)
    except (AttributeError, TypeError, ValueError) as e:
        raise GimlensError(f"{str(path)!r}: edge entries must be {{'score': float, 'in_graph': bool}} ({e})") from e
    s = torch.zeros(graph.n_forward, graph.n_backward)
    m = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.bool)
    if names == graph._layout.edge_names:  # our own order: no per-name lookup
        s[graph.valid], m[graph.valid] = scores, members
    else:
        idx = torch.tensor([graph.edge_index(n) for n in names], dtype=torch.long).view(-1, 2)
        s[idx[:, 0], idx[:, 1]], m[idx[:, 0], idx[:, 1]] = scores, members
    graph.scores, graph.in_graph = s, m
    nodes = doc.get("nodes")
    if isinstance(nodes, dict):
        graph.nodes_in_graph = torch.tensor([bool((nodes.get(n) or {}).get("in_graph", False))
                                             for n in graph.forward_names])
    else:
        graph.nodes_in_graph = m.any(1)
    return graph.as_kv_edges(kv_edges) if KVEdges.coerce(kv_edges) is not graph.kv_edges else graph


# ---------------------------------------------------------------------- GraphML and DOT
def to_graphml(graph: Graph, path: str | os.PathLike, *, weight: str = "score", include: Include = "all") -> Path:
    """Write GraphML via networkx (cfg as graph attributes)."""
    import networkx as nx

    G = to_networkx(graph, weight=weight, include=include)
    return atomic_write(path, lambda tmp: nx.write_graphml(G, tmp))


def from_graphml(path: str | os.PathLike, *, weight: str = "score", model: Any = None) -> Graph:
    """Load :func:`to_graphml` output."""
    import networkx as nx

    try:
        G = nx.read_graphml(path)
    except Exception as e:  # networkx raises several types for damaged files
        raise GimlensError(f"cannot read GraphML {str(path)!r}: {e}") from e
    return from_networkx(G, weight=weight, model=model)


def _selected_edges(graph: Graph, include: Include, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_include(include)
    mask = graph.valid if include == "all" else graph.in_graph.cpu() & graph.valid
    rows, cols = mask.nonzero(as_tuple=True)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise GimlensError(f"top_k must be a non-negative integer or None, got {top_k!r}")
        keep = graph.scores.cpu()[rows, cols].abs().argsort(descending=True, stable=True)[:top_k]
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def _dst_and_qkv(slot_name: str) -> tuple[str, str | None]:
    return (slot_name[:-3], slot_name[-2]) if slot_name.endswith(">") else (slot_name, None)


def to_dot(graph: Graph, path: str | os.PathLike | None = None, *, include: Include = "in_graph",
           top_k: int | None = None, weight: str = "score") -> str:
    """Graphviz DOT text (in-graph edges by default, or the ``top_k`` by |score|); written to
    ``path`` atomically when given. Edge attributes: ``name``, ``weight``, ``in_graph``, ``qkv``,
    ``color`` (by q/k/v), ``penwidth`` (∝ |score|)."""
    rows, cols = _selected_edges(graph, include, top_k)
    scores = graph.scores.cpu()[rows, cols]
    members = graph.in_graph.cpu()[rows, cols].tolist()
    top = float(scores.abs().max()) if len(scores) else 0.0
    fwd, bwd = graph.forward_names, graph.backward_names
    node_view = graph.nodes
    lines = ["digraph circuit {", "  rankdir=BT;",
             '  node [shape=box, style="rounded,filled", fillcolor="#f4f4f4", fontname="Helvetica"];']
    body, used = [], {"input", "logits"}
    for r, c, s, m in zip(rows.tolist(), cols.tolist(), scores.tolist(), members):
        dst, qkv = _dst_and_qkv(bwd[c])
        used.update((fwd[r], dst))
        width = 0.5 + 4.5 * abs(s) / top if top > 0 else 1.0
        attrs = (f'name="{fwd[r]}->{bwd[c]}", {weight}={_json_float(s)}, in_graph={str(m).lower()}, '
                 f'color="{QKV_COLORS[qkv]}", penwidth={width:.3f}')
        if qkv is not None:
            attrs += f', qkv="{qkv}"'
        body.append(f'  "{fwd[r]}" -> "{dst}" [{attrs}];')
    for node in node_view.values():
        if node.name in used:
            layer = "" if node.layer is None else f", layer={node.layer}"
            lines.append(f'  "{node.name}" [kind="{node.kind.value}"{layer}, in_graph={str(node.in_graph).lower()}];')
    text = "\n".join(lines + body + ["}"]) + "\n"
    if path is not None:
        _write_text(path, text)
    return text


# ---------------------------------------------------------------------- images
def _positions(graph: Graph) -> dict[str, tuple[float, float]]:
    """Layered layout: input at the bottom, per layer a row of heads then the MLP, logits on top."""
    c = graph.cfg
    H, L = c["n_heads"], c["n_layers"]
    pos = {"input": (0.0, 0.0), "logits": (0.0, 2.0 * L + 1)}
    for node in graph.nodes.values():
        if node.kind is NodeKind.ATTENTION:
            pos[node.name] = (node.head - (H - 1) / 2, 2.0 * node.layer + 1)
        elif node.kind is NodeKind.KV_GROUP:
            rep = H // c["n_kv_heads"]
            pos[node.name] = (node.head * rep + (rep - 1) / 2 - (H - 1) / 2, 2.0 * node.layer + 0.6)
        elif node.kind is NodeKind.MLP:
            pos[node.name] = ((H + 1) / 2, 2.0 * node.layer + (1 if c["parallel_attn_mlp"] else 1.6))
    return pos


def render(graph: Graph, path: str | os.PathLike, *, include: Include = "in_graph", top_k: int | None = None,
           max_edges: int = 5000, figsize: tuple[float, float] | None = None, dpi: int = 150,
           title: str | None = None) -> Path:
    """Draw the circuit to a .png / .svg / .pdf with matplotlib (no graphviz).

    Layered by layer; only in-graph edges (or the ``top_k`` by |score|); q/k/v edges coloured,
    line width ∝ |score|, negative scores dashed. More than ``max_edges`` edges -> GimlensError.
    """
    fmt = _format_of(path, None)
    if fmt not in _IMAGES:
        raise GimlensError(f"render writes {[f.value for f in _IMAGES]} images, got {str(path)!r}")
    rows, cols = _selected_edges(graph, include, top_k)
    if len(rows) > max_edges:
        raise GimlensError(f"{len(rows)} edges to draw (max_edges={max_edges}); pass top_k= to draw fewer")
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    pos, fwd, bwd = _positions(graph), graph.forward_names, graph.backward_names
    scores = graph.scores.cpu()[rows, cols].tolist()
    top = max((abs(s) for s in scores), default=0.0)
    segs, colors, widths, styles, used = [], [], [], [], {"input", "logits"}
    for r, c, s in zip(rows.tolist(), cols.tolist(), scores):
        dst, qkv = _dst_and_qkv(bwd[c])
        used.update((fwd[r], dst))
        segs.append([pos[fwd[r]], pos[dst]])
        colors.append(QKV_COLORS[qkv])
        widths.append(0.4 + 3.6 * abs(s) / top if top > 0 else 1.0)
        styles.append("dashed" if s < 0 else "solid")
    c = graph.cfg
    fig = Figure(figsize=figsize or (max(6.0, 0.6 * c["n_heads"] + 3), max(4.0, 0.9 * c["n_layers"] + 2)), dpi=dpi)
    ax = fig.add_subplot()
    if segs:
        ax.add_collection(LineCollection(segs, colors=colors, linewidths=widths, linestyles=styles, alpha=0.75, zorder=1))
    names = sorted(used, key=lambda n: pos[n][1])
    xs, ys = [pos[n][0] for n in names], [pos[n][1] for n in names]
    ax.scatter(xs, ys, s=260, marker="s", c="#f4f4f4", edgecolors="#333333", zorder=2)
    for n, x, y in zip(names, xs, ys):
        ax.annotate(n, (x, y), fontsize=5, ha="center", va="center", zorder=3)
    xr = (c["n_heads"] + 3) / 2
    ax.set_xlim(-xr, xr)
    ax.set_ylim(-0.7, 2 * c["n_layers"] + 1.7)
    ax.set_axis_off()
    ax.legend(handles=[Line2D([], [], color=QKV_COLORS[k], label=k or "residual") for k in ("q", "k", "v", None)],
              loc="upper right", fontsize=6, frameon=False)
    ax.set_title(title or f"{len(segs)} edges", fontsize=8)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt.value, bbox_inches="tight"))


# ---------------------------------------------------------------------- dispatch
_WRITERS: dict[Format, Callable[..., Any]] = {
    Format.JSON: to_json, Format.EAP_JSON: to_eap_json, Format.GRAPHML: to_graphml,
    Format.DOT: to_dot, Format.PNG: render, Format.SVG: render, Format.PDF: render,
}


def save(graph: Graph, path: str | os.PathLike, format: Format | str | None = None, **kwargs: Any) -> Path:
    """Write ``graph`` in the format named by ``format`` or by the suffix (see :class:`Format`)."""
    _WRITERS[_format_of(path, format)](graph, path, **kwargs)
    return Path(path)


def load(path: str | os.PathLike, format: Format | str | None = None, *, model: Any = None) -> Graph:
    """Read a circuit file: own or EAP-IG JSON (detected from the content) or GraphML."""
    fmt = _format_of(path, format)
    if fmt is Format.GRAPHML:
        return from_graphml(path, model=model)
    if fmt not in (Format.JSON, Format.EAP_JSON):
        raise GimlensError(f"cannot load {fmt.value} files; loadable: json, eap-json, graphml")
    if fmt is Format.JSON:
        try:
            with open(path, encoding="utf-8") as f:
                head = f.read(64)
        except OSError as e:
            raise GimlensError(f"cannot read circuit file {str(path)!r}: {e}") from e
        if not re.search(r'"format"\s*:\s*"' + re.escape(_FORMAT_TAG), head):
            return from_eap_json(path, model=model)
        return from_json(path, model=model)
    return from_eap_json(path, model=model)
