"""One entry point for circuit discovery: score-and-select, edge pruning, re-linearised attribution.

`discover` returns the graph with a circuit of at most `n_edges` edges selected (dangling edges
pruned), whatever the method:

| method | what it does | cost per batch (forward F, backward B) |
|---|---|---|
| `EAP` | `circuits.attribute`, then top-n by abs. score | 1 F (corrupted) + 1 F+B |
| `EAP-IG-inputs`, `EAP-IG-activations` | the same with IG | 1 F + `ig_steps` F+B |
| `clean-corrupted` | the same | 1 F + 2 F+B |
| `EAP-IG-iterative` | `iterative`: re-score in the patched model, remove the weakest, repeat | 2 F + `rounds * ig_steps` F+B |
| `edge-pruning` | `edge_pruning`: learned hard-concrete masks | 2 F (+ the warm start's attribution) + `steps` F+B of one batch in all |

`gim` switches GIM's backward rules on for every method's gradients (the patched forward
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

from enum import Enum
from typing import Any

from torch import Tensor

from gimlens.errors import GimlensError

from .attribute import Method, attribute
from .edge_pruning import edge_pruning
from .graph import Graph
from .iterative import iterative
from ._engine.masked import check_n_edges

__all__ = ["discover", "Search", "METHODS"]


class Search(str, Enum):
    """Discovery methods beyond the scoring methods of `circuits.attribute`."""

    EDGE_PRUNING = "edge-pruning"  #: learned edge masks
    ITERATIVE = "EAP-IG-iterative"  #: re-linearised attribution


#: options each search method accepts beyond the common ones
_OPTIONS = {
    Search.EDGE_PRUNING: {"steps", "lr", "loss", "warm_start", "ramp", "init", "seed"},
    Search.ITERATIVE: {"rounds", "quadrature"},
}
_SEARCH = {Search.EDGE_PRUNING: edge_pruning, Search.ITERATIVE: iterative}

#: every method name `discover` accepts
METHODS: tuple[str, ...] = tuple(m.value for m in Method) + tuple(s.value for s in Search)


def discover(model, graph: Graph, clean, corrupted=None, metric=None, *, n_edges: int,
             method: str = "EAP-IG-inputs", gim=None, ig_steps: int = 5,
             ablation: str = "corrupted", batch_size: int | None = None,
             attention_mask: Tensor | None = None, progress: bool = False,
             max_memory: int | str | None = None, **options: Any) -> Graph:
    """Find a circuit of at most `n_edges` edges.

    Args:
        model: a TransformerLens model (left as found).
        graph: a graph of `model`; its scores and selection are replaced (the search methods
            need `kv_edges="grouped"` on grouped-KV models).
        clean, corrupted, metric, attention_mask, ablation, batch_size, max_memory: as in
            `circuits.attribute`.
        n_edges: the circuit's edges before pruning dangling ones.
        method: one of `METHODS` (table in the module docstring).
        gim: GIM's backward rules for the gradients (`True`, a `GIMConfig` or a dict).
        ig_steps: interpolation steps of the IG methods (and of the warm start / re-scoring).
        progress: show a progress bar.
        **options: method-specific options (module docstring).

    Returns:
        `graph`, with `in_graph` the circuit and `scores` the method's edge scores.
    """
    check_n_edges(graph, n_edges)
    common = dict(gim=gim, ig_steps=ig_steps, ablation=ablation, batch_size=batch_size,
                  attention_mask=attention_mask, progress=progress, max_memory=max_memory)
    try:
        search = Search(method)
    except ValueError:
        search = None
    if search is None:
        try:
            scoring = Method(method)
        except ValueError:
            raise GimlensError(f"unknown method {method!r}; expected one of {str(METHODS)[1:-1]}") from None
        if options:
            raise GimlensError(f"method {scoring.value!r} takes no options {sorted(options)}")
        attribute(model, graph, clean, corrupted, metric, method=scoring, **common)
        return graph.apply_topn(n_edges, absolute=True)
    unknown = set(options) - _OPTIONS[search]
    if unknown:
        raise GimlensError(f"method {search.value!r} takes no option(s) {sorted(unknown)}; known: "
                           f"{sorted(_OPTIONS[search])}")
    return _SEARCH[search](model, graph, clean, corrupted, metric, n_edges=n_edges, **common, **options)
