"""A faithfulness curve from one search: `discover(..., n_edges=[...])`.

References: a single-size `discover` per size (same run inputs), a forward-pass counter on
`hook_embed`, `faithfulness` by exact patching.
"""

from __future__ import annotations

import pytest
import torch

from circuits import discover, faithfulness, faithfulness_curve
from circuits.edge_pruning import schedule
from circuits.graph import Graph
from circuits.tasks import make
from gimlens import GimlensError

SIZES = [40, 20, 10, 5]  # of the tiny GPT-2's 110 edges


@pytest.fixture(scope="module")
def task(gpt2_model):
    return make("ioi", gpt2_model, n=8, seed=0)


def _count_passes(model, fn):
    calls = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: calls.append(1))]):
        out = fn()
    return out, len(calls)


def test_schedule_reads_each_size_after_its_plateau_and_one_size_is_the_single_search():
    targets, reads = schedule(1000.0, [100], steps=10, ramp=0.6)
    assert reads == [10]
    assert targets == pytest.approx([1000 * 0.1 ** min(1, (t + 1) / 6) for t in range(10)])
    targets, reads = schedule(1000.0, [100, 10], steps=10, ramp=0.6, lead=0.5)
    assert reads == [5, 10] and targets[reads[0] - 1] == pytest.approx(100) and targets[-1] == pytest.approx(10)


def test_schedule_gives_the_largest_size_a_single_search_of_its_own_then_moves_on():
    sizes, steps, lead = [400, 200, 100, 50], 200, 0.45
    targets, reads = schedule(2000.0, sizes, steps, ramp=0.7, lead=lead)
    head = round(lead * steps)
    single, _ = schedule(2000.0, sizes[:1], head, ramp=0.7)
    assert targets[:head] == pytest.approx(single) and reads[0] == head
    assert reads == sorted(reads) and reads[-1] == steps and len(targets) == steps
    for n, r in zip(sizes, reads):
        assert targets[r - 1] == pytest.approx(n)  # each size is held when it is read
        assert targets[r - 2] == pytest.approx(n)  # after a plateau
    assert all(b <= a * (1 + 1e-9) for a, b in zip(targets, targets[1:]))  # never rises


def test_edge_pruning_curve_gives_one_circuit_per_size_of_at_most_n_edges(gpt2_model, task):
    graph = Graph.from_model(gpt2_model)
    curve = discover(gpt2_model, graph, task, n_edges=SIZES, method="edge-pruning", steps=40, ig_steps=2)
    assert list(curve) == SIZES
    for n, circuit in curve.items():
        assert 0 < circuit.n_edges_in_graph <= n
        selected = circuit.copy()
        selected.scores = circuit.scores.masked_fill(~circuit.valid, -1e30)
        selected.apply_topn(n, absolute=False, prune=False)
        assert selected.n_edges_in_graph == n  # exactly n selected before pruning dangling ones
        assert not (circuit.in_graph & ~selected.in_graph).any()
    assert torch.equal(graph.in_graph, curve[5].in_graph)
    # the snapshots differ: the search went on between them
    assert not torch.equal(curve[40].scores, curve[5].scores)


def test_curve_costs_at_most_1_5x_the_passes_of_one_single_size_search(gpt2_model, task):
    single = lambda: discover(gpt2_model, Graph.from_model(gpt2_model), task, n_edges=10,
                              method="edge-pruning", steps=40, ig_steps=2)
    curve = lambda: discover(gpt2_model, Graph.from_model(gpt2_model), task, n_edges=SIZES,
                             method="edge-pruning", steps=60, ig_steps=2)
    _, n_single = _count_passes(gpt2_model, single)
    _, n_curve = _count_passes(gpt2_model, curve)
    assert n_single > 40
    assert n_curve <= 1.5 * n_single
    assert n_curve < 2 * n_single  # one search per size would cost 4x


def test_curve_snapshot_is_as_faithful_as_a_single_search_at_that_size(gpt2_model, task):
    """Measured here (tiny GPT-2, IOI n=8, discovery-set faithfulness): a 60-step curve's
    snapshots against 40-step single searches, sizes 40/20/10/5: single 1.339 / 1.405 / 1.583 /
    0.869, curve 1.248 / 1.595 / 1.516 / 0.869 (a random model over-recovers: f > 1). The curve
    is 0.09 below at the largest size and within 0.07 or above at the others. Tolerance: the
    snapshot may be at most 0.15 below the single search (stated before measuring, not tuned)."""
    curve = discover(gpt2_model, Graph.from_model(gpt2_model), task, n_edges=SIZES,
                     method="edge-pruning", steps=60, ig_steps=2)
    for n in SIZES:
        single = discover(gpt2_model, Graph.from_model(gpt2_model), task, n_edges=n,
                          method="edge-pruning", steps=40, ig_steps=2)
        f_single = faithfulness(gpt2_model, single, task)
        f_curve = faithfulness(gpt2_model, curve[n], task)
        print(f"size {n}: single {f_single:.3f} curve {f_curve:.3f}")
        assert f_curve >= f_single - 0.15


def test_scoring_curve_equals_a_single_scoring_per_size(gpt2_model, task):
    curve = discover(gpt2_model, Graph.from_model(gpt2_model), task, n_edges=[10, 30], method="EAP")
    assert list(curve) == [10, 30]
    for n in (10, 30):
        single = discover(gpt2_model, Graph.from_model(gpt2_model), task, n_edges=n, method="EAP")
        assert torch.equal(curve[n].in_graph, single.in_graph)
        assert torch.equal(curve[n].scores, single.scores)


def test_iterative_curve_runs_one_search_per_size(gpt2_model, task):
    curve = discover(gpt2_model, Graph.from_model(gpt2_model), task, n_edges=[30, 10],
                     method="EAP-IG-iterative", rounds=2, ig_steps=2)
    single = discover(gpt2_model, Graph.from_model(gpt2_model), task, n_edges=10,
                      method="EAP-IG-iterative", rounds=2, ig_steps=2)
    assert torch.equal(curve[10].in_graph, single.in_graph)
    assert curve[30].n_edges_in_graph <= 30


def test_faithfulness_curve_takes_the_circuits_of_a_curve(gpt2_model, task):
    curve = discover(gpt2_model, Graph.from_model(gpt2_model), task, n_edges=[30, 10], method="EAP")
    got = faithfulness_curve(gpt2_model, curve, task)
    assert got.n_edges == (curve[10].n_edges_in_graph, curve[30].n_edges_in_graph)
    assert got.sizes == pytest.approx((100 * 10 / 110, 100 * 30 / 110))
    expected = [faithfulness(gpt2_model, curve[n], task) for n in (10, 30)]
    assert got.faithfulness == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("sizes", [[], [10, 10], [0, 5], [5, 1000], "10"])
def test_bad_sizes_raise(gpt2_model, task, sizes):
    with pytest.raises(GimlensError, match="sizes|n_edges"):
        discover(gpt2_model, Graph.from_model(gpt2_model), task, n_edges=sizes, method="edge-pruning")


def test_faithfulness_curve_rejects_an_empty_mapping(gpt2_model, task):
    with pytest.raises(GimlensError, match="size: Graph"):
        faithfulness_curve(gpt2_model, {}, task)


def test_cli_discover_writes_one_file_per_size_from_one_search(tmp_path, capsys):
    from conftest import TINY
    from gimlens_cli import main
    from gimlens.models import load_model
    from gimlens.testing import tiny_hf_model, tiny_tokenizer

    folder = tmp_path / "model"
    tiny_hf_model(**TINY["gpt2"]).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    out.mkdir()
    rc = main(["discover", "--model", str(folder), "--task", "ioi", "--n", "8", "--edges", "40", "10",
               "--method", "EAP", "--no-progress", "-o", str(out / "circuit.json")])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["circuit-10.json", "circuit-40.json"]
    model = load_model(str(folder))
    expected = discover(model, Graph.from_model(model), make("ioi", model, n=8, seed=0),
                        n_edges=[40, 10], method="EAP", batch_size=16)
    for n in (40, 10):
        got = Graph.load(out / f"circuit-{n}.json")
        assert torch.equal(got.in_graph, expected[n].in_graph)
    assert capsys.readouterr().out.count("circuit:") == 2


def test_cli_discover_rejects_repeated_sizes(tmp_path, capsys):
    from gimlens_cli import main

    rc = main(["discover", "--task", "ioi", "--edges", "10", "10", "-o", str(tmp_path / "c.json")])
    assert rc != 0 and "--edges sizes must be distinct" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_size_of_every_edge_is_the_whole_graph_and_costs_no_search_steps(gpt2_model, task):
    N = Graph.from_model(gpt2_model).n_valid_edges
    both = discover(gpt2_model, Graph.from_model(gpt2_model), task, n_edges=[N, 10], method="edge-pruning",
                    steps=30, ig_steps=2)
    alone = discover(gpt2_model, Graph.from_model(gpt2_model), task, n_edges=10, method="edge-pruning",
                     steps=30, ig_steps=2)
    full = Graph.from_model(gpt2_model).reset(empty=False)
    assert torch.equal(both[N].in_graph, full.in_graph)
    torch.testing.assert_close(faithfulness(gpt2_model, both[N], task), 1.0)
    assert torch.equal(both[10].in_graph, alone.in_graph)  # the whole search went to the smaller size
