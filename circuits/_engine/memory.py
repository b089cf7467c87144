"""Memory needs of edge attribution, and the batch size that fits a budget.

The dominant buffers of [`attribute`][circuits.attribute.attribute] grow with
`batch × positions × n_forward × d_model`: the ablated source activations and their differences
from the clean run (float32), the per-destination gradient blocks being multiplied, plus the
model's own activations kept for the backward pass.
`estimate_memory` counts them;
`fit_batch_size` picks the largest batch that stays within a
budget, so a long run is split into chunks instead of failing.

Examples:
    >>> from circuits.graph import Graph
    >>> from gimlens.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> est = estimate_memory(model, Graph.from_model(model), batch_size=8, n_pos=16)
    >>> est.total > 0 and fit_batch_size(model, Graph.from_model(model), 16, est.total) >= 8
    True
"""

from __future__ import annotations

from dataclasses import dataclass

from gimlens.errors import GimlensError
from gimlens.runtime import format_bytes, parse_bytes

from .accumulate import MIN_COLUMNS

__all__ = ["MemoryEstimate", "estimate_memory", "fit_batch_size", "parse_bytes"]

_F32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by buffer for one batch of edge attribution (an estimate, not a guarantee)."""

    sources: int  #: ablated activations and their differences, float32
    gradients: int  #: one block of destination-input gradients, float32
    activations: int  #: the model's forward activations kept for the backward pass
    logits: int  #: clean and corrupted logits and the metric's gradient, float32
    scores: int  #: the dense score matrix and its accumulator

    @property
    def total(self) -> int:
        return self.sources + self.gradients + self.activations + self.logits + self.scores

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {format_bytes(getattr(self, k))}"
                          for k in ("sources", "gradients", "activations", "logits", "scores"))
        return f"about {format_bytes(self.total)} per batch ({parts})"


def estimate_memory(model, graph, batch_size: int, n_pos: int) -> MemoryEstimate:
    """Estimated peak bytes of [`attribute`][circuits.attribute.attribute] for one batch of `batch_size`
    examples of `n_pos` positions (the same for every method: IG steps run one after another)."""
    cfg = model.cfg
    d, L, H = int(cfg.d_model), int(cfg.n_layers), int(cfg.n_heads)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    per_pos = batch_size * n_pos
    sources = 2 * graph.n_forward * per_pos * d * _F32
    per_layer_slots = graph.n_backward // max(L, 1)
    gradients = max(MIN_COLUMNS, per_layer_slots) * per_pos * d * _F32
    try:
        item = next(model.parameters()).element_size()
    except StopIteration:  # pragma: no cover
        item = _F32
    # Per layer and position: residual, norm, q/k/v (with RoPE and repeated KV heads), z and
    # output copies, float32 upcasts, scores and pattern, gated-MLP intermediates. The constants
    # were calibrated on SmolLM2 (benchmarks/bench_scale.py: estimate within ~10% of the peak).
    activations = L * per_pos * (40 * d + 6 * H * n_pos + 10 * d_mlp) * item
    logits = 3 * per_pos * int(cfg.d_vocab) * _F32
    scores = 2 * graph.n_forward * graph.n_backward * _F32
    return MemoryEstimate(sources, gradients, activations, logits, scores)


def fit_batch_size(model, graph, n_pos: int, max_memory: int | str, upper: int | None = None) -> int:
    """The largest batch size (at most `upper`) whose estimate stays within `max_memory`."""
    budget = parse_bytes(max_memory, "max_memory")
    one = estimate_memory(model, graph, 1, n_pos)
    fixed = one.scores
    per_example = one.total - fixed
    if fixed + per_example > budget:
        raise GimlensError(
            f"max_memory {format_bytes(budget)} is below what one example needs ({one}); "
            "raise it or shorten the prompts"
        )
    fits = int((budget - fixed) // per_example)
    return max(1, fits if upper is None else min(fits, upper))

