"""Pictures of a [`Graph`][circuits.graph.Graph]: Graphviz DOT text and PNG / SVG / PDF images
(matplotlib, no Graphviz needed).

Both draw the circuit (the in-graph edges, or the `top_k` by |score|); both write atomically with
`gimlens.runtime.atomic_write` and are reachable from `graph.save(path)` by suffix (`.dot`, `.gv`,
`.png`, `.svg`, `.pdf`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from gimlens.errors import GimlensError
from gimlens.validation import check_int
from gimlens.runtime import atomic_write

from .files import Format, Include, format_of, register_format
from .graph import Graph, NodeKind

__all__ = ["to_dot", "render", "QKV_COLORS"]

QKV_COLORS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#ff7f0e", None: "#555555"}
_IMAGES = (Format.PNG, Format.SVG, Format.PDF)


def _check_include(include: Any) -> None:
    if include not in ("all", "in_graph"):
        raise GimlensError(f"include must be 'all' or 'in_graph', got {include!r}")


def _number(x: float) -> str:
    return repr(x) if math.isfinite(x) else f'"{x}"'


def _selected_edges(graph: Graph, include: Include, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_include(include)
    mask = graph.valid if include == "all" else graph.in_graph.cpu() & graph.valid
    rows, cols = mask.nonzero(as_tuple=True)
    if top_k is not None:
        check_int("top_k", top_k, minimum=0, allow_none=True)
        keep = graph.scores.cpu()[rows, cols].abs().argsort(descending=True, stable=True)[:top_k]
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def _dst_and_qkv(slot_name: str) -> tuple[str, str | None]:
    return (slot_name[:-3], slot_name[-2]) if slot_name.endswith(">") else (slot_name, None)


def to_dot(graph: Graph, path: str | os.PathLike | None = None, *, include: Include = "in_graph",
           top_k: int | None = None, weight: str = "score") -> str:
    """Graphviz DOT text (in-graph edges by default, or the `top_k` by |score|); written to
    `path` atomically when given. Edge attributes: `name`, `weight`, `in_graph`, `qkv`,
    `color` (by q/k/v), `penwidth` (∝ |score|).

    Examples:
        >>> g = Graph(n_layers=1, n_heads=1, d_model=4).reset()
        >>> g.in_graph[g.edge_index("input->logits")] = True
        >>> [line for line in to_dot(g).splitlines() if "->" in line]
        ['  "input" -> "logits" [name="input->logits", score=0.0, in_graph=true, color="#555555", penwidth=1.000];']
    """
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
        attrs = (f'name="{fwd[r]}->{bwd[c]}", {weight}={_number(s)}, in_graph={str(m).lower()}, '
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
        atomic_write(path, text)
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

    Layered by layer; only in-graph edges (or the `top_k` by |score|); q/k/v edges coloured,
    line width ∝ |score|, negative scores dashed.

    Args:
        include: `"in_graph"` (the circuit) or `"all"` (every valid edge).
        top_k: draw only the `top_k` of those by |score|.
        max_edges: more edges to draw than this -> `GimlensError` (pass `top_k`).
        figsize: inches; the image is exactly `figsize * dpi` pixels. Default: from the shape.
        dpi: pixels per inch.
        title: default: the number of edges drawn.

    Returns:
        The path written.

    Examples:
        >>> import os, tempfile
        >>> g = Graph(n_layers=1, n_heads=2, d_model=8)
        >>> render(g, os.path.join(tempfile.mkdtemp(), "c.png"), figsize=(4, 3), dpi=50).name
        'c.png'
    """
    fmt = format_of(path, None)
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
    fig = Figure(figsize=figsize or (max(6.0, 0.6 * c["n_heads"] + 3), max(4.0, 0.9 * c["n_layers"] + 2)), dpi=dpi,
                 layout="constrained")
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
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt.value))


def _write_dot(graph: Graph, path: str | os.PathLike, **kwargs: Any) -> Path:
    to_dot(graph, path, **kwargs)
    return Path(path)


register_format(Format.DOT, write=_write_dot)
for _fmt in _IMAGES:
    register_format(_fmt, write=render)
