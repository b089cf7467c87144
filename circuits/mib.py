"""MIB's circuit-localization metrics (CPR, CMD, mean faithfulness) as its leaderboard computes them.

MIB (the circuit track of the Mechanistic Interpretability Benchmark) scores a circuit-discovery
method by the faithfulness of its circuits at ten sizes. [`mib_metrics`][circuits.mib.mib_metrics]
follows MIB's `evaluate_area_under_curve` and its leaderboard's choice of runs:

1. `N` = the number of edges with **k/v edges counted per query head** on grouped-query
   models (the EAP-IG / MIB graph: `mib_edge_count`; GPT-2 small has 32,491).
2. Points at the fractions `MIB_FRACTIONS` = 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5
   and 1, with `int(fraction * N)` edges each (truncated, not rounded: `mib_points`).
3. At each point: top-n edges by score on the per-query-head graph, then pruning of dangling
   edges and nodes; the circuit's metric `m` is the mean over examples of exact patching.
4. Normalised faithfulness `f = (m - m_corrupt) / (m_clean - m_corrupt)`, with `m_clean` the clean
   run and `m_corrupt` the empty circuit (the corrupted run under patching).
5. Trapezoid rule on the linear fraction axis from 0.001 to 1 (no point at 0): the area under `f`
   and the area of `|1 - f|` (`curve_areas`); MIB also reports the plain mean of `f` over points.
6. The leaderboard reads **CPR** (area under, higher is better) from a run that ranks edges by
   their **signed** score and **CMD** (area of `|1 - f|`, lower is better) from a run that ranks
   by **absolute** score. `mib_metrics` runs both selections and reports both full curves.

**Score sign.** MIB attributes with `loss=True`: its scores are those of the *negated* logit
difference, so an edge whose ablation lowers the logit difference scores positive, and the signed
selection keeps those first. gimlens scores the metric itself (`graph.scores` is the estimated
change of the metric when the edge is ablated: negative for such an edge). `mib_metrics`
therefore ranks the signed run by `-graph.scores` by default (`loss=False`); pass `loss=True`
when the scores already have MIB's sign: a graph loaded from a MIB / EAP-IG file, or one scored
with a metric that ablation raises (a loss, such as [`KLMetric`][circuits.tasks.kl.KLMetric]).
The absolute run does not depend on the sign.

**Grouped-query attention.** MIB runs `HookedTransformer` with
`ungroup_grouped_query_attention=True`: every query head then has its own copy of the k/v
projection, and a per-query-head circuit can give the query heads of one KV group different k/v
inputs. gimlens patches the model as it runs, with one k/v projection per KV head, so the
circuit is selected and pruned on the per-query-head graph (MIB's `N`, top-n and pruning) and
patched as `as_kv_edges("grouped")`: a k/v edge into a KV group is kept if any query head of the
group keeps it. Where the heads of every group agree (always on models without GQA, such as
GPT-2) this is exactly MIB's circuit; elsewhere the patched circuit is a superset, and each
curve's `n_edges_patched` (per-query-head count of what was patched) shows by how much next to
`n_edges` (MIB's count).

Examples:
    >>> from circuits.mib import MIB_FRACTIONS, mib_points
    >>> mib_points(32491, MIB_FRACTIONS)
    (32, 64, 162, 324, 649, 1624, 3249, 6498, 16245, 32491)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from gimlens.errors import GimlensError
from gimlens.validation import check_int

from ._engine.model import Ablation
from .evaluate import evaluate_run, given_circuits, given_curve
from .graph import Graph
from .layout import KVEdges
from .prune import Selection
from .run import Run

__all__ = ["MIB_FRACTIONS", "MIBCurve", "MIBMetrics", "mib_metrics", "mib_metrics_run", "mib_edge_count", "mib_points",
           "curve_areas"]

#: The fractions of edges at which MIB evaluates circuits.
MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

_SELECT = {Selection.TOPN: Graph.apply_topn, Selection.GREEDY: Graph.apply_greedy}


def mib_edge_count(graph_or_model: Any) -> int:
    """MIB's `N`: the valid edges with k/v edges counted per query head.

    Args:
        graph_or_model: a [`Graph`][circuits.graph.Graph] (either k/v layout), a TransformerLens
            model, or anything [`Graph.from_model`][circuits.graph.Graph.from_model] reads.

    Returns:
        The number of edges of the `kv_edges="per_query_head"` graph (EAP-IG's `len(graph.edges)`).

    Examples:
        >>> mib_edge_count({"n_layers": 24, "n_heads": 14, "n_key_value_heads": 2, "d_model": 896})
        179749
    """
    if isinstance(graph_or_model, Graph):
        cfg = graph_or_model.cfg
    else:
        cfg = Graph.from_model(graph_or_model).cfg
    return Graph(**{**cfg, "kv_edges": KVEdges.PER_QUERY_HEAD}).n_valid_edges


def mib_points(n_total: int, fractions: Sequence[float] = MIB_FRACTIONS) -> tuple[int, ...]:
    """Edges per point: `int(fraction * n_total)` (truncation, as MIB; not rounding).

    Args:
        n_total: `N`, from [`mib_edge_count`][circuits.mib.mib_edge_count].
        fractions: increasing fractions in (0, 1].

    Returns:
        One edge count per fraction.

    Examples:
        >>> mib_points(110)
        (0, 0, 0, 1, 2, 5, 11, 22, 55, 110)
    """
    check_int("n_total", n_total, minimum=0)
    return tuple(int(f * n_total) for f in _check_fractions(fractions))


def curve_areas(fractions: Sequence[float], faithfulness: Sequence[float]) -> tuple[float, float, float]:
    """MIB's summaries of one faithfulness curve: trapezoid areas on the linear fraction axis.

    Args:
        fractions: the x values (increasing), e.g. `MIB_FRACTIONS`.
        faithfulness: the normalised faithfulness at each fraction.

    Returns:
        `(area_under, area_from_1, mean)`: the trapezoid area under `f`, that of `|1 - f|`, and the
        plain mean of `f` over the points.

    Examples:
        >>> curve_areas([0.0, 0.5, 1.0], [0.0, 1.0, 1.0])
        (0.75, 0.25, 0.6666666666666666)
    """
    x = [float(v) for v in fractions]
    y = [float(v) for v in faithfulness]
    if len(x) != len(y) or len(x) < 2:
        raise GimlensError(f"need at least two points and one faithfulness value per fraction, got "
                           f"{len(x)} fractions and {len(y)} values")
    if any(b <= a for a, b in zip(x, x[1:])):
        raise GimlensError(f"fractions must be strictly increasing, got {list(fractions)!r}")
    under = float(np.trapezoid(y, x))
    from_1 = float(np.trapezoid([abs(1 - v) for v in y], x))
    return under, from_1, sum(y) / len(y)


@dataclass(frozen=True)
class MIBCurve:
    """One MIB run: circuits ranked by signed (`absolute=False`) or absolute scores.

    Attributes:
        absolute: how edges were ranked.
        n_edges: edges left after top-n and pruning, counted per query head (MIB's
            `weighted_edge_count`).
        n_edges_patched: per-query-head edges of the circuit actually patched (the grouped
            circuit on GQA models; equal to `n_edges` without GQA).
        faithfulness: normalised faithfulness per point.
        area_under: trapezoid area under the curve (CPR when `absolute` is False).
        area_from_1: trapezoid area of `|1 - f|` (CMD when `absolute` is True).
        mean: mean faithfulness over the points.
    """

    absolute: bool
    n_edges: tuple[int, ...]
    n_edges_patched: tuple[int, ...]
    faithfulness: tuple[float, ...]
    area_under: float
    area_from_1: float
    mean: float


@dataclass(frozen=True)
class MIBMetrics:
    """MIB's metrics of one scored graph (the module docstring gives the rules).

    Attributes:
        fractions: the points' edge fractions.
        n_total: `N`, edges counted per query head.
        n_requested: `int(fraction * N)` per point.
        signed: the run ranking edges by signed score in MIB's sign (its `area_under` is CPR).
        absolute: the run ranking edges by absolute score (its `area_from_1` is CMD).
        clean_metric: mean metric of the clean run (`m_clean`).
        corrupted_metric: mean metric of the empty circuit (`m_corrupt`).
    """

    fractions: tuple[float, ...]
    n_total: int
    n_requested: tuple[int, ...]
    signed: MIBCurve
    absolute: MIBCurve
    clean_metric: float
    corrupted_metric: float

    @property
    def cpr(self) -> float:
        """Area under the signed-score curve (MIB's CPR; higher is better)."""
        return self.signed.area_under

    @property
    def cmd(self) -> float:
        """Area of `|1 - f|` of the absolute-score curve (MIB's CMD; lower is better)."""
        return self.absolute.area_from_1


def mib_metrics(model, graph: Graph | Mapping[int, Graph], clean, corrupted=None, metric=None, *,
                fractions: Sequence[float] = MIB_FRACTIONS, selection: Selection | str = "topn",
                loss: bool = False, ablation: Ablation | str = "corrupted", batch_size: int | None = None,
                attention_mask: Tensor | None = None) -> MIBMetrics:
    """CPR, CMD and mean faithfulness of a scored graph, by MIB's rules (module docstring).

    Args:
        model: a TransformerLens model (left as found).
        graph: a scored graph of this model (`graph.scores` from
            [`circuits.attribute`][circuits.attribute.attribute]); not changed. Score it with
            `kv_edges="per_query_head"` on GQA models to rank k/v edges per query head as MIB
            does: a grouped graph is expanded (each KV-head score copied to its query heads).
            Or `{size: Graph}`, circuits already found (the curve of
            [`discover`][circuits.discover.discover] with a list of sizes, such as
            `mib_points(N)`): each is patched as it is, at the fraction `size / N` of its own
            graph's valid edges (grouped k/v edges counted once on GQA models), and both runs
            (`signed`, `absolute`) are that one curve; `fractions`, `selection` and `loss` are
            then ignored.
        clean, corrupted, metric, attention_mask: as in
            [`circuits.evaluate`][circuits.evaluate.evaluate] (a task object works as `clean`).
            MIB's leaderboard uses the logit difference, one value per example.
        fractions: the points (default `MIB_FRACTIONS`).
        selection: `"topn"` (MIB's default) or `"greedy"` (MIB's choice for information-flow
            routes).
        loss: `graph.scores` already have MIB's sign (scores of a loss: MIB / EAP-IG files, a
            KL metric). `False` (gimlens scores of a metric that important edges raise, such as
            the logit difference): the signed run ranks by `-graph.scores` (module docstring).
        ablation: what edges outside the circuit carry: `"corrupted"` (MIB's patching), `"mean"`
            or `"zero"`.
        batch_size: examples per forward pass (`None`: all at once).

    Returns:
        [`MIBMetrics`][circuits.mib.MIBMetrics]: `.cpr`, `.cmd`, both curves with their means.

    Examples:
        >>> from gimlens.testing import tiny_model
        >>> from circuits import Graph, attribute
        >>> model = tiny_model("gpt2")
        >>> clean, corrupted = model.to_tokens(["When Mary and John went"]), model.to_tokens(["When Anna and John went"])
        >>> metric = lambda logits, idx: logits[:, -1, 0] - logits[:, -1, 1]
        >>> g = attribute(model, Graph.from_model(model), clean, corrupted, metric)
        >>> result = mib_metrics(model, g, clean, corrupted, metric)
        >>> result.n_total, result.n_requested[-1], round(result.signed.faithfulness[-1], 6)
        (110, 110, 1.0)
    """
    if isinstance(graph, Mapping):
        circuits = given_circuits(graph)
        circuits[0][1].check_matches(model)
        run = Run.build(model, circuits[0][1].as_kv_edges(KVEdges.GROUPED), clean, corrupted, metric,
                        ablation=ablation, batch_size=batch_size, attention_mask=attention_mask)
        return _given_curve(run, circuits)
    if not isinstance(graph, Graph):
        raise GimlensError(f"graph must be a circuits.Graph, got {type(graph).__name__}")
    _options(selection, loss, fractions)  # bad options fail before the model is read
    graph.check_matches(model)
    run = Run.build(model, graph.as_kv_edges(KVEdges.GROUPED), clean, corrupted, metric,
                    ablation=ablation, batch_size=batch_size, attention_mask=attention_mask)
    return mib_metrics_run(run, graph, fractions=fractions, selection=selection, loss=loss)


def _given_curve(run: Run, circuits: list[tuple[int, Graph]]) -> MIBMetrics:
    """MIB's metrics of circuits already selected (`{size: Graph}`), each patched as it is (one
    clean and one corrupted forward per batch for all of them: `faithfulness_curve`'s)."""
    if len(circuits) < 2:
        raise GimlensError(f"a {{size: Graph}} curve needs at least two sizes, got {[n for n, _ in circuits]}")
    patched = [(n, c.as_kv_edges(KVEdges.GROUPED)) for n, c in circuits]
    found = given_curve(run, patched, progress=False)  # raises where clean = empty circuit
    fractions = [n / run.graph.n_valid_edges for n, _ in circuits]
    counts = tuple(c.as_kv_edges(KVEdges.PER_QUERY_HEAD).n_edges_in_graph for _, c in patched)
    under, from_1, mean = curve_areas(fractions, found.faithfulness)
    curves = [MIBCurve(absolute, counts, counts, found.faithfulness, under, from_1, mean)
              for absolute in (False, True)]
    return MIBMetrics(tuple(fractions), run.graph.as_kv_edges(KVEdges.PER_QUERY_HEAD).n_valid_edges,
                      tuple(n for n, _ in circuits), *curves, found.clean_metric, found.ablated_metric)


def _options(selection, loss, fractions) -> tuple[Selection, list[float]]:
    try:
        selection = Selection(selection)
    except ValueError:
        selection = None
    if selection not in _SELECT:
        raise GimlensError(f"selection must be one of {[s.value for s in _SELECT]}, got {selection!r}")
    if not isinstance(loss, bool):
        raise GimlensError(f"loss must be True or False, got {loss!r}")
    return selection, _check_fractions(fractions)


def mib_metrics_run(run: Run, graph: Graph, *, fractions: Sequence[float] = MIB_FRACTIONS,
                    selection: Selection | str = "topn", loss: bool = False) -> MIBMetrics:
    """[`mib_metrics`][circuits.mib.mib_metrics] of the scored `graph` on a
    [`Run`][circuits.run.Run] built with `graph.as_kv_edges("grouped")` (the patched layout)."""
    if not isinstance(graph, Graph):
        raise GimlensError(f"graph must be a circuits.Graph, got {type(graph).__name__}")
    selection, fractions = _options(selection, loss, fractions)
    grouped = run.check_graph(graph.as_kv_edges(KVEdges.GROUPED))
    per_query = graph.as_kv_edges(KVEdges.PER_QUERY_HEAD)
    importance = per_query.copy()  # MIB's sign: positive = ablation lowers the metric
    if not loss:
        importance.scores = -per_query.scores
    n_total = per_query.n_valid_edges
    requested = mib_points(n_total, fractions)
    cache: dict[bytes, float] = {}

    def mean_metric(mask: Bool[Tensor, "n_fwd n_bwd"]) -> float:
        key = mask.cpu().numpy().tobytes()
        if key not in cache:
            patched = grouped.copy().reset(empty=True)
            patched.in_graph = mask
            cache[key] = float(evaluate_run(run, patched).mean())
        return cache[key]

    clean_m = mean_metric(grouped.valid.clone())
    base_m = mean_metric(torch.zeros_like(grouped.valid))
    if clean_m == base_m:
        raise GimlensError("the clean run and the empty circuit have the same mean metric, so "
                           "faithfulness (m - m_corrupt) / (m_clean - m_corrupt) is undefined")

    def curve(absolute: bool) -> MIBCurve:
        n_edges, n_patched, f = [], [], []
        for n in requested:
            circuit = importance.copy()
            _SELECT[selection](circuit, n, absolute)
            n_edges.append(circuit.n_edges_in_graph)
            as_patched = circuit.as_kv_edges(KVEdges.GROUPED)
            n_patched.append(as_patched.as_kv_edges(KVEdges.PER_QUERY_HEAD).n_edges_in_graph)
            f.append((mean_metric(as_patched.in_graph) - base_m) / (clean_m - base_m))
        under, from_1, mean = curve_areas(fractions, f)
        return MIBCurve(absolute, tuple(n_edges), tuple(n_patched), tuple(f), under, from_1, mean)

    return MIBMetrics(tuple(fractions), n_total, requested, curve(False), curve(True), clean_m, base_m)


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    try:
        values = [float(v) for v in fractions]
    except (TypeError, ValueError):
        values = []
    if len(values) < 2 or any(math.isnan(v) or not 0 < v <= 1 for v in values) \
            or any(b <= a for a, b in zip(values, values[1:])):
        raise GimlensError(f"fractions must be at least two strictly increasing values in (0, 1], "
                           f"got {fractions!r}")
    return values
