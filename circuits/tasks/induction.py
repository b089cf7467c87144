"""Induction: `[BOS] x1 .. xk x1 .. x(k-1)` -> `xk` (repeated random tokens).

The corrupted sequence keeps the first half and replaces the second by `k - 1` other random
tokens `y1 .. y(k-1)`, so nothing can be copied. Labels are `(xk, yk)` with `yk` one more
fresh token: the logit difference of the induced token over an unrelated one. Tokens are drawn
without replacement (every token in a sequence distinct) from a safe range of the vocabulary: ids
that decode to a space followed by an ASCII word, never special tokens.

Examples:
    >>> from gimlens.testing import tiny_tokenizer
    >>> task = induction(tiny_tokenizer(), n=2, length=5, seed=0)
    >>> task.clean.shape, bool((task.clean[:, 1:5] == task.clean[:, 6:10]).all())
    (torch.Size([2, 10]), True)
"""

from __future__ import annotations

import random

import torch

from gimlens.errors import GimlensError

from .base import Task, tokenizer_and_bos

__all__ = ["induction", "word_tokens"]


def word_tokens(tok) -> list[int]:
    """Ids that decode to `" "` + an ASCII alphabetic word, excluding special tokens."""
    special = set(tok.all_special_ids)
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    return [
        i
        for i, s in enumerate(texts)
        if i not in special and s.startswith(" ") and s[1:].isascii() and s[1:].isalpha()
    ]


def induction(
    model_or_tokenizer,
    n: int = 64,
    seed: int = 0,
    *,
    length: int = 10,
    prepend_bos: bool | None = None,
) -> Task:
    """Repeated random-token sequences with a logit-difference metric (see the module docstring).

    Args:
        model_or_tokenizer: a TransformerLens model or a tokenizer (BOS as in [`ioi`][circuits.tasks.ioi]).
        n: number of examples.
        seed: seed of the token draws.
        length: `k`, the length of the random sequence (the prompt has `2k - 1` tokens + BOS).
        prepend_bos: override the BOS rule.

    Returns:
        A [`Task`][circuits.tasks.base.Task] named `"induction"` (no padding).

    Examples:
        >>> from gimlens.testing import tiny_tokenizer
        >>> task = induction(tiny_tokenizer(), n=1, length=4, seed=1)
        >>> int(task.labels[0, 0]) == int(task.clean[0, 4])
        True
    """
    if n < 1 or length < 2:
        raise GimlensError(f"induction: need n >= 1 and length >= 2, got n={n!r}, length={length!r}")
    tok, bos = tokenizer_and_bos(model_or_tokenizer, prepend_bos)
    pool = word_tokens(tok)
    if len(pool) < 2 * length:
        raise GimlensError(
            f"induction: the tokenizer has only {len(pool)} word tokens; length={length} needs {2 * length}"
        )
    rng = random.Random(seed)
    head = [bos] if bos is not None else []
    clean, corrupted, labels = [], [], []
    for _ in range(n):
        draw = rng.sample(pool, 2 * length)
        x, y = draw[:length], draw[length:]
        clean.append(head + x + x[:-1])
        corrupted.append(head + x + y[:-1])
        labels.append([x[-1], y[-1]])
    clean_t, corr_t = torch.tensor(clean), torch.tensor(corrupted)
    return Task(
        name="induction",
        clean=clean_t,
        corrupted=corr_t,
        labels=torch.tensor(labels),
        prompts=tuple(tok.batch_decode(clean_t[:, len(head) :])),
        corrupted_prompts=tuple(tok.batch_decode(corr_t[:, len(head) :])),
        info={"length": (length,) * n},
    )
