"""One entry point for circuit discovery: score-and-select, edge pruning, re-linearised attribution.

`discover` returns the graph with a circuit of at most `n_edges` edges selected (dangling edges
pruned), whatever the method:

| method | what it does | cost per batch (forward F, backward B) |
|---|---|---|
| `EAP` | `circuits.attribute`, then top-n by abs. score | 1 F (corrupted) + 1 F+B |
| `EAP-IG-inputs`, `EAP-IG-activations` | the same with IG | 1 F + `ig_steps` F+B |
| `clean-corrupted` | the same | 1 F + 2 F+B |
| `EAP-IG-iterative` | `iterative`: re-score in the patched model, remove the weakest, repeat | 1 F + `rounds * ig_steps` F+B |
| `edge-pruning` | `edge_pruning`: learned hard-concrete masks | 2 F (shared with the warm start) + the warm start's `ig_steps` F+B + `steps` F+B of one batch in all |

Every method is registered once in `ALGORITHMS` (name -> [`Algorithm`][circuits.discover.Algorithm]:
its function on a [`Run`][circuits.run.Run] and its options); `discover` builds one run and
calls it. `gim` switches GIM's backward rules on for every method's gradients (the patched forward
itself is unchanged). The method-specific options (`rounds`, `quadrature` for the iterative method; `steps`,
`lr`, `loss`, `warm_start`, `ramp`, `init`, `seed` for edge pruning) are passed as keywords.

Examples:
    >>> from gimlens.testing import tiny_model
    >>> from circuits.graph import Graph
    >>> model = tiny_model("gpt2")
    >>> clean, corrupted = model.to_tokens(["When Mary and John went"]), model.to_tokens(["When Anna and John went"])
    >>> metric = lambda logits, idx: logits[:, -1, 0] - logits[:, -1, 1]
    >>> g = discover(model, Graph.from_model(model), clean, corrupted, metric, n_edges=25, method="EAP")
    >>> 0 < g.n_edges_in_graph <= 25
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from collections.abc import Sequence
from typing import Any, Callable

from torch import Tensor

from gimlens.errors import GimlensError

from ._engine.masked import check_n_edges, check_sizes
from .attribute import Method, attribute_run
from .edge_pruning import edge_pruning_curve_run, edge_pruning_run
from .gim_advice import gim_for
from .graph import Graph
from .iterative import iterative_run
from .run import Run

__all__ = ["discover", "Algorithm", "ALGORITHMS", "Search", "METHODS"]


class Search(str, Enum):
    """Discovery methods beyond the scoring methods of `circuits.attribute`."""

    EDGE_PRUNING = "edge-pruning"  #: learned edge masks
    ITERATIVE = "EAP-IG-iterative"  #: re-linearised attribution


@dataclass(frozen=True)
class Algorithm:
    """One discovery method: `find(run, graph, *, n_edges, ig_steps, progress, **options)`
    selects a circuit of at most `n_edges` edges in `graph` on a [`Run`][circuits.run.Run];
    `options` are the keywords it takes beyond those; `keep_sources`: it passes over the
    batches more than once, so its run keeps every batch's ablated sources."""

    find: Callable[..., Graph]
    options: frozenset[str] = frozenset()
    keep_sources: bool = False
    #: `curve(run, graph, *, sizes, ig_steps, progress, **options) -> {size: Graph}` finds
    #: circuits of several sizes in one search; `None`: one `find` per size on the same run
    curve: Callable[..., dict[int, Graph]] | None = None


def _score_and_select(method: Method) -> Callable[..., Graph]:
    def find(run: Run, graph: Graph, *, n_edges: int, ig_steps: int = 5,
             progress: bool = False) -> Graph:
        attribute_run(run, graph, method=method, ig_steps=ig_steps, progress=progress)
        return graph.apply_topn(n_edges, absolute=True)
    find.__doc__ = f"`{method.value}` scores (`circuits.attribute`), then the top `n_edges` by |score|."
    return find


def _score_and_select_curve(method: Method) -> Callable[..., dict[int, Graph]]:
    def curve(run: Run, graph: Graph, *, sizes: list[int], ig_steps: int = 5,
              progress: bool = False) -> dict[int, Graph]:
        attribute_run(run, graph, method=method, ig_steps=ig_steps, progress=progress)
        found = {n: graph.copy().apply_topn(n, absolute=True) for n in sizes}
        graph.apply_topn(sizes[-1], absolute=True)
        return found
    curve.__doc__ = f"`{method.value}` scores once, then the top `n` by |score| for each size."
    return curve


#: every discovery method, by name: `discover` and the `gimlens discover` CLI read this table
ALGORITHMS: dict[str, Algorithm] = {
    **{m.value: Algorithm(_score_and_select(m), curve=_score_and_select_curve(m)) for m in Method},
    Search.ITERATIVE.value: Algorithm(iterative_run, frozenset({"rounds", "quadrature"}), True),
    Search.EDGE_PRUNING.value: Algorithm(
        edge_pruning_run, frozenset({"steps", "lr", "loss", "warm_start", "ramp", "init", "seed"}), True,
        edge_pruning_curve_run),
}

#: every method name `discover` accepts
METHODS: tuple[str, ...] = tuple(ALGORITHMS)

def discover(model, graph: Graph, clean, corrupted=None, metric=None, *, n_edges: int | Sequence[int],
             method: str = "EAP-IG-inputs", gim=None, ig_steps: int = 5,
             ablation: str = "corrupted", batch_size: int | None = None,
             attention_mask: Tensor | None = None, progress: bool = False,
             max_memory: int | str | None = None, **options: Any) -> Graph | dict[int, Graph]:
    """Find a circuit of at most `n_edges` edges (or one per size of a list: a curve).

    Args:
        model: a TransformerLens model (left as found).
        graph: a graph of `model`; its scores and selection are replaced (the search methods
            need `kv_edges="grouped"` on grouped-KV models).
        clean, corrupted, metric, attention_mask, ablation, batch_size, max_memory: as in
            `circuits.attribute`.
        n_edges: the circuit's edges before pruning dangling ones; a list of sizes asks for one
            circuit per size from one search: the scoring methods score once and take the top `n`
            per size; `edge-pruning` runs ONE search whose target passes through every size
            ([`edge_pruning_curve_run`][circuits.edge_pruning.edge_pruning_curve_run], `steps`
            then counts the whole curve, default 450 = 1.5x a single search);
            `EAP-IG-iterative` runs one search per size on the same run (shared forwards).
        method: one of `METHODS` (table in the module docstring; registered in `ALGORITHMS`).
        gim: GIM's backward rules for the gradients: `True` for the method's measured defaults
            (`GIM_DEFAULTS`, else every rule), a `GIMConfig` or a dict (overrides of every rule's
            default); a rule measured to hurt the method (`GIM_HURTS`) warns once.
        ig_steps: interpolation steps of the IG methods (and of the warm start / re-scoring).
        progress: show a progress bar.
        **options: method-specific options (module docstring).

    Returns:
        `graph`, with `in_graph` the circuit and `scores` the method's edge scores; for a list of
        sizes, `{size: Graph}` in the order given (each a copy holding that size's circuit and
        scores; `graph` itself ends with the smallest circuit).
    """
    curve = not isinstance(n_edges, int)
    sizes = check_sizes(graph, n_edges) if curve else check_n_edges(graph, n_edges)
    name = method.value if isinstance(method, Enum) else method
    algorithm = ALGORITHMS.get(name) if isinstance(name, str) else None
    if algorithm is None:
        raise GimlensError(f"unknown method {method!r}; known: {list(METHODS)}")
    unknown = set(options) - algorithm.options
    if unknown and not algorithm.options:
        raise GimlensError(f"method {name!r} takes no options {sorted(options)}")
    if unknown:
        raise GimlensError(f"method {name!r} takes no option(s) {sorted(unknown)}; known: "
                           f"{sorted(algorithm.options)}")
    run = Run.build(model, graph, clean, corrupted, metric, ablation=ablation, gim=gim_for(name, gim),
                    batch_size=batch_size, attention_mask=attention_mask, max_memory=max_memory,
                    keep_sources=algorithm.keep_sources)
    if not curve:
        return algorithm.find(run, graph, n_edges=n_edges, ig_steps=ig_steps, progress=progress,
                              **options)
    if algorithm.curve is not None:
        found = algorithm.curve(run, graph, sizes=sizes, ig_steps=ig_steps, progress=progress, **options)
    else:
        found = {n: algorithm.find(run, graph.copy(), n_edges=n, ig_steps=ig_steps, progress=progress,
                                   **options) for n in sizes}
        graph.scores, graph.in_graph = found[sizes[-1]].scores.clone(), found[sizes[-1]].in_graph.clone()
    return {int(n): found[int(n)] for n in n_edges}
