"""Views of a circuit Graph (networkx, GraphML, DOT, images) on grouped-query models and at SmolLM2 scale:
every exported node on an input -> logits path, readable pictures, the CLI's GraphML file is the circuit."""

import re

import networkx as nx
import torch

from circuits.files import view_edges
from circuits.graph import Graph
from circuits.render import figure, render, to_dot
from test_export import SMOLLM2, circuit_of, key_edges, per_head_circuit, scored_graph

def _gqa_circuit(model, n=60):
    """A pruned circuit of the tiny Llama (9 query heads over 3 KV heads would do; any GQA shape)
    from real EAP scores, with grouped k/v edges in it."""
    from circuits.attribute import attribute

    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(5, 200, (4, 8), generator=gen)
    corrupted = torch.randint(5, 200, (4, 8), generator=gen)
    metric = lambda logits, idx: logits[:, -1, 3] - logits[:, -1, 4]  # noqa: E731
    g = attribute(model, Graph.from_model(model), clean, corrupted, metric)
    g.apply_topn(n)
    return g


def _on_input_logits_paths(G):
    return all(nx.has_path(G, "input", v) and nx.has_path(G, v, "logits") for v in G.nodes)


def test_gqa_circuit_exports_without_dead_ends(llama_model, tmp_path):
    g = _gqa_circuit(llama_model)
    c = g.cfg
    assert c["kv_edges"] == "grouped" and c["n_kv_heads"] < c["n_heads"]
    grouped = [n for n in circuit_of(g) if ".g" in n.split("->")[1]]
    assert grouped, "the circuit must hold grouped k/v edges for this test to mean anything"
    G = g.to_networkx()
    assert _on_input_logits_paths(G)
    assert G.number_of_nodes() == int(g.nodes_in_graph.sum()) + 1  # + logits
    assert not any(".g" in v for v in G.nodes)
    assert key_edges(G) == per_head_circuit(g)
    copies = [(v, d) for _, v, d in G.edges(data=True) if "kv_group" in d]
    rep = c["n_heads"] // c["n_kv_heads"]
    assert copies and all(int(v.split(".h")[1]) // rep == d["kv_group"] and d["qkv"] in "kv" for v, d in copies)
    # GraphML: the file holds the circuit (read with networkx here), with the same paths
    g.save(tmp_path / "c.graphml")
    read = nx.read_graphml(tmp_path / "c.graphml", force_multigraph=True)
    assert _on_input_logits_paths(read) and read.number_of_nodes() == G.number_of_nodes()
    assert set(key_edges(read)) == set(per_head_circuit(g))
    back = Graph.load(tmp_path / "c.graphml")
    assert torch.equal(back.in_graph, g.in_graph) and torch.equal(back.nodes_in_graph, g.nodes_in_graph)
    assert Graph.from_networkx(g.to_networkx(include="all")).equals(g)


def dot_edges(text):
    """{edge name: (score, in_graph)} parsed from DOT text."""
    parsed = {}
    for m in re.finditer(r'^\s*"([^"]+)" -> "([^"]+)" \[(.*)\];$', text, re.M):
        attrs = dict(re.findall(r'(\w+)=("[^"]*"|[^,\s]+)', m[3]))
        qkv = attrs.get("qkv", "").strip('"')
        name = f"{m[1]}->{m[2]}" + (f"<{qkv}>" if qkv else "")
        assert attrs["name"].strip('"') == name
        parsed[name] = (float(attrs["score"]), attrs["in_graph"] == "true")
    return parsed


def test_dot_text_parses_into_the_in_graph_edge_set(tmp_path):
    g = scored_graph(seed=7).prune()
    assert g.save(tmp_path / "c.dot") == tmp_path / "c.dot"
    text = (tmp_path / "c.dot").read_text()
    assert text == to_dot(g) and text.startswith("digraph")
    expected = per_head_circuit(g)  # grouped k/v edges end at the heads that read them
    assert dot_edges(text) == expected and len(expected) >= g.n_edges_in_graph > 0
    assert re.search(r'-> "a1\.h\d".*qkv="[kv]", kv_group=\d', text)
    circuit = circuit_of(g)
    strongest = sorted(circuit, key=lambda n: -abs(circuit[n][0]))[:3]
    top = dot_edges(to_dot(g, top_k=3))
    assert top == {n: v for n, v in expected.items() if nx_edges_name(n) in strongest}
    everything = dot_edges(to_dot(g, include="all"))
    assert everything == {n: (e.score, e.in_graph) for n, e in g.as_kv_edges("per_query_head").edges.items()}


def nx_edges_name(per_head):
    """The grouped graph's name of a per-head edge name (shape of `scored_graph`: 4 heads, 2 KV heads)."""
    m = re.fullmatch(r"(.+)->a(\d+)\.h(\d+)<([kv])>", per_head)
    return f"{m[1]}->a{m[2]}.g{int(m[3]) // 2}<{m[4]}>" if m else per_head


def test_png_is_sized_to_its_content_and_draws_the_edges(tmp_path):
    import matplotlib.image as mpimg

    g = scored_graph()
    g.apply_topn(30)
    out = g.save(tmp_path / "c.png", dpi=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png"]
    pixels = mpimg.imread(out)
    w, h = figure(g).get_size_inches() * 60
    assert pixels.shape[:2] == (int(h), int(w))
    ink = lambda p: int((p[..., :3] < 0.9).any(-1).sum())  # noqa: E731  (non-white pixels)
    render(g.copy().reset(), tmp_path / "empty.png", dpi=60)
    empty = mpimg.imread(tmp_path / "empty.png")
    assert empty.shape[0] < pixels.shape[0]  # fewer rows of nodes: a smaller picture
    assert ink(pixels) > ink(empty) > 0  # edges add ink; nodes alone have some


def test_svg_draws_one_line_per_drawn_edge(tmp_path):
    import xml.etree.ElementTree as ET

    g = scored_graph()
    g.apply_topn(30)
    g.save(tmp_path / "c.svg")
    root = ET.parse(tmp_path / "c.svg").getroot()
    svg = "{http://www.w3.org/2000/svg}"
    groups = [el for el in root.iter(f"{svg}g") if (el.get("id") or "").startswith("LineCollection")]
    assert len(groups) == 1
    lines = len(list(groups[0].iter(f"{svg}path")))
    assert lines == len(per_head_circuit(g)) == len(view_edges(g)) > g.n_edges_in_graph > 0  # k/v copies drawn


def _boxes(fig):
    """Display-space boxes of the node labels (their drawn frames) of a rendered figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [t.get_bbox_patch().get_window_extent(renderer) for t in fig.axes[0].texts]


def test_smollm2_sized_circuit_picture_is_readable():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    g = Graph.from_model(SMOLLM2)
    gen = torch.Generator().manual_seed(1)
    g.scores = torch.randn(g.n_forward, g.n_backward, generator=gen)
    for f in torch.randperm(g.n_forward - 1, generator=gen)[:70].tolist():  # 70 nodes on input -> logits paths
        name = g.forward_names[f + 1]
        slot = f"{name}<q>" if ".h" in name else name
        g.scores[g.edge_index(f"input->{slot}")] = g.scores[g.edge_index(f"{name}->logits")] = 50.0
    g.apply_topn(300)
    fig = figure(g)
    FigureCanvasAgg(fig)
    boxes = _boxes(fig)
    nodes = int(g.nodes_in_graph.sum()) + 1
    assert len(boxes) == nodes > 40
    assert all(t.get_fontsize() >= 8 for t in fig.axes[0].texts)
    overlaps = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert overlaps == []
    w, h = fig.get_size_inches() * fig.dpi
    assert w <= 1400 and h <= 2000  # was 1260 x 4350 px with 5 pt labels
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"q input", "k input", "v input", "negative score"} <= legend
    assert any(t.startswith("|score| ") for t in legend)


def test_discover_graphml_option_writes_the_circuit(tmp_path):
    """`gimlens discover --graphml` ("GraphML file of the circuit") writes the circuit, not all edges."""
    from conftest import TINY
    from gimlens_cli import main
    from gimlens.testing import tiny_hf_model, tiny_tokenizer

    folder = tmp_path / "tiny-llama"
    tiny_hf_model(**TINY["llama"]).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out, own = tmp_path / "c.graphml", tmp_path / "c.json"
    assert main(["discover", "--model", str(folder), "--task", "ioi", "--n", "4", "--batch-size", "4",
                 "--method", "EAP", "--edges", "40", "--no-progress", "-o", str(own), "--graphml", str(out)]) == 0
    circuit = Graph.load(own)
    G = nx.read_graphml(out, force_multigraph=True)
    assert 0 < circuit.n_edges_in_graph <= 40 < circuit.n_valid_edges
    assert set(key_edges(G)) == set(per_head_circuit(circuit))
    assert _on_input_logits_paths(G) and G.number_of_nodes() == int(circuit.nodes_in_graph.sum()) + 1
