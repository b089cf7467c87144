"""circuits.attribute at its boundary: model preparation, metric forms, the steps setting, and the
score accumulator against plain GEMMs."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from circuits._engine.accumulate import Accumulator
from circuits.attribute import attribute, gradient_points
from circuits.graph import Graph
from circuits._engine.model import ModelSpec
from gimlens.quadrature import nodes_and_weights
from gimlens.testing import tiny_model
from test_attribute import ioi


def _dropout_modules(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]


def test_train_mode_model_with_dropout_gives_eval_scores():
    model = tiny_model("gpt2", seed=3)
    drops = _dropout_modules(model)
    assert drops, "the tiny GPT-2 must have dropout modules for this test"
    for m in drops:
        m.p = 0.5
    clean, corrupted, metric = ioi(model)
    expected = attribute(model, Graph.from_model(model), clean, corrupted, metric).scores

    model.train()
    with torch.no_grad():  # dropout is live in train mode: two plain runs differ
        assert not torch.equal(model(clean), model(clean))
    for _ in range(2):
        got = attribute(model, Graph.from_model(model), clean, corrupted, metric).scores
        assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_one_argument_metric_gives_the_two_argument_scores(llama_model):
    clean, corrupted, metric = ioi(llama_model)
    everyone = torch.arange(len(clean))
    two = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted, metric,
                    method="EAP-IG-inputs", steps=2).scores
    one = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted,
                    lambda logits: metric(logits, everyone), method="EAP-IG-inputs", steps=2).scores
    assert two.abs().sum() > 0
    assert torch.equal(one, two)


def test_one_argument_metric_sees_each_batch_of_the_batched_run(llama_model):
    """Batches of one: a one-argument metric reads every example's own logits."""
    clean, corrupted, _ = ioi(llama_model)
    seen = []

    def last_token_metric(logits):
        seen.append(logits.shape[0])
        return logits[:, -1, 5] - logits[:, -1, 7]

    a = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted, last_token_metric,
                  batch_size=1).scores
    b = attribute(llama_model, Graph.from_model(llama_model), clean, corrupted,
                  lambda lg, idx: lg[:, -1, 5] - lg[:, -1, 7]).scores
    assert set(seen) == {1}
    _close(a, b)


def test_steps_and_ig_steps_are_the_same_setting(llama_model):
    clean, corrupted, metric = ioi(llama_model)
    run = lambda **kw: attribute(llama_model, Graph.from_model(llama_model), clean, corrupted,  # noqa: E731
                                 metric, method="EAP-IG-inputs", **kw).scores
    assert torch.equal(run(steps=3), run(ig_steps=3))
    assert not torch.equal(run(steps=3), run(steps=2))


@pytest.mark.parametrize("rule", ["riemann_right", "riemann_left", "gauss_legendre", "trapezoid"])
def test_gradient_points_are_the_quadrature_rule(rule):
    alpha, w = nodes_and_weights(4, rule)
    points = gradient_points("EAP-IG-inputs", 4, rule)
    assert sorted((p.alpha, p.weight) for p in points) == sorted(zip(alpha.tolist(), w.tolist()))
    assert all(p.inputs for p in points) and points[0].alpha == max(alpha.tolist())


def _close(actual, expected, rtol=2e-5):
    assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


# --------------------------------------------------------------------------- the accumulator


def _fill_in_backward_order(acc, spec, graph, grads, skip_kv=False):
    """Hand grads to the accumulator the way the scorer's hooks do: logits first, then each
    layer from the last (its MLP input, then v, k, q)."""
    L = spec.n_layers
    acc.slot(L - 1, slice(graph.n_backward - 1, graph.n_backward))[:] = grads[-1:]
    for layer in reversed(range(L)):
        col = graph.backward_index(layer)
        acc.slot(layer, slice(col, col + 1))[:] = grads[col: col + 1]
        for qkv in "vkq":
            if skip_kv and qkv != "q":
                continue
            cols = graph.backward_slice(layer, qkv)
            acc.slot(layer, cols)[:] = grads[cols]
    acc.end_pass()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_accumulator_equals_plain_per_destination_gemm(arch):
    model = tiny_model(arch, n_layers=3)
    spec, graph = ModelSpec.read(model), Graph.from_model(model)
    gen = torch.Generator().manual_seed(0)
    B, S, d = 2, 5, spec.d_model
    diff = torch.randn(graph.n_forward, B, S, d, generator=gen)
    passes = [torch.randn(graph.n_backward, B, S, d, generator=gen) for _ in range(3)]
    valid = graph.valid

    def reference(grads):  # one matrix-vector product per destination column
        out = torch.zeros(graph.n_forward, graph.n_backward)
        for c in range(graph.n_backward):
            out[:, c] = diff.reshape(graph.n_forward, -1) @ grads[c].reshape(-1)
        return out * valid

    for defer in (False, True):
        scores = torch.zeros(graph.n_forward, graph.n_backward)
        acc = Accumulator.build(spec, graph, scores, diff, split_kv=False, defer=defer)
        for grads in passes:
            _fill_in_backward_order(acc, spec, graph, grads)
        acc.flush()
        _close(scores * valid, reference(sum(passes)))
        assert len(acc.chunks) < spec.n_layers or spec.n_layers == 1


def test_accumulator_leaves_unwritten_kv_columns_at_zero():
    model = tiny_model("llama", n_layers=2)
    spec, graph = ModelSpec.read(model), Graph.from_model(model)
    diff = torch.randn(graph.n_forward, 1, 4, spec.d_model)
    grads = torch.randn(graph.n_backward, 1, 4, spec.d_model)
    scores = torch.zeros(graph.n_forward, graph.n_backward)
    acc = Accumulator.build(spec, graph, scores, diff, split_kv=True, defer=True)
    for _ in range(2):  # a reused buffer must not carry the previous pass's values
        _fill_in_backward_order(acc, spec, graph, grads, skip_kv=True)
    acc.flush()
    kv = torch.zeros(graph.n_backward, dtype=torch.bool)
    for layer in range(spec.n_layers):
        for qkv in "kv":
            kv[graph.backward_slice(layer, qkv)] = True
    assert torch.equal(scores[:, kv], torch.zeros_like(scores[:, kv]))
    expected = torch.einsum("fbsd,nbsd->fn", diff, 2 * grads) * graph.valid
    _close((scores * graph.valid)[:, ~kv], expected[:, ~kv])


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_completeness_compares_input_edges_with_the_input_ablated_metric_change(ablation, gpt2_model):
    clean, corrupted, metric = ioi(gpt2_model)
    idx = torch.arange(len(clean))
    emb = gpt2_model.embed(clean) if hasattr(gpt2_model, "embed") else None
    with torch.no_grad():
        if ablation == "zero":
            e_abl = torch.zeros_like(emb)
        else:  # per position, the mean embedding of the corrupted examples
            e_abl = gpt2_model.embed(corrupted).mean(0, keepdim=True).expand_as(emb)
        m_clean = metric(gpt2_model(clean), idx).mean()
        m_abl = metric(gpt2_model.run_with_hooks(
            clean, fwd_hooks=[("hook_embed", lambda x, hook: e_abl.to(x.dtype))]), idx).mean()
    g = attribute(gpt2_model, Graph.from_model(gpt2_model), clean, corrupted, metric,
                  method="EAP-IG-inputs", steps=16, quadrature="gauss_legendre", ablation=ablation)
    assert g.completeness.metric_change == pytest.approx(float(m_abl - m_clean), rel=1e-4, abs=1e-7)
    assert g.completeness.input_edges == pytest.approx(float(g.scores[0].sum()))
    assert g.completeness.input_edges == pytest.approx(g.completeness.metric_change, rel=0.01, abs=1e-7)
