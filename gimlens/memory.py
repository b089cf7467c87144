"""Memory needs of token attribution, and the rows per forward pass that fit a budget.

Every method of [`attribute`][gimlens.attribution.attribute.attribute], the faithfulness metrics
of [`gimlens.evaluate`][gimlens.evaluate] and [`layerwise_ig`][gimlens.layerwise.core.layerwise_ig]
run their work as rows of batched passes (an integration step of a prompt, an ablated variant, a
layer-wise target and node). A pass's memory grows linearly with its rows and, per row, with the
positions (activations, logits) and their square (attention scores). This module counts that, per
row, for three kinds of pass:

- `gradients`: a whole-model forward whose activations are kept for the backward, plus the
  logits and their gradient;
- `forward`: a whole-model forward without gradient (the logits of the whole batch, one layer's
  temporaries at a time);
- `block`: one transformer block with gradient (layer-wise IG, no logits).

The constants were calibrated by measuring the peak resident memory of fresh processes on CPU
(SmolLM2-135M and the tiny test models; `benchmarks/bench_memory.py` prints estimate against
measurement). [`fit_rows`][gimlens.memory.fit_rows] lowers the rows per pass until the estimate
fits `max_memory`; by default the budget is half the memory free on the model's device when the
call starts.

Examples:
    >>> from gimlens.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> one = row_bytes(model, 100, PassKind.GRADIENTS)
    >>> plan = fit_rows("demo", per_row=one, n_rows=64, max_memory=10 * one)
    >>> plan.rows, plan.total <= plan.budget
    (10, True)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from .errors import GimlensError
from .runtime import available_memory, format_bytes, parse_bytes

__all__ = ["DEFAULT_FRACTION", "MemoryEstimate", "PassKind", "fit_rows", "resolve_budget", "row_bytes"]

#: The default budget: this fraction of the memory free on the device when a call starts.
DEFAULT_FRACTION = 0.5


class PassKind(str, Enum):
    """What one row of a pass keeps alive (see the module docstring)."""

    GRADIENTS = "gradients"
    FORWARD = "forward"
    BLOCK = "block"


# Calibrated multipliers, in elements of the model's dtype (logits: float32) per row and position.
# gradients, per layer: residual-stream copies x d_model, MLP intermediates x d_mlp, attention
# scores x heads x positions; logits and their gradient x vocabulary.
_GRAD_D, _GRAD_MLP, _GRAD_ATT, _GRAD_LOGITS = 6.0, 2.5, 1.16, 2.0
# gradients, once (not per layer): at the peak, the backward of one layer also holds the
# gradients of its attention pattern and scores (x heads x positions). Measured on the tiny
# models, where this term is a large share: 1.95-1.97 per head without GIM, 2.98 with it.
_GRAD_PEAK_ATT = 2.0
# forward without gradient: one layer's temporaries at a time, the batch's logits.
_FWD_D, _FWD_MLP, _FWD_ATT, _FWD_LOGITS = 2.0, 1.0, 1.0, 1.0
# GIM's backward rules keep one more attention-sized tensor per layer, and one more at the peak.
_GIM_ATT = 1.0


def _dims(model: Any) -> tuple[int, int, int, int, int, int]:
    cfg = model.cfg
    d = int(cfg.d_model)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    try:
        item = next(model.parameters()).element_size()
    except StopIteration:  # pragma: no cover - a model without parameters
        item = 4
    return d, d_mlp, int(cfg.n_heads), int(cfg.n_layers), int(cfg.d_vocab), item


def row_bytes(model: Any, n_pos: int, kind: PassKind | str, *, gim: bool = False) -> int:
    """Estimated bytes one row of `n_pos` positions adds to a pass of the given kind.

    Args:
        model: a TransformerLens model (its config gives the sizes, its parameters the dtype).
        n_pos: positions of the row.
        kind: a [`PassKind`][gimlens.memory.PassKind] or its value.
        gim: whether GIM's rules are on (gradient passes keep a little more).

    Returns:
        Bytes: for gradient passes an upper bound of the measured peak on CPU (0-30% above it on
        SmolLM2 up to 1,500 positions and on the tiny models up to 1,000), for the others an
        estimate calibrated within ~15%; not a guarantee on other devices.

    Examples:
        >>> from gimlens.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> row_bytes(model, 200, "gradients") > row_bytes(model, 100, "gradients")
        True
    """
    from .runtime import coerce_enum

    kind = coerce_enum(PassKind, kind, "pass kind")
    d, d_mlp, H, L, vocab, item = _dims(model)
    P = int(n_pos)
    grad_att = _GRAD_ATT + (_GIM_ATT if gim else 0.0)
    if kind is PassKind.GRADIENTS:
        per_layer = _GRAD_D * d + _GRAD_MLP * d_mlp + grad_att * H * P
        peak = (_GRAD_PEAK_ATT + (_GIM_ATT if gim else 0.0)) * H * P
        return int(P * ((L * per_layer + peak) * item + _GRAD_LOGITS * vocab * 4))
    if kind is PassKind.FORWARD:
        per_layer = _FWD_D * d + _FWD_MLP * d_mlp + _FWD_ATT * H * P
        return int(P * (per_layer * item + _FWD_LOGITS * vocab * 4))
    per_layer = _GRAD_D * d + _GRAD_MLP * d_mlp + grad_att * H * P
    return int(P * (per_layer + 2 * d) * item)  # block: one layer, plus input and output


def resolve_budget(max_memory: int | str | None, device: torch.device | str) -> int:
    """`max_memory` in bytes; `None`: `DEFAULT_FRACTION` of
    what `gimlens.runtime.available_memory` reports for `device`.

    Examples:
        >>> resolve_budget("4GB", "cpu")
        4000000000
    """
    if max_memory is None:
        return max(1, int(DEFAULT_FRACTION * available_memory(device)))
    return parse_bytes(max_memory)


@dataclass(frozen=True)
class MemoryEstimate:
    """The plan for one kind of pass: rows per pass and the estimated bytes of one pass.

    The one estimate type of both packages: token attribution's passes and the batches of
    `circuits`' edge attribution are both planned by [`fit_rows`][gimlens.memory.fit_rows].

    Examples:
        >>> plan = MemoryEstimate("demo", per_row=1024, fixed=512, rows=2, n_rows=8, budget=None,
        ...                       parts=(("activations", 1000), ("logits", 24)))
        >>> plan.total
        2560
        >>> print(plan)
        demo: about 2.5 KiB per pass (2 of 8 rows per pass, 1.0 KiB a row: activations 1000 B, logits 24 B)
    """

    what: str  #: the work, e.g. `integrated_gradients`
    per_row: int  #: estimated bytes of one row
    fixed: int  #: bytes independent of the rows per pass
    rows: int  #: rows per pass chosen
    n_rows: int  #: rows in all
    budget: int | None  #: the budget the plan fits (`None`: not fitted to one)
    parts: tuple[tuple[str, int], ...] = ()  #: `per_row` by buffer, where the estimate names them

    @property
    def total(self) -> int:
        """Estimated peak bytes of one pass (what the call adds to the model's own memory)."""
        return self.fixed + self.per_row * self.rows

    def __str__(self) -> str:
        parts = "".join(f"{', ' if i else ': '}{name} {format_bytes(n)}" for i, (name, n) in enumerate(self.parts))
        budget = "" if self.budget is None else f"; budget {format_bytes(self.budget)}"
        return (f"{self.what}: about {format_bytes(self.total)} per pass ({self.rows} of "
                f"{self.n_rows} rows per pass, {format_bytes(self.per_row)} a row{parts}{budget})")


def fit_rows(
    what: str,
    *,
    per_row: int,
    n_rows: int,
    max_memory: int | str | None = None,
    device: torch.device | str = "cpu",
    upper: int | None = None,
    fixed: int = 0,
    show: bool = False,
    parts: tuple[tuple[str, int], ...] = (),
) -> MemoryEstimate:
    """The most rows per pass (at most `upper` and `n_rows`) whose estimate fits the budget.

    Args:
        what: the work, named in the printed estimate and in errors.
        per_row: bytes of one row ([`row_bytes`][gimlens.memory.row_bytes]).
        n_rows: rows in all.
        max_memory: bytes, a size like `"4GB"`, or `None` for the default budget of `device`.
        device: where the passes run (for the default budget).
        upper: a cap on the rows per pass (the caller's `batch_size`).
        fixed: bytes needed whatever the rows per pass.
        show: print the estimate to stderr.
        parts: `per_row` by buffer, shown in the printed estimate.

    Returns:
        A [`MemoryEstimate`][gimlens.memory.MemoryEstimate].

    Raises:
        GimlensError: when not even one row fits, naming the budget and the need.
    """
    budget = resolve_budget(max_memory, device)
    n_rows = max(1, int(n_rows))
    need = fixed + per_row
    if need > budget:
        raise GimlensError(
            f"{what}: max_memory {format_bytes(budget)} is below the {format_bytes(need)} that "
            f"one row needs ({format_bytes(per_row)} a row, {format_bytes(fixed)} fixed); raise "
            "max_memory or shorten the prompt"
        )
    rows = min(n_rows, int((budget - fixed) // max(per_row, 1)), upper or n_rows)
    plan = MemoryEstimate(what, per_row, fixed, max(1, rows), n_rows, budget, tuple(parts))
    if show:
        print(f"gimlens memory estimate: {plan}", file=sys.stderr)
    return plan
