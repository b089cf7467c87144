"""Induction: `[BOS] x1 .. xk x1 .. x(k-1)` -> `xk` (repeated random tokens).

The corrupted sequence removes what induction copies from, so nothing can be copied
(`corruption`): `"last_token"` (the default) replaces only the final token, the query, by
`y(k-1)` (clean and corrupted differ only at the scored position); `"second_half"` (the default
before, kept for earlier results) keeps the first half and replaces the whole repeat by `k - 1`
other random tokens `y1 .. y(k-1)`; `"first_half"` replaces the first half by `z1 .. zk` and keeps
the repeat `x1 .. x(k-1)` (they differ only where the copied sequence is). On SmolLM2 the
induction heads carry the effect under each, but only `"last_token"` leaves a circuit small
enough to find: 5% of edges recover 0.46 held out by EAP-IG-inputs and 0.77 by edge pruning,
against 0.17 with `"second_half"` (docs/performance.md, "Induction on SmolLM2: a diagnosis").
Labels are `(xk, yk)` with `yk` one more fresh token: the logit difference of the induced token over an unrelated one. Tokens are drawn
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

__all__ = ["induction", "word_tokens", "CORRUPTIONS"]

#: corrupted sequence (after BOS) from the clean `x`, the fresh `y` and, for `"first_half"`, `z`
CORRUPTIONS = {
    "second_half": lambda x, y, z: x + y[:-1],
    "first_half": lambda x, y, z: z + x[:-1],
    "last_token": lambda x, y, z: x + x[:-2] + [y[-2]],
}


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
    corruption: str = "last_token",
) -> Task:
    """Repeated random-token sequences with a logit-difference metric (see the module docstring).

    Args:
        model_or_tokenizer: a TransformerLens model or a tokenizer (BOS as in [`ioi`][circuits.tasks.ioi]).
        n: number of examples.
        seed: seed of the token draws.
        length: `k`, the length of the random sequence (the prompt has `2k - 1` tokens + BOS).
        prepend_bos: override the BOS rule.
        corruption: `"last_token"`, `"second_half"` or `"first_half"` (module docstring); the
            clean prompts and labels do not depend on it.

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
    if corruption not in CORRUPTIONS:
        raise GimlensError(f"induction: corruption must be one of {list(CORRUPTIONS)}, got {corruption!r}")
    tok, bos = tokenizer_and_bos(model_or_tokenizer, prepend_bos)
    pool = word_tokens(tok)
    needed = (3 if corruption == "first_half" else 2) * length
    if len(pool) < needed:
        raise GimlensError(
            f"induction: the tokenizer has only {len(pool)} word tokens; length={length} needs {needed}"
        )
    rng, other = random.Random(seed), random.Random(f"induction-first-half-{seed}")
    head = [bos] if bos is not None else []
    clean, corrupted, labels = [], [], []
    for _ in range(n):
        draw = rng.sample(pool, 2 * length)
        x, y = draw[:length], draw[length:]
        z = []
        if corruption == "first_half":  # its own draws: the clean prompts stay those of the others
            used = set(draw)
            z = [t for t in other.sample(pool, 3 * length) if t not in used][:length]
        clean.append(head + x + x[:-1])
        corrupted.append(head + CORRUPTIONS[corruption](x, y, z))
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
