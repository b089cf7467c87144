"""Edge attribution patching: score every edge of a circuit [`Graph`][circuits.graph.Graph].

The score of edge `src -> dst` estimates how the mean metric changes when `dst` reads the
ablated instead of the clean value of `src`: `(a_abl[src] - a_clean[src]) . g[dst]`, summed over
positions and `d_model` and averaged over examples, where `g[dst]` is the gradient of the metric
at `dst`'s input. One forward and backward pass per batch (per IG point) fills all scores;
per-head destination inputs need no split mode:

- sources: `input` = `hook_embed`; head `h` = `z[h] @ W_O[h]` (from `hook_z`); MLP =
  `hook_mlp_out`;
- q/k/v inputs: `g_in[h] = LN1_backward(g_q[h] @ W_Q[h]^T)` from the gradient at `hook_q/k/v`
  (k/v per KV head), with the exact or, under GIM's `freeze_norm`, the frozen norm Jacobian;
- MLP input: the gradient at `ln2.hook_in` (which feeds only the MLP); logits: at
  `ln_final.hook_in`.

Methods ([`Method`][circuits.attribute.Method]); the IG methods integrate over `alpha` in
[0, 1] (0 = ablated, 1 = clean) with the points and weights of a
[`Quadrature`][gimlens.quadrature.Quadrature] rule and `steps` points, by default EAP-IG's:

- `EAP`: gradients of the clean run.
- `EAP-IG-inputs`: gradients averaged over runs whose token embeddings are
  `e_abl + alpha (e_clean - e_abl)` (`e_abl`: the ablated `input` activation); default
  `alpha = k / steps`, `k = 0..steps-1` (`"riemann_left"`: the ablated point in, the clean out).
- `EAP-IG-activations`, `activations="per_node"` (default): for each node group in turn (the
  input, each layer's attention, each MLP) `steps` runs in which only that group's output is
  `a_clean + (1 - alpha)(a_abl - a_clean)`, a constant for the backward pass; default
  `alpha = k / steps`, `k = 1..steps` (EAP-IG's code); all `(2L + 1) steps` runs averaged.
- `EAP-IG-activations`, `activations="joint"`: runs in which *every destination's input* is
  `x_abl + alpha (x_clean - x_abl)` (equivalently every source activation is interpolated; the
  gradient passes each replacement straight through). `x_abl - x_clean` is the sum of the
  upstream sources' `a_abl - a_clean`, so the path is the same for every ablation.
- `clean-corrupted`: the mean of the clean-run gradient and the gradient at `alpha = 0` of the
  joint path (for `ablation="corrupted"` that is the corrupted run's).

The returned graph carries `graph.completeness` ([`Completeness`][circuits.attribute.Completeness]):
the `input` node's scores summed against the metric change they estimate.

Ablations (`circuits._engine.model.Ablation`): `corrupted` (the corrupted example's
activations), `mean` (per position, the mean over all given corrupted examples, weighted by
`attention_mask`), `zero`.

**Metric.** `metric(logits, indices) -> Tensor[b]` or `metric(logits) -> Tensor[b]`
(see `circuits._engine.examples`).

**Grouped KV heads.** With `kv_edges="per_query_head"` the k/v score of query head `h` is its
exact share: the gradient that reaches the KV head through `h`'s attention scores (k) or
pattern (v) alone, obtained by differentiating that layer's scores / `z` with the other heads'
gradients masked out. Summed over a group they equal the grouped score.

**Cost.** Per batch: the ablated run (no grad; none for `zero`/`mean`), a clean no-grad run
when no point is the clean one, and one forward and backward pass per gradient point, plus
per-head projections of the gradients and one score GEMM per group of layers (`diff
[n_forward, B, S, d]` against the destination gradients, float32). The IG methods sum gradients
over their points and multiply once, holding `[n_backward, B, S, d]` float32 gradients
meanwhile.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from jaxtyping import Float

from gimlens.distributed import all_reduce_sum, is_main_process
from gimlens.errors import GimlensError
from gimlens.gim import GIMConfig
from gimlens.validation import check_int
from gimlens.quadrature import Quadrature, nodes_and_weights
from gimlens.runtime import coerce_enum, prepared, progress as progress_bar

from ._engine.accumulate import Accumulator
from ._engine.memory import estimate_memory
from ._engine.model import Ablation, run_model
from ._engine.scoring import Point, Scorer
from ._engine.sites import Site
from .gim_advice import warn_if_measured_to_hurt
from .graph import Graph
from .layout import KVEdges
from .prune import Level
from .run import Run

__all__ = ["Activations", "Completeness", "Method", "MLPGradient", "attribute", "attribute_run",
           "gradient_points"]

#: Gradient points of the IG methods when neither `steps` nor `ig_steps` is given.
DEFAULT_STEPS = 5


class Method(str, Enum):
    """Edge-scoring methods (see the module docstring)."""

    EAP = "EAP"
    EAP_IG_INPUTS = "EAP-IG-inputs"
    EAP_IG_ACTIVATIONS = "EAP-IG-activations"
    CLEAN_CORRUPTED = "clean-corrupted"


class MLPGradient(str, Enum):
    """Where an MLP node's gradient is taken at node and neuron level."""

    OUTPUT = "output"  #: at its output: the first-order effect of ablating it (its edges' row sum)
    INPUT = "input"  #: EAP-IG's `attribute_node`: at its input (`hook_mlp_in`)


class Activations(str, Enum):
    """How `EAP-IG-activations` interpolates (see the module docstring)."""

    PER_NODE = "per_node"  #: EAP-IG's: one node group's output at a time, m runs each
    JOINT = "joint"  #: every destination's input at once, m runs in all


#: EAP-IG's integration rule per method: inputs at alpha = k/m, k = 0..m-1; per-node
#: activations at alpha = k/m, k = 1..m (EAP-IG's `get_scores_ig_activations`).
DEFAULT_RULES = {(Method.EAP_IG_INPUTS, None): Quadrature.RIEMANN_LEFT,
                 (Method.EAP_IG_ACTIVATIONS, Activations.PER_NODE): Quadrature.RIEMANN_RIGHT,
                 (Method.EAP_IG_ACTIVATIONS, Activations.JOINT): Quadrature.RIEMANN_RIGHT}


@dataclass(frozen=True)
class Completeness:
    """How exact the integral was: the input node's edge scores summed over destinations
    against the metric change when only the token embedding is ablated (means over examples).

    For `EAP-IG-inputs` the two agree in the limit of many points (integrated gradients'
    completeness); for `EAP` the gap is the linear estimate's error.
    """

    input_edges: float  #: sum of the `input -> *` scores
    metric_change: float  #: mean metric(embedding ablated) - mean metric(clean)

    @property
    def relative_error(self) -> float:
        """`|input_edges - metric_change| / |metric_change|` (inf if the change is 0)."""
        gap = abs(self.input_edges - self.metric_change)
        return gap / abs(self.metric_change) if self.metric_change else math.inf


def gradient_points(method: Method | str, steps: int = DEFAULT_STEPS,
                    quadrature: Quadrature | str | None = None, *,
                    activations: Activations | str = Activations.PER_NODE,
                    n_layers: int = 1) -> list[Point]:
    """The gradient passes of `method`, the clean one (if any) first; `quadrature=None` takes
    EAP-IG's rule for the method (`DEFAULT_RULES`).

    Examples:
        >>> [(p.alpha, p.weight) for p in gradient_points("EAP-IG-inputs", 2)]
        [(0.5, 0.5), (0.0, 0.5)]
        >>> len(gradient_points("EAP-IG-activations", 2, n_layers=3))  # 7 node groups x 2
        14
    """
    method = coerce_enum(Method, method, "method")
    activations = coerce_enum(Activations, activations, "activations")
    if method is Method.EAP:
        return [Point(1.0)]
    if method is Method.CLEAN_CORRUPTED:
        return [Point(0.5), Point(0.5, 0.0, False)]
    how = None if method is Method.EAP_IG_INPUTS else activations
    rule = DEFAULT_RULES[method, how] if quadrature is None else quadrature
    alpha, weights = nodes_and_weights(steps, coerce_enum(Quadrature, rule, "quadrature rule"))
    pairs = list(zip(alpha.tolist(), weights.tolist()))
    if how is Activations.PER_NODE:
        groups = 1 + 2 * n_layers
        return [Point(w / groups, a, False, node) for node in range(groups) for a, w in pairs]
    points = [Point(w, a, method is Method.EAP_IG_INPUTS) for a, w in pairs]
    return sorted(points, key=lambda p: -p.alpha)


def _steps(steps: int | None, ig_steps: int | None) -> int:
    if steps is not None and ig_steps is not None:
        raise GimlensError("pass steps or ig_steps (the same setting), not both")
    value = DEFAULT_STEPS if steps is None and ig_steps is None else (
        steps if steps is not None else ig_steps)
    return check_int("steps (ig_steps)", value, minimum=1)


def attribute(model, graph: Graph, clean, corrupted=None, metric=None, *,
              method: Method | str = "EAP", steps: int | None = None, ig_steps: int | None = None,
              quadrature: Quadrature | str | None = None,
              activations: Activations | str = Activations.PER_NODE,
              gim: GIMConfig | bool | dict | None = None, batch_size: int | None = None,
              ablation: Ablation | str = "corrupted", attention_mask: Tensor | None = None,
              progress: bool = False, max_memory: int | str | None = None,
              level: Level | str = "edge", mlp_gradient: MLPGradient | str = "output") -> Graph:
    """Fill `graph.scores` with edge attribution scores (float32, mean over examples), and with
    `level="node"` / `"neuron"` also `graph.node_scores` / `graph.neuron_scores`.

    The model runs in eval mode with frozen parameters (dropout off) and is left as found.

    Args:
        model: a TransformerLens `TransformerBridge` (or `HookedTransformer`).
        graph: a [`Graph`][circuits.graph.Graph] built for this model (`Graph.from_model(model)`);
            its scores are replaced, its selection is untouched.
        clean, corrupted: int tokens `[n, pos]` of equal shape, or a task object with `.clean`,
            `.corrupted`, `.metric` (and `.attention_mask`) as `clean`.
        metric: `metric(logits [b, pos, vocab], indices [b]) -> Tensor[b]` or `metric(logits)`.
        method: `"EAP"`, `"EAP-IG-inputs"`, `"EAP-IG-activations"`, `"clean-corrupted"`.
        steps: gradient points of the IG methods (default 5; per node group for per-node
            activations); `ig_steps` is the same setting.
        quadrature: the IG methods' integration rule (a
            [`Quadrature`][gimlens.quadrature.Quadrature] or its value, e.g. `"gauss_legendre"`,
            `"riemann_right"`); `None`: EAP-IG's (module docstring).
        activations: `"per_node"` (EAP-IG's) or `"joint"`, for `EAP-IG-activations`.
        gim: `True` (every rule), a [`GIMConfig`][gimlens.gim.GIMConfig] or a dict: gradients
            follow GIM. GIM measured to make this method's circuits less faithful
            ([`GIM_HURTS`][circuits.gim_advice.GIM_HURTS]: `EAP-IG-inputs` on some tasks) warns
            once; `circuits.discover(gim=True)` uses the method's measured rules.
        batch_size: examples per forward pass (`None`: all at once).
        ablation: `"corrupted"`, `"mean"` or `"zero"`.
        attention_mask: `[n, pos]` 1 for real tokens (both runs).
        progress: show a progress bar (and print the memory estimate first).
        max_memory: a budget in bytes (or `"4GB"`): `batch_size` is lowered so the estimate of
            `estimate_memory` stays within it.
        level: `"edge"` (default), `"node"`: also `graph.node_scores` (per source node:
            `(a_abl - a_clean) . g` at its output, summed over positions and `d_model`), or
            `"neuron"`: also `graph.neuron_scores` (the same per output dimension, `[n_forward,
            d_model]`) and `graph.node_scores` (their sums). With `quadrature=None`,
            `EAP-IG-inputs` then takes EAP-IG's node-level points, `alpha = k / m`, `k = 1..m`.
            See the module `circuits._engine.accumulate`; the cost over edges is small.
        mlp_gradient: at node and neuron level, `"output"` (default): an MLP node's score is its
            `(a_abl - a_clean)` times the gradient at its output, like every other node (the
            first-order effect of ablating it; the row sum of its edge scores), or `"input"`:
            times the gradient at the MLP's *input* (`hook_mlp_in`), as EAP-IG's
            `attribute_node` computes it (to reproduce its node and neuron scores).

    Under `torchrun` (an initialised `torch.distributed` process group) each rank scores a
    contiguous shard of the examples and the score sums are all-reduced: every rank returns the
    scores of the whole set.

    Returns:
        `graph`, with `graph.scores[src, dst]` the estimated change of the mean metric when edge
        `src -> dst` is ablated, and `graph.completeness` a
        [`Completeness`][circuits.attribute.Completeness] (how far the `input` node's scores
        are from the metric change they estimate).

    Examples:
        >>> from gimlens.testing import tiny_model
        >>> from circuits.graph import Graph
        >>> model = tiny_model("llama")
        >>> clean = model.to_tokens(["When Mary and John went to the store, John gave a drink to"])
        >>> corrupted = model.to_tokens(["When Mary and John went to the store, Anna gave a drink to"])
        >>> ids = model.to_single_token(" Mary"), model.to_single_token(" John")
        >>> metric = lambda logits: logits[:, -1, ids[0]] - logits[:, -1, ids[1]]
        >>> g = attribute(model, Graph.from_model(model), clean, corrupted, metric)
        >>> g.scores.shape == (g.n_forward, g.n_backward)
        True
        >>> n = attribute(model, Graph.from_model(model), clean, corrupted, metric, level="node")
        >>> bool(torch.allclose(n.node_scores, n.scores.sum(1), atol=1e-6))  # row sums
        True
    """
    config = GIMConfig.coerce(gim)
    if not config.is_off:
        name = method.value if isinstance(method, Method) else method
        warn_if_measured_to_hurt(name if isinstance(name, str) else "", config)
    run = Run.build(model, graph, clean, corrupted, metric, ablation=ablation, gim=config,
                    batch_size=batch_size, attention_mask=attention_mask, max_memory=max_memory)
    return attribute_run(run, method=method, steps=steps, ig_steps=ig_steps, quadrature=quadrature,
                         activations=activations, level=level, mlp_gradient=mlp_gradient,
                         progress=progress)


@dataclass(frozen=True)
class _Plan:
    """What one attribution computes: its gradient points and output levels."""

    points: list[Point]
    level: Level
    mlp_gradient: MLPGradient
    split_kv: bool  # per-query-head k/v scores on a grouped-KV model

    @classmethod
    def read(cls, run: Run, graph: Graph, method, steps, ig_steps, quadrature, activations,
             level, mlp_gradient) -> "_Plan":
        method = coerce_enum(Method, method, "method")
        level = coerce_enum(Level, level, "level")
        mlp_gradient = coerce_enum(MLPGradient, mlp_gradient, "mlp_gradient")
        if mlp_gradient is MLPGradient.INPUT and level is Level.EDGE:
            raise GimlensError("mlp_gradient='input' applies to level='node' or 'neuron' scores, "
                               "got level='edge'")
        if quadrature is None and level is not Level.EDGE and method is Method.EAP_IG_INPUTS:
            quadrature = Quadrature.RIEMANN_RIGHT  # EAP-IG's attribute_node: k = 1..m
        points = gradient_points(method, _steps(steps, ig_steps), quadrature,
                                 activations=activations, n_layers=run.spec.n_layers)
        spec = run.spec
        split_kv = graph.kv_edges is KVEdges.PER_QUERY_HEAD and spec.n_kv_heads < spec.n_heads
        return cls(points, level, mlp_gradient, split_kv)


@dataclass
class _Sums:
    """Sums over examples of the scores and of the two metrics completeness compares."""

    scores: Float[Tensor, "n_fwd n_bwd"]
    neurons: Float[Tensor, "n_fwd d"] | None  # node / neuron level
    mlp_input: Float[Tensor, "n_fwd d"] | None  # mlp_gradient="input"
    metrics: Float[Tensor, "2"]  # clean, input ablated (float64)


def attribute_run(run: Run, graph: Graph | None = None, *, method: Method | str = "EAP",
                  steps: int | None = None, ig_steps: int | None = None,
                  quadrature: Quadrature | str | None = None,
                  activations: Activations | str = Activations.PER_NODE,
                  level: Level | str = "edge", mlp_gradient: MLPGradient | str = "output",
                  progress: bool = False) -> Graph:
    """[`attribute`][circuits.attribute.attribute] on a [`Run`][circuits.run.Run]: fill `graph`
    (default the run's) with the scores of `method` over the run's examples."""
    graph = run.check_graph(graph)
    plan = _Plan.read(run, graph, method, steps, ig_steps, quadrature, activations, level,
                      mlp_gradient)
    spec = run.spec
    neurons = None if plan.level is Level.EDGE else torch.zeros(graph.n_forward, spec.d_model,
                                                                device=spec.device)
    sums = _Sums(torch.zeros(graph.n_forward, graph.n_backward, device=spec.device), neurons,
                 torch.zeros_like(neurons) if plan.mlp_gradient is MLPGradient.INPUT else None,
                 torch.zeros(2, dtype=torch.float64, device=spec.device))
    show = progress and is_main_process()
    if show:
        size = run.batch_size or max(sum(len(b.idx) for b in run.batches), 1)
        print(f"attribute: {run.n_examples} examples in batches of {size}; memory "
              f"{estimate_memory(run.model, graph, size, run.examples.clean.shape[1])}", file=sys.stderr)
    with prepared(run.model), torch.enable_grad(), \
            progress_bar(len(run.batches) * len(plan.points), show=show, desc="attribute") as bar:
        for i in range(len(run.batches)):
            _score_batch(run, graph, plan, i, sums, bar)
    return _finish(run, graph, plan, sums)


def _score_batch(run: Run, graph: Graph, plan: _Plan, i: int, sums: _Sums, bar) -> None:
    """Add batch `i`'s scores and metrics to `sums`: its gradient passes, then completeness."""
    spec, points, batch = run.spec, plan.points, run.batches[i]
    ablated, corrupted_metric = run.ablated(i, writable=True)  # the scorer turns it into diff
    acc = Accumulator.build(spec, graph, sums.scores, ablated.resid, split_kv=plan.split_kv,
                            defer=len(points) > 1, neurons=sums.neurons, mlp_input=sums.mlp_input)
    scorer = Scorer(spec, graph, ablated, run.frozen, plan.split_kv,
                    keep_clean=any(not p.inputs and p.node is None for p in points),
                    acc=acc, keep_nodes=any(p.node is not None for p in points))
    toks, mask, idx = batch.tokens, batch.mask, batch.idx
    if not points[0].clean:
        with torch.no_grad():
            logits = run_model(run.model, toks, mask, scorer.record_hooks())
            sums.metrics[0] += run.examples.score(logits, idx).double().sum()
    for j, point in enumerate(points):
        hooks = scorer.hooks(point, check_norm_once=i == 0 and j == 0) + list(run.hooks)
        logits = run_model(run.model, toks, mask, hooks)
        values = run.examples.score(logits, idx)
        if not values.requires_grad:
            raise GimlensError("metric must be a differentiable function of the logits")
        if point.clean:
            sums.metrics[0] += values.detach().double().sum()
        torch.autograd.backward(point.weight * values.sum(), inputs=[scorer.leaf],
                                retain_graph=plan.split_kv)
        acc.end_pass()
        if plan.split_kv:
            scorer.split_kv_grads()
        del logits, values
        bar.update(1)
    acc.flush()
    with torch.no_grad():
        if corrupted_metric is None:  # only the token embedding ablated: one run
            shift = scorer.diff[0]
            logits = run_model(run.model, toks, mask,
                               [(Site.EMBED.at(), lambda x, hook: x + shift.to(x.dtype))])
            corrupted_metric = run.examples.score(logits, idx)
        # for ablation="corrupted" the corrupted run is that run: the rest follows from the embedding
        sums.metrics[1] += corrupted_metric.double().sum()


def _finish(run: Run, graph: Graph, plan: _Plan, sums: _Sums) -> Graph:
    """Means over all examples (summed over processes) into `graph`, with completeness."""
    spec, n = run.spec, run.n_examples
    all_reduce_sum(sums.scores)
    all_reduce_sum(sums.metrics)
    graph.scores = (sums.scores / n).to(graph.scores.device)
    neurons = sums.neurons
    if neurons is not None:
        if sums.mlp_input is not None:  # EAP-IG's rule replaces the MLP rows
            rows = [spec.mlp_row(l) for l in range(spec.n_layers)]
            neurons[rows] = sums.mlp_input[rows]
        all_reduce_sum(neurons)
        neurons = (neurons / n).to(graph.scores.device)
        graph.node_scores = neurons.sum(-1)
        if plan.level is Level.NEURON:
            graph.neuron_scores = neurons
    m_clean, m_ablated = (sums.metrics / n).tolist()
    graph.completeness = Completeness(float(graph.scores[0].sum()), m_ablated - m_clean)
    return graph
