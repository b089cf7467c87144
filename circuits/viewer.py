"""An interactive circuit viewer: one self-contained HTML page (inline SVG and JavaScript, no network).

`graph.save("circuit.html")` (or [`to_html`][circuits.viewer.to_html]) writes a page that lays the
circuit out by layer (input at the bottom, logits on top, one row per layer that holds a circuit
node), colours q / k / v / residual edges, draws width ∝ |score| and negative scores dashed, shows a
node's and an edge's score on hover, and filters by a |score| threshold and by a node (only the
paths through it; click a node, or type its name). The page shows the numbers of nodes and edges
shown; its state is in the URL hash (`#threshold=0.01&node=a3.h5`), so a link opens the same view.

Edges are [`view_edges`][circuits.files.view_edges]: on grouped-query models a grouped k/v edge is
drawn to each query head that reads it (counted once: the edge count is the graph's).
"""

from __future__ import annotations

import html
import json
import math
import os

from gimlens.errors import GimlensError
from gimlens.runtime import atomic_write

from .files import Include, view_edges
from .graph import Graph

__all__ = ["to_html"]


def _data(graph: Graph, include: Include, top_k: int | None, max_edges: int) -> dict:
    edges = view_edges(graph, include, top_k)
    if len({e.name for e in edges}) > max_edges:
        raise GimlensError(f"{len({e.name for e in edges})} edges to show (max_edges={max_edges}); "
                           "pass top_k= to show fewer")
    used = {"input", "logits"} | {n for e in edges for n in (e.src, e.dst)}
    finite = lambda x: x if x is None or math.isfinite(x) else None  # noqa: E731  (JSON has no NaN)
    nodes = [{"name": n.name, "kind": n.kind.value, "layer": n.layer, "head": n.head, "score": finite(n.score)}
             for n in graph.nodes.values() if n.name in used]
    return {"nodes": nodes,
            "edges": [{"name": e.name, "src": e.src, "dst": e.dst, "qkv": e.qkv, "score": finite(e.score),
                       "group": e.kv_group} for e in edges]}


def to_html(graph: Graph, path: str | os.PathLike | None = None, *, include: Include = "in_graph",
            top_k: int | None = None, max_edges: int = 5000, title: str | None = None) -> str:
    """The circuit as one self-contained interactive HTML page; written atomically to `path` when given.

    Args:
        include: `"in_graph"` (the circuit) or `"all"` (every valid edge: pass `top_k`).
        top_k: show only the `top_k` of those edges by |score|.
        max_edges: more edges than this -> `GimlensError`.
        title: the page's heading (default: the model name, or "circuit").

    Returns:
        The HTML text.

    Examples:
        >>> g = Graph(n_layers=1, n_heads=2, d_model=8).reset()
        >>> g.in_graph[g.edge_index("input->logits")] = True
        >>> page = to_html(g)
        >>> page.startswith("<!DOCTYPE html>"), "http" in page.split("<script>")[1]
        (True, False)
    """
    data = json.dumps(_data(graph, include, top_k, max_edges), allow_nan=False).replace("</", "<\\/")
    name = title or graph.cfg.get("model_name") or "circuit"
    text = (_PAGE.replace("%TITLE%", html.escape(str(name))).replace("%DATA%", data)
            .replace("%SCRIPT%", _SCRIPT.strip()))
    if path is not None:
        atomic_write(path, text)
    return text


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<style>
body{font:13px/1.4 system-ui,sans-serif;margin:0;color:#222}
header{position:sticky;top:0;background:#fafafa;border-bottom:1px solid #ddd;padding:8px 12px;z-index:2}
header label{margin-right:14px} #counts{font-weight:600;margin-right:14px}
.key span{display:inline-block;width:22px;height:0;border-top:3px solid;vertical-align:middle;margin:0 4px 0 10px}
#errors{color:#b00;margin:0} #tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #999;
padding:4px 7px;border-radius:4px;font-size:12px;display:none;z-index:3;white-space:pre}
svg text{font-size:11px;pointer-events:none} .node rect{fill:#f4f4f4;stroke:#333;stroke-width:.8;cursor:pointer}
.node.sel rect{fill:#ffe9a8;stroke-width:2} .edge{fill:none;stroke-opacity:.7} .edge:hover{stroke-opacity:1}
</style></head><body>
<header><b>%TITLE%</b> &nbsp; <span id="counts"></span>
<label>|score| &ge; <input id="threshold" type="number" min="0" step="any" value="0" style="width:7em"></label>
<label>node <input id="node" list="names" placeholder="all (or click one)" style="width:9em"></label>
<datalist id="names"></datalist> <button id="clear">clear</button>
<span class="key"><span style="border-color:#1f77b4"></span>q<span style="border-color:#2ca02c"></span>k
<span style="border-color:#ff7f0e"></span>v<span style="border-color:#555"></span>to MLP / logits
<span style="border-top-style:dashed;border-color:#333"></span>negative score &nbsp; width &prop; |score|</span>
<pre id="errors"></pre></header>
<svg id="view" xmlns="http://www.w3.org/2000/svg"></svg><div id="tip"></div>
<script>window.onerror=function(m,s,l){document.getElementById("errors").textContent+=m+" (line "+l+")\\n"};</script>
<script type="application/json" id="data">%DATA%</script>
<script>%SCRIPT%</script>
</body></html>
"""

_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const COLOR = {q: "#1f77b4", k: "#2ca02c", v: "#ff7f0e", null: "#555555"};
const $ = id => document.getElementById(id), NS = "http://www.w3.org/2000/svg";
const row = n => n.name === "input" ? -1 : n.name === "logits" ? 1e9 : n.layer;
const fmt = x => x === null ? "n/a" : Math.abs(x) >= 1e-3 && Math.abs(x) < 1e4 ? x.toFixed(4) : x.toExponential(3);
// layout: one row per layer holding a node; a head keeps its column in every layer, MLPs last
const rows = [...new Set(D.nodes.map(row))].sort((a, b) => a - b), pos = {};
const colKey = n => n.kind === "mlp" ? 1e6 : n.head;
const columns = [...new Set(D.nodes.filter(n => n.layer !== null).map(colKey))].sort((a, b) => a - b);
const cols = Math.max(columns.length, 1), W = 62, H = 48, left = 80;
const width = left + cols * W + 20, height = rows.length * H + 20;
D.nodes.forEach(n => pos[n.name] = [left + W / 2 + W * (n.layer === null ? (cols - 1) / 2 : columns.indexOf(colKey(n))),
                                    height - 20 - rows.indexOf(row(n)) * H]);
const svg = $("view"); svg.setAttribute("width", width); svg.setAttribute("height", height);
const el = (tag, attrs, parent) => { const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]); parent.appendChild(e); return e; };
rows.forEach((r, i) => { if (r >= 0 && r < 1e9) el("text", {x: 6, y: height - 16 - i * H}, svg).textContent = "layer " + r; });
const maxAbs = Math.max(1e-30, ...D.edges.map(e => Math.abs(e.score || 0)));
const tip = $("tip"), show = (ev, text) => { tip.textContent = text; tip.style.display = "block";
  tip.style.left = ev.clientX + 12 + "px"; tip.style.top = ev.clientY + 12 + "px"; }, hide = () => tip.style.display = "none";
const edgeEls = D.edges.map(e => { const [x1, y1] = pos[e.src], [x2, y2] = pos[e.dst], my = (y1 + y2) / 2;
  const p = el("path", {class: "edge", d: `M${x1},${y1 - 10} C${x1},${my} ${x2},${my} ${x2},${y2 + 10}`,
    stroke: COLOR[e.qkv], "stroke-width": 0.6 + 4 * Math.abs(e.score || 0) / maxAbs,
    "stroke-dasharray": e.score < 0 ? "5,3" : "none"}, svg);
  const label = e.name + (e.group === null ? "" : `  (KV group ${e.group}, read by ${e.dst})`);
  p.addEventListener("mousemove", ev => show(ev, label + "\nscore " + fmt(e.score))); p.addEventListener("mouseleave", hide);
  return p; });
const nodeEls = {};
D.nodes.forEach(n => { const g = el("g", {class: "node"}, svg), [x, y] = pos[n.name];
  const label = n.kind === "attention" ? "h" + n.head : n.kind === "mlp" ? "MLP" : n.name;
  el("rect", {x: x - 25, y: y - 10, width: 50, height: 20, rx: 5}, g);
  el("text", {x: x, y: y + 4, "text-anchor": "middle"}, g).textContent = label;
  g.addEventListener("mousemove", ev => {  // a grouped k/v edge counts once, however many heads read it
    const uniq = a => [...new Map(a.map(e => [e.name, e])).values()];
    const ins = uniq(D.edges.filter(e => e.dst === n.name && shown.has(e))),
    outs = uniq(D.edges.filter(e => e.src === n.name && shown.has(e))), sum = a => fmt(a.reduce((s, e) => s + (e.score || 0), 0));
    show(ev, `${n.name} (${n.kind})\nscore ${fmt(n.score)}\nin: ${ins.length} edges, sum ${sum(ins)}` +
             `\nout: ${outs.length} edges, sum ${sum(outs)}`); });
  g.addEventListener("mouseleave", hide);
  g.addEventListener("click", () => { $("node").value = $("node").value === n.name ? "" : n.name; update(); });
  nodeEls[n.name] = g; el("option", {value: n.name}, $("names")); });
let shown = new Set();
function reach(edges, start, forward) {  // names reachable from start along (or against) the edges
  const seen = new Set([start]), todo = [start];
  while (todo.length) { const n = todo.pop();
    edges.forEach(e => { const [a, b] = forward ? [e.src, e.dst] : [e.dst, e.src];
      if (a === n && !seen.has(b)) { seen.add(b); todo.push(b); } }); }
  return seen;
}
function update() {
  const t = parseFloat($("threshold").value) || 0, node = $("node").value.trim();
  let edges = D.edges.filter(e => Math.abs(e.score || 0) >= t);
  if (node && pos[node]) { const up = reach(edges, node, false), down = reach(edges, node, true);
    edges = edges.filter(e => (up.has(e.src) && up.has(e.dst)) || (down.has(e.src) && down.has(e.dst))); }
  shown = new Set(edges);
  const nodes = new Set(["input", "logits"]); edges.forEach(e => { nodes.add(e.src); nodes.add(e.dst); });
  D.edges.forEach((e, i) => edgeEls[i].style.display = shown.has(e) ? "" : "none");
  for (const n in nodeEls) { nodeEls[n].style.display = nodes.has(n) ? "" : "none";
    nodeEls[n].classList.toggle("sel", n === node); }
  const names = new Set(edges.map(e => e.name)), c = $("counts");
  c.dataset.nodes = nodes.size; c.dataset.edges = names.size;
  c.textContent = `${nodes.size} nodes, ${names.size} edges` + (edges.length > names.size ? ` (${edges.length} lines)` : "");
  history.replaceState(null, "", "#threshold=" + t + (node ? "&node=" + encodeURIComponent(node) : ""));
}
const hash = new URLSearchParams(location.hash.slice(1));
$("threshold").value = hash.get("threshold") || 0; $("node").value = hash.get("node") || "";
$("threshold").addEventListener("input", update); $("node").addEventListener("change", update);
$("clear").addEventListener("click", () => { $("threshold").value = 0; $("node").value = ""; update(); });
update();
"""
