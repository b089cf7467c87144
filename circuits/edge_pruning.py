"""Edge pruning: learned hard-concrete edge masks optimised through the exact patching forward.

After Bhaskar et al. 2024, "Finding Transformer Circuits with Edge Pruning" (formulas only).
Every valid edge `e` has a mask `m_e = min(1, max(0, sigmoid((log u - log(1 - u) + log_alpha_e)
/ beta) (zeta - gamma) + gamma))`, `u ~ U(0, 1)` (hard concrete, `beta = 2/3`, `gamma = -0.1`,
`zeta = 1.1`), whose probability of being non-zero is `p_e = sigmoid(log_alpha_e - beta log(-gamma
/ zeta))`. Each step runs one batch through the exact patching forward with missing
coefficients `w = 1 - m` (differentiable in `log_alpha`) and minimises

    loss = faithfulness loss + lambda_1 r + lambda_2 r^2,   r = (sum_e p_e - target_t) / target_t

with the Lagrange multipliers `lambda` *maximised* (gradient ascent, as in the paper), so the
expected edge count is driven to the target. The target falls geometrically from the start's expected edge count
(all valid edges without a warm start) to `n_edges` over the first `ramp` share of the steps,
then stays. Adam moves each `log_alpha` by about `lr` per step, so the count can follow the
target only if `lr * ramp * steps` covers the few units between an open and a closed mask: the
defaults (300 steps, `lr = 0.1`, `ramp = 0.7`) reach 1% of SmolLM2's 70,651 edges by step ~210
under the sparsity terms alone; 40 steps do not (the final selection is still the `n_edges`
largest `log_alpha`, so the circuit has the requested size either way). The faithfulness loss
is `"metric"`: the mean of `((m_patched - m_clean) / gap)^2` over the batch (`gap` the mean
clean-minus-ablated metric of the discovery set), or `"kl"`: the KL divergence from the clean to
the patched next-token distribution at each example's last real token. The circuit is the
`n_edges` edges of largest `log_alpha`, then pruned.

A curve: `edge_pruning_curve_run` (or `discover(..., n_edges=[...])`) runs one search whose
target passes through several sizes (`schedule`) and reads each size's circuit after a plateau.

Warm start (`warm_start="EAP-IG-inputs"`, optionally with GIM): `log_alpha` starts as an affine
function of each edge's rank by |EAP-IG score|, `init + 4 (q - 1 + n_edges / N)` with `q` the
rank quantile (1 = best), so the ranks' top `n_edges` start above `init`.

Cost: one corrupted and one clean forward per batch (the [`Run`][circuits.run.Run]'s, shared
with the warm start), the warm start's `ig_steps` forward-and-backward passes per batch, then
`steps` forward-and-backward passes of one batch each (batches cycled), each about 2.5x a plain
forward and backward of the batch (`benchmarks/bench_discover.py`). Memory: one batch's
autograd graph of the patched forward, about what `circuits.attribute` holds for one gradient
point (`max_memory` lowers the batch size accordingly).

Examples:
    >>> from gimlens.testing import tiny_model
    >>> from circuits.graph import Graph
    >>> model = tiny_model("gpt2")
    >>> clean, corrupted = model.to_tokens(["When Mary and John went"]), model.to_tokens(["When Anna and John went"])
    >>> metric = lambda logits, idx: logits[:, -1, 0] - logits[:, -1, 1]
    >>> g = edge_pruning(model, Graph.from_model(model), clean, corrupted, metric, n_edges=30, steps=20)
    >>> 0 < g.n_edges_in_graph <= 30
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch
from jaxtyping import Float
from torch import Tensor

from gimlens.errors import GimlensError
from gimlens.validation import check_int
from gimlens.runtime import coerce_enum, prepared, progress as progress_bar

from ._engine.masked import check_n_edges, check_run, check_sizes, gap, patched_logits
from .attribute import attribute_run
from .graph import Graph
from .run import Run

__all__ = ["edge_pruning", "edge_pruning_run", "edge_pruning_curve_run", "CURVE_STEPS", "LEAD", "schedule", "Loss",
           "hard_concrete", "expected_open"]

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


class Loss(str, Enum):
    """Faithfulness losses of edge pruning."""

    METRIC = "metric"  #: squared normalised distance to the clean metric, per example
    KL = "kl"  #: KL(clean || patched) of the next-token distribution at the last real token


def hard_concrete(log_alpha: Tensor, generator: torch.Generator | None = None,
                  sample: bool = True) -> Tensor:
    """A hard-concrete mask in [0, 1] (a sample, or the deterministic `sample=False` value)."""
    if sample:
        u = torch.rand(log_alpha.shape, generator=generator).to(log_alpha.device).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / BETA)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_open(log_alpha: Tensor) -> Tensor:
    """`P(m_e > 0)` of each hard-concrete mask (the expected L0 norm per edge).

    Examples:
        >>> round(float(expected_open(torch.tensor(0.0))), 3)
        0.832
    """
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def _loss(run: Run, i: int, missing: Tensor, kind: Loss, gap: float) -> Tensor:
    logits, _ = patched_logits(run, i, missing)
    batch, ref = run.batches[i], run.reference(i)
    if kind is Loss.KL:
        rows = torch.arange(len(batch.idx), device=logits.device)
        logp = logits[rows, ref.last.to(logits.device)].float().log_softmax(-1)
        return (ref.clean_logprobs.exp() * (ref.clean_logprobs - logp)).sum(-1).mean()
    values = run.examples.score(logits, batch.idx).float()
    return (((values - ref.clean_metric) / gap) ** 2).mean()


def _warm_log_alpha(run: Run, graph: Graph, warm_start: str | Graph, ig_steps: int, n_edges: int,
                    init: float, progress: bool = False) -> Tensor:
    """The start: `init + 4 (q - 1 + n_edges / N)` by the rank quantile `q` of |score| (module
    docstring); the scores are `warm_start`'s, or the run's attribution by that method."""
    if isinstance(warm_start, Graph):
        if not warm_start.same_layout(graph):
            raise GimlensError("warm_start graph has another layout than graph")
        scored = warm_start
    else:
        scored = attribute_run(run, graph.copy(), method=warm_start, ig_steps=ig_steps,
                               progress=progress)
    ranked = scored.scores.detach().cpu().abs().masked_fill(~graph.valid, -1.0).flatten()
    order = torch.empty(ranked.numel())
    order[ranked.argsort(stable=True)] = torch.arange(ranked.numel(), dtype=torch.float32)
    N = graph.n_valid_edges
    q = (order.view_as(scored.scores) - (ranked.numel() - N)) / max(N - 1, 1)  # 0 worst .. 1 best
    return init + 4.0 * (q - 1.0 + n_edges / N)


def edge_pruning(model, graph: Graph, clean, corrupted=None, metric=None, *, n_edges: int,
                 steps: int = 300, lr: float = 0.1, loss: Loss | str = "metric",
                 warm_start: str | Graph | None = "EAP-IG-inputs", ig_steps: int = 5, gim=None,
                 ramp: float = 0.7, init: float = 1.0, seed: int = 0,
                 ablation="corrupted", batch_size: int | None = None,
                 attention_mask: Tensor | None = None, progress: bool = False,
                 max_memory: int | str | None = None) -> Graph:
    """Learn a circuit of at most `n_edges` edges with hard-concrete edge masks.

    Args:
        model: a TransformerLens model (left as found).
        graph: a `kv_edges="grouped"` graph of `model`; its scores and selection are replaced.
        clean, corrupted, metric, attention_mask, ablation, batch_size, max_memory: as in
            `circuits.attribute`.
        n_edges: the circuit's size before pruning (and the sparsity target).
        steps: optimisation steps, each one forward and backward pass of one batch.
        lr: Adam's learning rate for `log_alpha` and for the multipliers.
        loss: `"metric"` or `"kl"` (module docstring).
        warm_start: `None` (every `log_alpha = init`), a `circuits.attribute` method whose
            scores rank the initial masks (`ig_steps` and `gim` passed on), or a scored `Graph`
            of the same layout whose scores do (no attribution run).
        gim: GIM's rules for the gradients of the warm start and of the optimisation.
        ramp: share of the steps over which the edge target falls to `n_edges`.
        init: the initial `log_alpha` level.
        seed: seed of the mask samples.
        progress: a progress bar showing the loss and the expected edge count.

    Returns:
        `graph`: `in_graph` the circuit, `scores` the learned `log_alpha` (0 off `valid`).
    """
    check_n_edges(graph, n_edges)
    run = Run.build(model, graph, clean, corrupted, metric, ablation=ablation, gim=gim,
                    batch_size=batch_size, attention_mask=attention_mask, max_memory=max_memory,
                    keep_sources=True)
    return edge_pruning_run(run, n_edges=n_edges, steps=steps, lr=lr, loss=loss,
                            warm_start=warm_start, ig_steps=ig_steps, ramp=ramp, init=init,
                            seed=seed, progress=progress)


def edge_pruning_run(run: Run, graph: Graph | None = None, *, n_edges: int, steps: int = 300,
                     lr: float = 0.1, loss: Loss | str = "metric",
                     warm_start: str | Graph | None = "EAP-IG-inputs", ig_steps: int = 5,
                     ramp: float = 0.7, init: float = 1.0, seed: int = 0,
                     progress: bool = False) -> Graph:
    """[`edge_pruning`][circuits.edge_pruning.edge_pruning] on a [`Run`][circuits.run.Run]
    (best built with `keep_sources=True`: the warm start then reuses its corrupted forwards);
    `graph` (default the run's) gets the circuit."""
    graph = run.check_graph(graph)
    check_n_edges(graph, n_edges)
    (log_alpha,) = _search(run, graph, [n_edges], steps, lr, loss, warm_start, ig_steps, ramp, init,
                           seed, progress)
    return _select(graph, log_alpha, n_edges)


#: optimisation steps of a curve search (`edge_pruning_curve_run`): 1.5x a single search's
CURVE_STEPS = 450


def edge_pruning_curve_run(run: Run, graph: Graph | None = None, *, sizes: Sequence[int],
                           steps: int = CURVE_STEPS, lr: float = 0.1, loss: Loss | str = "metric",
                           warm_start: str | Graph | None = "EAP-IG-inputs", ig_steps: int = 5,
                           ramp: float = 0.7, init: float = 1.0, seed: int = 0,
                           progress: bool = False) -> dict[int, Graph]:
    """Circuits of several sizes from ONE edge-pruning search (a faithfulness curve).

    The sparsity target passes through `sizes` from the largest down (`schedule`: the largest
    gets a single search's schedule over the first `LEAD` = 45% of `steps`; then the target moves
    on through the others, each size holding for a while so the masks settle) and each size's
    circuit is the `n` largest `log_alpha` at the end of its plateau, pruned, as a single search
    selects. The warm start (ranked for the largest size) and the
    run's forwards are shared: the whole curve costs `steps` (default `CURVE_STEPS` = 450, 1.5x a
    single search's 300) forward-and-backward passes of one batch, whatever the number of sizes.
    A size of every valid edge (MIB's 100% point) is the whole graph, not searched for.

    Returns:
        `{size: Graph}` in the order of `sizes`, each a copy of `graph` holding that circuit and
        its snapshot's `log_alpha` as scores; `graph` (default the run's) gets the smallest.

    Examples:
        >>> from gimlens.testing import tiny_model
        >>> from circuits.run import Run
        >>> model = tiny_model("gpt2")
        >>> clean, corrupted = model.to_tokens(["When Mary and John went"]), model.to_tokens(["When Anna and John went"])
        >>> metric = lambda logits, idx: logits[:, -1, 0] - logits[:, -1, 1]
        >>> run = Run.build(model, Graph.from_model(model), clean, corrupted, metric, keep_sources=True)
        >>> curve = edge_pruning_curve_run(run, sizes=[40, 10], steps=20)
        >>> [g.n_edges_in_graph <= n for n, g in curve.items()]
        [True, True]
    """
    graph = run.check_graph(graph)
    ordered = check_sizes(graph, sizes)
    searched = [n for n in ordered if n < graph.n_valid_edges]  # every edge: nothing to learn
    snapshots = _search(run, graph, searched, steps, lr, loss, warm_start, ig_steps, ramp, init,
                        seed, progress) if searched else []
    found = {n: _select(graph.copy(), log_alpha, n) for n, log_alpha in zip(searched, snapshots)}
    for n in ordered[:len(ordered) - len(searched)]:
        found[n] = _select(graph.copy(), snapshots[0] if snapshots else graph.valid.float(), n)
    _select(graph, found[ordered[-1]].scores, ordered[-1])
    return {int(n): found[int(n)] for n in sizes}


def _search(run: Run, graph: Graph, sizes: list[int], steps, lr, loss, warm_start, ig_steps,
            ramp, init, seed, progress) -> list[Tensor]:
    """Validate the options, warm-start and fit; `log_alpha` at each size (largest first)."""
    check_run(run)
    kind = coerce_enum(Loss, loss, "loss")
    for name, value, low in (("steps", steps, 1), ("ig_steps", ig_steps, 1)):
        check_int(name, value, minimum=low)
    for name, value in (("lr", lr), ("ramp", ramp)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or (name == "ramp" and value > 1):
            raise GimlensError(f"{name} must be a number > 0{' and <= 1' if name == 'ramp' else ''}, "
                               f"got {value!r}")
    if steps < len(sizes):
        raise GimlensError(f"steps must be at least the number of sizes ({len(sizes)}), got {steps}")
    with prepared(run.model):
        if warm_start is None:
            start = torch.full(graph.valid.shape, float(init))
        else:
            start = _warm_log_alpha(run, graph, warm_start, ig_steps, sizes[0], init,
                                    progress)
        return _fit(run, start.to(run.spec.device), kind, steps, lr, ramp, sizes, seed, progress)


def _select(graph: Graph, log_alpha: Tensor, n_edges: int) -> Graph:
    """`graph` with scores `log_alpha` (0 off `valid`) and the `n_edges` largest selected, pruned."""
    valid = graph.valid
    scores = log_alpha.detach().cpu().masked_fill(~valid, 0.0)
    graph.scores = scores.to(graph.scores.device)
    ranked = graph.copy()
    ranked.scores = scores.masked_fill(~valid, -math.inf).nan_to_num(neginf=-1e30)
    ranked.apply_topn(n_edges, absolute=False, prune=False)
    graph.in_graph = ranked.in_graph
    graph.prune()
    return graph


#: share of a curve search's steps that the largest size gets as a single search of its own
#: (`schedule`); the smaller sizes start from its masks and share the rest
LEAD = 0.45


def schedule(first: float, sizes: list[int], steps: int, ramp: float,
             lead: float = LEAD) -> tuple[list[float], list[int]]:
    """The per-step edge targets and the steps after which each size (largest first) is read.

    One size: the single search's schedule: the target falls geometrically from `first` to the
    size over the `ramp` share of the steps, then holds; the size is read at the end. Several
    sizes: the largest gets that schedule over the first `lead` share of the steps (it moves
    furthest from the start, and a short phase left its circuit much worse than a single search's:
    tiny Llama, 20% of edges, f -2.9 against 6.9); the others share the rest the same way from
    there: the `ramp` share moves the target on through them (each size's share of those steps
    proportional to its log-ratio to the previous one), and the rest are split equally into a
    plateau after each size, at whose end it is read.

    Examples:
        >>> targets, reads = schedule(1000.0, [100, 10], steps=10, ramp=0.6, lead=0.5)
        >>> reads, [round(t) for t in targets]
        ([5, 10], [464, 215, 100, 100, 100, 46, 22, 10, 10, 10])
    """
    if len(sizes) > 1:
        head = max(1, min(steps - len(sizes) + 1, round(lead * steps)))
        targets, reads = _through(first, sizes[:1], head, ramp)
        rest, later = _through(float(sizes[0]), sizes[1:], steps - head, ramp)
        return targets + rest, reads + [head + r for r in later]
    return _through(first, sizes, steps, ramp)


def _through(first: float, sizes: list[int], steps: int, ramp: float) -> tuple[list[float], list[int]]:
    """Targets moving from `first` through `sizes` over `ramp * steps`, a plateau after each."""
    lengths = [math.log(max(a, b) / b) for a, b in zip([first] + sizes[:-1], sizes)]
    total = sum(lengths)
    lengths = [ramp * steps * (v / total if total > 0 else 1 / len(sizes)) for v in lengths]
    plateau = (1 - ramp) * steps / len(sizes)
    targets, reads, begin, prev = [], [], 0.0, first
    for size, length in zip(sizes, lengths):
        end = begin + length + plateau
        stop = steps if size == sizes[-1] else round(end)
        for t in range(len(targets), stop):
            share = min(1.0, (t + 1 - round(begin)) / max(1.0, length))
            targets.append(max(prev, size) * (size / max(prev, size)) ** share)
        reads.append(stop)
        begin, prev = end, size
    return targets, reads


def _fit(run: Run, start: Tensor, kind: Loss, steps: int, lr: float, ramp: float,
         sizes: list[int], seed: int, show: bool) -> list[Float[Tensor, "n_fwd n_bwd"]]:
    """Optimise `log_alpha` from `start`; its value at each size's read step (`schedule`)."""
    valid = run.graph.valid.to(start.device)
    N = run.graph.n_valid_edges
    scale = abs(gap(run)) or 1.0
    log_alpha = start.clone().requires_grad_(True)
    lambdas = torch.zeros(2, device=start.device, requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=lr)
    opt_lambda = torch.optim.Adam([lambdas], lr=lr, maximize=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the schedule starts where the (warm) start is
        first = min(float(N), max(float(sizes[0]), float((expected_open(log_alpha) * valid).sum())))
    targets, reads = schedule(first, sizes, steps, ramp)
    snapshots = []
    with torch.enable_grad(), progress_bar(steps, show=show, desc="edge pruning", unit="step") as bar:
        for t, target in enumerate(targets):
            m = hard_concrete(log_alpha, generator)
            missing = (1.0 - m) * valid
            faith = _loss(run, t % len(run.batches), missing, kind, scale)
            expected = (expected_open(log_alpha) * valid).sum()
            r = (expected - target) / target
            total = faith + lambdas[0] * r + lambdas[1] * r ** 2
            opt.zero_grad()
            opt_lambda.zero_grad()
            total.backward()
            opt.step()
            opt_lambda.step()
            snapshots += [log_alpha.detach().clone() for read in reads if read == t + 1]
            bar.set_postfix(loss=f"{float(faith.detach()):.4f}", edges=int(expected.detach()),
                            target=int(target))
            bar.update(1)
    return snapshots
