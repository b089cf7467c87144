"""Templated circuit-discovery tasks: clean / corrupted token batches of equal shape, labels, a metric.

One generator per task, in the [`TASKS`][circuits.tasks.TASKS] registry; [`make`][circuits.tasks.make] builds one by name.

Examples:
    >>> from circuits.tasks import make
    >>> from gimlens.testing import tiny_tokenizer
    >>> task = make("ioi", tiny_tokenizer(), n=8, seed=0)
    >>> len(task), task.labels.shape
    (8, torch.Size([8, 2]))
"""

from __future__ import annotations

from typing import Callable

from gimlens.errors import GimlensError

from .base import MetricKind, Task
from .capitals import capitals
from .greater_than import greater_than
from .induction import induction
from .ioi import ioi
from .kl import KLMetric

__all__ = ["Task", "MetricKind", "KLMetric", "TASKS", "make", "ioi", "greater_than", "capitals", "induction"]

#: task name -> generator ``f(model_or_tokenizer, n, seed, **options) -> Task``.
TASKS: dict[str, Callable[..., Task]] = {
    "ioi": ioi,
    "greater_than": greater_than,
    "capitals": capitals,
    "induction": induction,
}


def make(name: str, model_or_tokenizer, n: int = 64, seed: int = 0, **options) -> Task:
    """Build the task `name` (a key of [`TASKS`][circuits.tasks.TASKS]) with `n` examples for a model or tokenizer."""
    try:
        generator = TASKS[name]
    except KeyError:
        raise GimlensError(f"unknown task {name!r}; expected one of {sorted(TASKS)}") from None
    return generator(model_or_tokenizer, n=n, seed=seed, **options)
