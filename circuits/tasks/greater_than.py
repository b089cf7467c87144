"""Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> a year > 32.

The metric is Hanna et al.'s probability difference: the probability of the continuations that make
the second year greater minus those that do not, with probabilities from the full-vocabulary
softmax at the last position. How the year is continued depends on the tokenizer (`mode`):

- `"two_digit"` (GPT-2-style tokenizers, where `"1732"` is `" 17" + "32"`): Hanna et al.'s
  original. Prompt `"... from the year {C}{YY} to the year {C}"`, `YY` in 02..98; answer tokens
  the 100 tokens `"00"`..`"99"`; `PD = P(yy > YY) - P(yy <= YY)`. Corrupted: `YY = 01`.
- `"last_digit"` (tokenizers that split numbers into digits, e.g. SmolLM2, Llama 2, Qwen): the
  decade is given and only the last digit is predicted. Prompt `"... from the year {C}{D}{Y} to
  the year {C}{D}"`, `Y` in 1..8; answer tokens the 10 digits; `PD = P(d > Y) - P(d <= Y)`,
  which is exactly Hanna et al.'s metric conditioned on the second year sharing the first year's
  decade (a first-digit version would leave the mass on the equal digit ambiguous). Corrupted:
  `Y = 0` (every later year in the decade is greater, so the prompt no longer says where the
  boundary is).

`"auto"` picks `"two_digit"` when all 100 two-digit strings are single tokens after the
century, else `"last_digit"`. Labels are `(YY + 1, YY)` (resp. `(Y + 1, Y)`), the nearest
correct and incorrect answers, for logit-difference tools.

Examples:
    >>> from gimlens.testing import tiny_tokenizer
    >>> task = greater_than(tiny_tokenizer(), n=4, seed=0)
    >>> task.info["mode"][0], task.answer_sign.shape
    ('last_digit', torch.Size([4, 10]))
"""

from __future__ import annotations

import random
from typing import Literal, Sequence

import torch

from gimlens.errors import GimlensError
from gimlens.validation import check_int

from .base import MetricKind, Task, encode, pair_batch, single_tokens, tokenizer_and_bos

__all__ = ["greater_than", "NOUNS", "TEMPLATE"]

Mode = Literal["auto", "two_digit", "last_digit"]

TEMPLATE = "The {noun} lasted from the year {start} to the year {prefix}"
#: Event nouns (a subset of Hanna et al.'s list); single-token ones are preferred.
NOUNS = tuple(
    """war expedition voyage trip journey siege reign dynasty treaty campaign occupation plague
    rebellion truce marriage project tour study trial conflict crisis friendship rivalry
    partnership investigation construction pilgrimage kingdom epidemic contract""".split()
)
CENTURIES = tuple(range(11, 18))


def _continuations(tok, prompt: str, strings: Sequence[str]) -> list[int] | None:
    """Token ids of `strings` as the single next token after `prompt`, or None if any is not."""
    base = encode(tok, prompt)
    out = []
    for s in strings:
        ids = encode(tok, prompt + s)
        if len(ids) != len(base) + 1 or ids[:-1] != base:
            return None
        out.append(ids[-1])
    return out


def greater_than(
    model_or_tokenizer,
    n: int = 64,
    seed: int = 0,
    *,
    mode: Mode = "auto",
    nouns: Sequence[str] = NOUNS,
    prepend_bos: bool | None = None,
) -> Task:
    """Greater-than prompts with a probability-difference metric (see the module docstring).

    Args:
        model_or_tokenizer: a TransformerLens model or a tokenizer (BOS as in [`ioi`][circuits.tasks.ioi]).
        n: number of examples.
        seed: seed of the noun / century / year draws.
        mode: `"auto"`, `"two_digit"` or `"last_digit"`.
        nouns: event nouns; single-token ones (with a leading space) are used when there are any.
        prepend_bos: override the BOS rule.

    Returns:
        A `PROB_DIFF` [`Task`][circuits.tasks.base.Task] named `"greater_than"`; `info` keys
        `mode`, `year` (the first year, e.g. 1732) and `noun`.

    Examples:
        >>> from gimlens.testing import tiny_tokenizer
        >>> task = greater_than(tiny_tokenizer(), n=2, seed=3)
        >>> task.prompts[0].endswith(str(task.info["year"][0])[:3])
        True
    """
    check_int("greater_than: n", n, minimum=1)
    if mode not in ("auto", "two_digit", "last_digit"):
        raise GimlensError(f"greater_than: unknown mode {mode!r}; expected 'auto', 'two_digit' or 'last_digit'")
    tok, bos = tokenizer_and_bos(model_or_tokenizer, prepend_bos)
    noun_pool = list(single_tokens(tok, nouns)) or list(nouns)
    two = [f"{yy:02d}" for yy in range(100)]
    digits = [str(d) for d in range(10)]
    probe = TEMPLATE.format(noun=noun_pool[0], start="1732", prefix="17")
    if mode == "auto":
        mode = "two_digit" if _continuations(tok, probe, two) is not None else "last_digit"
    rng = random.Random(seed)
    clean, corrupted, years, used_nouns, sign_rows, label_rows = [], [], [], [], [], []
    answer_ids: list[int] | None = None
    for _ in range(n):
        noun, century = rng.choice(noun_pool), rng.choice(CENTURIES)
        if mode == "two_digit":
            yy = rng.randint(2, 98)
            prefix, start, corrupt_start = f"{century}", f"{century}{yy:02d}", f"{century}01"
            answers, boundary = two, yy
        else:
            decade, y = rng.randint(0, 9), rng.randint(1, 8)
            prefix = f"{century}{decade}"
            start, corrupt_start = f"{prefix}{y}", f"{prefix}0"
            answers, boundary = digits, y
        prompt = TEMPLATE.format(noun=noun, start=start, prefix=prefix)
        ids = _continuations(tok, prompt, answers)
        if ids is None or (answer_ids is not None and ids != answer_ids):
            raise GimlensError(
                f"greater_than: in mode {mode!r} every answer in {answers[0]}..{answers[-1]} must be one "
                f"token right after {prompt!r} (the same token in every prompt) with this tokenizer; "
                "try the other mode"
            )
        answer_ids = ids
        clean.append(prompt)
        corrupted.append(TEMPLATE.format(noun=noun, start=corrupt_start, prefix=prefix))
        years.append(int(start))
        used_nouns.append(noun)
        sign_rows.append([1.0 if v > boundary else -1.0 for v in range(len(answers))])
        label_rows.append([ids[boundary + 1], ids[boundary]])
    clean_t, corr_t, answer, mask = pair_batch(tok, bos, clean, corrupted, "greater_than")
    return Task(
        name="greater_than",
        clean=clean_t,
        corrupted=corr_t,
        labels=torch.tensor(label_rows),
        answer_position=answer,
        attention_mask=mask,
        metric_kind=MetricKind.PROB_DIFF,
        answer_tokens=torch.tensor(answer_ids),
        answer_sign=torch.tensor(sign_rows),
        prompts=tuple(clean),
        corrupted_prompts=tuple(corrupted),
        info={"mode": (mode,) * n, "year": tuple(years), "noun": tuple(used_nouns)},
    )
