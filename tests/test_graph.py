"""Graph layout, index helpers, valid mask and views, checked against hand-derived values."""

from types import SimpleNamespace

import pytest
import torch

from circuits.graph import Edge, Graph, KVEdges, NodeKind
from gimlens.errors import GimlensError


def expected_valid(L, H, n_slots_kv, parallel=False):
    """The valid mask written out from the contract's sentences, one destination at a time."""
    n_fwd = 1 + L * (H + 1)
    layer_of_src = [-1] + [l for l in range(L) for _ in range(H + 1)]
    is_mlp_src = [False] + [i == H for l in range(L) for i in range(H + 1)]
    cols = []
    for l in range(L):
        for _ in range(H + 2 * n_slots_kv):  # q, k, v inputs: input + everything of layers < l
            cols.append([layer_of_src[f] < l for f in range(n_fwd)])
        # MLP of layer l: also the heads of layer l (not its own MLP), unless parallel
        cols.append([layer_of_src[f] < l or (not parallel and layer_of_src[f] == l and not is_mlp_src[f])
                     for f in range(n_fwd)])
    cols.append([True] * n_fwd)
    return torch.tensor(cols).T


def test_gpt2_mha_layout_counts_and_names(gpt2_model):
    g = Graph.from_model(gpt2_model)
    # L=2, H=4: n_forward = 1 + 2*5, n_backward = 2*(3*4+1) + 1 (EAP-IG formula)
    assert (g.n_forward, g.n_backward) == (11, 27)
    # valid edges: layer 0: 12 attn slots x 1 + MLP 5; layer 1: 12 x 6 + MLP 10; logits 11
    assert g.n_valid_edges == 12 + 5 + 72 + 10 + 11 == int(g.valid.sum())
    assert g.forward_names == ["input", "a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0",
                               "a1.h0", "a1.h1", "a1.h2", "a1.h3", "m1"]
    assert g.backward_names[:13] == [f"a0.h{h}<{x}>" for x in "qkv" for h in range(4)] + ["m0"]
    assert g.backward_names[-1] == "logits"
    assert g.cfg == {"n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "d_model": 32,
                     "parallel_attn_mlp": False, "kv_edges": "grouped", "model_name": "external"}


def test_llama_grouped_layout_has_one_kv_slot_per_kv_head(llama_model):
    g = Graph.from_model(llama_model)
    assert g.cfg["n_kv_heads"] == 2 and g.kv_edges is KVEdges.GROUPED
    assert (g.n_forward, g.n_backward, g.n_kv_slots) == (11, 2 * (4 + 2 * 2 + 1) + 1, 2)
    assert g.backward_names[:9] == ["a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>",
                                    "a0.g0<k>", "a0.g1<k>", "a0.g0<v>", "a0.g1<v>", "m0"]
    # layer 0: 8 slots x 1 + MLP 5; layer 1: 8 x 6 + MLP 10; logits 11
    assert g.n_valid_edges == 8 + 5 + 48 + 10 + 11
    assert torch.equal(g.valid, expected_valid(2, 4, 2))


def test_llama_per_query_head_layout_matches_eap_ig_formula(llama_model):
    g = Graph.from_model(llama_model, kv_edges="per_query_head")
    L, H = 2, 4
    assert g.n_backward == L * (3 * H + 1) + 1
    assert g.backward_names[4:12] == [f"a0.h{h}<{x}>" for x in "kv" for h in range(4)]
    assert g.n_valid_edges == 110
    assert torch.equal(g.valid, expected_valid(2, 4, 4))


@pytest.mark.parametrize("kv", ["grouped", "per_query_head"])
@pytest.mark.parametrize("L,H,Hk,parallel", [(2, 4, 2, False), (3, 6, 3, True), (1, 2, 1, False), (3, 4, 4, True)])
def test_valid_mask_matches_contract(L, H, Hk, parallel, kv):
    g = Graph(n_layers=L, n_heads=H, n_kv_heads=Hk, d_model=8, parallel_attn_mlp=parallel, kv_edges=kv)
    slots = Hk if kv == "grouped" else H
    assert torch.equal(g.valid, expected_valid(L, H, slots, parallel))
    assert torch.equal(g.valid, torch.arange(g.n_forward)[:, None] < g.upstream_counts[None, :])
    # fresh graph = the whole model
    assert torch.equal(g.in_graph, g.valid) and bool(g.nodes_in_graph.all())
    assert g.scores.dtype == torch.float32 and not g.scores.any()


def test_parallel_attn_mlp_mlp_does_not_read_its_own_layer_heads():
    g = Graph(n_layers=2, n_heads=2, d_model=8, parallel_attn_mlp=True)
    col = g.backward_index(1)
    assert g.n_upstream(1, mlp=True) == g.n_upstream(1) == 1 + 3
    assert not g.valid[g.forward_index(1, 0), col] and g.valid[g.forward_index(0), col]


def test_index_helpers_follow_the_formulas():
    L, H, Hk = 3, 6, 2
    g = Graph(n_layers=L, n_heads=H, n_kv_heads=Hk, d_model=8)
    B = H + 2 * Hk + 1
    for l in range(L):
        for h in range(H):
            assert g.forward_index(l, h) == 1 + l * (H + 1) + h
            assert g.backward_index(l, h, "q") == l * B + h
            assert g.forward_names[g.forward_index(l, h)] == f"a{l}.h{h}"
        for k in range(Hk):
            assert g.backward_index(l, k, "k") == l * B + H + k
            assert g.backward_index(l, k, "v") == l * B + H + Hk + k
            assert g.backward_names[g.backward_index(l, k, "v")] == f"a{l}.g{k}<v>"
        assert g.forward_index(l) == 1 + l * (H + 1) + H
        assert g.backward_index(l) == l * B + H + 2 * Hk
        assert g.forward_slice(l) == slice(1 + l * (H + 1), 1 + l * (H + 1) + H)
        assert g.backward_slice(l, "k") == slice(l * B + H, l * B + H + Hk)
    assert g.forward_index(None) == 0 and g.backward_index(None) == g.n_backward - 1
    assert [g.kv_slot(h) for h in range(H)] == [0, 0, 0, 1, 1, 1]
    pq = Graph(n_layers=L, n_heads=H, n_kv_heads=Hk, d_model=8, kv_edges="per_query_head")
    assert [pq.kv_slot(h) for h in range(H)] == list(range(H))
    assert g.edge_index("a0.h5->a2.g1<k>") == (g.forward_index(0, 5), g.backward_index(2, 1, "k"))
    assert g.edge_index("input->logits") == (0, g.n_backward - 1)
    for name, col in zip(g.backward_names, range(g.n_backward)):
        assert g.backward_index_of(name) == col


@pytest.mark.parametrize("call", [
    lambda g: g.forward_index(2, 0), lambda g: g.forward_index(0, 4), lambda g: g.backward_index(0, 2, "k"),
    lambda g: g.backward_index(0, 1, "x"), lambda g: g.backward_index(0, None, "q"),
    lambda g: g.edge_index("a1.h0->a0.h0<q>"), lambda g: g.edge_index("a0.h0->m9"), lambda g: g.edge_index("m0"),
    lambda g: g.forward_index_of("a0.g0"),
])
def test_bad_indices_raise_gimlens_error(call):
    with pytest.raises(GimlensError):
        call(Graph(n_layers=2, n_heads=4, n_kv_heads=2, d_model=8))


@pytest.mark.parametrize("make", [
    lambda: Graph(n_layers=2, n_heads=4, d_model=8, kv_edges="per_kv"),
    lambda: Graph.from_model(SimpleNamespace(n_layers=2, n_heads=4)),
    lambda: Graph.from_model({"n_heads": 4, "d_model": 8}),
    lambda: Graph(n_layers=2, n_heads=4, n_kv_heads=3, d_model=8),
    lambda: Graph(n_layers=0, n_heads=4, d_model=8),
    lambda: Graph(n_layers=2, n_heads=4, d_model=8, parallel_attn_mlp="yes"),
])
def test_bad_config_raises_gimlens_error(make):
    with pytest.raises(GimlensError):
        make()


def test_edges_and_nodes_views_reflect_the_tensors():
    g = Graph(n_layers=2, n_heads=4, n_kv_heads=2, d_model=8)
    row, col = g.edge_index("a0.h3->a1.g1<k>")
    g.scores[row, col] = 2.5
    g.in_graph[row, col] = False
    edges = g.edges
    assert len(edges) == g.n_valid_edges
    assert edges["a0.h3->a1.g1<k>"] == Edge("a0.h3->a1.g1<k>", "a0.h3", "a1.g1", "k", 2.5, False, (row, col))
    assert edges["a0.h0->m0"].qkv is None and edges["m1->logits"].in_graph
    nodes = g.nodes
    assert nodes["a1.g1"].kind is NodeKind.KV_GROUP and nodes["a1.g1"].head == 1
    assert nodes["logits"].in_graph and nodes["m0"].kind is NodeKind.MLP
    assert set(nodes) == set(g.forward_names) | {"a0.g0", "a0.g1", "a1.g0", "a1.g1", "logits"}
    assert all(e.src in nodes and e.dst in nodes for e in edges.values())


def test_copy_is_independent_and_equal():
    g = Graph(n_layers=1, n_heads=2, d_model=8)
    c = g.copy()
    assert c.equals(g) and c.same_layout(g)
    c.scores[0, -1] = 1.0
    c.in_graph[0, -1] = False
    assert g.scores[0, -1] == 0 and g.in_graph[0, -1] and not c.equals(g)


def test_assigning_scores_casts_to_float32_and_zeroes_invalid_entries():
    g = Graph(n_layers=2, n_heads=2, d_model=8)
    g.scores = torch.ones(g.n_forward, g.n_backward, dtype=torch.float64)
    assert g.scores.dtype == torch.float32
    assert torch.equal(g.scores, g.valid.float())
    g.in_graph = torch.ones(g.n_forward, g.n_backward)
    assert torch.equal(g.in_graph, g.valid)
    with pytest.raises(GimlensError):
        g.scores = torch.ones(3, 3)


def test_kv_layout_conversion_copies_group_edges_and_merges_back():
    g = Graph(n_layers=2, n_heads=4, n_kv_heads=2, d_model=8)
    g.scores = torch.randn(g.n_forward, g.n_backward)
    g.in_graph = torch.rand(g.n_forward, g.n_backward) > 0.5
    pq = g.as_kv_edges("per_query_head")
    for l in range(2):
        for h in range(4):
            for x in "kv":
                src, dst = pq.backward_index(l, h, x), g.backward_index(l, g.kv_slot(h), x)
                assert torch.equal(pq.scores[:, src], g.scores[:, dst])
                assert torch.equal(pq.in_graph[:, src], g.in_graph[:, dst])
    assert pq.as_kv_edges("grouped").equals(g)
    # merging distinct per-query-head scores: mean score, any membership
    pq.scores[0, pq.backward_index(1, 0, "k")] = 1.0
    pq.scores[0, pq.backward_index(1, 1, "k")] = 2.0
    pq.in_graph[0, pq.backward_index(1, 0, "k")] = False
    pq.in_graph[0, pq.backward_index(1, 1, "k")] = True
    back = pq.as_kv_edges("grouped")
    assert back.scores[0, g.backward_index(1, 0, "k")] == 1.5 and back.in_graph[0, g.backward_index(1, 0, "k")]


def test_check_matches_names_the_mismatch(gpt2_model, llama_model):
    g = Graph.from_model(llama_model, kv_edges="per_query_head")
    g.check_matches(llama_model)
    with pytest.raises(GimlensError, match="n_kv_heads"):
        g.check_matches(gpt2_model)


def test_layout_from_a_config_alone_matches_the_graph_and_model_spec(any_model):
    from circuits.layout import Layout
    from circuits._engine.model import ModelSpec

    lay = Layout.from_config(any_model.cfg)
    g = Graph.from_model(any_model)
    assert lay is g.layout  # cached: graphs of one shape share the masks
    spec = ModelSpec.read(any_model)
    assert lay.n_forward == spec.n_forward
    for layer in range(lay.n_layers):
        assert lay.forward_slice(layer) == spec.head_rows(layer)
        assert lay.forward_index(layer) == spec.mlp_row(layer)
        for mlp in (False, True):
            assert lay.upstream(layer, mlp=mlp) == spec.upstream(layer, mlp)
    assert lay.upstream(None) == spec.upstream(None) == lay.n_forward


def test_layout_reads_mappings_and_objects_alike():
    from circuits.layout import Layout

    a = Layout.from_config({"n_layers": 3, "n_heads": 6, "n_kv_heads": 2, "parallel_attn_mlp": True})
    b = Layout.from_config(SimpleNamespace(n_layers=3, n_heads=6, n_key_value_heads=2, parallel_attn_mlp=True))
    assert a is b and (a.n_kv_heads, a.parallel_attn_mlp, a.n_slot_kv) == (2, True, 2)
    assert Layout.from_config({"n_layers": 3, "n_heads": 6}, "per_query_head").n_slot_kv == 6
    with pytest.raises(GimlensError, match="n_layers"):
        Layout.from_config({"n_heads": 6})


def test_node_names_kinds_and_rows_follow_the_layout():
    g = Graph(n_layers=2, n_heads=4, n_kv_heads=2, d_model=8)
    specs = {name: (kind, layer, head, rows) for name, kind, layer, head, rows in g.layout.node_specs}
    assert specs["a1.g1"] == (NodeKind.KV_GROUP, 1, 1, (g.forward_index(1, 2), g.forward_index(1, 3)))
    assert specs["m0"] == (NodeKind.MLP, 0, None, (g.forward_index(0),))
    assert specs["logits"] == (NodeKind.LOGITS, None, None, ())
    g.nodes_in_graph = torch.zeros(g.n_forward, dtype=torch.bool)
    g.nodes_in_graph[g.forward_index(1, 3)] = True
    nodes = g.nodes
    assert nodes["a1.g1"].in_graph and not nodes["a1.g0"].in_graph and nodes["logits"].in_graph
