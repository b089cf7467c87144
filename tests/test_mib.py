"""MIB's CPR / CMD: point rule, edge count, trapezoid areas and the two selections, each checked
against a hand count or an independent loop over points written here."""

import warnings

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import circuits
from circuits import Graph, attribute
from circuits.mib import MIB_FRACTIONS, curve_areas, mib_edge_count, mib_metrics, mib_points
from circuits.tasks import make
from gimlens import GimlensError


def _hand_edge_count(L: int, H: int, parallel: bool = False) -> int:
    """Edges with k/v per query head: each of a layer's 3H q/k/v inputs reads the input and every
    head and MLP of the layers below; the MLP also the heads of its own layer; logits everything."""
    below = [1 + l * (H + 1) for l in range(L)]
    return sum(3 * H * b + b + (0 if parallel else H) for b in below) + 1 + L * (H + 1)


@pytest.mark.parametrize("cfg, published", [
    # MIB's EDGE_COUNTS table for its models (per-query-head k/v on the GQA ones)
    (dict(n_layers=12, n_heads=12, d_model=768), 32491),                         # GPT-2 small
    (dict(n_layers=24, n_heads=14, n_key_value_heads=2, d_model=896), 179749),   # Qwen2.5-0.5B
    (dict(n_layers=26, n_heads=8, n_key_value_heads=4, d_model=2304), 74218),    # Gemma-2-2B
    (dict(n_layers=32, n_heads=32, n_key_value_heads=8, d_model=4096), 1592881),  # Llama-3.1-8B
])
def test_edge_count_is_mibs_published_per_query_head_total(cfg, published):
    assert mib_edge_count(cfg) == published == _hand_edge_count(cfg["n_layers"], cfg["n_heads"])
    # a grouped graph of the same model counts the same N, though it holds fewer edges
    grouped = Graph.from_model(cfg)
    assert mib_edge_count(grouped) == published
    if cfg.get("n_key_value_heads", cfg["n_heads"]) < cfg["n_heads"]:
        assert grouped.n_valid_edges < published


def test_points_on_tiny_gqa_llama_and_gpt2_are_truncated_per_query_head_counts(llama_model, gpt2_model):
    # both tiny models: 2 layers, 4 query heads (llama: 2 KV heads)
    # layer 0: 12 q/k/v inputs x 1 source + MLP 5; layer 1: 12 x 6 + MLP 10; logits 11 -> 110
    assert _hand_edge_count(2, 4) == 110
    assert mib_edge_count(llama_model) == mib_edge_count(gpt2_model) == 110
    assert Graph.from_model(llama_model).n_valid_edges == 82  # grouped: 8 q/k/v slots per layer
    assert Graph.from_model(gpt2_model).n_valid_edges == 110
    # int(f * 110): 0.11, 0.22, 0.55, 1.1, 2.2, 5.5, 11, 22, 55, 110 truncated
    assert mib_points(110) == (0, 0, 0, 1, 2, 5, 11, 22, 55, 110)
    # rounding would differ at 0.005 (0.55 -> 1) and 0.05 (5.5 -> 6); the grouped N at most points
    assert [round(f * 110) for f in MIB_FRACTIONS] != list(mib_points(110))
    assert mib_points(82) == (0, 0, 0, 0, 1, 4, 8, 16, 41, 82)


def test_curve_areas_equal_a_hand_trapezoid():
    assert curve_areas([0.0, 0.5, 1.0], [0.0, 1.0, 1.0]) == (0.75, 0.25, 2 / 3)
    f = [0.0, 0.1, -0.2, 0.3, 0.5, 0.6, 0.8, 1.3, 0.9, 1.0]
    x = list(MIB_FRACTIONS)
    under, from_1, mean = curve_areas(x, f)
    hand_under = sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(9))
    hand_from_1 = sum((x[i + 1] - x[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2 for i in range(9))
    assert under == pytest.approx(hand_under) == pytest.approx(np.trapezoid(f, x))
    assert from_1 == pytest.approx(hand_from_1) == pytest.approx(np.trapezoid(np.abs(1 - np.array(f)), x))
    assert mean == pytest.approx(np.mean(f))
    # the axis starts at the first point (0.001), not at 0: a constant curve covers 0.999
    assert curve_areas(x, [1.0] * 10)[0] == pytest.approx(0.999)


def _model_metric(model, task, tokens) -> float:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(task.metric(model(tokens, attention_mask=task.attention_mask)).mean())


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_cpr_and_cmd_equal_an_independent_loop_over_points(request, name):
    model = request.getfixturevalue(f"{name}_model")
    task = make("ioi", model, n=6, seed=1)
    graph = attribute(model, Graph.from_model(model, kv_edges="per_query_head"), task)
    before = graph.scores.clone(), graph.in_graph.clone()
    got = mib_metrics(model, graph, task)
    assert torch.equal(graph.scores, before[0]) and torch.equal(graph.in_graph, before[1])

    clean_m, corrupt_m = _model_metric(model, task, task.clean), _model_metric(model, task, task.corrupted)
    assert got.clean_metric == pytest.approx(clean_m, abs=1e-5)
    assert got.corrupted_metric == pytest.approx(corrupt_m, abs=1e-5)
    assert got.n_requested == (0, 0, 0, 1, 2, 5, 11, 22, 55, 110)
    # MIB scores the negated logit difference: its signed run ranks by -(gimlens score)
    mib_signed = graph.copy()
    mib_signed.scores = -graph.scores
    for absolute, curve in ((False, got.signed), (True, got.absolute)):
        f, counts = [], []
        for n in (0, 0, 0, 1, 2, 5, 11, 22, 55, 110):
            circuit = (graph if absolute else mib_signed).copy().apply_topn(n, absolute=absolute)
            counts.append(circuit.n_edges_in_graph)
            patched = circuit.as_kv_edges("grouped")  # what exact patching can realise
            m = float(circuits.evaluate(model, patched, task).mean())
            f.append((m - corrupt_m) / (clean_m - corrupt_m))
        assert curve.n_edges == tuple(counts)
        assert_close(torch.tensor(curve.faithfulness), torch.tensor(f), atol=1e-4, rtol=1e-4)
        assert curve.area_under == pytest.approx(np.trapezoid(f, MIB_FRACTIONS), abs=1e-4)
        assert curve.area_from_1 == pytest.approx(np.trapezoid(np.abs(1 - np.array(f)), MIB_FRACTIONS), abs=1e-4)
        assert curve.mean == pytest.approx(np.mean(f), abs=1e-4)
    assert got.cpr == got.signed.area_under and got.cmd == got.absolute.area_from_1
    assert got.signed.faithfulness[0] == 0.0 and got.signed.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    if name == "gpt2":  # no GQA: what is patched is exactly MIB's circuit
        assert got.absolute.n_edges_patched == got.absolute.n_edges
    else:  # k/v edges of a KV group patched as a whole: a superset of MIB's circuit
        assert all(p >= n for p, n in zip(got.absolute.n_edges_patched, got.absolute.n_edges))


def test_a_grouped_graph_is_ranked_as_its_per_query_head_expansion(llama_model):
    task = make("ioi", llama_model, n=4, seed=2)
    grouped = attribute(llama_model, Graph.from_model(llama_model), task)
    fractions = (0.1, 0.5, 1.0)
    a = mib_metrics(llama_model, grouped, task, fractions=fractions)
    b = mib_metrics(llama_model, grouped.as_kv_edges("per_query_head"), task, fractions=fractions)
    assert a.n_total == 110 and a.n_requested == (11, 55, 110)
    assert a == b


def test_loss_true_takes_scores_with_mibs_sign_as_they_are(gpt2_model):
    task = make("ioi", gpt2_model, n=4, seed=4)
    graph = attribute(gpt2_model, Graph.from_model(gpt2_model), task)
    negated = graph.copy()
    negated.scores = -graph.scores  # what MIB's loss=True attribution stores
    fractions = (0.02, 0.1, 1.0)
    ours = mib_metrics(gpt2_model, graph, task, fractions=fractions)
    assert ours == mib_metrics(gpt2_model, negated, task, fractions=fractions, loss=True)
    flipped = mib_metrics(gpt2_model, graph, task, fractions=fractions, loss=True)
    assert flipped.absolute == ours.absolute  # the absolute run ignores the sign
    # the signed run of loss=True on gimlens scores keeps the edges that *raise* the metric
    assert flipped.signed.n_edges == tuple(
        graph.copy().apply_topn(n, absolute=False).n_edges_in_graph for n in flipped.n_requested)
    with pytest.raises(GimlensError, match="loss"):
        mib_metrics(gpt2_model, graph, task, loss="yes")


def test_greedy_selection_follows_apply_greedy_at_each_point(gpt2_model):
    task = make("ioi", gpt2_model, n=4, seed=3)
    graph = attribute(gpt2_model, Graph.from_model(gpt2_model), task)
    got = mib_metrics(gpt2_model, graph, task, fractions=(0.05, 0.2, 1.0), selection="greedy")
    clean_m = _model_metric(gpt2_model, task, task.clean)
    corrupt_m = _model_metric(gpt2_model, task, task.corrupted)
    f = []
    for n in (5, 22, 110):
        circuit = graph.copy()
        circuit.scores = -graph.scores  # MIB's sign
        circuit.apply_greedy(n, absolute=False)
        f.append((float(circuits.evaluate(gpt2_model, circuit, task).mean()) - corrupt_m) / (clean_m - corrupt_m))
    assert_close(torch.tensor(got.signed.faithfulness), torch.tensor(f), atol=1e-4, rtol=1e-4)


def test_bad_arguments_raise_gimlens_errors(gpt2_model):
    task = make("ioi", gpt2_model, n=2, seed=0)
    graph = Graph.from_model(gpt2_model)
    for fractions in ((0.5,), (0.2, 0.1), (0.0, 1.0), (0.5, 1.5), "ab"):
        with pytest.raises(GimlensError, match="fractions"):
            mib_metrics(gpt2_model, graph, task, fractions=fractions)
    with pytest.raises(GimlensError, match="selection"):
        mib_metrics(gpt2_model, graph, task, selection="threshold")
    with pytest.raises(GimlensError, match="circuits.Graph"):
        mib_metrics(gpt2_model, graph.scores, task)
    with pytest.raises(GimlensError, match="n_total"):
        mib_points(-1)
    with pytest.raises(GimlensError, match="increasing"):
        curve_areas([0.5, 0.5], [0.0, 1.0])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_curve_of_found_circuits_is_patched_as_given_at_its_own_fractions(request, name):
    model = request.getfixturevalue(f"{name}_model")
    task = make("ioi", model, n=6, seed=1)
    N = Graph.from_model(model).n_valid_edges  # grouped on the GQA llama: what a search finds
    sizes = mib_points(N, (0.05, 0.2, 1.0))
    found = circuits.discover(model, Graph.from_model(model), task, n_edges=list(sizes), method="EAP")
    got = mib_metrics(model, found, task)

    clean_m, corrupt_m = _model_metric(model, task, task.clean), _model_metric(model, task, task.corrupted)
    f = [(float(circuits.evaluate(model, found[n], task).mean()) - corrupt_m) / (clean_m - corrupt_m)
         for n in sizes]
    x = [n / N for n in sizes]
    assert got.fractions == pytest.approx(x) and got.n_requested == sizes
    assert got.n_total == mib_edge_count(model)
    for curve in (got.signed, got.absolute):
        assert_close(torch.tensor(curve.faithfulness), torch.tensor(f), atol=1e-4, rtol=1e-4)
        assert curve.area_under == pytest.approx(np.trapezoid(f, x), abs=1e-4)
        assert curve.area_from_1 == pytest.approx(np.trapezoid(np.abs(1 - np.array(f)), x), abs=1e-4)
        expanded = [found[n].as_kv_edges("per_query_head").n_edges_in_graph for n in sizes]
        assert curve.n_edges == tuple(expanded)
    assert got.absolute.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)


def test_a_curve_needs_two_circuits_of_one_layout(gpt2_model, llama_model):
    task = make("ioi", gpt2_model, n=4, seed=1)
    one = {10: Graph.from_model(gpt2_model).reset(empty=False)}
    with pytest.raises(GimlensError, match="two sizes"):
        mib_metrics(gpt2_model, one, task)
    with pytest.raises(GimlensError, match="size: Graph"):
        mib_metrics(gpt2_model, {}, task)
    mixed = {10: Graph.from_model(gpt2_model), 20: Graph.from_model(llama_model)}
    with pytest.raises(GimlensError, match="one graph layout"):
        mib_metrics(gpt2_model, mixed, task)
