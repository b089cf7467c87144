"""circuits.evaluate: exact edge patching against the per-edge reference forward of
test_attribute.py, the empty / full circuit identities, faithfulness and its curve."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from circuits.attribute import attribute
from circuits.evaluate import FaithfulnessCurve, evaluate, faithfulness, faithfulness_curve
from circuits.graph import Graph
from conftest import TINY
from gimlens import GimlensError
from gimlens.testing import tiny_hf_model
from helpers import assert_state_equal, model_state
from test_attribute import edge_reference, ioi


patching_module = importlib.import_module("circuits._engine.patching")


def logits_of(model, graph, clean, corrupted, **kwargs):
    """The patched run's logits, read through a metric that keeps them."""
    seen = []

    def keep(logits, idx):
        seen.append(logits.detach().clone())
        return logits[:, -1, 0]

    evaluate(model, graph, clean, corrupted, keep, **kwargs)
    return torch.cat(seen)


def fingerprint(model):
    """A metric that sees every logit of the last position (clean and corrupted differ clearly)."""
    w = torch.randn(model.cfg.d_vocab, generator=torch.Generator().manual_seed(0))
    return lambda logits, idx: logits[:, -1] @ w.to(logits)


def random_circuit(model, kv_edges="grouped", seed=0, p=0.5):
    g = Graph.from_model(model)
    gen = torch.Generator().manual_seed(seed)
    g.in_graph = torch.rand(g.valid.shape, generator=gen) < p
    return g.as_kv_edges(kv_edges)  # per query head: each KV group's heads share their edges


@pytest.fixture(scope="module")
def hf_models():
    return {name: tiny_hf_model(**kw) for name, kw in TINY.items()}


@pytest.mark.parametrize("name,kv", [("gpt2", "grouped"), ("llama", "grouped"),
                                     ("llama", "per_query_head"), ("qwen2", "grouped")])
def test_empty_circuit_reproduces_corrupted_run(name, kv, request):
    model = request.getfixturevalue(f"{name}_model")
    clean, corrupted, _ = ioi(model)
    empty = Graph.from_model(model, kv_edges=kv).reset(empty=True)
    assert_close(logits_of(model, empty, clean, corrupted), model(corrupted), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_full_circuit_reproduces_clean_run(name, request):
    model = request.getfixturevalue(f"{name}_model")
    clean, corrupted, _ = ioi(model)
    full = Graph.from_model(model)
    assert_close(logits_of(model, full, clean, corrupted), model(clean), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ablation", ["corrupted", "mean", "zero"])
@pytest.mark.parametrize("name,kv", [("gpt2", "grouped"), ("llama", "grouped"),
                                     ("llama", "per_query_head"), ("qwen2", "grouped")])
def test_patched_run_matches_reference_edge_patching(name, kv, ablation, hf_models, request):
    """Reference: each destination reads sum_src a[src] + [src->dst missing] (a_abl[src] - a[src])."""
    model = request.getfixturevalue(f"{name}_model")
    clean, corrupted, _ = ioi(model)
    circuit = random_circuit(model, kv, seed=1)
    hf = hf_models[name]
    emb = hf.get_input_embeddings().weight
    per_q = kv == "per_query_head"
    zero = torch.zeros(circuit.n_forward, circuit.n_backward)
    with torch.no_grad():
        _, a_corr = edge_reference(hf, emb[corrupted], zero, delta=zero[:, :1, None, None],
                                   per_query_kv=per_q)
        ablated = {"corrupted": a_corr, "mean": a_corr.mean(1, keepdim=True),
                   "zero": torch.zeros_like(a_corr)}[ablation]
        missing = (circuit.valid & ~circuit.in_graph).float()
        expected, _ = edge_reference(hf, emb[clean], missing, patch_to=ablated, per_query_kv=per_q)
    got = logits_of(model, circuit, clean, corrupted, ablation=ablation)
    assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - model(clean)).abs().max() > 1e-2  # the circuit really changes the output


def test_per_query_head_graph_needs_shared_kv_edges_within_a_group(llama_model):
    clean, corrupted, _ = ioi(llama_model)
    metric = fingerprint(llama_model)
    grouped = random_circuit(llama_model, "grouped", seed=2)
    per_q = grouped.as_kv_edges("per_query_head")
    assert_close(evaluate(llama_model, per_q, clean, corrupted, metric),
                 evaluate(llama_model, grouped, clean, corrupted, metric), atol=0, rtol=0)
    # take one k edge away from one query head only: no exact patching exists
    ing = per_q.in_graph.clone()
    col = per_q.backward_index(1, 0, "k")
    ing[:, col] = ~ing[:, col] & per_q.valid[:, col]
    per_q.in_graph = ing
    before = model_state(llama_model)
    with pytest.raises(GimlensError, match="as_kv_edges\\('grouped'\\)"):
        evaluate(llama_model, per_q, clean, corrupted, metric)
    assert_state_equal(before, model_state(llama_model))


def test_faithfulness_is_0_for_empty_and_1_for_full_circuit_and_the_normalised_metric(gpt2_model):
    clean, corrupted, _ = ioi(gpt2_model)
    metric = fingerprint(gpt2_model)
    g = Graph.from_model(gpt2_model)
    assert faithfulness(gpt2_model, g, clean, corrupted, metric) == pytest.approx(1.0, abs=1e-6)
    # rounding of the 1e-7-level logit differences, divided by the clean-corrupted gap
    assert faithfulness(gpt2_model, g.copy().reset(empty=True), clean, corrupted,
                        metric) == pytest.approx(0.0, abs=1e-3)
    circuit = random_circuit(gpt2_model, seed=3)
    idx = torch.arange(len(clean))
    with torch.no_grad():
        m_clean = metric(gpt2_model(clean), idx).mean()
        m_corr = metric(gpt2_model(corrupted), idx).mean()
    m = evaluate(gpt2_model, circuit, clean, corrupted, metric).mean()
    expected = float((m - m_corr) / (m_clean - m_corr))
    assert faithfulness(gpt2_model, circuit, clean, corrupted, metric) == pytest.approx(expected, rel=1e-5)


def test_mean_ablation_faithfulness_is_relative_to_the_fully_mean_ablated_model(llama_model):
    clean, corrupted, _ = ioi(llama_model)
    metric = fingerprint(llama_model)
    empty = Graph.from_model(llama_model).reset(empty=True)
    assert faithfulness(llama_model, empty, clean, corrupted, metric,
                        ablation="mean") == pytest.approx(0.0, abs=1e-3)


def test_faithfulness_curve_selects_on_copies_and_integrates_by_trapezoid(llama_model):
    clean, corrupted, _ = ioi(llama_model)
    metric = fingerprint(llama_model)
    g = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted, metric)
    g.in_graph = g.valid & (g.scores > 0)
    scores, ing = g.scores.clone(), g.in_graph.clone()
    sizes = (0, 5, 20, 50, 100)
    curve = faithfulness_curve(llama_model, g, clean, corrupted, metric, sizes=sizes, batch_size=2)
    assert isinstance(curve, FaithfulnessCurve)
    assert torch.equal(g.scores, scores) and torch.equal(g.in_graph, ing)  # caller's graph untouched
    for size, n, f in zip(sizes, curve.n_edges, curve.faithfulness):
        by_hand = g.copy().apply_topn(round(size / 100 * g.n_valid_edges))
        assert by_hand.n_edges_in_graph == n
        assert f == pytest.approx(faithfulness(llama_model, by_hand, clean, corrupted, metric),
                                  rel=1e-5, abs=1e-6)
    x = np.array(sizes) / 100
    f = np.array(curve.faithfulness)
    assert curve.cpr == pytest.approx(np.trapezoid(f, x), rel=1e-9)
    assert curve.cmd == pytest.approx(np.trapezoid(np.abs(1 - f), x), rel=1e-9)
    assert curve.faithfulness[0] == pytest.approx(0, abs=1e-3)
    assert curve.faithfulness[-1] == pytest.approx(1, abs=1e-6)


def test_batching_does_not_change_the_patched_metric(qwen2_model):
    clean, corrupted, _ = ioi(qwen2_model)
    metric = fingerprint(qwen2_model)
    circuit = random_circuit(qwen2_model, seed=4)
    for ablation in ("corrupted", "mean"):
        whole = evaluate(qwen2_model, circuit, clean, corrupted, metric, ablation=ablation)
        parts = evaluate(qwen2_model, circuit, clean, corrupted, metric, ablation=ablation,
                         batch_size=2)
        assert_close(parts, whole, atol=1e-5, rtol=1e-5)


def test_model_left_as_found_after_success_and_after_a_failure(llama_model, monkeypatch):
    clean, corrupted, _ = ioi(llama_model)
    metric = fingerprint(llama_model)
    circuit = random_circuit(llama_model, seed=5)
    circuit.scores = torch.randn(circuit.scores.shape, generator=torch.Generator().manual_seed(5))
    before = model_state(llama_model)
    faithfulness_curve(llama_model, circuit, clean, corrupted, metric, sizes=(10, 100),
                       ablation="mean")
    assert_state_equal(before, model_state(llama_model))

    def boom(*args, **kwargs):
        raise RuntimeError("patch failed")

    monkeypatch.setattr(patching_module, "head_projection_deltas", boom)  # inside a forward hook
    with pytest.raises(RuntimeError, match="patch failed"):
        evaluate(llama_model, circuit, clean, corrupted, metric)
    assert_state_equal(before, model_state(llama_model))


def test_model_in_train_mode_is_evaluated_in_eval_mode_and_left_in_train_mode(gpt2_model):
    clean, corrupted, _ = ioi(gpt2_model)
    metric = fingerprint(gpt2_model)
    circuit = random_circuit(gpt2_model, seed=6)
    expected = evaluate(gpt2_model, circuit, clean, corrupted, metric)
    gpt2_model.train()
    try:
        before = model_state(gpt2_model)
        got = [evaluate(gpt2_model, circuit, clean, corrupted, metric) for _ in range(2)]
        assert_state_equal(before, model_state(gpt2_model))
        assert gpt2_model.training
    finally:
        gpt2_model.eval()
    assert_close(got[0], expected)
    assert_close(got[1], expected)


@pytest.mark.parametrize("kwargs,message", [
    (dict(ablation="resample"), "expected one of 'corrupted', 'mean', 'zero'"),
    (dict(graph=Graph(n_layers=3, n_heads=4, d_model=32)), "does not match"),
    (dict(corrupted=torch.zeros(2, 2, dtype=torch.long)), "same shape"),
    (dict(metric=lambda logits, idx: logits[:, -1]), "shape \\[3\\]"),
])
def test_bad_input_raises_gimlens_error(kwargs, message, llama_model):
    clean, corrupted, metric = ioi(llama_model)
    args = dict(graph=Graph.from_model(llama_model), clean=clean, corrupted=corrupted, metric=metric)
    args.update(kwargs)
    before = model_state(llama_model)
    with pytest.raises(GimlensError, match=message):
        evaluate(llama_model, args.pop("graph"), args.pop("clean"), args.pop("corrupted"),
                 args.pop("metric"), **args)
    assert_state_equal(before, model_state(llama_model))


@pytest.mark.parametrize("kwargs,message", [
    (dict(sizes=(50, 10)), "increasing percentages"),
    (dict(sizes=(0, 150)), "increasing percentages"),
    (dict(sizes=()), "increasing percentages"),
    (dict(selection="threshold"), "selection must be one of \\['topn', 'greedy'\\]"),
])
def test_bad_curve_arguments_raise_gimlens_error(kwargs, message, gpt2_model):
    clean, corrupted, metric = ioi(gpt2_model)
    with pytest.raises(GimlensError, match=message):
        faithfulness_curve(gpt2_model, Graph.from_model(gpt2_model), clean, corrupted, metric, **kwargs)


@pytest.mark.slow
def test_smollm2_empty_and_full_circuits_reproduce_corrupted_and_clean_runs():
    from circuits.tasks import make
    from gimlens.models import load_model

    model = load_model()
    task = make("ioi", model, n=3, seed=1)
    mask = task.attention_mask
    graph = Graph.from_model(model)
    with torch.no_grad():
        clean = model(task.clean, attention_mask=mask)
        corrupted = model(task.corrupted, attention_mask=mask)
    full = logits_of(model, graph, task.clean, task.corrupted, attention_mask=mask)
    empty = logits_of(model, graph.copy().reset(empty=True), task.clean, task.corrupted,
                      attention_mask=mask)
    assert_close(full, clean, atol=1e-5, rtol=0)
    assert_close(empty, corrupted, atol=1e-4, rtol=0)
