"""Exports and files of a circuit Graph: exact round trips, EAP-IG/MIB compatibility, DOT, images, atomicity."""

import json
import re

import networkx as nx
import pytest
import torch

import circuits.export as export
from circuits.graph import Graph
from gimlens.errors import GimlensError


def scored_graph(kv="grouped", seed=0, **shape):
    shape = {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_model": 32, **shape}
    g = Graph(**shape, kv_edges=kv, model_name="tiny")
    gen = torch.Generator().manual_seed(seed)
    # float32 values of very different magnitudes, including subnormals and huge ones
    mags = 10.0 ** torch.randint(-44, 38, (g.n_forward, g.n_backward), generator=gen).float()
    g.scores = torch.randn(g.n_forward, g.n_backward, generator=gen) * mags
    g.in_graph = torch.rand(g.n_forward, g.n_backward, generator=gen) < 0.3
    g.nodes_in_graph = torch.rand(g.n_forward, generator=gen) < 0.5
    return g


def f32(x):
    """The float32 a JSON number denotes (files hold float32 scores as 9-digit decimals)."""
    return torch.tensor(x, dtype=torch.float32).item()


def eap_index(L, H, src, dst):
    """EAP-IG/MIB indices written from the published layout (not from circuits.graph)."""
    def fwd(name):
        if name == "input":
            return 0
        m = re.fullmatch(r"a(\d+)\.h(\d+)", name)
        return 1 + int(m[1]) * (H + 1) + int(m[2]) if m else 1 + int(name[1:]) * (H + 1) + H
    if dst == "logits":
        return fwd(src), L * (3 * H + 1)
    m = re.fullmatch(r"a(\d+)\.h(\d+)<([qkv])>", dst)
    if m:
        return fwd(src), int(m[1]) * (3 * H + 1) + "qkv".index(m[3]) * H + int(m[2])
    return fwd(src), int(dst[1:]) * (3 * H + 1) + 3 * H


@pytest.mark.parametrize("kv", ["grouped", "per_query_head"])
def test_networkx_round_trip_is_exact(kv):
    g = scored_graph(kv)
    G = g.to_networkx(weight="w")
    assert isinstance(G, nx.MultiDiGraph)
    assert G.number_of_edges() == g.n_valid_edges
    assert G.graph["n_kv_heads"] == 2 and G.graph["kv_edges"] == kv
    row, col = g.edge_index("a0.h1->a1.h2<q>")
    data = G.get_edge_data("a0.h1", "a1.h2")["a0.h1->a1.h2<q>"]
    assert data == {"w": float(g.scores[row, col]), "in_graph": bool(g.in_graph[row, col]), "qkv": "q"}
    assert G.nodes["m1"]["kind"] == "mlp" and G.nodes["m1"]["layer"] == 1
    assert Graph.from_networkx(G, weight="w").equals(g)


def test_networkx_in_graph_view_and_missing_cfg():
    g = scored_graph()
    G = g.to_networkx(include="in_graph")
    assert G.number_of_edges() == g.n_edges_in_graph
    back = Graph.from_networkx(G)  # absent edges: score 0, out of the circuit
    assert torch.equal(back.in_graph, g.in_graph)
    assert torch.equal(back.scores, torch.where(g.in_graph, g.scores, torch.zeros(())))
    G.graph.clear()
    with pytest.raises(GimlensError, match="model="):
        Graph.from_networkx(G)
    assert torch.equal(Graph.from_networkx(G, model={"n_layers": 2, "n_heads": 4, "n_key_value_heads": 2,
                                                      "d_model": 32}).in_graph, g.in_graph)


@pytest.mark.parametrize("kv", ["grouped", "per_query_head"])
def test_own_json_round_trip_is_exact(tmp_path, kv):
    g = scored_graph(kv, seed=3)
    g.to_json(tmp_path / "c.json")
    assert Graph.from_json(tmp_path / "c.json").equals(g)
    assert Graph.load(tmp_path / "c.json").equals(g)


def test_loading_a_file_for_another_model_raises(tmp_path, gpt2_model, llama_model):
    g = Graph.from_model(llama_model)
    g.to_json(tmp_path / "c.json")
    Graph.from_json(tmp_path / "c.json", model=llama_model)
    with pytest.raises(GimlensError, match="does not match"):
        Graph.from_json(tmp_path / "c.json", model=gpt2_model)
    g.to_eap_json(tmp_path / "e.json")
    with pytest.raises(GimlensError, match="does not match"):
        Graph.from_eap_json(tmp_path / "e.json", model=gpt2_model)


def test_damaged_or_foreign_json_raises(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(GimlensError):
        Graph.from_json(tmp_path / "x.json")
    scored_graph().to_eap_json(tmp_path / "e.json")
    with pytest.raises(GimlensError, match="from_eap_json"):
        Graph.from_json(tmp_path / "e.json")


def test_hand_written_eap_ig_file_loads_with_its_scores(tmp_path, gpt2_model):
    L, H = 2, 2
    edges = {"input->a0.h1<k>": (0.25, True), "a0.h1->m1": (-1.5, True), "m1->logits": (3.0, True),
             "a0.h0->a1.h1<v>": (0.125, False), "input->logits": (1e-8, False)}
    doc = {"cfg": {"n_layers": L, "n_heads": H, "d_model": 8, "parallel_attn_mlp": False},
           "nodes": {"input": {"in_graph": True}, "a0.h1": {"in_graph": True}, "m1": {"in_graph": True},
                     "a0.h0": {"in_graph": False}, "logits": {"in_graph": True}},
           "edges": {k: {"score": s, "in_graph": m} for k, (s, m) in edges.items()}}
    (tmp_path / "mib.json").write_text(json.dumps(doc))
    g = Graph.from_eap_json(tmp_path / "mib.json")
    assert g.kv_edges.value == "per_query_head" and (g.n_forward, g.n_backward) == (7, 15)
    expected_s = torch.zeros(7, 15)
    expected_m = torch.zeros(7, 15, dtype=torch.bool)
    for name, (s, m) in edges.items():
        idx = eap_index(L, H, *name.split("->"))
        expected_s[idx], expected_m[idx] = s, m
    assert torch.equal(g.scores, expected_s) and torch.equal(g.in_graph, expected_m)
    assert [g.forward_names[i] for i in g.nodes_in_graph.nonzero().flatten()] == ["input", "a0.h1", "m1"]
    assert Graph.load(tmp_path / "mib.json").equals(g)  # auto-detected as EAP-IG
    with pytest.raises(GimlensError):
        Graph.from_eap_json(tmp_path / "mib.json", model=gpt2_model)
    doc["edges"]["a1.h0->a0.h0<q>"] = {"score": 1.0, "in_graph": True}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(GimlensError):
        Graph.from_eap_json(tmp_path / "bad.json")


def test_eap_export_copies_gqa_edges_to_every_query_head(tmp_path):
    g = scored_graph("grouped")
    g.to_eap_json(tmp_path / "e.json")
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["cfg"] == {"n_layers": 2, "n_heads": 4, "d_model": 32, "parallel_attn_mlp": False,
                          "n_key_value_heads": 2, "model_name": "tiny"}
    assert len(doc["edges"]) == Graph(n_layers=2, n_heads=4, d_model=32).n_valid_edges
    assert set(doc["nodes"]) == set(g.forward_names) | {"logits"}
    for h in range(4):  # query heads 0,1 read KV group 0; 2,3 read group 1
        for x in "kv":
            src, written = g.edges[f"a0.h1->a1.g{h // 2}<{x}>"], doc["edges"][f"a0.h1->a1.h{h}<{x}>"]
            assert f32(written["score"]) == src.score and written["in_graph"] == src.in_graph
    assert f32(doc["edges"]["a0.h1->a1.h3<q>"]["score"]) == g.edges["a0.h1->a1.h3<q>"].score
    exact = [f32(doc["edges"][n]["score"]) == e.score for n, e in g.as_kv_edges("per_query_head").edges.items()]
    assert all(exact) and len(exact) == len(doc["edges"])
    assert Graph.from_eap_json(tmp_path / "e.json", kv_edges="grouped").equals(g)
    assert Graph.from_eap_json(tmp_path / "e.json").equals(g.as_kv_edges("per_query_head"))


def test_hand_written_gqa_eap_file_merges_copies_on_request(tmp_path):
    doc = {"cfg": {"n_layers": 2, "n_heads": 2, "n_key_value_heads": 1, "d_model": 8, "parallel_attn_mlp": False},
           "nodes": {}, "edges": {"input->a1.h0<k>": {"score": 1.0, "in_graph": False},
                                  "input->a1.h1<k>": {"score": 3.0, "in_graph": True}}}
    (tmp_path / "gqa.json").write_text(json.dumps(doc))
    g = Graph.from_eap_json(tmp_path / "gqa.json", kv_edges="grouped")
    row, col = g.edge_index("input->a1.g0<k>")
    assert g.scores[row, col] == 2.0 and g.in_graph[row, col] and g.n_edges_in_graph == 1


@pytest.mark.parametrize("kv", ["grouped", "per_query_head"])
def test_graphml_round_trip_is_exact(tmp_path, kv):
    g = scored_graph(kv, seed=5)
    g.to_graphml(tmp_path / "c.graphml")
    assert Graph.from_graphml(tmp_path / "c.graphml").equals(g)
    assert Graph.load(tmp_path / "c.graphml").equals(g)


def test_dot_text_parses_into_the_in_graph_edge_set(tmp_path):
    g = scored_graph(seed=7)
    text = g.to_dot(tmp_path / "c.dot")
    assert (tmp_path / "c.dot").read_text() == text and text.startswith("digraph")
    parsed = {}
    for m in re.finditer(r'^\s*"([^"]+)" -> "([^"]+)" \[(.*)\];$', text, re.M):
        attrs = dict(re.findall(r'(\w+)=("[^"]*"|[^,\s]+)', m[3]))
        qkv = attrs.get("qkv", "").strip('"')
        name = f"{m[1]}->{m[2]}" + (f"<{qkv}>" if qkv else "")
        assert attrs["name"].strip('"') == name
        parsed[name] = float(attrs["score"])
    expected = {n: e.score for n, e in g.edges.items() if e.in_graph}
    assert parsed == expected and len(expected) == g.n_edges_in_graph > 0
    top = re.findall(r'\[name="([^"]+)"', g.to_dot(top_k=3))
    assert sorted(top) == sorted(sorted(expected, key=lambda n: -abs(expected[n]))[:3])


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<svg")])
def test_render_writes_an_image(tmp_path, suffix, magic):
    g = scored_graph()
    g.apply_topn(30)
    out = g.render(tmp_path / f"c{suffix}")
    data = out.read_bytes()
    assert len(data) > 1000 and magic in data[:600]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"c{suffix}"]


def test_unknown_suffix_raises_before_anything_is_written(tmp_path):
    g = scored_graph()
    for call in (lambda: g.render(tmp_path / "c.bmp"), lambda: g.save(tmp_path / "c.xyz"),
                 lambda: g.render(tmp_path / "c.json"), lambda: Graph.load(tmp_path / "c.png")):
        with pytest.raises(GimlensError):
            call()
    assert list(tmp_path.iterdir()) == []
    for call in (lambda: g.render(tmp_path / "c.png", include="some"), lambda: g.to_dot(include="edges"),
                 lambda: g.to_networkx(include="x"), lambda: g.render(tmp_path / "c.png", top_k=-1)):
        with pytest.raises(GimlensError):
            call()
    with pytest.raises(GimlensError, match="max_edges"):
        g.render(tmp_path / "c.png", include="all", max_edges=10)
    assert list(tmp_path.iterdir()) == []


def test_save_dispatches_on_suffix_and_format(tmp_path):
    g = scored_graph()
    g.save(tmp_path / "a.json")
    g.save(tmp_path / "b.json", format="eap-json")
    g.save(tmp_path / "c.graphml")
    g.save(tmp_path / "d.gv")
    assert Graph.load(tmp_path / "a.json").equals(g)
    assert Graph.load(tmp_path / "b.json").equals(g.as_kv_edges("per_query_head"))
    assert Graph.load(tmp_path / "c.graphml").equals(g)
    assert (tmp_path / "d.gv").read_text() == g.to_dot()


class _Boom(RuntimeError):
    pass


def test_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    g = scored_graph()
    real_open = open

    class HalfFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            raise _Boom("disk full")

    monkeypatch.setattr(export, "open", lambda p, *a, **k: HalfFile(real_open(p, *a, **k)), raising=False)
    for call in (g.to_json, g.to_eap_json, g.to_dot):
        with pytest.raises(_Boom):
            call(tmp_path / "c.out")
        assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def half_then_fail(G, path, *a, **k):
        with real_open(path, "w") as f:
            f.write("<?xml")
        raise _Boom("interrupted")

    monkeypatch.setattr(nx, "write_graphml", half_then_fail)
    (tmp_path / "c.graphml").write_text("old")  # an existing file survives a failed overwrite
    with pytest.raises(_Boom):
        g.to_graphml(tmp_path / "c.graphml")
    assert [p.name for p in tmp_path.iterdir()] == ["c.graphml"]
    assert (tmp_path / "c.graphml").read_text() == "old"


def test_failed_render_leaves_no_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def half_then_fail(self, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"\x89PNG partial")
        raise _Boom("renderer crashed")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(_Boom):
        scored_graph().render(tmp_path / "c.png")
    assert list(tmp_path.iterdir()) == []
