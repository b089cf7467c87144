"""Memory needs of edge attribution, planned by the kernel's planner ([`gimlens.memory`][gimlens.memory]).

The dominant buffers of [`attribute`][circuits.attribute.attribute] grow with
`batch × positions × n_forward × d_model`: the ablated source activations and their differences
from the clean run (float32), the per-destination gradient blocks being multiplied, plus the
model's own activations kept for the backward pass. `example_bytes` counts them for one example;
`estimate_memory` and `fit_batch_size` hand that to [`MemoryEstimate`][gimlens.memory.MemoryEstimate]
and [`fit_rows`][gimlens.memory.fit_rows], so a long run is split into batches instead of failing.

Examples:
    >>> from circuits.graph import Graph
    >>> from gimlens.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> est = estimate_memory(model, Graph.from_model(model), batch_size=8, n_pos=16)
    >>> est.total > 0 and fit_batch_size(model, Graph.from_model(model), 16, est.total) >= 8
    True
"""

from __future__ import annotations

from gimlens.memory import MemoryEstimate, fit_rows
from gimlens.runtime import parse_bytes

from .accumulate import MIN_COLUMNS

__all__ = ["WHAT", "estimate_memory", "example_bytes", "fit_batch_size", "parse_bytes"]

_F32 = 4
#: the work, as the estimate and its errors name it
WHAT = "edge attribution"


def example_bytes(model, graph, n_pos: int) -> tuple[int, int, tuple[tuple[str, int], ...]]:
    """`(per_example, fixed, parts)`: estimated bytes one example of `n_pos` positions adds to a batch
    of [`attribute`][circuits.attribute.attribute] (by buffer in `parts`), and the bytes of the dense
    score matrix and its accumulator, whatever the batch (the same for every method: IG steps run one
    after another)."""
    cfg = model.cfg
    d, L, H = int(cfg.d_model), int(cfg.n_layers), int(cfg.n_heads)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    sources = 2 * graph.n_forward * n_pos * d * _F32
    per_layer_slots = graph.n_backward // max(L, 1)
    gradients = max(MIN_COLUMNS, per_layer_slots) * n_pos * d * _F32
    try:
        item = next(model.parameters()).element_size()
    except StopIteration:  # pragma: no cover
        item = _F32
    # Per layer and position: residual, norm, q/k/v (with RoPE and repeated KV heads), z and
    # output copies, float32 upcasts, scores and pattern, gated-MLP intermediates. The constants
    # were calibrated on SmolLM2 (benchmarks/bench_scale.py: estimate within ~10% of the peak).
    activations = L * n_pos * (40 * d + 6 * H * n_pos + 10 * d_mlp) * item
    logits = 3 * n_pos * int(cfg.d_vocab) * _F32
    parts = (("sources", sources), ("gradients", gradients), ("activations", activations), ("logits", logits))
    return sum(n for _, n in parts), 2 * graph.n_forward * graph.n_backward * _F32, parts


def estimate_memory(model, graph, batch_size: int, n_pos: int) -> MemoryEstimate:
    """Estimated peak bytes of [`attribute`][circuits.attribute.attribute] for one batch of `batch_size`
    examples of `n_pos` positions (not fitted to a budget: `budget` is `None`)."""
    per_example, fixed, parts = example_bytes(model, graph, n_pos)
    return MemoryEstimate(WHAT, per_example, fixed, batch_size, batch_size, None, parts)


def fit_batch_size(model, graph, n_pos: int, max_memory: int | str, upper: int | None = None) -> int:
    """The largest batch size (at most `upper`) whose estimate stays within `max_memory`."""
    per_example, fixed, parts = example_bytes(model, graph, n_pos)
    n = upper or 2**62
    plan = fit_rows(WHAT, per_row=per_example, n_rows=n, max_memory=parse_bytes(max_memory, "max_memory"),
                    upper=upper, fixed=fixed, parts=parts)
    return plan.rows
