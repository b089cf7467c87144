"""Capitals: "The capital of France is" -> " Paris"; corrupted with another country.

Labels are `(capital, capital of the corrupting country)`, so the logit difference compares the
right capital with the one the corrupted prompt asks for. Only countries and capitals that are
single tokens (with a leading space) for the tokenizer are used, so every prompt has the same length.

Examples:
    >>> from gimlens.testing import tiny_tokenizer
    >>> task = capitals(tiny_tokenizer(), n=3, seed=0)
    >>> task.prompts[0], task.corrupted_prompts[0], task.attention_mask is None
    ('The capital of Spain is', 'The capital of Japan is', True)
"""

from __future__ import annotations

import random

import torch

from gimlens.errors import GimlensError
from gimlens.validation import check_int

from .base import Task, pair_batch, single_tokens, tokenizer_and_bos

__all__ = ["capitals", "CAPITALS", "TEMPLATE"]

TEMPLATE = "The capital of {country} is"
#: country -> capital.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "England": "London", "Egypt": "Cairo",
    "Greece": "Athens", "Austria": "Vienna", "Portugal": "Lisbon", "Ireland": "Dublin",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Hungary": "Budapest", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Canada": "Ottawa", "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Cuba": "Havana", "Kenya": "Nairobi", "Nigeria": "Abuja",
    "Ghana": "Accra", "Morocco": "Rabat", "Iran": "Tehran", "Iraq": "Baghdad", "Syria": "Damascus",
    "Lebanon": "Beirut", "Turkey": "Ankara", "Afghanistan": "Kabul", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila", "Australia": "Canberra",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Scotland": "Edinburgh", "Wales": "Cardiff", "Iceland": "Reykjavik", "Nepal": "Kathmandu",
    "Qatar": "Doha", "Uganda": "Kampala", "Senegal": "Dakar", "Tunisia": "Tunis",
    "Sudan": "Khartoum", "Jordan": "Amman", "Switzerland": "Bern", "Mongolia": "Ulaanbaatar",
}  # fmt: skip


def capitals(
    model_or_tokenizer,
    n: int = 64,
    seed: int = 0,
    *,
    pairs: dict[str, str] = CAPITALS,
    template: str = TEMPLATE,
    prepend_bos: bool | None = None,
) -> Task:
    """Country-capital prompts with a logit-difference metric (capital minus the corrupting capital).

    Args:
        model_or_tokenizer: a TransformerLens model or a tokenizer (BOS as in [`ioi`][circuits.tasks.ioi]).
        n: number of examples (countries repeat when `n` exceeds the usable pairs).
        seed: seed of the country draws.
        pairs: country -> capital; filtered to pairs where both are single tokens.
        template: a prompt with one `{country}` slot whose next token is the capital.
        prepend_bos: override the BOS rule.

    Returns:
        A [`Task`][circuits.tasks.base.Task] named `"capitals"`; `info` keys `country` and
        `corrupted_country`.

    Examples:
        >>> from gimlens.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> task = capitals(tok, n=2, seed=1)
        >>> tok.decode(task.labels[0, 0]) == " " + CAPITALS[task.info["country"][0]]
        True
    """
    check_int("capitals: n", n, minimum=1)
    if template.count("{country}") != 1:
        raise GimlensError(f"capitals: template {template!r} must contain {{country}} exactly once")
    tok, bos = tokenizer_and_bos(model_or_tokenizer, prepend_bos)
    countries = single_tokens(tok, list(pairs))
    cities = single_tokens(tok, list(pairs.values()))
    usable = [c for c in countries if pairs[c] in cities]
    if len(usable) < 2:
        raise GimlensError(
            f"capitals: only {len(usable)} country/capital pairs are single tokens for this tokenizer "
            f"({usable}); at least 2 are needed"
        )
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < n:  # every usable country once before any repeats
        order += rng.sample(usable, len(usable))
    clean, corrupted, labels, corrupting = [], [], [], []
    for country in order[:n]:
        other = rng.choice([c for c in usable if pairs[c] != pairs[country]])
        clean.append(template.format(country=country))
        corrupted.append(template.format(country=other))
        labels.append([cities[pairs[country]], cities[pairs[other]]])
        corrupting.append(other)
    clean_t, corr_t, answer, mask = pair_batch(tok, bos, clean, corrupted, "capitals")
    return Task(
        name="capitals",
        clean=clean_t,
        corrupted=corr_t,
        labels=torch.tensor(labels),
        answer_position=answer,
        attention_mask=mask,
        prompts=tuple(clean),
        corrupted_prompts=tuple(corrupted),
        info={"country": tuple(order[:n]), "corrupted_country": tuple(corrupting)},
    )
