"""Indirect object identification (Wang et al. 2023): "When Mary and John went ..., John gave a drink to" -> " Mary".

Templates name the two people introduced `{A}` and `{B}` (in that order) and the repeated
subject `{S}`; optional `{place}` / `{object}` slots. ABBA examples set `A = IO, B = S`,
BABA examples `A = S, B = IO` (half each). Labels are `(IO, S)`; the corrupted prompt is the
same sentence with `A`, `B` and `S` replaced by three other distinct names (the "ABC"
corruption: the indirect object can no longer be inferred). Names, places and objects are drawn
only from words that are a single token (with a leading space) for the tokenizer, so a clean
prompt and its corruption always have the same length.

Examples:
    >>> from gimlens.testing import tiny_tokenizer
    >>> task = ioi(tiny_tokenizer(), n=4, seed=0)
    >>> task.clean.shape == task.corrupted.shape, task.info["order"]
    (True, ('ABBA', 'BABA', 'ABBA', 'BABA'))
"""

from __future__ import annotations

import random
import string
from typing import Sequence

import torch

from gimlens.errors import GimlensError
from gimlens.validation import check_int

from .base import Task, pair_batch, single_tokens, tokenizer_and_bos

__all__ = ["ioi", "IOI_TEMPLATES", "NAMES", "PLACES", "OBJECTS"]

IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "Then, {A} and {B} went to the {place}. {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "Then, {A} and {B} had a long argument. Afterwards {S} said to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
    "Afterwards, {A} and {B} went to the {place}. {S} gave a {object} to",
    "After the lunch, {A} and {B} went to the {place}. {S} handed a {object} to",
)

#: Common English first names; only those that are one token for the tokenizer are used.
NAMES = tuple(
    """Mary John Alice Bob Tom James Sarah Anna David Paul Emma Lucy Mark Kate Peter Laura Aaron Adam
    Alan Alex Amy Andrew Andy Anthony Arthur Austin Ben Blake Brandon Brian Carl Charlie Claire Clark
    Chris Dan Daniel Dean Edward Elizabeth Emily Eric Frank George Grace Graham Grant Henry Ian Jack
    Jacob Jake Jane Jason Jeff Jennifer Jeremy Jessica Jim Joe Jonathan Jordan Joseph Joshua Justin
    Kelly Kevin Kyle Leon Lewis Lisa Louis Luke Maria Martin Matthew Max Michael Michelle Mike
    Morgan Nancy Nick Oliver Patrick Rachel Richard Robert Rose Ruby Ryan Sam Scott Sean Simon
    Sophie Stephen Steven Susan Taylor Thomas Tim Tyler Victoria William""".split()
)
PLACES = tuple(
    "store park school garden restaurant house office hospital station library market beach church "
    "museum hotel zoo".split()
)
OBJECTS = tuple(
    "drink book ball bone ring necklace snack gift letter apple bottle basketball computer".split()
)
_NAME_SLOTS = ("A", "B", "S")


def _check_template(template: str) -> frozenset[str]:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    unknown = set(fields) - {"A", "B", "S", "place", "object"}
    if unknown or any(fields.count(slot) != 1 for slot in _NAME_SLOTS):
        raise GimlensError(
            f"IOI template {template!r}: expected each of {{A}}, {{B}}, {{S}} exactly once and "
            f"optionally {{place}} / {{object}}; found fields {fields}"
        )
    return frozenset(fields)


def ioi(
    model_or_tokenizer,
    n: int = 64,
    seed: int = 0,
    *,
    templates: Sequence[str] = IOI_TEMPLATES,
    names: Sequence[str] = NAMES,
    places: Sequence[str] = PLACES,
    objects: Sequence[str] = OBJECTS,
    prepend_bos: bool | None = None,
) -> Task:
    """IOI prompts with ABC corruptions and a logit-difference metric (IO minus S).

    Args:
        model_or_tokenizer: a TransformerLens model (its tokenizer and `default_prepend_bos`)
            or a tokenizer (BOS prepended when it has one, unless `prepend_bos=False`).
        n: number of examples; ABBA and BABA alternate (half each for even `n`).
        seed: seed of the name / template / place / object draws.
        templates: sentence templates (see the module docstring); example `i` draws one at random.
        names, places, objects: word lists, filtered to single tokens with a leading space.
        prepend_bos: override the BOS rule above.

    Returns:
        A [`Task`][circuits.tasks.base.Task] named `"ioi"` with `info` keys `order`,
        `template`, `io`, `s`, `corrupted_names`.

    Examples:
        >>> from gimlens.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> task = ioi(tok, n=2, seed=1, templates=["When {A} and {B} went to the {place}, {S} gave a {object} to"])
        >>> tok.decode(task.labels[0, 0]) == " " + task.info["io"][0]
        True
    """
    check_int("ioi: n", n, minimum=1)
    if not templates:
        raise GimlensError("ioi: expected at least one template")
    fields = [_check_template(t) for t in templates]
    tok, bos = tokenizer_and_bos(model_or_tokenizer, prepend_bos)
    name_ids = single_tokens(tok, dict.fromkeys(names))
    pool = list(name_ids)
    if len(pool) < 3:
        raise GimlensError(
            f"ioi: only {len(pool)} of the {len(names)} names are single tokens (with a leading space) "
            f"for this tokenizer ({pool}); at least 3 are needed"
        )
    # Multi-token places/objects would still work (same word in clean and corrupted) but would make
    # lengths differ between examples; prefer single tokens when the tokenizer has any.
    place_pool = list(single_tokens(tok, places)) or list(places)
    object_pool = list(single_tokens(tok, objects)) or list(objects)
    rng = random.Random(seed)
    clean, corrupted = [], []
    info = {k: [] for k in ("order", "template", "io", "s", "corrupted_names")}
    for i in range(n):
        order = "ABBA" if i % 2 == 0 else "BABA"
        t = rng.randrange(len(templates))
        io_name, s_name = rng.sample(pool, 2)
        # ABC corruption: three distinct names, avoiding IO and S when the pool allows it.
        others = [p for p in pool if p not in (io_name, s_name)]
        c_names = rng.sample(others if len(others) >= 3 else pool, 3)
        fill = {
            "place": rng.choice(place_pool) if "place" in fields[t] else "",
            "object": rng.choice(object_pool) if "object" in fields[t] else "",
        }
        a, b = (io_name, s_name) if order == "ABBA" else (s_name, io_name)
        clean.append(templates[t].format(A=a, B=b, S=s_name, **fill))
        corrupted.append(templates[t].format(A=c_names[0], B=c_names[1], S=c_names[2], **fill))
        for k, v in zip(info, (order, t, io_name, s_name, tuple(c_names))):
            info[k].append(v)
    clean_t, corr_t, answer, mask = pair_batch(tok, bos, clean, corrupted, "ioi")
    labels = torch.tensor([[name_ids[io], name_ids[s]] for io, s in zip(info["io"], info["s"])])
    return Task(
        name="ioi",
        clean=clean_t,
        corrupted=corr_t,
        labels=labels,
        answer_position=answer,
        attention_mask=mask,
        prompts=tuple(clean),
        corrupted_prompts=tuple(corrupted),
        info={k: tuple(v) for k, v in info.items()},
    )

