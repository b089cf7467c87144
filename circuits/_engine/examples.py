"""Validated inputs of edge attribution and evaluation: clean / corrupted tokens, the metric and
an optional attention mask.

**Metric forms.** Either `metric(logits, indices) -> Tensor[b]` (`logits` `[b, pos, vocab]` of the
examples `indices`, a CPU `LongTensor [b]` of positions in the full example set, to pick
per-example labels; `Task.metric` of `circuits.tasks` has this form) or the one-argument form
TransformerLens users write, `metric(logits) -> Tensor[b]` (a metric with exactly one positional
parameter). Either returns one differentiable float value per example.

Examples:
    >>> import torch
    >>> from gimlens.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> ex = Examples.resolve(model, torch.tensor([[1, 2]]), torch.tensor([[1, 3]]),
    ...                       lambda logits: logits[:, -1, 0])
    >>> len(ex), ex.score(torch.zeros(1, 2, 5), torch.tensor([0])).tolist()
    (1, [0.0])
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gimlens.errors import GimlensError
from gimlens.validation import check_int
from gimlens.runtime import check_tokens

from .model import ModelSpec, Sources, mean_sources

__all__ = ["Examples"]


@dataclass(frozen=True)
class Examples:
    """Validated clean / corrupted token batches, their metric and optional attention mask."""

    clean: Int[Tensor, "n pos"]
    corrupted: Int[Tensor, "n pos"]
    metric: Callable[..., Tensor]
    attention_mask: Int[Tensor, "n pos"] | None = None
    with_indices: bool = True  #: the metric takes `(logits, indices)`; else `(logits)`

    @classmethod
    def resolve(cls, model, clean, corrupted=None, metric=None, attention_mask=None) -> "Examples":
        """Accept tensors or a task object with `.clean`, `.corrupted`, `.metric` (and
        optionally `.attention_mask`)."""
        if all(hasattr(clean, a) for a in ("clean", "corrupted", "metric")):
            if corrupted is not None:
                raise GimlensError("pass either a task or clean and corrupted tokens, not both")
            task = clean
            clean, corrupted = task.clean, task.corrupted
            metric = task.metric if metric is None else metric
            if attention_mask is None:
                attention_mask = getattr(task, "attention_mask", None)
        clean = check_tokens(clean, model, "clean tokens", allow_1d=False)
        corrupted = check_tokens(corrupted, model, "corrupted tokens", allow_1d=False)
        if clean.shape != corrupted.shape:
            raise GimlensError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} "
                               "tokens must have the same shape [batch, pos]")
        with_indices = _metric_form(metric)
        if attention_mask is not None and (not isinstance(attention_mask, Tensor)
                                           or attention_mask.shape != clean.shape):
            raise GimlensError(f"attention_mask must be a tensor of shape {tuple(clean.shape)}, got "
                               f"{_describe(attention_mask)}")
        return cls(clean, corrupted, metric,
                   None if attention_mask is None else attention_mask.long(), with_indices)

    def __len__(self) -> int:
        return self.clean.shape[0]

    def batches(self, batch_size: int | None, n: int | None = None) -> list[Tensor]:
        """Example indices per batch (CPU `LongTensor`s) of the first `n` (default all)."""
        n = len(self) if n is None else n
        if batch_size is None:
            batch_size = max(n, 1)
        check_int("batch_size", batch_size, minimum=1, allow_none=True)
        return list(torch.arange(n).split(batch_size))

    def tokens(self, which: str, idx: Tensor, device) -> tuple[Tensor, Tensor | None]:
        """The `clean` or `corrupted` tokens of examples `idx` and their mask, on `device`."""
        toks = getattr(self, which)[idx].to(device)
        mask = None if self.attention_mask is None else self.attention_mask[idx].to(device)
        return toks, mask

    def mean_sources(self, model, spec: ModelSpec, batch_size) -> Sources:
        """Per-position mean source activations over all corrupted examples."""
        return mean_sources(model, spec, (self.tokens("corrupted", idx, spec.device)
                                          for idx in self.batches(batch_size)))

    def score(self, logits: Tensor, idx: Tensor) -> Float[Tensor, " b"]:
        """The metric of examples `idx`, checked: a finite float tensor `[b]`."""
        values = self.metric(logits, idx) if self.with_indices else self.metric(logits)
        if not isinstance(values, Tensor) or values.shape != (len(idx),) \
                or not values.dtype.is_floating_point:
            raise GimlensError(f"metric must return a float tensor of shape [{len(idx)}] (one value "
                               f"per example), got {_describe(values)}")
        if not bool(torch.isfinite(values.detach()).all()):
            raise GimlensError("metric returned NaN or inf for some examples; expected finite values")
        return values


def _metric_form(metric: Any) -> bool:
    """True for `metric(logits, indices)`, False for `metric(logits)`; else GimlensError."""
    expected = "metric(logits, indices) -> Tensor[b] or metric(logits) -> Tensor[b]"
    if not callable(metric):
        raise GimlensError(f"metric must be callable as {expected}, got {metric!r}")
    try:
        sig = inspect.signature(metric)
    except (TypeError, ValueError):  # no signature to read (some builtins): the documented form
        return True
    for args in ((None, None), (None,)):
        try:
            sig.bind(*args)
        except TypeError:
            continue
        return len(args) == 2
    raise GimlensError(f"metric must be callable as {expected}; its signature is {sig}")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return repr(x) if not hasattr(x, "__len__") else type(x).__name__
