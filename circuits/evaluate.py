"""Faithfulness of a circuit by exact edge patching, and the faithfulness curve (CPR / CMD).

`evaluate` runs the clean examples once with every edge outside the circuit
(`graph.in_graph` False) carrying its ablated value. Destination `d` reads

    x_d = (its input in this run) - sum over missing edges src -> d of (a[src] - a_abl[src])

(the hooks live in `circuits._engine.patching`) where `a` are the source activations of this
patched run (captured as it proceeds: token embedding, per-head outputs `z[h] @ W_O[h]`, MLP
outputs) and `a_abl` the ablated ones (`Ablation`). Per-head q/k/v inputs are realised by recomputing each
head's projection from its own corrected residual stream with the layer's ln1 (exact norm):
`hook_q[h] += (ln1(x - c_h) - ln1(x)) @ W_Q[h]` (before RoPE, so RoPE still applies); the MLP
input is corrected at `ln2.hook_in`, the logits' at `ln_final.hook_in`.

The empty circuit reproduces the ablated run (the corrupted run for `ablation="corrupted"`),
the full circuit the clean run.

**Node and neuron level** (`level`, EAP-IG's `evaluate_graph`). `level="node"`: the circuit is
`graph.nodes_in_graph`; every outgoing edge of a node outside it carries the ablated value, every
other edge is clean (what `apply_topn(level="node")` selects: the edges between kept nodes, after
pruning, give the same run). `level="neuron"`: the circuit is `graph.neurons_in_graph`; at every
destination, each source's output has its out-of-circuit dimensions ablated and the others
clean, `x_d = x - sum over src of (1 - keep[src]) * (a[src] - a_abl[src])` (edges play no part:
EAP-IG's rule). `"edge"` (default) reads `graph.in_graph` only.

**Grouped-query attention.** Query heads of one KV group share their keys and values, so a
`per_query_head` graph can be patched exactly only where the group's query heads have the same
k (and v) edges; otherwise `evaluate` raises and suggests `graph.as_kv_edges("grouped")`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from gimlens.distributed import all_reduce_sum
from gimlens.errors import GimlensError
from gimlens.runtime import coerce_enum, prepared, progress as progress_bar

from ._engine.model import Ablation, run_model
from ._engine.patching import Patcher, blocks
from .graph import Graph
from .prune import Level, Selection
from .run import Run

__all__ = ["evaluate", "evaluate_run", "faithfulness", "faithfulness_run", "faithfulness_curve",
           "faithfulness_curve_run", "FaithfulnessCurve"]

DEFAULT_SIZES = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)


def _ablated_parts(graph: Graph, level: Level) -> tuple[Tensor, Tensor | None]:
    """`(missing edges [n_fwd, n_bwd], neuron mask [n_fwd, d] or None)` of a circuit at `level`
    (module docstring); the mask is 1 where a source's output dimension is ablated."""
    valid = graph.valid.cpu()
    if level is Level.EDGE:
        return valid & ~graph.in_graph.cpu().bool(), None
    if level is Level.NODE:
        return valid & ~graph.nodes_in_graph.cpu().bool()[:, None], None
    if graph.neurons_in_graph is None:
        raise GimlensError("level='neuron' evaluates graph.neurons_in_graph, which this graph lacks: "
                           "score with circuits.attribute(..., level='neuron') or set it")
    keep = graph.neurons_in_graph.cpu().bool()
    return valid & ~keep.all(1)[:, None], (~keep).float()


def _run_circuits(run: Run, graph: Graph, masks: list[tuple[Tensor, Tensor | None]], *,
                  reference: bool, show: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-example metrics `[len(masks), n]` of the patched runs (each given by its
    `_ablated_parts`), and (`reference`) of the clean run and of the ablated baseline (the
    corrupted run, or the empty circuit)."""
    spec, ex, n = run.spec, run.examples, run.n_examples
    plans = []
    for missing, neurons in masks:
        plans.append((missing.to(spec.device), blocks(spec, graph, missing),
                      None if neurons is None else neurons.to(spec.device)))
    out = torch.zeros(len(masks), n)
    clean_m = torch.zeros(n) if reference else None
    base_m = torch.zeros(n) if reference else None
    with prepared(run.model), torch.no_grad(), \
            progress_bar(len(run.batches) * len(plans), show=show, desc="evaluate", unit="circuit") as bar:
        for i, batch in enumerate(run.batches):
            ref = run.reference(i) if reference else None  # scores the corrupted run too
            ablated, _ = run.ablated(i, score=False)
            for k, (missing, plan, neurons) in enumerate(plans):
                patcher = Patcher(spec, missing, plan, ablated, neuron_mask=neurons)
                logits = run_model(run.model, batch.tokens, batch.mask, patcher.hooks())  # HookedTransformer: hook_mlp_in on
                out[k, batch.idx] = ex.score(logits, batch.idx).float().cpu()
                bar.update(1)
            if ref is not None:
                clean_m[batch.idx], base_m[batch.idx] = ref.clean_metric.cpu(), ref.base_metric.cpu()
    # every example was scored by exactly one rank: the sums over ranks fill in the others
    for t in (out, clean_m, base_m):
        if t is not None:
            all_reduce_sum(t)
    return out, clean_m, base_m


def evaluate(model, graph: Graph, clean, corrupted=None, metric=None, *,
             ablation: Ablation | str = "corrupted", batch_size: int | None = None,
             attention_mask: Tensor | None = None, progress: bool = False,
             level: Level | str = "edge") -> Float[Tensor, " n"]:
    """The metric of every example with only the circuit's edges clean (exact edge patching).

    Args:
        model: a TransformerLens model (left as found).
        graph: the circuit: `graph.in_graph` marks the edges kept clean.
        clean, corrupted, metric, attention_mask: as in `circuits.attribute`.
        ablation: what missing edges carry: `"corrupted"`, `"mean"` or `"zero"`.
        batch_size: examples per forward pass (`None`: all at once).
        progress: show a progress bar (one step per batch).
        level: what the circuit is: `"edge"` (`graph.in_graph`), `"node"`
            (`graph.nodes_in_graph`) or `"neuron"` (`graph.neurons_in_graph`); see the module
            docstring.

    The model runs in eval mode with frozen parameters (restored on exit). Cost: per batch one
    corrupted forward (none for `zero`/`mean`) and one patched forward, no backward.

    Returns:
        float32 `[n]` (CPU): `metric` per example.

    Examples:
        >>> import torch
        >>> from gimlens.testing import tiny_model
        >>> from circuits.graph import Graph
        >>> model = tiny_model("gpt2")
        >>> clean, corrupted = model.to_tokens(["When Mary and John went"]), model.to_tokens(["When Anna and John went"])
        >>> metric = lambda logits, idx: logits[:, -1, 0]
        >>> empty = Graph.from_model(model).reset(empty=True)
        >>> got = evaluate(model, empty, clean, corrupted, metric)
        >>> torch.allclose(got, model(corrupted)[:, -1, 0], atol=1e-5)
        True
    """
    run = Run.build(model, graph, clean, corrupted, metric, ablation=ablation,
                    batch_size=batch_size, attention_mask=attention_mask)
    return evaluate_run(run, level=level, progress=progress)


def evaluate_run(run: Run, graph: Graph | None = None, *, level: Level | str = "edge",
                 progress: bool = False) -> Float[Tensor, " n"]:
    """[`evaluate`][circuits.evaluate.evaluate] on a [`Run`][circuits.run.Run]: the circuit is
    `graph` (default the run's)."""
    graph = run.check_graph(graph)
    parts = _ablated_parts(graph, coerce_enum(Level, level, "level"))
    return _run_circuits(run, graph, [parts], reference=False, show=progress)[0][0]


def faithfulness(model, graph: Graph, clean, corrupted=None, metric=None, *,
                 ablation: Ablation | str = "corrupted", batch_size: int | None = None,
                 attention_mask: Tensor | None = None, progress: bool = False,
                 level: Level | str = "edge") -> float:
    """`(m_circuit - m_ablated) / (m_clean - m_ablated)` with means over examples.

    `m_ablated` is the fully ablated model: the corrupted run for `ablation="corrupted"`,
    else the empty circuit under that ablation. 1 means the circuit does what the model does.
    `level` says what the circuit is, as in [`evaluate`][circuits.evaluate.evaluate].
    """
    run = Run.build(model, graph, clean, corrupted, metric, ablation=ablation,
                    batch_size=batch_size, attention_mask=attention_mask)
    return faithfulness_run(run, level=level, progress=progress)


def faithfulness_run(run: Run, graph: Graph | None = None, *, level: Level | str = "edge",
                     progress: bool = False) -> float:
    """[`faithfulness`][circuits.evaluate.faithfulness] on a [`Run`][circuits.run.Run]: the
    circuit is `graph` (default the run's)."""
    graph = run.check_graph(graph)
    parts = _ablated_parts(graph, coerce_enum(Level, level, "level"))
    circuit, clean_m, base_m = _run_circuits(run, graph, [parts], reference=True, show=progress)
    return _normalise(circuit[0].mean(), clean_m.mean(), base_m.mean())


def _normalise(m: Tensor, clean: Tensor, base: Tensor) -> float:
    gap = float(clean - base)
    if gap == 0.0:
        raise GimlensError("the clean and the ablated runs have the same mean metric, so "
                           "faithfulness (m - m_ablated) / (m_clean - m_ablated) is undefined")
    return float(m - base) / gap


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of the best circuits of several sizes, with the curve's areas.

    `sizes` are percentages of the valid edges (or, at node / neuron level, of the scored nodes
    or neurons) requested, `n_edges` the edges left after selection and pruning. `cpr` is the
    area under the curve and `cmd` the area between the curve and 1 (`|1 - f|`), both by the
    trapezoid rule over the fraction axis `sizes / 100`.
    """

    sizes: tuple[float, ...]
    n_edges: tuple[int, ...]
    faithfulness: tuple[float, ...]
    cpr: float
    cmd: float
    clean_metric: float
    ablated_metric: float


_SELECT = {Selection.TOPN: Graph.apply_topn, Selection.GREEDY: Graph.apply_greedy}


def faithfulness_curve(model, graph: Graph | Mapping[int, Graph], clean, corrupted=None, metric=None, *,
                       sizes: Sequence[float] = DEFAULT_SIZES, selection: Selection | str = "topn",
                       absolute: bool = True, ablation: Ablation | str = "corrupted",
                       batch_size: int | None = None,
                       attention_mask: Tensor | None = None,
                       progress: bool = False, level: Level | str = "edge") -> FaithfulnessCurve:
    """Faithfulness of the circuits made of the top `sizes` percent of edges by score.

    Each circuit is selected on a copy of `graph` (`apply_topn` or `apply_greedy` with
    `absolute`, then pruned); `graph` itself is not changed. With `level="node"` or
    `"neuron"`, `sizes` are percentages of the scored (non-NaN) nodes or neurons, selected with
    `apply_topn(level=...)` and evaluated at that level (`selection` must be `"topn"`). All circuits of a batch share
    one corrupted and one clean forward pass; `progress` shows a bar over the patched runs.

    `graph` may instead be `{size: Graph}` of circuits already selected (the curve of
    [`discover`][circuits.discover.discover] with a list of sizes): each is evaluated as it is, at
    edge level, and `sizes` (then ignored) are reported as the percentages `100 size / N`.

    Examples:
        >>> from gimlens.testing import tiny_model
        >>> from circuits import attribute
        >>> from circuits.graph import Graph
        >>> model = tiny_model("gpt2")
        >>> clean, corrupted = model.to_tokens(["When Mary and John went"]), model.to_tokens(["When Anna and John went"])
        >>> metric = lambda logits, idx: logits[:, -1, 0] - logits[:, -1, 1]
        >>> g = attribute(model, Graph.from_model(model), clean, corrupted, metric)
        >>> curve = faithfulness_curve(model, g, clean, corrupted, metric, sizes=(0, 50, 100))
        >>> abs(curve.faithfulness[0]) < 1e-3, abs(curve.faithfulness[-1] - 1) < 1e-6
        (True, True)
    """
    if isinstance(graph, Mapping):
        circuits = given_circuits(graph)
        run = Run.build(model, circuits[0][1], clean, corrupted, metric, ablation=ablation,
                        batch_size=batch_size, attention_mask=attention_mask)
        return given_curve(run, circuits, progress)
    if not isinstance(graph, Graph):
        raise GimlensError(f"graph must be a circuits.Graph, got {type(graph).__name__}")
    options = _curve_options(selection, sizes, level)  # bad options fail before the model is read
    run = Run.build(model, graph, clean, corrupted, metric, ablation=ablation,
                    batch_size=batch_size, attention_mask=attention_mask)
    return faithfulness_curve_run(run, sizes=options[1], selection=options[0], absolute=absolute,
                                  level=options[2], progress=progress)


def _curve_options(selection, sizes, level) -> tuple[Selection, list[float], Level]:
    try:
        selection = Selection(selection)
    except ValueError:
        selection = None
    if selection not in _SELECT:
        raise GimlensError(f"selection must be one of {[m.value for m in _SELECT]}, got {selection!r}")
    sizes = _check_sizes(sizes)
    level = coerce_enum(Level, level, "level")
    if level is not Level.EDGE and selection is not Selection.TOPN:
        raise GimlensError(f"level={level.value!r} curves select by top-n, got selection={selection.value!r}")
    return selection, sizes, level


def faithfulness_curve_run(run: Run, graph: Graph | None = None, *,
                           sizes: Sequence[float] = DEFAULT_SIZES, selection: Selection | str = "topn",
                           absolute: bool = True, level: Level | str = "edge",
                           progress: bool = False) -> FaithfulnessCurve:
    """[`faithfulness_curve`][circuits.evaluate.faithfulness_curve] on a
    [`Run`][circuits.run.Run], of the scores of `graph` (default the run's)."""
    graph = run.check_graph(graph)
    selection, sizes, level = _curve_options(selection, sizes, level)
    n_items = graph.n_valid_edges if level is Level.EDGE else _n_scored(graph, level)
    masks, n_edges = [], []
    for size in sizes:
        circuit = graph.copy()
        n = round(size / 100 * n_items)
        if level is Level.EDGE:
            _SELECT[selection](circuit, n, absolute)
        else:
            circuit.apply_topn(n, absolute, level=level.value)
        masks.append(_ablated_parts(circuit, level))
        n_edges.append(circuit.n_edges_in_graph)
    circuits, clean_m, base_m = _run_circuits(run, graph, masks, reference=True, show=progress)
    f = [_normalise(c.mean(), clean_m.mean(), base_m.mean()) for c in circuits]
    x = [size / 100 for size in sizes]
    return FaithfulnessCurve(tuple(sizes), tuple(n_edges), tuple(f), float(np.trapezoid(f, x)),
                             float(np.trapezoid([abs(1 - v) for v in f], x)),
                             float(clean_m.mean()), float(base_m.mean()))


def given_circuits(circuits: Mapping[int, Graph]) -> list[tuple[int, Graph]]:
    """`{size: Graph}` as (size, circuit) pairs by increasing size, checked."""
    items = sorted(circuits.items(), key=lambda kv: kv[0]) if circuits else []
    if not items or not all(isinstance(g, Graph) and isinstance(n, int) for n, g in items):
        raise GimlensError("graph must be a circuits.Graph or a non-empty {size: Graph} of circuits "
                           f"(discover(..., n_edges=[...])), got {circuits!r:.80}")
    if any(not g.same_layout(items[0][1]) for _, g in items):
        raise GimlensError("the circuits of a {size: Graph} curve must share one graph layout")
    return items


def given_curve(run: Run, circuits: list[tuple[int, Graph]], progress: bool) -> FaithfulnessCurve:
    """The faithfulness curve of circuits already selected (`given_circuits`' pairs), each patched
    as it is at edge level; one clean and one corrupted forward per batch for all of them."""
    masks = [_ablated_parts(g, Level.EDGE) for _, g in circuits]
    found, clean_m, base_m = _run_circuits(run, run.graph, masks, reference=True, show=progress)
    f = [_normalise(c.mean(), clean_m.mean(), base_m.mean()) for c in found]
    x = [n / run.graph.n_valid_edges for n, _ in circuits]
    return FaithfulnessCurve(tuple(100 * v for v in x), tuple(g.n_edges_in_graph for _, g in circuits),
                             tuple(f), float(np.trapezoid(f, x)),
                             float(np.trapezoid([abs(1 - v) for v in f], x)),
                             float(clean_m.mean()), float(base_m.mean()))


def _n_scored(graph: Graph, level: Level) -> int:
    scores = graph.node_scores if level is Level.NODE else graph.neuron_scores
    if scores is None:
        raise GimlensError(f"a level={level.value!r} curve needs graph.{level.value}_scores: score with "
                           f"circuits.attribute(..., level={level.value!r})")
    return int((~torch.isnan(scores)).sum())


def _check_sizes(sizes) -> list[float]:
    try:
        values = [float(v) for v in sizes]
    except (TypeError, ValueError):
        values = []
    if not values or any(not (0 <= v <= 100) or math.isnan(v) for v in values) \
            or values != sorted(set(values)):
        raise GimlensError(f"sizes must be increasing percentages in [0, 100], got {sizes!r}")
    return values
