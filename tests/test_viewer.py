"""The interactive circuit viewer (`graph.save("c.html")`), loaded in a real headless Chromium.

The page writes uncaught script errors into `#errors` (window.onerror) and its node / edge counts into
`#counts` (`data-nodes`, `data-edges`); it reads its filters from the URL hash, so `--dump-dom` with two
URLs shows two states. Expected counts are computed here from the graph's tensors and networkx.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile

import networkx as nx
import pytest
import torch

from circuits.files import view_edges
from circuits.graph import Graph
from circuits.viewer import to_html
from gimlens.errors import GimlensError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")


def load(url: str) -> tuple[str, int, int]:
    """(script errors, nodes shown, edges shown) of the page after it ran, from Chromium's DOM."""
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    errors = re.search(r'<pre id="errors">(.*?)</pre>', dom, re.S)
    counts = re.search(r'<span id="counts" data-nodes="(\d+)" data-edges="(\d+)"', dom)
    assert errors is not None and counts is not None, dom[:2000]
    return errors[1], int(counts[1]), int(counts[2])


def gqa_circuit(seed=0) -> Graph:
    """A pruned circuit of a GQA-shaped graph (6 query heads over 2 KV heads) with grouped k/v edges."""
    g = Graph(n_layers=4, n_heads=6, n_kv_heads=2, d_model=16, model_name="tiny-gqa")
    g.scores = torch.randn(g.n_forward, g.n_backward, generator=torch.Generator().manual_seed(seed))
    g.apply_topn(120)
    assert any(".g" in n for n in g.layout.edge_names if g.in_graph[g.edge_index(n)])
    return g


def graph_edge(key: str, group: int | None) -> str:
    """The graph's edge name of a networkx edge key (a grouped k/v copy names its KV group)."""
    return key if group is None else re.sub(r"\.h\d+<", f".g{group}<", key)


def expected(g: Graph, threshold: float = 0.0, node: str | None = None) -> tuple[int, int]:
    """Nodes and graph edges the page should show: edges with |score| >= threshold, then (with
    `node`) only those on a path through it; nodes = input, logits and the shown edges' ends."""
    G = g.to_networkx()
    G.remove_edges_from([(u, v, k) for u, v, k, d in G.edges(keys=True, data=True) if abs(d["score"]) < threshold])
    if node is not None:
        up, down = nx.ancestors(G, node) | {node}, nx.descendants(G, node) | {node}
        G.remove_edges_from([(u, v, k) for u, v, k in G.edges(keys=True)
                             if not ({u, v} <= up or {u, v} <= down)])
    names = {graph_edge(k, d.get("kv_group")) for _, _, k, d in G.edges(keys=True, data=True)}
    nodes = {"input", "logits"} | {n for u, v in G.edges() for n in (u, v)}
    return len(nodes), len(names)


def test_page_is_self_contained_and_small():
    g = gqa_circuit()
    page = to_html(g)
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|@import|url\(", page)  # nothing fetched
    assert set(re.findall(r"https?://[^\s\"'`]+", page)) <= {"http://www.w3.org/2000/svg"}  # a namespace only
    assert len(page.encode()) < 40_000


def test_bad_arguments_raise_gimlens_errors(tmp_path):
    g = gqa_circuit()
    with pytest.raises(GimlensError, match="include"):
        to_html(g, include="circuit")
    with pytest.raises(GimlensError, match="top_k"):
        to_html(g, top_k=-1)
    with pytest.raises(GimlensError, match="max_edges"):
        to_html(g, include="all", max_edges=10)
    assert list(tmp_path.iterdir()) == []


@needs_browser
def test_viewer_shows_the_circuit_counts_and_its_filters_change_them(tmp_path):
    g = gqa_circuit()
    path = g.save(tmp_path / "circuit.html")
    assert path.read_text() == to_html(g)
    url = path.resolve().as_uri()
    errors, nodes, edges = load(url)
    assert errors == ""
    assert (nodes, edges) == (int(g.nodes_in_graph.sum()) + 1, g.n_edges_in_graph) == expected(g)
    t = float(g.scores[g.in_graph].abs().median())
    errors, nodes_t, edges_t = load(f"{url}#threshold={t!r}")
    assert errors == "" and (nodes_t, edges_t) == expected(g, t) and edges_t < edges
    G = g.to_networkx()
    node = max((n for n in G.nodes if n.startswith("a")), key=lambda n: G.in_degree(n))
    errors, nodes_n, edges_n = load(f"{url}#threshold=0&node={node}")
    assert errors == "" and (nodes_n, edges_n) == expected(g, 0.0, node) and edges_n < edges


@needs_browser
def test_page_reports_script_errors(tmp_path):
    """The error channel the other test reads works: a broken script shows up in #errors."""
    page = to_html(gqa_circuit()).replace('"use strict";', '"use strict"; undefinedFunction();', 1)
    (tmp_path / "broken.html").write_text(page)
    with pytest.raises(AssertionError):  # the counts are never written
        load((tmp_path / "broken.html").resolve().as_uri())
    late = page.replace("undefinedFunction();", "", 1).replace(
        "update();</script>", "update(); undefinedFunction();</script>")
    assert late.count("undefinedFunction") == 1
    (tmp_path / "late.html").write_text(late)
    errors, *_ = load((tmp_path / "late.html").resolve().as_uri())
    assert "undefinedFunction" in errors


@needs_browser
def test_hover_shows_an_edges_and_a_nodes_scores(tmp_path):
    """A script appended by the test hovers the first edge, then a head, and copies the tooltips into the DOM."""
    g = gqa_circuit()
    probe = """<script>
    const tips = [], hover = el => { el.dispatchEvent(new MouseEvent("mousemove", {clientX: 5, clientY: 5}));
      tips.push(document.getElementById("tip").textContent); };
    hover(document.querySelector("path.edge")); hover(document.querySelector("g.node:nth-of-type(2)"));
    document.getElementById("errors").insertAdjacentHTML("afterend", "<pre id=probe></pre>");
    document.getElementById("probe").textContent = JSON.stringify(tips);
    </script></body>"""
    (tmp_path / "probe.html").write_text(to_html(g).replace("</body>", probe))
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", f"--user-data-dir={profile}", "--dump-dom",
                              (tmp_path / "probe.html").resolve().as_uri()],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    assert re.search(r'<pre id="errors"></pre>', dom)
    edge_tip, node_tip = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)[1]))
    first = view_edges(g)[0]
    assert edge_tip.startswith(first.name) and f"score {first.score:.4f}" in edge_tip
    G = g.to_networkx()
    node = node_tip.split(" (")[0]
    assert node in G.nodes and node not in ("input", "logits")
    outs = {graph_edge(k, d.get("kv_group")): d["score"] for _, _, k, d in G.out_edges(node, keys=True, data=True)}
    assert f"out: {len(outs)} edges, sum {sum(outs.values()):.4f}" in node_tip
