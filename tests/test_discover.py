"""circuits.discover: float edge masks, edge pruning, re-linearised attribution.

References: the plain-torch edge patching forward of test_attribute (`edge_reference`, HF weights,
autograd), `circuits.evaluate` and `circuits.attribute`.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch.testing import assert_close

from circuits import attribute, discover, evaluate, faithfulness
from circuits.edge_pruning import edge_pruning, expected_open, hard_concrete
from circuits.graph import Graph
from circuits.iterative import iterative, keep_counts, patched_scores
from circuits._engine.masked import patched_metric
from circuits.run import Run
from conftest import TINY
from gimlens import GimlensError
from gimlens.testing import tiny_hf_model, tiny_tokenizer
from test_attribute import edge_reference, ioi
from test_evaluate import fingerprint, random_circuit


@pytest.fixture(scope="module")
def hf_models():
    return {name: tiny_hf_model(**kw) for name, kw in TINY.items()}


def prepare(model, graph, *args, **kwargs):
    return Run.build(model, graph, *args, keep_sources=True, **kwargs)


def _metric_and_grad(run, missing):
    w = missing.clone().requires_grad_(True)
    with torch.enable_grad():
        values = torch.cat([patched_metric(run, i, w)[0] for i in range(len(run.batches))])
        (grad,) = torch.autograd.grad(values.mean(), w)
    return values.detach(), grad


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_float_mask_run_and_its_gradient_match_plain_autograd_patching(name, hf_models, request):
    """Reference: destination c reads sum_src a[src] + w[src, c] (a_abl[src] - a[src]) in a plain
    torch forward on the HF weights; its logits and d metric / d w by autograd."""
    model = request.getfixturevalue(f"{name}_model")
    clean, corrupted, metric = ioi(model)
    graph = Graph.from_model(model)
    w = torch.rand(graph.valid.shape, generator=torch.Generator().manual_seed(0)) * graph.valid
    hf = hf_models[name]
    emb = hf.get_input_embeddings().weight
    zero = torch.zeros_like(w)
    with torch.no_grad():
        _, a_corr = edge_reference(hf, emb[corrupted], zero, delta=zero[:, :1, None, None])
    alpha = w.clone().requires_grad_(True)
    with torch.enable_grad():
        logits, _ = edge_reference(hf, emb[clean].detach(), alpha, patch_to=a_corr)
        (expected_grad,) = torch.autograd.grad(metric(logits, torch.arange(len(clean))).mean(), alpha)
    run = prepare(model, graph, clean, corrupted, metric)
    values, grad = _metric_and_grad(run, w)
    assert_close(values, metric(logits.detach(), torch.arange(len(clean))), atol=1e-4, rtol=1e-4)
    assert_close(grad * graph.valid, expected_grad * graph.valid, atol=1e-5, rtol=1e-3)
    assert float(grad.abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("ablation", ["corrupted", "mean"])
def test_mask_fixed_at_zero_and_one_reproduces_evaluate_exactly(name, ablation, request):
    model = request.getfixturevalue(f"{name}_model")
    clean, corrupted, _ = ioi(model)
    metric = fingerprint(model)
    circuit = random_circuit(model, seed=3)
    expected = evaluate(model, circuit, clean, corrupted, metric, ablation=ablation)
    run = prepare(model, circuit, clean, corrupted, metric, ablation=ablation, batch_size=2)
    missing = (circuit.valid & ~circuit.in_graph).float()
    values, _ = _metric_and_grad(run, missing)
    assert_close(values.cpu(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name,gim", [("gpt2", None), ("llama", None), ("llama", True),
                                      ("qwen2", True)])
def test_gradient_of_masked_metric_at_the_full_circuit_equals_eap_scores(name, gim, request):
    model = request.getfixturevalue(f"{name}_model")
    clean, corrupted, metric = ioi(model)
    graph = Graph.from_model(model)
    eap = attribute(model, graph.copy(), clean, corrupted, metric, method="EAP", gim=gim).scores
    _, grad = _metric_and_grad(prepare(model, graph, clean, corrupted, metric, gim=gim),
                               torch.zeros_like(eap))
    assert_close(grad * graph.valid, eap, atol=1e-6, rtol=1e-4)
    assert float(eap.abs().max()) > 1e-3


def _eap_ig_inputs(model, clean, corrupted, metric, rule, gim):
    """EAP-IG-inputs scores with 3 points of `rule` from `circuits.attribute`: passed on where
    attribute takes `quadrature=`; else from its fixed right Riemann rule, the left rule by
    `left = right + (g(0) - g(1)) / 3` with `g(1)` the EAP scores and `g(0) = 2 clean-corrupted -
    EAP` (clean-corrupted averages the clean and the corrupted-input gradient)."""
    def run(method, **kw):
        return attribute(model, Graph.from_model(model), clean, corrupted, metric, method=method,
                         ig_steps=3, gim=gim, **kw)
    if "quadrature" in inspect.signature(attribute).parameters:
        return run("EAP-IG-inputs", quadrature=rule)
    right = run("EAP-IG-inputs")
    if rule == "riemann_right":
        return right
    eap, cc = run("EAP").scores, run("clean-corrupted").scores
    right.scores = right.scores + ((2 * cc - eap) - eap) / 3
    return right


@pytest.mark.parametrize("name,gim,rule", [("gpt2", None, "riemann_left"), ("llama", True, "riemann_left"),
                                           ("qwen2", None, "riemann_right")])
def test_iterative_with_one_round_equals_topn_of_eap_ig(name, gim, rule, request):
    model = request.getfixturevalue(f"{name}_model")
    clean, corrupted, metric = ioi(model)
    expected = _eap_ig_inputs(model, clean, corrupted, metric, rule, gim).apply_topn(40, absolute=True)
    got = iterative(model, Graph.from_model(model), clean, corrupted, metric, n_edges=40, rounds=1,
                    ig_steps=3, gim=gim, quadrature=rule)
    assert_close(got.scores, expected.scores, atol=1e-6, rtol=1e-4)
    assert torch.equal(got.in_graph, expected.in_graph)


def test_rescoring_in_the_patched_model_is_the_gradient_at_the_current_mask(llama_model):
    clean, corrupted, metric = ioi(llama_model)
    circuit = random_circuit(llama_model, seed=7, p=0.6)
    run = prepare(llama_model, circuit, clean, corrupted, metric)
    scores = patched_scores(run, circuit.in_graph, ig_steps=1)
    _, grad = _metric_and_grad(run, (circuit.valid & ~circuit.in_graph).float())
    assert_close(scores.cpu(), grad * circuit.valid, atol=1e-6, rtol=1e-4)
    full = patched_scores(run, circuit.valid, ig_steps=1)
    assert float((scores - full).abs().max()) > 1e-4  # the patched model's scores really differ


def test_keep_counts_fall_geometrically_to_the_target():
    assert keep_counts(1000, 10, 1) == [10]
    assert keep_counts(1000, 10, 2) == [100, 10]
    assert keep_counts(100, 100, 3) == [100, 100, 100]


def test_hard_concrete_mask_matches_its_definition():
    log_alpha = torch.tensor([-3.0, 0.0, 2.0, 8.0])
    m = hard_concrete(log_alpha, sample=False)
    expected = (torch.sigmoid(log_alpha) * 1.2 - 0.1).clamp(0, 1)
    assert_close(m, expected)
    samples = torch.stack([hard_concrete(log_alpha, torch.Generator().manual_seed(s))
                           for s in range(4000)])
    assert_close((samples > 0).float().mean(0), expected_open(log_alpha), atol=0.03, rtol=0)


def _planted_model():
    """Tiny Llama whose only non-zero head output is layer 1's head 0 and whose MLPs output 0:
    the clean-corrupted difference of earlier tokens reaches the last position's logits only
    through input -> a1.h0's keys and values and a1.h0 -> logits."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    hf = tiny_hf_model("llama", scale=3.0, seed=11)
    dh = hf.config.hidden_size // hf.config.num_attention_heads
    with torch.no_grad():
        for l, layer in enumerate(hf.model.layers):
            keep = layer.self_attn.o_proj.weight[:, :dh].clone()
            layer.self_attn.o_proj.weight.zero_()
            if l == 1:
                layer.self_attn.o_proj.weight[:, :dh] = keep
            layer.mlp.down_proj.weight.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_bridge_from_module(hf, type(hf).__name__, hf_config=hf.config,
                                         tokenizer=tiny_tokenizer())
    return model.eval()


def test_edge_pruning_recovers_a_planted_circuit():
    model = _planted_model()
    clean, corrupted, metric = ioi(model)  # clean and corrupted differ before the last token
    g = Graph.from_model(model)
    planted = {g.edge_index(n) for n in ("a1.h0->logits", "input->a1.g0<k>", "input->a1.g0<v>")}
    assert faithfulness(model, _circuit(g, planted), clean, corrupted, metric) == pytest.approx(1, abs=1e-4)
    for e in planted:  # each planted edge is needed
        assert faithfulness(model, _circuit(g, planted - {e}), clean, corrupted, metric) < 0.9
    found = edge_pruning(model, g, clean, corrupted, metric, n_edges=3, steps=150, lr=0.1,
                         warm_start=None)
    assert {tuple(e) for e in found.in_graph.nonzero().tolist()} == planted
    assert faithfulness(model, found, clean, corrupted, metric) == pytest.approx(1, abs=1e-4)


def _circuit(graph, edges):
    c = graph.copy().reset(empty=True)
    mask = torch.zeros_like(c.in_graph)
    for e in edges:
        mask[e] = True
    c.in_graph = mask
    return c


def test_discover_with_a_scoring_method_is_attribute_then_topn(llama_model):
    clean, corrupted, metric = ioi(llama_model)
    expected = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted, metric,
                         method="EAP").apply_topn(30, absolute=True)
    got = discover(llama_model, Graph.from_model(llama_model), clean, corrupted, metric, n_edges=30,
                   method="EAP")
    assert torch.equal(got.in_graph, expected.in_graph)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="magic"), "unknown method 'magic'"),
    (dict(method="EAP", rounds=2), "takes no options"),
    (dict(method="edge-pruning", rounds=2), "takes no option"),
    (dict(method="EAP", n_edges=0), "n_edges must be an int"),
    (dict(method="EAP-IG-iterative", rounds=0), "rounds must be an int >= 1"),
    (dict(method="edge-pruning", loss="l2"), "loss"),
    (dict(method="edge-pruning", ramp=2.0), "ramp must be"),
])
def test_bad_options_raise_gimlens_error(kwargs, message, llama_model):
    clean, corrupted, metric = ioi(llama_model)
    kwargs = {"n_edges": 10, **kwargs}
    with pytest.raises(GimlensError, match=message):
        discover(llama_model, Graph.from_model(llama_model), clean, corrupted, metric, **kwargs)


def test_search_methods_refuse_a_per_query_head_graph_on_a_gqa_model(llama_model):
    clean, corrupted, metric = ioi(llama_model)
    g = Graph.from_model(llama_model, kv_edges="per_query_head")
    with pytest.raises(GimlensError, match="grouped"):
        discover(llama_model, g, clean, corrupted, metric, n_edges=10, method="EAP-IG-iterative")
