"""Pictures of a [`Graph`][circuits.graph.Graph]: Graphviz DOT text and PNG / SVG / PDF images
(matplotlib, no Graphviz needed).

Both draw the circuit (the in-graph edges, or the `top_k` by |score|) as
[`view_edges`][circuits.files.view_edges] shows it (a grouped k/v edge goes to each query head that
reads it); both write atomically with `gimlens.runtime.atomic_write` and are reachable from
`graph.save(path)` by suffix (`.dot`, `.gv`, `.png`, `.svg`, `.pdf`).

The image is sized to its content: one row per layer that holds a node of the circuit, one column per
head index that occurs (a head keeps its column in every layer) and one for the MLPs, 8 pt labels in
boxes that never overlap; colour says q / k / v / residual, width |score|, a dashed line a negative
score (the legend says so).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from gimlens.errors import GimlensError
from gimlens.runtime import atomic_write

from .files import Format, Include, format_of, view_edges
from .graph import Graph

__all__ = ["to_dot", "write_dot", "figure", "render", "QKV_COLORS"]

QKV_COLORS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#ff7f0e", None: "#555555"}
_IMAGES = (Format.PNG, Format.SVG, Format.PDF)
_FONT = 8  # points: node labels
_COL_W, _ROW_H = 0.62, 0.42  # inches per column / per row


def _number(x: float) -> str:
    return repr(x) if math.isfinite(x) else f'"{x}"'


def to_dot(graph: Graph, path: str | os.PathLike | None = None, *, include: Include = "in_graph",
           top_k: int | None = None, weight: str = "score") -> str:
    """Graphviz DOT text (in-graph edges by default, or the `top_k` by |score|); written to
    `path` atomically when given. Edge attributes: `name` (per-head name), `weight`, `in_graph`,
    `qkv`, `kv_group` (a grouped k/v edge's copies), `color` (by q/k/v), `penwidth` (∝ |score|).

    Examples:
        >>> g = Graph(n_layers=1, n_heads=1, d_model=4).reset()
        >>> g.in_graph[g.edge_index("input->logits")] = True
        >>> [line for line in to_dot(g).splitlines() if "->" in line]
        ['  "input" -> "logits" [name="input->logits", score=0.0, in_graph=true, color="#555555", penwidth=1.000];']
    """
    edges = view_edges(graph, include, top_k)
    top = max((abs(e.score) for e in edges), default=0.0)
    lines = ["digraph circuit {", "  rankdir=BT;",
             '  node [shape=box, style="rounded,filled", fillcolor="#f4f4f4", fontname="Helvetica"];']
    body, used = [], {"input", "logits"}
    for e in edges:
        used.update((e.src, e.dst))
        width = 0.5 + 4.5 * abs(e.score) / top if top > 0 else 1.0
        attrs = (f'name="{e.key}", {weight}={_number(e.score)}, in_graph={str(e.in_graph).lower()}, '
                 f'color="{QKV_COLORS[e.qkv]}", penwidth={width:.3f}')
        if e.qkv is not None:
            attrs += f', qkv="{e.qkv}"'
        if e.kv_group is not None:
            attrs += f", kv_group={e.kv_group}"
        body.append(f'  "{e.src}" -> "{e.dst}" [{attrs}];')
    for node in graph.nodes.values():
        if node.name in used:
            layer = "" if node.layer is None else f", layer={node.layer}"
            lines.append(f'  "{node.name}" [kind="{node.kind.value}"{layer}, in_graph={str(node.in_graph).lower()}];')
    text = "\n".join(lines + body + ["}"]) + "\n"
    if path is not None:
        atomic_write(path, text)
    return text


def write_dot(graph: Graph, path: str | os.PathLike, **kwargs: Any) -> Path:
    """`to_dot(graph, path, **kwargs)`, returning the path (the `.dot` / `.gv` writer of `Graph.save`)."""
    to_dot(graph, path, **kwargs)
    return Path(path)


# ---------------------------------------------------------------------- images
def _row_of(name: str) -> int:
    """Drawing row: 0 input, 1 + layer for a layer's heads and MLP, a large number for logits."""
    if name == "input":
        return 0
    if name == "logits":
        return 10**9
    return 1 + int(name[1:].split(".")[0])


def _order(name: str) -> tuple[int, int]:
    """Left-to-right order inside a row: heads by index, then the MLP."""
    return (0, int(name.rsplit("h", 1)[1])) if ".h" in name else (1, 0)


def _label(name: str) -> str:
    return name.split(".")[1] if "." in name else ("MLP" if name[0] == "m" and name[1:].isdigit() else name)


def _layout(names: set[str]) -> tuple[dict[str, tuple[float, float]], list[int], int]:
    """Node -> (x, y) in column / row units, the rows (`_row_of` values, bottom up), the number of columns.

    A head keeps its column in every layer (columns: the heads that occur, by index, then the MLPs);
    input and logits are centred.
    """
    rows = sorted({_row_of(n) for n in names})
    columns = sorted({_order(n) for n in names if n not in ("input", "logits")}) or [(1, 0)]
    middle = (len(columns) - 1) / 2
    pos = {n: (columns.index(_order(n)) - middle, float(rows.index(_row_of(n)))) for n in names
           if n not in ("input", "logits")}
    pos.update({"input": (0.0, 0.0), "logits": (0.0, float(len(rows) - 1))})
    return pos, rows, len(columns)


def figure(graph: Graph, *, include: Include = "in_graph", top_k: int | None = None, max_edges: int = 5000,
           dpi: int = 120, title: str | None = None):
    """The circuit as a matplotlib `Figure` (what [`render`][circuits.render.render] saves).

    One row per layer that holds a circuit node (input at the bottom, logits on top), nodes as boxes
    labelled `h{head}` / `MLP` with the layer on the left; edges coloured by q / k / v / residual, width
    ∝ |score|, dashed when the score is negative. Sized to the content: 0.62 in per column (head
    indices that occur, then the MLPs), 0.42 in per row.

    Examples:
        >>> g = Graph(n_layers=1, n_heads=2, d_model=8).reset()
        >>> g.in_graph[g.edge_index("input->logits")] = True
        >>> [t.get_text() for t in figure(g).axes[0].texts]
        ['input', 'logits']
    """
    edges = view_edges(graph, include, top_k)
    if len(edges) > max_edges:
        raise GimlensError(f"{len(edges)} edges to draw (max_edges={max_edges}); pass top_k= to draw fewer")
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    used = {"input", "logits"} | {n for e in edges for n in (e.src, e.dst)}
    pos, rows, n_cols = _layout(used)
    top = max((abs(e.score) for e in edges), default=0.0)
    width_in = max(5.5, _COL_W * n_cols + 2.6)  # + room for the layer labels and the legend
    height_in = max(3.0, _ROW_H * len(rows) + 1.6)
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    ax = fig.add_axes((1.0 / width_in, 0.3 / height_in, (width_in - 2.6) / width_in,
                       (height_in - 1.3) / height_in))
    half = max(n_cols - 1, 1) / 2
    segs = [[(pos[e.src][0], pos[e.src][1] + 0.18), (pos[e.dst][0], pos[e.dst][1] - 0.18)] for e in edges]
    if segs:
        ax.add_collection(LineCollection(
            segs, colors=[QKV_COLORS[e.qkv] for e in edges], alpha=0.7, zorder=1,
            linewidths=[0.4 + 3.6 * abs(e.score) / top if top > 0 else 1.0 for e in edges],
            linestyles=["dashed" if e.score < 0 else "solid" for e in edges]))
    for n in sorted(used, key=lambda n: pos[n]):
        ax.text(*pos[n], _label(n), fontsize=_FONT, ha="center", va="center", zorder=3,
                bbox={"boxstyle": "round,pad=0.25", "fc": "#f4f4f4", "ec": "#333333", "lw": 0.6})
    ax.set_xlim(-half - 0.6, half + 0.6)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_yticks(range(len(rows)), ["" if r in (0, 10**9) else f"layer {r - 1}" for r in rows], fontsize=_FONT)
    ax.set_xticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(left=False)
    handles = [Line2D([], [], color=QKV_COLORS[k], lw=2, label=f"{k} input") for k in "qkv"]
    handles += [Line2D([], [], color=QKV_COLORS[None], lw=2, label="to MLP / logits"),
                Line2D([], [], color="#333333", lw=1.5, ls="dashed", label="negative score"),
                Line2D([], [], color="#333333", lw=4.0, label=f"|score| {top:.3g}"),
                Line2D([], [], color="#333333", lw=0.4, label="|score| ≈ 0")]
    fig.legend(handles=handles, loc="upper right", fontsize=_FONT, frameon=False, title="edges",
               title_fontsize=_FONT, handlelength=2.2)
    n_edges = len({e.name for e in edges})
    fig.suptitle(title or f"{n_edges} edges, {len(used)} nodes", fontsize=_FONT + 1, x=0.02, ha="left")
    return fig


def render(graph: Graph, path: str | os.PathLike, *, include: Include = "in_graph", top_k: int | None = None,
           max_edges: int = 5000, dpi: int = 120, title: str | None = None) -> Path:
    """Draw the circuit to a .png / .svg / .pdf with matplotlib (no graphviz): the
    [`figure`][circuits.render.figure], saved atomically.

    Args:
        include: `"in_graph"` (the circuit) or `"all"` (every valid edge).
        top_k: draw only the `top_k` of those by |score|.
        max_edges: more edges to draw than this -> `GimlensError` (pass `top_k`).
        dpi: pixels per inch (the size in inches follows the content).
        title: default: the numbers of edges and nodes drawn.

    Returns:
        The path written.

    Examples:
        >>> import os, tempfile
        >>> g = Graph(n_layers=1, n_heads=2, d_model=8)
        >>> render(g, os.path.join(tempfile.mkdtemp(), "c.png"), dpi=50).name
        'c.png'
    """
    fmt = format_of(path, None)
    if fmt not in _IMAGES:
        raise GimlensError(f"render writes {[f.value for f in _IMAGES]} images, got {str(path)!r}")
    fig = figure(graph, include=include, top_k=top_k, max_edges=max_edges, dpi=dpi, title=title)
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt.value))
