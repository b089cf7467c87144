"""Memory needs of edge attribution, and the batch size that fits a budget.

The dominant buffers of :func:`circuits.attribute` grow with ``batch × positions × n_forward ×
d_model``: the ablated source activations and their differences from the clean run (float32),
the per-destination gradient blocks being multiplied, plus the model's own activations kept for
the backward pass. :func:`estimate_memory` counts them; :func:`fit_batch_size` picks the largest
batch that stays within a budget, so a long run is split into chunks instead of failing.

Example:
    >>> from circuits.graph import Graph
    >>> from gimlens.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> est = estimate_memory(model, Graph.from_model(model), batch_size=8, n_pos=16)
    >>> est.total > 0 and fit_batch_size(model, Graph.from_model(model), 16, est.total) >= 8
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gimlens.errors import GimlensError

__all__ = ["MemoryEstimate", "estimate_memory", "fit_batch_size", "parse_bytes"]

_F32 = 4
#: Destination columns scored per gradient block (circuits.attribute groups >= 64 of them).
_MIN_COLUMNS = 64


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
        parts = ", ".join(f"{k} {_human(getattr(self, k))}"
                          for k in ("sources", "gradients", "activations", "logits", "scores"))
        return f"about {_human(self.total)} per batch ({parts})"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # pragma: no cover


def parse_bytes(value: int | str) -> int:
    """``2_000_000_000``, ``"2GB"``, ``"1.5 GiB"``, ``"512MiB"`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", value, re.I)
        if m:
            power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
            base = 1024 if m.group(3) or power == 0 else 1000
            return int(float(m.group(1)) * base**power)
    raise GimlensError(f"max_memory must be a positive number of bytes or a size like '4GB', got {value!r}")


def estimate_memory(model, graph, batch_size: int, n_pos: int) -> MemoryEstimate:
    """Estimated peak bytes of :func:`circuits.attribute` for one batch of ``batch_size``
    examples of ``n_pos`` positions (the same for every method: IG steps run one after another)."""
    cfg = model.cfg
    d, L, H = int(cfg.d_model), int(cfg.n_layers), int(cfg.n_heads)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    per_pos = batch_size * n_pos
    sources = 2 * graph.n_forward * per_pos * d * _F32
    per_layer_slots = graph.n_backward // max(L, 1)
    gradients = max(_MIN_COLUMNS, per_layer_slots) * per_pos * d * _F32
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
    """The largest batch size (at most ``upper``) whose estimate stays within ``max_memory``."""
    budget = parse_bytes(max_memory)
    one = estimate_memory(model, graph, 1, n_pos)
    fixed = one.scores
    per_example = one.total - fixed
    if fixed + per_example > budget:
        raise GimlensError(
            f"max_memory {_human(budget)} is below what one example needs ({one}); "
            "raise it or shorten the prompts"
        )
    fits = int((budget - fixed) // per_example)
    return max(1, fits if upper is None else min(fits, upper))

