"""circuits.run: one validated Run shared by the algorithms, and the one algorithm table.

References: the public wrappers (each builds its own run), counted forward passes on the
corrupted tokens (a forward pre-hook on the token embedding), and argparse's choices.
"""

from __future__ import annotations

import argparse
import contextlib

import pytest
import torch
from torch.testing import assert_close

from circuits import attribute, discover, evaluate, faithfulness, faithfulness_curve
from circuits.attribute import attribute_run
from circuits.cli import add_arguments
from circuits.discover import ALGORITHMS, METHODS, Search
from circuits.edge_pruning import edge_pruning_run
from circuits.evaluate import evaluate_run, faithfulness_curve_run, faithfulness_run
from circuits.graph import Graph
from circuits.iterative import iterative, iterative_run
from circuits.mib import mib_metrics, mib_metrics_run
from circuits.run import Run
from gimlens import GimlensError
from helpers import model_state
from test_attribute import ioi
from test_evaluate import random_circuit


@contextlib.contextmanager
def corrupted_forwards(model, corrupted):
    """Count the forward passes whose tokens are rows of `corrupted` (and not all clean)."""
    rows = {tuple(r.tolist()) for r in corrupted}
    count = [0]

    def pre(module, args):
        tokens = args[0]
        if isinstance(tokens, torch.Tensor) and tokens.ndim == 2 and not tokens.is_floating_point() \
                and all(tuple(r.tolist()) in rows for r in tokens.cpu()):
            count[0] += 1

    handle = model.embed.register_forward_pre_hook(pre)
    try:
        yield count
    finally:
        handle.remove()


@pytest.mark.parametrize("warm_start", ["EAP-IG-inputs", None])
def test_edge_pruning_runs_one_corrupted_forward_per_batch(warm_start, llama_model):
    clean, corrupted, metric = ioi(llama_model)
    assert not any(torch.equal(c, k) for c in clean for k in corrupted)
    with corrupted_forwards(llama_model, corrupted) as count:
        discover(llama_model, Graph.from_model(llama_model), clean, corrupted, metric, n_edges=20,
                 method="edge-pruning", steps=3, ig_steps=2, batch_size=2, warm_start=warm_start)
    assert count[0] == 2  # 3 examples in batches of 2; the warm start reuses the run's sources


def test_the_counter_sees_every_corrupted_forward(llama_model):
    """The counter itself: a plain attribution runs one corrupted forward per batch, and two
    algorithms on a run without `keep_sources` run them again."""
    clean, corrupted, metric = ioi(llama_model)
    with corrupted_forwards(llama_model, corrupted) as count:
        attribute(llama_model, Graph.from_model(llama_model), clean, corrupted, metric, batch_size=1)
    assert count[0] == 3
    run = Run.build(llama_model, Graph.from_model(llama_model), clean, corrupted, metric, batch_size=2)
    with corrupted_forwards(llama_model, corrupted) as count:
        attribute_run(run)
        evaluate_run(run)
    assert count[0] == 4


def test_one_run_serves_every_algorithm_as_the_wrappers_do(gpt2_model):
    model = gpt2_model
    clean, corrupted, metric = ioi(model)
    before = model_state(model)
    run = Run.build(model, Graph.from_model(model), clean, corrupted, metric, batch_size=2,
                    keep_sources=True)
    with corrupted_forwards(model, corrupted) as count:
        scored = attribute_run(run, run.graph.copy(), method="EAP-IG-inputs", ig_steps=2)
        circuit = random_circuit(model, seed=5)
        values = evaluate_run(run, circuit)
        f = faithfulness_run(run, circuit)
        curve = faithfulness_curve_run(run, scored, sizes=(10, 50, 100))
        mib = mib_metrics_run(run, scored)
        found = iterative_run(run, run.graph.copy(), n_edges=20, rounds=2, ig_steps=2)
        learned = edge_pruning_run(run, run.graph.copy(), n_edges=20, steps=2, ig_steps=2)
    assert count[0] == 2  # every algorithm above shared the run's two corrupted forwards
    assert model_state(model) == before
    kw = dict(batch_size=2)
    expected = attribute(model, Graph.from_model(model), clean, corrupted, metric,
                         method="EAP-IG-inputs", ig_steps=2, **kw)
    assert_close(scored.scores, expected.scores, atol=1e-6, rtol=1e-5)
    assert_close(values, evaluate(model, circuit, clean, corrupted, metric, **kw), atol=1e-6, rtol=1e-5)
    assert f == pytest.approx(faithfulness(model, circuit, clean, corrupted, metric, **kw), abs=1e-6)
    want = faithfulness_curve(model, expected, clean, corrupted, metric, sizes=(10, 50, 100), **kw)
    assert curve.n_edges == want.n_edges
    assert curve.faithfulness == pytest.approx(want.faithfulness, abs=1e-5)
    assert mib.cpr == pytest.approx(mib_metrics(model, expected, clean, corrupted, metric, **kw).cpr,
                                    abs=1e-5)
    again = iterative(model, Graph.from_model(model), clean, corrupted, metric, n_edges=20, rounds=2,
                      ig_steps=2, **kw)
    assert torch.equal(found.in_graph, again.in_graph)
    assert 0 < learned.n_edges_in_graph <= 20


def test_run_rejects_bad_inputs_before_running_anything(gpt2_model, llama_model):
    clean, corrupted, metric = ioi(gpt2_model)
    graph = Graph.from_model(gpt2_model)
    with pytest.raises(GimlensError, match="graph must be a circuits.Graph"):
        Run.build(gpt2_model, "graph", clean, corrupted, metric)
    with pytest.raises(GimlensError, match="ablation"):
        Run.build(gpt2_model, graph, clean, corrupted, metric, ablation="noise")
    with pytest.raises(GimlensError, match="batch_size"):
        Run.build(gpt2_model, graph, clean, corrupted, metric, batch_size=0)
    with pytest.raises(GimlensError, match="does not match"):
        Run.build(llama_model, graph, clean, corrupted, metric)
    run = Run.build(gpt2_model, graph, clean, corrupted, metric)
    with pytest.raises(GimlensError, match="the run's layout"):
        evaluate_run(run, Graph.from_model(llama_model))
    assert run._cache == {}  # nothing ran


def test_algorithm_table_is_what_discover_and_the_cli_offer():
    assert METHODS == tuple(ALGORITHMS)
    assert {s.value for s in Search} <= set(ALGORITHMS)
    assert {"EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted"} <= set(ALGORITHMS)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    choices = next(a.choices for a in parser._actions if a.dest == "method")
    assert list(choices) == list(ALGORITHMS)
    assert ALGORITHMS["edge-pruning"].keep_sources and ALGORITHMS["EAP-IG-iterative"].keep_sources
    assert ALGORITHMS["EAP-IG-iterative"].options == {"rounds", "quadrature"}
