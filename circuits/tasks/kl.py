"""KL divergence from the clean next-token distribution: the metric of EAP-IG-KL.

For example `i` with answer position `p_i`, clean log-probabilities `log P` (the clean run) and
the log-probabilities `log Q` of the run being scored (patched, interpolated or corrupted), both
`log_softmax` of the float32 logits at `p_i`:

    KL_i = sum over v of P[v] * (log P[v] - log Q[v])        (KL(clean || run))

This is EAP-IG's (and MIB's) direction, position and per-example value up to one constant:
EAP-IG takes `torch.nn.functional.kl_div(log Q, log P, log_target=True, reduction="none")` and
then the **mean** over the vocabulary, i.e. `KL_i / d_vocab`; `vocab_mean=True` reproduces that
scale. Normalised faithfulness, CPR / CMD and edge rankings do not depend on the constant.
EAP-IG takes `log(softmax(.))`; gimlens takes `log_softmax`, which is the same up to rounding
and stays finite where a probability underflows to 0.

The KL of the clean run is 0 and its gradient there is 0 too, so plain EAP (gradients at the
clean run only) scores every edge 0 with this metric: use an integrated-gradients method.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from gimlens.errors import GimlensError
from gimlens.validation import check_int
from gimlens.runtime import prepared, require_lens_model, run_hooked

__all__ = ["KLMetric", "clean_log_probs"]


def clean_log_probs(model, task, batch_size: int | None = None) -> Float[Tensor, "n vocab"]:
    """float32 `log_softmax` of the clean run's logits at each example's answer position.

    Args:
        model: a TransformerLens model (left as found).
        task: a [`Task`][circuits.tasks.base.Task] (read through its public `clean`,
            `attention_mask`, `batches` and `answer_logits`), whose clean tokens are run.
        batch_size: examples per forward pass (`None`: all at once).

    Returns:
        `[n, vocab]` on the model's device, without gradient.
    """
    require_lens_model(model)
    n = len(task)
    size = n if batch_size is None else batch_size
    check_int("batch_size", batch_size, minimum=1, allow_none=True)
    device = next(iter(model.parameters())).device
    out = []
    with prepared(model), torch.no_grad():
        for s in task.batches(size):
            mask = None if task.attention_mask is None else task.attention_mask[s].to(device)
            logits = run_hooked(model, task.clean[s].to(device), attention_mask=mask)
            out.append(task.answer_logits(logits, s).log_softmax(-1))
    return torch.cat(out)


class KLMetric:
    """`metric(logits, indices) -> KL(clean || run)` per example, with the clean distribution fixed.

    Usable as `metric` in [`circuits.attribute`][circuits.attribute.attribute],
    [`circuits.evaluate`][circuits.evaluate.evaluate] and the curves. Build it with
    [`Task.kl_metric`][circuits.tasks.base.Task.kl_metric] (which runs the model once) or directly
    from clean log-probabilities.

    Args:
        task: a [`Task`][circuits.tasks.base.Task] (read through its public `answer_logits`
            and `example_index`).
        clean_log_probs: `[n, vocab]` clean log-probabilities at the answer positions.
        vocab_mean: divide by the vocabulary size, as EAP-IG's `kl_div(...).mean(-1)` does.

    Examples:
        >>> import torch
        >>> from circuits.tasks.base import Task
        >>> task = Task("toy", torch.tensor([[1, 2]]), torch.tensor([[1, 3]]), torch.tensor([[0, 1]]))
        >>> clean = torch.zeros(1, 2, 4)
        >>> kl = KLMetric(task, clean[:, -1].log_softmax(-1))
        >>> kl(clean), kl(torch.tensor([[[0.0] * 4, [9.0, 0, 0, 0]]])) > 0
        (tensor([0.]), tensor([True]))
    """

    def __init__(self, task, clean_log_probs: Float[Tensor, "n vocab"], *,
                 vocab_mean: bool = False) -> None:
        if not isinstance(clean_log_probs, Tensor) or clean_log_probs.ndim != 2 \
                or clean_log_probs.shape[0] != len(task):
            raise GimlensError(f"clean_log_probs must be a [{len(task)}, vocab] tensor (one row per "
                               f"example of task {task.name!r}), got "
                               f"{getattr(clean_log_probs, 'shape', clean_log_probs)!r}")
        if not isinstance(vocab_mean, bool):
            raise GimlensError(f"vocab_mean must be True or False, got {vocab_mean!r}")
        self.task = task
        self.clean_log_probs = clean_log_probs.detach().float()
        self.vocab_mean = vocab_mean

    def __call__(self, logits: Float[Tensor, "b pos vocab"], indices: Any = None) -> Float[Tensor, " b"]:
        """KL of the examples `indices` (None = all) from their clean distributions (float32)."""
        log_q = self.task.answer_logits(logits, indices).log_softmax(-1)
        idx = self.task.example_index(indices)
        log_p = self.clean_log_probs[idx.to(self.clean_log_probs.device)].to(log_q.device)
        if log_p.shape[-1] != log_q.shape[-1]:
            raise GimlensError(f"logits have {log_q.shape[-1]} vocabulary entries, the clean "
                               f"distribution {log_p.shape[-1]}")
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return kl / log_q.shape[-1] if self.vocab_mean else kl

    def __repr__(self) -> str:
        return f"KLMetric(task={self.task.name!r}, n={len(self.task)}, vocab_mean={self.vocab_mean})"
