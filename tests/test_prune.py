"""Edge selection (top-n, threshold, greedy) and dangling-edge pruning against brute-force references."""

import re

import networkx as nx
import pytest
import torch

from circuits.graph import Graph
from circuits.prune import Selection, prune_dangling, select
from gimlens.errors import GimlensError


def random_graph(seed, kv="grouped", L=3, H=4, Hk=2, parallel=False):
    g = Graph(n_layers=L, n_heads=H, n_kv_heads=Hk, d_model=8, kv_edges=kv, parallel_attn_mlp=parallel)
    gen = torch.Generator().manual_seed(seed)
    g.scores = torch.randn(g.n_forward, g.n_backward, generator=gen)
    return g


def slot_heads(g, slot_name):
    """Forward node names a destination slot feeds, read off its name (independent of the code)."""
    if slot_name == "logits":
        return []
    m = re.fullmatch(r"a(\d+)\.([hg])(\d+)<[qkv]>", slot_name)
    if m is None:
        return [slot_name]
    layer, kind, i = int(m[1]), m[2], int(m[3])
    if kind == "h":
        return [f"a{layer}.h{i}"]
    rep = g.cfg["n_heads"] // g.cfg["n_kv_heads"]
    return [f"a{layer}.h{h}" for h in range(i * rep, (i + 1) * rep)]


def valid_edges(g):
    return [tuple(rc) for rc in g.valid.nonzero().tolist()]


def reference_prune(g, mask):
    """Keep an edge iff input reaches its source and its destination slot reaches logits (networkx)."""
    D = nx.DiGraph()
    fwd, bwd = g.forward_names, g.backward_names
    for r, c in mask.nonzero().tolist():
        D.add_edge(fwd[r], "slot:" + bwd[c])
    for c, name in enumerate(bwd):
        for node in slot_heads(g, name):
            D.add_edge("slot:" + name, node)
    D.add_edge("slot:logits", "LOGITS")
    D.add_nodes_from(["input", "LOGITS"])
    from_input = nx.descendants(D, "input") | {"input"}
    to_logits = nx.ancestors(D, "LOGITS")
    kept = torch.zeros_like(mask)
    for r, c in mask.nonzero().tolist():
        kept[r, c] = fwd[r] in from_input and "slot:" + bwd[c] in to_logits
    nodes = torch.tensor([n in from_input and n in to_logits for n in fwd])
    return kept, nodes


def greedy_reference(g, n, absolute):
    """The greedy rule written naively: scan every candidate edge each step."""
    S = g.scores.abs() if absolute else g.scores
    fwd, bwd = g.forward_names, g.backward_names
    in_nodes, chosen = set(), set()
    edges = valid_edges(g)
    for _ in range(n):
        best = None
        for r, c in edges:
            if (r, c) in chosen:
                continue
            if bwd[c] == "logits" or any(h in in_nodes for h in slot_heads(g, bwd[c])):
                # documented tie rule: lower destination index, then lower source index
                if best is None or (S[r, c], -c, -r) > (S[best], -best[1], -best[0]):
                    best = (r, c)
        chosen.add(best)
        in_nodes.add(fwd[best[0]])
    mask = torch.zeros(g.n_forward, g.n_backward, dtype=torch.bool)
    for rc in chosen:
        mask[rc] = True
    return mask


@pytest.mark.parametrize("absolute", [True, False])
def test_topn_picks_exactly_the_n_largest_scores_among_valid_edges(absolute):
    g = random_graph(0)
    g.scores[~g.valid] = 100.0  # in-place: invalid entries must still never be chosen
    n = 17
    g.apply_topn(n, absolute=absolute, prune=False)
    key = (lambda rc: abs(float(g.scores[rc]))) if absolute else (lambda rc: float(g.scores[rc]))
    expected = sorted(valid_edges(g), key=key, reverse=True)[:n]
    assert sorted(map(tuple, g.in_graph.nonzero().tolist())) == sorted(expected)
    assert g.n_edges_in_graph == n


def test_threshold_is_inclusive_and_absolute_by_default():
    g = Graph(n_layers=1, n_heads=2, d_model=8)
    g.scores[g.edge_index("input->a0.h0<q>")] = 0.5
    g.scores[g.edge_index("input->a0.h1<k>")] = -0.5
    g.scores[g.edge_index("a0.h0->m0")] = 0.49
    g.scores[g.edge_index("m0->logits")] = 2.0
    names = lambda: {n for n, e in g.edges.items() if e.in_graph}  # noqa: E731
    g.apply_threshold(0.5, prune=False)
    assert names() == {"input->a0.h0<q>", "input->a0.h1<k>", "m0->logits"}
    g.apply_threshold(0.5, absolute=False, prune=False)
    assert names() == {"input->a0.h0<q>", "m0->logits"}
    g.apply_threshold(-0.5, absolute=False, prune=False)  # every valid edge (-0.5 included), nothing invalid
    assert names() == set(g.edges) and g.n_edges_in_graph == g.n_valid_edges


def test_pruning_removes_a_dangling_chain_and_keeps_a_connected_path():
    g = Graph(n_layers=2, n_heads=4, n_kv_heads=2, d_model=8).reset()
    path = ["input->a0.h1<q>", "a0.h1->m1", "m1->logits"]
    dangling = [
        "input->a0.g1<v>", "a0.h3->a1.h2<q>",  # chain ending at a1.h2, which feeds nothing
        "a1.h3->logits",  # fed by nothing
        "a0.h2->a1.g0<k>",  # a0.h2 has no input; a1.g0's heads have no output
    ]
    for name in path + dangling:
        g.in_graph[g.edge_index(name)] = True
    g.prune()
    assert {n for n, e in g.edges.items() if e.in_graph} == set(path)
    assert {n for n, i in zip(g.forward_names, g.nodes_in_graph.tolist()) if i} == {"input", "a0.h1", "m1"}


def test_grouped_kv_edge_survives_through_another_head_of_its_group():
    g = Graph(n_layers=2, n_heads=4, n_kv_heads=2, d_model=8).reset()
    # the k input of KV group 0 at layer 1 feeds a1.h0 and a1.h1; only a1.h1 reaches logits
    for name in ["input->a1.g0<k>", "a1.h1->logits"]:
        g.in_graph[g.edge_index(name)] = True
    g.prune()
    assert g.n_edges_in_graph == 2
    assert g.nodes_in_graph[g.forward_index(1, 1)] and not g.nodes_in_graph[g.forward_index(1, 0)]


@pytest.mark.parametrize("kv,parallel", [("grouped", False), ("per_query_head", False), ("grouped", True)])
@pytest.mark.parametrize("seed", range(4))
def test_pruning_matches_networkx_reachability(seed, kv, parallel):
    g = random_graph(seed, kv=kv, parallel=parallel)
    gen = torch.Generator().manual_seed(100 + seed)
    mask = (torch.rand(g.n_forward, g.n_backward, generator=gen) < 0.15) & g.valid
    g.in_graph = mask
    edges, nodes = prune_dangling(g)
    ref_edges, ref_nodes = reference_prune(g, mask)
    assert torch.equal(edges, ref_edges)
    assert torch.equal(nodes, ref_nodes)


def test_full_graph_survives_pruning_whole():
    g = random_graph(1).prune()
    assert torch.equal(g.in_graph, g.valid) and bool(g.nodes_in_graph.all())


@pytest.mark.parametrize("kv", ["grouped", "per_query_head"])
@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("seed,n", [(0, 1), (1, 7), (2, 25), (3, 60)])
def test_greedy_matches_brute_force_reference(seed, n, absolute, kv):
    g = random_graph(seed, kv=kv)
    expected = greedy_reference(g, n, absolute)
    g.apply_greedy(n, absolute=absolute, prune=False)
    assert torch.equal(g.in_graph, expected)
    g.apply_greedy(n, absolute=absolute)  # pruned: a subset, consistent with the reference pruning
    assert torch.equal(g.in_graph, reference_prune(g, expected)[0])


@pytest.mark.parametrize("kv", ["grouped", "per_query_head"])
def test_greedy_breaks_ties_by_destination_then_source_index(kv):
    g = random_graph(6, kv=kv)
    gen = torch.Generator().manual_seed(6)
    g.scores = torch.randint(-2, 3, (g.n_forward, g.n_backward), generator=gen).float()  # many ties, and -0.0
    g.scores[g.scores == 0] = -0.0
    for n in (5, 40, 120):
        for absolute in (True, False):
            g.apply_greedy(n, absolute=absolute, prune=False)
            assert torch.equal(g.in_graph, greedy_reference(g, n, absolute=absolute))


def test_greedy_can_take_every_valid_edge():
    g = random_graph(5, L=2, H=2, Hk=1)
    g.apply_greedy(g.n_valid_edges)
    assert torch.equal(g.in_graph, g.valid)


@pytest.mark.parametrize("method", list(Selection))
def test_selection_without_pruning_marks_sources_of_selected_edges(method):
    g = random_graph(2)
    select(g, method, 0.5 if method is Selection.THRESHOLD else 12, prune=False)
    assert torch.equal(g.nodes_in_graph, g.in_graph.any(1))
    assert not (g.in_graph & ~g.valid).any()


@pytest.mark.parametrize("call", [
    lambda g: g.apply_topn(g.n_valid_edges + 1), lambda g: g.apply_topn(-1), lambda g: g.apply_topn(2.5),
    lambda g: g.apply_greedy(g.n_valid_edges + 1), lambda g: g.apply_greedy(True),
    lambda g: g.apply_threshold(float("nan")), lambda g: g.apply_threshold("0.1"),
    lambda g: select(g, "best", 3), lambda g: g.apply_topn(3, absolute="yes"),
])
def test_bad_selection_input_raises_gimlens_error(call):
    g = random_graph(3)
    before = g.copy()
    with pytest.raises(GimlensError):
        call(g)
    assert g.equals(before)


def test_nan_scores_are_rejected_before_selection():
    g = random_graph(4)
    g.scores[0, -1] = float("nan")
    for method, value in [("topn", 3), ("greedy", 3), ("threshold", 0.1)]:
        with pytest.raises(GimlensError, match="non-finite"):
            select(g, method, value)


def node_topn_reference(g, n, absolute):
    """EAP-IG's node-level top-n, written out: the n best scored nodes (ties: lower index) and every
    unscored node; all valid edges leaving them; then the networkx reachability pruning."""
    s = g.node_scores.tolist()
    scored = [i for i, v in enumerate(s) if v == v]
    best = sorted(scored, key=lambda i: (-(abs(s[i]) if absolute else s[i]), i))[:n]
    chosen = set(best) | {i for i, v in enumerate(s) if v != v}
    mask = torch.zeros(g.n_forward, g.n_backward, dtype=torch.bool)
    for r, c in valid_edges(g):
        mask[r, c] = r in chosen
    return chosen, reference_prune(g, mask)


@pytest.mark.parametrize("kv", ["grouped", "per_query_head"])
@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("n", [0, 3, 8, 14])
def test_node_topn_keeps_edges_between_selected_nodes_like_eap_ig(n, absolute, kv):
    g = random_graph(11, kv=kv)
    gen = torch.Generator().manual_seed(n)
    g.node_scores = torch.randn(g.n_forward, generator=gen)
    g.node_scores[0] = float("nan")  # the input unscored: always in
    g.node_scores[3] = g.node_scores[5]  # a tie
    chosen, (ref_edges, ref_nodes) = node_topn_reference(g, n, absolute)
    g.apply_topn(n, absolute=absolute, level="node")
    assert torch.equal(g.in_graph, ref_edges) and torch.equal(g.nodes_in_graph, ref_nodes)
    fwd = g.forward_names
    for r, c in g.in_graph.nonzero().tolist():
        assert r in chosen
        heads = slot_heads(g, g.backward_names[c])
        assert not heads or any(fwd.index(h) in chosen for h in heads)
    g.apply_topn(n, absolute=absolute, level="node", prune=False)
    assert torch.equal(g.nodes_in_graph, torch.tensor([i in chosen for i in range(g.n_forward)]))


def test_node_threshold_is_inclusive_and_keeps_unscored_nodes():
    g = Graph(n_layers=2, n_heads=2, d_model=8)
    g.node_scores = torch.tensor([float("nan"), 0.5, -0.5, 0.1, 2.0, 0.2, 0.0])
    select(g, "threshold", 0.5, level="node", prune=False)
    assert g.nodes_in_graph.tolist() == [True, True, True, False, True, False, False]
    select(g, "threshold", 0.5, absolute=False, level="node", prune=False)
    assert g.nodes_in_graph.tolist() == [True, True, False, False, True, False, False]
    assert torch.equal(g.in_graph, g.valid & g.nodes_in_graph[:, None])


@pytest.mark.parametrize("call", [
    lambda g: g.apply_topn(2, level="node"),  # no node scores
    lambda g: (setattr(g, "node_scores", torch.ones(g.n_forward)), select(g, "greedy", 2, level="node")),
    lambda g: (setattr(g, "node_scores", torch.ones(g.n_forward)), g.apply_topn(g.n_forward + 1, level="node")),
    lambda g: (setattr(g, "node_scores", torch.ones(g.n_forward)), g.apply_topn(2, level="neurons")),
    lambda g: setattr(g, "node_scores", torch.ones(3)),
])
def test_bad_node_selection_raises_gimlens_error(call):
    with pytest.raises(GimlensError):
        call(random_graph(3))


@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("n", [0, 5, 40])
def test_neuron_topn_follows_eap_ig_and_prunes_the_neurons_of_removed_nodes(n, absolute):
    g = random_graph(12, L=2, H=2, Hk=1)
    d = g.cfg["d_model"]
    gen = torch.Generator().manual_seed(n)
    g.neuron_scores = torch.randn(g.n_forward, d, generator=gen)
    g.neuron_scores[0] = float("nan")  # the input's neurons unscored: always in
    flat = g.neuron_scores.flatten().tolist()
    scored = [i for i, v in enumerate(flat) if v == v]
    best = set(sorted(scored, key=lambda i: (-(abs(flat[i]) if absolute else flat[i]), i))[:n])
    neurons = torch.tensor([i in best or flat[i] != flat[i] for i in range(len(flat))]).view(g.n_forward, d)
    nodes = neurons.any(1)
    ref_edges, ref_nodes = reference_prune(g, g.valid & nodes[:, None])
    g.apply_topn(n, absolute=absolute, level="neuron")
    assert torch.equal(g.in_graph, ref_edges) and torch.equal(g.nodes_in_graph, ref_nodes)
    assert torch.equal(g.neurons_in_graph, neurons & ref_nodes[:, None])


def test_neuron_threshold_and_reset():
    g = Graph(n_layers=1, n_heads=1, d_model=2)
    g.neuron_scores = torch.tensor([[float("nan"), 0.0], [0.5, -0.5], [0.1, 0.2]])
    assert bool(g.neurons_in_graph.all())  # scores on a fresh graph: every neuron in
    select(g, "threshold", 0.5, level="neuron", prune=False)
    assert g.neurons_in_graph.int().tolist() == [[1, 0], [1, 1], [0, 0]]
    assert g.nodes_in_graph.tolist() == [True, True, False]
    assert not g.reset().neurons_in_graph.any() and bool(g.reset(empty=False).neurons_in_graph.all())
    with pytest.raises(GimlensError):
        g.neuron_scores = torch.zeros(3, 3)
    with pytest.raises(GimlensError):
        Graph(n_layers=1, n_heads=1, d_model=2).apply_topn(1, level="neuron")
