"""The [`Task`][circuits.tasks.base.Task] container (clean / corrupted token batches, labels, metric) and tokenising helpers.

A task holds `n` examples as equal-shape int tensors `clean` and `corrupted` `[n, pos]`.
Examples shorter than the longest are right-padded: the scored position `answer_position[i]` is
then before the padding, so (causal attention) the padding never changes the scored logits, and the
`attention_mask` says which positions are real.

Examples:
    >>> import torch
    >>> from circuits.tasks.base import Task
    >>> task = Task("toy", clean=torch.tensor([[1, 2]]), corrupted=torch.tensor([[1, 3]]),
    ...             labels=torch.tensor([[5, 6]]))
    >>> logits = torch.zeros(1, 2, 8); logits[0, 1, 5] = 2.0
    >>> task.metric(logits)
    tensor([2.])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterator, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gimlens.errors import GimlensError
from gimlens.validation import check_int

from .kl import KLMetric, clean_log_probs

__all__ = ["Task", "MetricKind", "Indices", "tokenizer_and_bos", "encode", "single_tokens", "pair_batch"]

#: Which examples: ``None`` (all), a slice, a list / LongTensor of indices, or a bool mask.
Indices = Union[None, slice, Sequence[int], Tensor]


class MetricKind(str, Enum):
    """How [`Task.metric`][circuits.tasks.base.Task.metric] scores the logits at the answer position."""

    #: ``logit[labels[:, 0]] - logit[labels[:, 1]]``.
    LOGIT_DIFF = "logit_diff"
    #: ``sum(softmax(logits)[answer_tokens] * answer_sign[i])``: probability of the correct answer
    #: tokens minus that of the incorrect ones (greater-than, Hanna et al. 2023).
    PROB_DIFF = "prob_diff"


@dataclass(frozen=True, eq=False)
class Task:
    """Clean / corrupted prompt pairs with labels and a per-example metric.

    Args:
        name: the task's registry name (`"ioi"`, ...).
        clean, corrupted: token ids `[n, pos]` of equal shape (right-padded where needed).
        labels: `[n, 2]` (correct token id, incorrect / contrast token id).
        answer_position: `[n]` position whose logits are scored; default the last position.
        attention_mask: `[n, pos]` 1 for real tokens (`None`: no padding anywhere).
        metric_kind: [`MetricKind`][circuits.tasks.base.MetricKind].
        answer_tokens, answer_sign: for `PROB_DIFF`: the `m` token ids scored and `[n, m]`
            signs (+1 correct, -1 incorrect, 0 ignored).
        prompts, corrupted_prompts: the strings the tokens came from (for display).
        info: per-example metadata, each value a tuple of length `n` (e.g. `"order"`).

    Examples:
        >>> import torch
        >>> t = Task("toy", torch.tensor([[1, 2], [1, 4]]), torch.tensor([[1, 3], [1, 3]]),
        ...          torch.tensor([[5, 6], [6, 5]]))
        >>> logits = torch.arange(16.).reshape(1, 2, 8).expand(2, 2, 8)
        >>> t.metric(logits), t.metric_for([1])(logits[1:])
        (tensor([-1.,  1.]), tensor([1.]))
    """

    name: str
    clean: Int[Tensor, "n pos"]
    corrupted: Int[Tensor, "n pos"]
    labels: Int[Tensor, "n 2"]
    answer_position: Int[Tensor, " n"] | None = None
    attention_mask: Int[Tensor, "n pos"] | None = None
    metric_kind: MetricKind = MetricKind.LOGIT_DIFF
    answer_tokens: Int[Tensor, " m"] | None = None
    answer_sign: Float[Tensor, "n m"] | None = None
    prompts: tuple[str, ...] = ()
    corrupted_prompts: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.clean.ndim != 2 or self.clean.shape != self.corrupted.shape:
            raise GimlensError(
                f"task {self.name!r}: clean {tuple(self.clean.shape)} and corrupted "
                f"{tuple(self.corrupted.shape)} must be int tensors of the same shape [n, pos]"
            )
        n, pos = self.clean.shape
        if self.labels.shape != (n, 2):
            raise GimlensError(f"task {self.name!r}: labels must be [{n}, 2], got {tuple(self.labels.shape)}")
        if self.answer_position is None:
            object.__setattr__(self, "answer_position", torch.full((n,), pos - 1, dtype=torch.long))
        if self.answer_position.shape != (n,) or not bool(
            ((self.answer_position >= 0) & (self.answer_position < pos)).all()
        ):
            raise GimlensError(f"task {self.name!r}: answer_position must be [{n}] ints in [0, {pos})")
        if self.attention_mask is not None and self.attention_mask.shape != (n, pos):
            raise GimlensError(f"task {self.name!r}: attention_mask must be [{n}, {pos}]")
        object.__setattr__(self, "metric_kind", MetricKind(self.metric_kind))
        if self.metric_kind is MetricKind.PROB_DIFF and (
            self.answer_tokens is None
            or self.answer_sign is None
            or self.answer_sign.shape != (n, len(self.answer_tokens))
        ):
            raise GimlensError(
                f"task {self.name!r}: a prob_diff metric needs answer_tokens [m] and answer_sign [{n}, m]"
            )

    def __len__(self) -> int:
        return self.clean.shape[0]

    def example_index(self, indices: Indices = None) -> Int[Tensor, " b"]:
        """The example positions `indices` select (`None`: all), as a LongTensor `[b]`.

        Examples:
            >>> task = Task("toy", torch.tensor([[1, 2]] * 3), torch.tensor([[1, 3]] * 3), torch.tensor([[0, 1]] * 3))
            >>> task.example_index(slice(1, None)).tolist(), task.example_index([True, False, True]).tolist()
            ([1, 2], [0, 2])
        """
        try:
            return torch.arange(len(self))[indices if indices is not None else slice(None)].reshape(-1)
        except (IndexError, TypeError, RuntimeError) as e:
            raise GimlensError(
                f"task {self.name!r}: bad example indices {indices!r} for {len(self)} examples; expected "
                "None, a slice, a list or LongTensor of indices, or a bool mask"
            ) from e

    def answer_logits(self, logits: Float[Tensor, "b pos vocab"], indices: Indices = None) -> Float[Tensor, "b vocab"]:
        """The float32 logits at each example's answer position (`logits` of exactly `indices`)."""
        idx = self.example_index(indices)
        if logits.ndim != 3 or logits.shape[0] != len(idx):
            raise GimlensError(
                f"task {self.name!r}: expected logits [{len(idx)}, pos, vocab] for {len(idx)} examples, "
                f"got {tuple(logits.shape)}"
            )
        pos = self.answer_position[idx]
        if int(pos.max()) >= logits.shape[1]:
            raise GimlensError(
                f"task {self.name!r}: logits have {logits.shape[1]} positions, the answer is at {int(pos.max())}"
            )
        rows = torch.arange(len(idx), device=logits.device)
        return logits[rows, pos.to(logits.device)].float()

    def metric(self, logits: Float[Tensor, "b pos vocab"], indices: Indices = None) -> Float[Tensor, " b"]:
        """Per-example metric (float32, differentiable) of the examples `indices` (None = all).

        Logit difference `logit[correct] - logit[incorrect]` at the answer position, or for
        `PROB_DIFF` tasks the probability of the correct answer tokens minus the incorrect ones.
        """
        final = self.answer_logits(logits, indices)
        idx = self.example_index(indices)
        if self.metric_kind is MetricKind.LOGIT_DIFF:
            picked = final.gather(1, self.labels[idx].to(final.device))
            return picked[:, 0] - picked[:, 1]
        probs = final.softmax(-1)[:, self.answer_tokens.to(final.device)]
        return (probs * self.answer_sign[idx].to(final)).sum(-1)

    def kl_metric(self, model, *, batch_size: int | None = None, vocab_mean: bool = False) -> KLMetric:
        """A KL-divergence metric (EAP-IG-KL's): `KL(clean || run)` at the answer position.

        Runs the model once on the clean examples and keeps their log-probabilities; the returned
        [`KLMetric`][circuits.tasks.kl.KLMetric] is `metric(logits, indices) -> Tensor[b]`
        (rules and EAP-IG's conventions in [circuits.tasks.kl][]). It is 0 for the clean run and
        so has zero gradient there: score with an integrated-gradients method, not plain EAP.

        Args:
            model: the TransformerLens model the task is run on (left as found).
            batch_size: examples per forward pass (`None`: all at once).
            vocab_mean: divide by the vocabulary size (EAP-IG's `kl_div(...).mean(-1)` scale).

        Examples:
            >>> from gimlens.testing import tiny_model
            >>> from circuits.tasks import make
            >>> model = tiny_model("gpt2")
            >>> task = make("ioi", model, n=4)
            >>> kl = task.kl_metric(model)
            >>> bool((kl(model(task.clean, attention_mask=task.attention_mask)).abs() < 1e-5).all())
            True
        """
        return KLMetric(self, clean_log_probs(model, self, batch_size), vocab_mean=vocab_mean)

    def metric_for(self, indices: Indices = None) -> Callable[[Tensor], Tensor]:
        """`metric` with the examples fixed: `task.metric_for(idx)(logits) == task.metric(logits, idx)`."""
        idx = self.example_index(indices)
        return lambda logits: self.metric(logits, idx)

    def top1(self, logits: Float[Tensor, "b pos vocab"], indices: Indices = None) -> Bool[Tensor, " b"]:
        """Whether the argmax over the vocabulary at the answer position is the correct label."""
        final = self.answer_logits(logits, indices)
        return final.argmax(-1) == self.labels[self.example_index(indices)].to(final.device)[:, 0]

    def subset(self, indices: Indices) -> "Task":
        """A task with only the examples `indices` (e.g. a held-out split)."""
        idx = self.example_index(indices)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        strings = lambda s: tuple(s[i] for i in idx.tolist()) if s else s  # noqa: E731
        return dataclasses.replace(
            self,
            clean=self.clean[idx],
            corrupted=self.corrupted[idx],
            labels=self.labels[idx],
            answer_position=self.answer_position[idx],
            attention_mask=pick(self.attention_mask),
            answer_sign=pick(self.answer_sign),
            prompts=strings(self.prompts),
            corrupted_prompts=strings(self.corrupted_prompts),
            info={k: strings(v) for k, v in self.info.items()},
        )

    def batches(self, batch_size: int) -> Iterator[slice]:
        """Consecutive example slices of at most `batch_size` (use with `metric(logits, s)`)."""
        check_int("batch_size", batch_size, minimum=1)
        for start in range(0, len(self), batch_size):
            yield slice(start, min(start + batch_size, len(self)))


# ----------------------------------------------------------------------------------- tokenising


def tokenizer_and_bos(model_or_tokenizer, prepend_bos: bool | None = None):
    """`(tokenizer, bos_id or None)` following TransformerLens: a model's `default_prepend_bos`."""
    model_cfg = getattr(model_or_tokenizer, "cfg", None)
    tok = getattr(model_or_tokenizer, "tokenizer", None) if model_cfg is not None else model_or_tokenizer
    if tok is None or not callable(getattr(tok, "encode", None)):
        raise GimlensError(
            f"expected a model with a tokenizer or a tokenizer, got {type(model_or_tokenizer).__name__}"
        )
    if prepend_bos is None:
        prepend_bos = bool(getattr(model_cfg, "default_prepend_bos", True))
    bos = tok.bos_token_id if prepend_bos else None
    return tok, bos


def encode(tok, text: str) -> list[int]:
    """Token ids of `text` without special tokens."""
    return list(tok.encode(text, add_special_tokens=False))


def single_tokens(tok, words: Sequence[str], prefix: str = " ") -> dict[str, int]:
    """`{word: id}` for the words that are one token with `prefix` (default: a leading space)."""
    out = {}
    for w in words:
        ids = encode(tok, prefix + w)
        if len(ids) == 1:
            out[w] = ids[0]
    return out


def pad_id(tok) -> int:
    for cand in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0  # pragma: no cover


def pair_batch(
    tok, bos: int | None, clean: Sequence[str], corrupted: Sequence[str], what: str
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Tokenise prompt pairs into right-padded `(clean, corrupted, answer_position, mask)`.

    Every clean prompt must tokenise to as many tokens as its corrupted partner (`what` names the
    task in the error otherwise). `mask` is `None` when all prompts have the same length.
    """
    rows_c, rows_x = [], []
    for c, x in zip(clean, corrupted, strict=True):
        ids_c = ([bos] if bos is not None else []) + encode(tok, c)
        ids_x = ([bos] if bos is not None else []) + encode(tok, x)
        if len(ids_c) != len(ids_x):
            raise GimlensError(
                f"{what}: the clean prompt {c!r} ({len(ids_c)} tokens) and its corrupted prompt {x!r} "
                f"({len(ids_x)} tokens) tokenise to different lengths with this tokenizer"
            )
        rows_c.append(ids_c)
        rows_x.append(ids_x)
    lengths = torch.tensor([len(r) for r in rows_c])
    pos = int(lengths.max())
    pad = pad_id(tok)
    clean_t = torch.full((len(rows_c), pos), pad, dtype=torch.long)
    corr_t = clean_t.clone()
    for i, (a, b) in enumerate(zip(rows_c, rows_x)):
        clean_t[i, : len(a)] = torch.tensor(a)
        corr_t[i, : len(b)] = torch.tensor(b)
    mask = (torch.arange(pos) < lengths[:, None]).long()
    return clean_t, corr_t, lengths - 1, None if bool(mask.all()) else mask
