"""Exports and files of a circuit Graph: exact round trips, EAP-IG/MIB compatibility, DOT, images, atomicity."""

import json
import math
import os
import re
import stat
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import networkx as nx
import numpy as np
import pytest
import torch

import gimlens.runtime as runtime
from circuits.export import from_eap_json, from_graphml, to_eap_json, to_graphml
from circuits.graph import Graph
from circuits.render import render, to_dot
from gimlens.errors import GimlensError

SMOLLM2 = SimpleNamespace(n_layers=30, n_heads=9, n_key_value_heads=3, d_model=576, model_name="smollm2-shaped")


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


def circuit_of(g):
    """The circuit written out from the tensors: {edge name: (score, in_graph)} of in-graph edges."""
    fwd, bwd = g.forward_names, g.backward_names
    return {f"{fwd[r]}->{bwd[c]}": (float(g.scores[r, c]), True) for r, c in g.in_graph.nonzero().tolist()}


def nx_edges(G):
    """{edge name: (score, in_graph)} of a networkx export, the name rebuilt from endpoints and qkv
    (a grouped k/v copy `src->a1.h3` with `kv_group=1` names the graph's edge `src->a1.g1<k>`)."""
    def name(u, v, d):
        if "kv_group" in d:
            v = f"{v.split('.')[0]}.g{d['kv_group']}"
        return f"{u}->{v}<{d['qkv']}>" if "qkv" in d else f"{u}->{v}"
    return {name(u, v, d): (d["score"], d["in_graph"]) for u, v, d in G.edges(data=True)}


def per_head_circuit(g):
    """The circuit with k/v edges per query head, written from the tensors: a grouped k/v edge of
    group `gi` goes to each head `h` with `h // (H // Hk) == gi` that is in `nodes_in_graph`."""
    c = g.cfg
    rep = c["n_heads"] // c["n_kv_heads"]
    out = {}
    for name, value in circuit_of(g).items():
        m = re.fullmatch(r"(.+)->a(\d+)\.g(\d+)<([kv])>", name)
        if m is None:
            out[name] = value
            continue
        layer, group = int(m[2]), int(m[3])
        for h in range(group * rep, (group + 1) * rep):
            if g.nodes_in_graph[1 + layer * (c["n_heads"] + 1) + h]:
                out[f"{m[1]}->a{layer}.h{h}<{m[4]}>"] = value
    return out


def key_edges(G):
    """{edge key: (score, in_graph)} of a networkx multigraph."""
    return {k: (d["score"], d["in_graph"]) for _, _, k, d in G.edges(keys=True, data=True)}


@pytest.mark.parametrize("kv", ["grouped", "per_query_head"])
def test_networkx_of_a_model_sized_circuit_holds_only_the_circuit(kv):
    g = Graph.from_model(SMOLLM2, kv_edges=kv)
    g.scores = torch.randn(g.n_forward, g.n_backward, generator=torch.Generator().manual_seed(0))
    for layer in range(20):  # 40 strong edges forming input -> head -> logits paths
        for name in (f"input->a{layer}.h{layer % 9}<q>", f"a{layer}.h{layer % 9}->logits"):
            g.scores[g.edge_index(name)] = 10.0 + layer
    g.apply_topn(50)
    assert 40 <= g.n_edges_in_graph <= 50 < g.n_valid_edges
    G = g.to_networkx()
    assert nx_edges(G) == circuit_of(g)
    touched = {n for name in circuit_of(g) for n in name.split("->")}
    touched = {re.sub(r"<[qkv]>$", "", n) for n in touched}
    assert set(G.nodes) == touched
    assert all(G.nodes[n]["in_graph"] for n in G.nodes)  # pruned circuit: every node it touches is in
    full = g.to_networkx(include="all")  # grouped k/v edges: one per query head that reads them
    assert full.number_of_edges() == g.as_kv_edges("per_query_head").n_valid_edges
    assert set(nx_edges(full)) == set(g.layout.edge_names)
    flags = {name: m for name, (_, m) in nx_edges(full).items()}
    assert {name for name, m in flags.items() if m} == set(circuit_of(g))


@pytest.mark.parametrize("kv", ["grouped", "per_query_head"])
def test_networkx_round_trip_is_exact(kv):
    g = scored_graph(kv)
    G = g.to_networkx(include="all", weight="w")
    assert isinstance(G, nx.MultiDiGraph)
    assert G.number_of_edges() == g.as_kv_edges("per_query_head").n_valid_edges
    assert G.graph["n_kv_heads"] == 2 and G.graph["kv_edges"] == kv
    row, col = g.edge_index("a0.h1->a1.h2<q>")
    data = G.get_edge_data("a0.h1", "a1.h2")["a0.h1->a1.h2<q>"]
    assert data == {"w": float(g.scores[row, col]), "in_graph": bool(g.in_graph[row, col]), "qkv": "q"}
    assert G.nodes["m1"]["kind"] == "mlp" and G.nodes["m1"]["layer"] == 1
    assert Graph.from_networkx(G, weight="w").equals(g)


def test_networkx_circuit_view_reads_back_and_missing_cfg():
    g = scored_graph()
    G = g.to_networkx()
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
    text = g.to_json()
    assert Graph.from_json(text).equals(g)
    assert json.loads(g.to_json(indent=2)) == json.loads(text)
    assert g.save(tmp_path / "c.json") == tmp_path / "c.json"
    assert (tmp_path / "c.json").read_text() == text
    assert Graph.load(tmp_path / "c.json").equals(g)
    # the documented encoding, decoded here without the library
    doc = json.loads(text)
    scores = np.frombuffer(__import__("base64").b64decode(doc["scores"]), "<f4")
    assert torch.equal(torch.from_numpy(scores.copy()), g.scores[g.valid])


def test_from_json_takes_text_and_points_files_to_load(tmp_path):
    g = scored_graph()
    g.save(tmp_path / "c.json")
    with pytest.raises(GimlensError, match="Graph.load"):
        Graph.from_json(str(tmp_path / "c.json"))


def test_loading_a_file_for_another_model_raises(tmp_path, gpt2_model, llama_model):
    g = Graph.from_model(llama_model)
    g.save(tmp_path / "c.json")
    Graph.load(tmp_path / "c.json", model=llama_model)
    with pytest.raises(GimlensError, match="does not match"):
        Graph.load(tmp_path / "c.json", model=gpt2_model)
    with pytest.raises(GimlensError, match="does not match"):
        Graph.from_json(g.to_json(), model=gpt2_model)
    g.save(tmp_path / "e.json", format="eap-json")
    with pytest.raises(GimlensError, match="does not match"):
        from_eap_json(tmp_path / "e.json", model=gpt2_model)


def test_damaged_or_foreign_json_raises(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(GimlensError):
        Graph.load(tmp_path / "x.json")
    with pytest.raises(GimlensError):
        Graph.from_json("{not json")
    to_eap_json(scored_graph(), tmp_path / "e.json")
    with pytest.raises(GimlensError, match="from_eap_json"):
        Graph.from_json((tmp_path / "e.json").read_text())


def test_hand_written_eap_ig_file_loads_with_its_scores(tmp_path, gpt2_model):
    L, H = 2, 2
    edges = {"input->a0.h1<k>": (0.25, True), "a0.h1->m1": (-1.5, True), "m1->logits": (3.0, True),
             "a0.h0->a1.h1<v>": (0.125, False), "input->logits": (1e-8, False)}
    doc = {"cfg": {"n_layers": L, "n_heads": H, "d_model": 8, "parallel_attn_mlp": False},
           "nodes": {"input": {"in_graph": True}, "a0.h1": {"in_graph": True}, "m1": {"in_graph": True},
                     "a0.h0": {"in_graph": False}, "logits": {"in_graph": True}},
           "edges": {k: {"score": s, "in_graph": m} for k, (s, m) in edges.items()}}
    (tmp_path / "mib.json").write_text(json.dumps(doc))
    g = from_eap_json(tmp_path / "mib.json")
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
        from_eap_json(tmp_path / "mib.json", model=gpt2_model)
    doc["edges"]["a1.h0->a0.h0<q>"] = {"score": 1.0, "in_graph": True}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(GimlensError):
        from_eap_json(tmp_path / "bad.json")


def test_eap_export_copies_gqa_edges_to_every_query_head(tmp_path):
    g = scored_graph("grouped")
    g.save(tmp_path / "e.json", format="eap-json")
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
    assert from_eap_json(tmp_path / "e.json", kv_edges="grouped").equals(g)
    assert from_eap_json(tmp_path / "e.json").equals(g.as_kv_edges("per_query_head"))


def test_hand_written_gqa_eap_file_merges_copies_on_request(tmp_path):
    doc = {"cfg": {"n_layers": 2, "n_heads": 2, "n_key_value_heads": 1, "d_model": 8, "parallel_attn_mlp": False},
           "nodes": {}, "edges": {"input->a1.h0<k>": {"score": 1.0, "in_graph": False},
                                  "input->a1.h1<k>": {"score": 3.0, "in_graph": True}}}
    (tmp_path / "gqa.json").write_text(json.dumps(doc))
    g = from_eap_json(tmp_path / "gqa.json", kv_edges="grouped")
    row, col = g.edge_index("input->a1.g0<k>")
    assert g.scores[row, col] == 2.0 and g.in_graph[row, col] and g.n_edges_in_graph == 1


def graphml_edges(path):
    """{edge key: (score, in_graph)} read from a GraphML file with ElementTree, not networkx."""
    ns = {"g": "http://graphml.graphdrawing.org/xmlns"}
    root = ET.parse(path).getroot()
    keys = {k.get("id"): k.get("attr.name") for k in root.findall("g:key", ns) if k.get("for") == "edge"}
    out = {}
    for e in root.iter("{http://graphml.graphdrawing.org/xmlns}edge"):
        data = {keys[d.get("key")]: d.text for d in e.findall("g:data", ns)}
        out[e.get("id")] = (float(data["score"]), data["in_graph"].lower() == "true")
    return out


@pytest.mark.parametrize("kv", ["grouped", "per_query_head"])
def test_graphml_file_holds_the_graph_values_and_round_trips(tmp_path, kv):
    g = scored_graph(kv, seed=5)
    to_graphml(g, tmp_path / "c.graphml", include="all")
    written = graphml_edges(tmp_path / "c.graphml")
    # every edge, grouped k/v edges copied to each query head of the group (the MIB spelling)
    expected = {e.name: (e.score, e.in_graph) for e in g.as_kv_edges("per_query_head").edges.values()}
    assert written.keys() == expected.keys()
    assert all(f32(written[n][0]) == s and written[n][1] == m for n, (s, m) in expected.items())
    assert from_graphml(tmp_path / "c.graphml").equals(g)
    assert Graph.load(tmp_path / "c.graphml").equals(g)
    g.prune()  # the default file is the circuit: in-graph edges only
    g.save(tmp_path / "circuit.graphml")
    circuit = graphml_edges(tmp_path / "circuit.graphml")
    assert circuit.keys() == per_head_circuit(g).keys() and len(circuit) >= g.n_edges_in_graph > 0
    assert all(f32(circuit[n][0]) == s for n, (s, _) in per_head_circuit(g).items())


def test_files_get_the_umask_mode(tmp_path):
    g = scored_graph()
    old = os.umask(0o022)
    try:
        for name, fmt in [("a.json", None), ("b.json", "eap-json"), ("c.graphml", None), ("d.dot", None),
                          ("e.png", None), ("f.svg", None)]:
            g.save(tmp_path / name, format=fmt)
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    finally:
        os.umask(old)


def test_unknown_suffix_raises_before_anything_is_written(tmp_path):
    g = scored_graph()
    for call in (lambda: render(g, tmp_path / "c.bmp"), lambda: g.save(tmp_path / "c.xyz"),
                 lambda: render(g, tmp_path / "c.json"), lambda: Graph.load(tmp_path / "c.png"),
                 lambda: g.save(tmp_path / "c.json", format="excel"), lambda: g.save(tmp_path / "no" / "c.json")):
        with pytest.raises(GimlensError):
            call()
    assert list(tmp_path.iterdir()) == []
    for call in (lambda: render(g, tmp_path / "c.png", include="some"), lambda: to_dot(g, include="edges"),
                 lambda: g.to_networkx(include="x"), lambda: render(g, tmp_path / "c.png", top_k=-1)):
        with pytest.raises(GimlensError):
            call()
    with pytest.raises(GimlensError, match="max_edges"):
        render(g, tmp_path / "c.png", include="all", max_edges=10)
    assert list(tmp_path.iterdir()) == []


def test_save_dispatches_on_suffix_and_format(tmp_path):
    g = scored_graph()
    g.save(tmp_path / "a.json")
    g.save(tmp_path / "b.json", format="eap-json")
    g.save(tmp_path / "c.graphml")
    g.save(tmp_path / "d.gv")
    g.save(tmp_path / "e.graphml", include="all")
    assert Graph.load(tmp_path / "a.json").equals(g)
    assert Graph.load(tmp_path / "b.json").equals(g.as_kv_edges("per_query_head"))
    assert Graph.load(tmp_path / "b.json", format="eap-json").equals(g.as_kv_edges("per_query_head"))
    circuit = Graph.load(tmp_path / "c.graphml")  # the circuit: other edges read back as score 0
    assert torch.equal(circuit.in_graph, g.in_graph)
    assert torch.equal(circuit.scores, torch.where(g.in_graph, g.scores, torch.zeros(())))
    assert Graph.load(tmp_path / "e.graphml").equals(g)
    assert (tmp_path / "d.gv").read_text() == to_dot(g)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fmt,name", [(None, "c.json"), ("eap-json", "c.json"), (None, "c.graphml"),
                                      (None, "c.dot"), (None, "c.png")])
def test_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, fmt, name):
    g = scored_graph()
    g.apply_topn(20)
    real_fdopen = os.fdopen

    class HalfFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise _Boom("disk full")

        def __getattr__(self, attr):  # seek/tell/flush for writers that use them
            return getattr(self.f, attr)

    (tmp_path / name).write_text("old")  # an existing file survives a failed overwrite
    monkeypatch.setattr(runtime.os, "fdopen", lambda *a, **k: HalfFile(real_fdopen(*a, **k)))
    with pytest.raises(_Boom):
        g.save(tmp_path / name, format=fmt)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_text() == "old"


def node_scored_graph(kv="grouped"):
    g = scored_graph(kv, seed=9)
    g.node_scores = torch.randn(g.n_forward, generator=torch.Generator().manual_seed(9))
    g.node_scores[0] = float("nan")  # unscored
    g.apply_topn(4, level="node", prune=False)
    return g


@pytest.mark.parametrize("kv", ["grouped", "per_query_head"])
def test_node_scores_round_trip_through_every_readable_format(tmp_path, kv):
    g = node_scored_graph(kv)
    assert Graph.from_json(g.to_json()).equals(g)
    assert Graph.from_networkx(g.to_networkx(include="all")).equals(g)
    g.save(tmp_path / "c.graphml", include="all")
    assert Graph.load(tmp_path / "c.graphml").equals(g)
    g.save(tmp_path / "e.json", format="eap-json")
    assert from_eap_json(tmp_path / "e.json", kv_edges=kv).equals(g)
    plain = scored_graph(kv)
    assert Graph.from_json(plain.to_json()).node_scores is None  # no node scores: none written, none read


def test_mib_node_level_file_writes_a_score_per_source_node(tmp_path):
    g = node_scored_graph("grouped")
    to_eap_json(g, tmp_path / "e.json")
    nodes = json.loads((tmp_path / "e.json").read_text())["nodes"]
    for i, name in enumerate(g.forward_names):
        written, expected = nodes[name].get("score"), float(g.node_scores[i])
        assert (written != written and expected != expected) or f32(written) == expected, name
        assert nodes[name]["in_graph"] == bool(g.nodes_in_graph[i])
    assert "score" not in nodes["logits"] and nodes["logits"]["in_graph"]


def test_hand_written_mib_node_level_file_loads_its_node_scores(tmp_path):
    doc = {"cfg": {"n_layers": 1, "n_heads": 2, "d_model": 8, "parallel_attn_mlp": False},
           "nodes": {"input": {"in_graph": True}, "a0.h0": {"in_graph": True, "score": 0.75},
                     "a0.h1": {"in_graph": False, "score": -0.25}, "m0": {"in_graph": True, "score": 2.0},
                     "logits": {"in_graph": True}},
           "edges": {"input->a0.h0<q>": {"score": 1.0, "in_graph": True}}}
    (tmp_path / "nodes.json").write_text(json.dumps(doc))
    g = Graph.load(tmp_path / "nodes.json")
    assert g.node_scores[1:].tolist() == [0.75, -0.25, 2.0] and g.node_scores[0].isnan()
    assert g.nodes_in_graph.tolist() == [True, True, False, True]
    assert g.nodes["a0.h1"].score == -0.25 and g.nodes["logits"].score is None
    g.apply_topn(1, level="node", prune=False)  # m0 (|2.0|) and the unscored input
    assert g.nodes_in_graph.tolist() == [True, False, False, True]


def neuron_graph(kv="grouped"):
    g = scored_graph(kv, seed=4, d_model=6)
    gen = torch.Generator().manual_seed(4)
    g.neuron_scores = torch.randn(g.n_forward, 6, generator=gen)
    g.neuron_scores[0, :3] = float("nan")
    g.apply_topn(10, level="neuron", prune=False)
    return g


@pytest.mark.parametrize("kv", ["grouped", "per_query_head"])
def test_neuron_level_state_round_trips_through_own_and_eap_ig_json(tmp_path, kv):
    g = neuron_graph(kv)
    assert Graph.from_json(g.to_json()).equals(g)
    to_eap_json(g, tmp_path / "e.json")
    nodes = json.loads((tmp_path / "e.json").read_text())["nodes"]
    for i, name in enumerate(g.forward_names):
        assert nodes[name]["neurons"] == g.neurons_in_graph[i].tolist()
        written = torch.tensor([math.nan if v is None else v for v in nodes[name]["neurons_scores"]])
        assert torch.equal(written.float().isnan(), g.neuron_scores[i].isnan())
        assert torch.equal(written.float().nan_to_num(), g.neuron_scores[i].nan_to_num())
    assert from_eap_json(tmp_path / "e.json", kv_edges=kv).equals(g)


def test_hand_written_eap_ig_neuron_file_loads(tmp_path):
    doc = {"cfg": {"n_layers": 1, "n_heads": 1, "d_model": 2, "parallel_attn_mlp": False},
           "nodes": {"input": {"in_graph": True, "neurons": [True, False], "neurons_scores": [0.5, 0.25]},
                     "a0.h0": {"in_graph": False, "neurons": [False, False]}, "logits": {"in_graph": True}},
           "edges": {"input->logits": {"score": 1.0, "in_graph": True}}}
    (tmp_path / "n.json").write_text(json.dumps(doc))
    g = Graph.load(tmp_path / "n.json")
    assert g.neurons_in_graph.tolist() == [[True, False], [False, False], [False, False]]  # absent: out
    assert g.neuron_scores[0].tolist() == [0.5, 0.25] and bool(g.neuron_scores[1:].isnan().all())  # absent: unscored
