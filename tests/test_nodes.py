"""Node- and neuron-level circuits: scores against plain autograd at each node's output, the
identities that tie them to edge scores, and exact evaluation against patching by hand."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from circuits.attribute import attribute
from circuits.evaluate import evaluate, faithfulness, faithfulness_curve
from circuits.export import from_eap_json, to_eap_json
from circuits.graph import Graph
from conftest import TINY
from gimlens import GimlensError
from gimlens.gim import GIMConfig, gim_hooks
from gimlens.runtime import prepared, run_hooked
from gimlens.testing import tiny_hf_model
from test_attribute import ioi, reference_scores

METHODS = ["EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted"]


def _sources(model, tokens, *, leaf=False, extra=()):
    """`(embed, [z per layer], [mlp_out per layer], logits)` of one run (with the hooks `extra`
    too); with `leaf` the embedding is a leaf and every captured tensor keeps its gradient."""
    got = {"z": {}, "mlp": {}}

    def embed(x, hook):
        if leaf:
            x = x.detach().requires_grad_(True)
        got["embed"] = x
        return x

    def keep(kind, layer):
        def fn(x, hook):
            if leaf:  # a tensor of its own that the rest of the run reads: its gradient is ours
                x = x.clone()
                x.retain_grad()
            got[kind][layer] = x
            return x
        return fn

    L = model.cfg.n_layers
    hooks = [("hook_embed", embed)]
    hooks += [(f"blocks.{l}.attn.hook_z", keep("z", l)) for l in range(L)]
    hooks += [(f"blocks.{l}.hook_mlp_out", keep("mlp", l)) for l in range(L)]
    logits = run_hooked(model, tokens, fwd_hooks=hooks + list(extra))
    return got["embed"], [got["z"][l] for l in range(L)], [got["mlp"][l] for l in range(L)], logits


def node_reference(model, clean, corrupted, metric, extra=()):
    """Node scores by plain autograd: `(a_corrupt - a_clean) . dM/da` at the input's, each
    head's and each MLP's output (a head through `hook_z`: `dz . dM/dz` equals `d(z W_O) . dM/d
    out` because the head's output is linear in its z), mean over examples."""
    n = clean.shape[0]
    with prepared(model):
        with torch.no_grad():
            e_c, z_c, m_c, _ = _sources(model, corrupted)
        with torch.enable_grad():
            e, z, m, logits = _sources(model, clean, leaf=True, extra=extra)
            metric(logits, torch.arange(n)).sum().backward()
    scores = [((e_c - e) * e.grad).sum()]
    for l in range(model.cfg.n_layers):
        scores += list(((z_c[l] - z[l]) * z[l].grad).sum((0, 1, 3)))
        scores.append(((m_c[l] - m[l]) * m[l].grad).sum())
    return torch.stack([s.detach().float() for s in scores]) / n


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_node_scores_equal_autograd_gradient_at_each_node_output_times_activation_difference(request, arch):
    model = request.getfixturevalue(f"{arch}_model")
    clean, corrupted, metric = ioi(model)
    g = attribute(model, Graph.from_model(model), clean, corrupted, metric, level="node")
    assert_close(g.node_scores, node_reference(model, clean, corrupted, metric), atol=2e-5, rtol=1e-4)
    assert g.neuron_scores is None


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch,kv", [("gpt2", "grouped"), ("llama", "grouped"), ("llama", "per_query_head")])
def test_node_scores_are_row_sums_of_edge_scores_and_neuron_scores_sum_to_them(request, arch, kv, method):
    # residual additivity: the gradient at a node's output is the sum of the gradients at every
    # destination input it feeds, per query head or per KV group alike
    model = request.getfixturevalue(f"{arch}_model")
    clean, corrupted, metric = ioi(model)
    g = attribute(model, Graph.from_model(model, kv_edges=kv), clean, corrupted, metric,
                  method=method, steps=2, level="neuron")
    assert g.neuron_scores.shape == (g.n_forward, model.cfg.d_model)
    assert_close(g.node_scores, g.scores.sum(1), atol=1e-6, rtol=1e-4)
    assert_close(g.neuron_scores.sum(1), g.node_scores, atol=1e-6, rtol=1e-5)
    assert bool(g.neurons_in_graph.all())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_node_scores_with_gim_equal_autograd_under_gim_hooks_and_gim_edge_row_sums(request, arch):
    model = request.getfixturevalue(f"{arch}_model")
    clean, corrupted, metric = ioi(model)
    g = attribute(model, Graph.from_model(model), clean, corrupted, metric, gim=True, level="node")
    plain = attribute(model, Graph.from_model(model), clean, corrupted, metric, level="node")
    assert_close(g.node_scores, g.scores.sum(1), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(g.node_scores, plain.node_scores)  # GIM changed the gradients
    ref = node_reference(model, clean, corrupted, metric, extra=gim_hooks(model, GIMConfig()))
    assert_close(g.node_scores, ref, atol=2e-5, rtol=1e-4)


def test_neuron_scores_of_input_and_mlp_rows_equal_autograd_per_dimension(gpt2_model):
    model = gpt2_model
    clean, corrupted, metric = ioi(model)
    n = clean.shape[0]
    g = attribute(model, Graph.from_model(model), clean, corrupted, metric, level="neuron")
    with prepared(model):
        with torch.no_grad():
            e_c, _, m_c, _ = _sources(model, corrupted)
        with torch.enable_grad():
            e, _, m, logits = _sources(model, clean, leaf=True)
            metric(logits, torch.arange(n)).sum().backward()
    assert_close(g.neuron_scores[0], ((e_c - e) * e.grad).sum((0, 1)).detach() / n, atol=1e-6, rtol=1e-4)
    for l in range(model.cfg.n_layers):
        ref = ((m_c[l] - m[l]) * m[l].grad).sum((0, 1)).detach() / n
        assert_close(g.neuron_scores[g.forward_index(l)], ref, atol=1e-6, rtol=1e-4)


def mlp_input_reference(model, clean, corrupted, metric, run):
    """EAP-IG's MLP node rule by plain autograd, per dimension: `(mlp_out_corrupt - mlp_out_clean)
    * dM/d mlp_in` with the gradient of the run on tokens `run`, taken at `hook_mlp_in` (a tensor
    of its own, read only by the MLP), summed over examples and positions."""
    L, grads = model.cfg.n_layers, {}

    def keep(l):
        def fn(x, hook):
            x = x.clone()
            x.retain_grad()
            grads[l] = x
            return x
        return fn

    before = model.cfg.use_hook_mlp_in
    model.set_use_hook_mlp_in(True)
    try:
        with prepared(model):
            with torch.no_grad():
                _, _, m_c, _ = _sources(model, corrupted)
                _, _, m, _ = _sources(model, clean)
            with torch.enable_grad():
                leaf = ("hook_embed", lambda x, hook: x.detach().requires_grad_(True))
                logits = run_hooked(model, run, fwd_hooks=[leaf] + [(f"blocks.{l}.hook_mlp_in", keep(l))
                                                                    for l in range(L)])
                metric(logits, torch.arange(run.shape[0])).sum().backward()
    finally:
        model.set_use_hook_mlp_in(before)
    return [((m_c[l] - m[l]) * grads[l].grad).sum((0, 1)).detach() for l in range(L)]


@pytest.mark.parametrize("arch,kv", [("gpt2", "grouped"), ("llama", "per_query_head")])
def test_mlp_gradient_input_reproduces_eap_ig_mlp_node_rule_and_leaves_other_nodes(request, arch, kv):
    model = request.getfixturevalue(f"{arch}_model")
    clean, corrupted, metric = ioi(model)
    n = clean.shape[0]
    out = attribute(model, Graph.from_model(model, kv_edges=kv), clean, corrupted, metric, level="neuron")
    inp = attribute(model, Graph.from_model(model, kv_edges=kv), clean, corrupted, metric, level="neuron",
                    mlp_gradient="input")
    ref = mlp_input_reference(model, clean, corrupted, metric, clean)
    rows = [inp.forward_index(l) for l in range(model.cfg.n_layers)]
    for l, row in enumerate(rows):
        assert_close(inp.neuron_scores[row], ref[l] / n, atol=1e-6, rtol=1e-4)
    others = [r for r in range(inp.n_forward) if r not in rows]
    assert_close(inp.neuron_scores[others], out.neuron_scores[others])
    assert_close(inp.node_scores, inp.neuron_scores.sum(1))
    assert_close(inp.scores, out.scores)  # edge scores do not depend on the node rule
    assert not torch.allclose(inp.node_scores[rows], out.node_scores[rows], atol=1e-4)


def test_mlp_gradient_input_sums_over_gradient_points(gpt2_model):
    # clean-corrupted: the mean of the clean and the corrupted run's gradients (two points, summed
    # before the one product)
    model = gpt2_model
    clean, corrupted, metric = ioi(model)
    g = attribute(model, Graph.from_model(model), clean, corrupted, metric, method="clean-corrupted",
                  level="node", mlp_gradient="input")
    both = [mlp_input_reference(model, clean, corrupted, metric, run) for run in (clean, corrupted)]
    for l in range(model.cfg.n_layers):
        want = (both[0][l] + both[1][l]).sum() / (2 * clean.shape[0])
        assert_close(g.node_scores[g.forward_index(l)], want, atol=1e-6, rtol=1e-4)


def test_mlp_gradient_input_is_refused_for_edge_scores_and_unknown_rules(gpt2_model):
    model = gpt2_model
    clean, corrupted, metric = ioi(model)
    with pytest.raises(GimlensError, match="mlp_gradient='input' applies to level='node'"):
        attribute(model, Graph.from_model(model), clean, corrupted, metric, mlp_gradient="input")
    with pytest.raises(GimlensError, match="mlp_gradient"):
        attribute(model, Graph.from_model(model), clean, corrupted, metric, level="node", mlp_gradient="in")


def test_eap_ig_inputs_at_node_level_uses_eap_ig_node_points_unless_a_rule_is_given(gpt2_model):
    model = gpt2_model
    clean, corrupted, metric = ioi(model)
    node = attribute(model, Graph.from_model(model), clean, corrupted, metric, method="EAP-IG-inputs",
                     steps=3, level="node")
    right = attribute(model, Graph.from_model(model), clean, corrupted, metric, method="EAP-IG-inputs",
                      steps=3, quadrature="riemann_right")
    left = attribute(model, Graph.from_model(model), clean, corrupted, metric, method="EAP-IG-inputs",
                     steps=3, quadrature="riemann_left", level="node")
    assert_close(node.node_scores, right.scores.sum(1), atol=1e-6, rtol=1e-4)
    assert_close(left.node_scores, left.scores.sum(1), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(left.node_scores, node.node_scores)


def test_edge_level_attribution_leaves_node_and_neuron_scores_alone(gpt2_model):
    clean, corrupted, metric = ioi(gpt2_model)
    g = attribute(gpt2_model, Graph.from_model(gpt2_model), clean, corrupted, metric)
    assert g.node_scores is None and g.neuron_scores is None
    # ... and fills the edge scores: EAP's, by plain autograd through a hand-written forward
    want = reference_scores(tiny_hf_model(**TINY["gpt2"]), clean, corrupted, metric)
    assert_close(g.scores, want, rtol=2e-4, atol=2e-4 * float(want.abs().max()))


# ------------------------------------------------------------------------ evaluation by hand
def patched_by_hand(model, clean, corrupted, *, heads=(), mlps=(), embed=False, dims=None, zero=False):
    """Logits of the clean run with the outputs of the given heads `(layer, head)`, MLPs and the
    input replaced by their corrupted values; with `dims` (a dict node -> dimension list, nodes
    `"input"`, `("m", l)`, `(l, h)`) only those output dimensions are replaced; with `zero` by 0."""
    with prepared(model), torch.no_grad():
        e_c, z_c, m_c, _ = _sources(model, corrupted)
        if zero:
            e_c = torch.zeros_like(e_c)
            z_c, m_c = [torch.zeros_like(z) for z in z_c], [torch.zeros_like(m) for m in m_c]
        hooks = []
        if embed:
            def fn(x, hook):
                out = x.clone()
                k = slice(None) if dims is None else dims["input"]
                out[..., k] = e_c[..., k]
                return out
            hooks.append(("hook_embed", fn))
        for l in mlps:
            def fn(x, hook, l=l):
                out = x.clone()
                k = slice(None) if dims is None else dims["m", l]
                out[..., k] = m_c[l][..., k]
                return out
            hooks.append((f"blocks.{l}.hook_mlp_out", fn))
        for l, h in heads:
            if dims is None:  # the head's whole output: its z
                def fn(x, hook, l=l, h=h):
                    out = x.clone()
                    out[:, :, h] = z_c[l][:, :, h]
                    return out
                hooks.append((f"blocks.{l}.attn.hook_z", fn))
            else:  # some dimensions of z W_O: corrected where the attention output joins
                seen = {}
                W_O = model.blocks[l].attn.W_O[h]
                hooks.append((f"blocks.{l}.attn.hook_z", lambda x, hook, s=seen: s.__setitem__("z", x)))

                def add(x, hook, l=l, h=h, s=seen, W_O=W_O):
                    delta = (z_c[l][:, :, h] - s["z"][:, :, h]) @ W_O
                    keep = torch.zeros(x.shape[-1], dtype=torch.bool)
                    keep[dims[l, h]] = True
                    return x + delta * keep.to(x.dtype)
                hooks.append((f"blocks.{l}.hook_attn_out", add))
        return run_hooked(model, clean, fwd_hooks=hooks)


def logits_metric(store):
    def metric(logits, idx):
        store.append(logits.detach())
        return logits[:, -1, 0]
    return metric


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_node_level_evaluation_equals_patching_the_nodes_outputs_by_hand(request, arch):
    model = request.getfixturevalue(f"{arch}_model")
    clean, corrupted, _ = ioi(model)
    g = Graph.from_model(model)
    out = [g.forward_index(1, 0), g.forward_index(0, 1), g.forward_index(0)]  # a1.h0, a0.h1, m0
    g.nodes_in_graph[out] = False
    seen = []
    evaluate(model, g, clean, corrupted, logits_metric(seen), level="node")
    ref = patched_by_hand(model, clean, corrupted, heads=[(1, 0), (0, 1)], mlps=[0])
    assert_close(seen[0], ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ref, run_hooked(model, clean), atol=1e-3)  # the patch did something
    g.nodes_in_graph[0] = False  # and the input
    seen.clear()
    evaluate(model, g, clean, corrupted, logits_metric(seen), level="node")
    ref = patched_by_hand(model, clean, corrupted, heads=[(1, 0), (0, 1)], mlps=[0], embed=True)
    assert_close(seen[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_neuron_level_evaluation_equals_patching_some_output_dimensions_by_hand(request, arch):
    model = request.getfixturevalue(f"{arch}_model")
    clean, corrupted, _ = ioi(model)
    g = Graph.from_model(model)
    d = model.cfg.d_model
    g.neurons_in_graph = torch.ones(g.n_forward, d, dtype=torch.bool)
    dims = {"input": [0, 5, 7], ("m", 0): [1, 2, 30], (1, 1): [3, 4, 31]}
    g.neurons_in_graph[0, dims["input"]] = False
    g.neurons_in_graph[g.forward_index(0), dims["m", 0]] = False
    g.neurons_in_graph[g.forward_index(1, 1), dims[1, 1]] = False
    seen = []
    evaluate(model, g, clean, corrupted, logits_metric(seen), level="neuron")
    ref = patched_by_hand(model, clean, corrupted, heads=[(1, 1)], mlps=[0], embed=True, dims=dims)
    assert_close(seen[0], ref, atol=1e-4, rtol=1e-4)
    unpatched = run_hooked(model, clean)
    assert not torch.allclose(seen[0], unpatched, atol=1e-3)  # the patch did something


def test_node_level_zero_ablation_equals_zeroing_the_nodes_outputs_by_hand(gpt2_model):
    model = gpt2_model
    clean, corrupted, _ = ioi(model)
    g = Graph.from_model(model)
    g.nodes_in_graph[[g.forward_index(0, 0), g.forward_index(1)]] = False  # a0.h0, m1
    seen = []
    evaluate(model, g, clean, corrupted, logits_metric(seen), level="node", ablation="zero")
    ref = patched_by_hand(model, clean, corrupted, heads=[(0, 0)], mlps=[1], zero=True)
    assert_close(seen[0], ref, atol=1e-4, rtol=1e-4)


def test_node_level_circuit_evaluates_the_same_by_its_edges_and_by_its_nodes(llama_model):
    model = llama_model
    clean, corrupted, metric = ioi(model)
    g = attribute(model, Graph.from_model(model), clean, corrupted, metric, level="node")
    g.apply_topn(4, level="node")
    assert 0 < g.n_edges_in_graph < g.n_valid_edges
    assert_close(evaluate(model, g, clean, corrupted, metric, level="node"),
                 evaluate(model, g, clean, corrupted, metric))


def test_neuron_level_circuit_of_whole_nodes_equals_the_node_level_circuit(gpt2_model):
    model = gpt2_model
    clean, corrupted, metric = ioi(model)
    g = attribute(model, Graph.from_model(model), clean, corrupted, metric, level="neuron")
    g.apply_topn(5, level="node", prune=False)
    g.neurons_in_graph = g.nodes_in_graph[:, None].expand(-1, model.cfg.d_model).clone()
    assert_close(evaluate(model, g, clean, corrupted, metric, level="neuron"),
                 evaluate(model, g, clean, corrupted, metric, level="node"))


@pytest.mark.parametrize("level", ["node", "neuron"])
def test_empty_and_full_circuits_at_node_and_neuron_level_give_0_and_1(gpt2_model, level):
    model = gpt2_model
    clean, corrupted, metric = ioi(model)
    g = attribute(model, Graph.from_model(model), clean, corrupted, metric, level=level)
    curve = faithfulness_curve(model, g, clean, corrupted, metric, sizes=(0, 50, 100), level=level)
    assert abs(curve.faithfulness[0]) < 1e-5 and abs(curve.faithfulness[-1] - 1) < 1e-5
    assert curve.n_edges[0] == 0 and curve.n_edges[-1] == g.n_valid_edges
    g.reset(empty=True)
    assert abs(faithfulness(model, g, clean, corrupted, metric, level=level)) < 1e-5


def test_node_level_curve_point_equals_faithfulness_of_the_top_nodes(gpt2_model):
    model = gpt2_model
    clean, corrupted, metric = ioi(model)
    g = attribute(model, Graph.from_model(model), clean, corrupted, metric, level="node")
    curve = faithfulness_curve(model, g, clean, corrupted, metric, sizes=(40,), level="node")
    top = g.copy().apply_topn(round(0.4 * g.n_forward), level="node")
    assert curve.faithfulness[0] == pytest.approx(faithfulness(model, top, clean, corrupted, metric,
                                                               level="node"), abs=1e-6)


def test_neuron_level_evaluation_without_neurons_and_greedy_node_curves_are_refused(gpt2_model):
    clean, corrupted, metric = ioi(gpt2_model)
    g = Graph.from_model(gpt2_model)
    with pytest.raises(GimlensError, match="neurons_in_graph"):
        evaluate(gpt2_model, g, clean, corrupted, metric, level="neuron")
    with pytest.raises(GimlensError, match="level"):
        evaluate(gpt2_model, g, clean, corrupted, metric, level="nodes")
    with pytest.raises(GimlensError, match="node_scores"):
        faithfulness_curve(gpt2_model, g, clean, corrupted, metric, level="node")
    with pytest.raises(GimlensError, match="top-n"):
        faithfulness_curve(gpt2_model, g, clean, corrupted, metric, level="node", selection="greedy")


@pytest.mark.parametrize("level", ["node", "neuron"])
def test_mib_node_level_file_round_trips_after_attribution(gpt2_model, tmp_path, level):
    model = gpt2_model
    clean, corrupted, metric = ioi(model)
    g = attribute(model, Graph.from_model(model), clean, corrupted, metric, level=level)
    g.apply_topn(6, level=level)
    path = to_eap_json(g, tmp_path / "circuit.json")
    back = from_eap_json(path, model=model)
    assert_close(back.node_scores, g.node_scores)
    assert torch.equal(back.nodes_in_graph, g.nodes_in_graph)
    if level == "neuron":
        assert_close(back.neuron_scores, g.neuron_scores)
        assert torch.equal(back.neurons_in_graph, g.neurons_in_graph)
    assert_close(evaluate(model, back, clean, corrupted, metric, level=level),
                 evaluate(model, g, clean, corrupted, metric, level=level))
