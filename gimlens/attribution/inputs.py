"""Inputs of an attribution: text or token ids to a padded batch, BOS handling, the baseline.

Examples:
    >>> from gimlens.testing import tiny_model
    >>> from gimlens.attribution.inputs import prepare_prompt
    >>> model = tiny_model("llama")
    >>> p = prepare_prompt(model, ["The capital of France is", "Alice"], None, model.tokenizer)
    >>> p.tokens.shape, p.mask.sum(-1).tolist(), p.bos[:, :2].tolist()
    (torch.Size([2, 7]), [7, 3], [[True, False], [False, False]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..errors import GimlensError
from ..validation import check_int
from ..runtime import check_tokens
from .gradients import check_mask, default_baseline_token

__all__ = ["Prompt", "prepare_prompt", "resolve_baseline", "model_device"]


@dataclass
class Prompt:
    """A batch of prompts on the model's device.

    Attributes:
        tokens: `[batch, pos]` token ids (strings are left-padded).
        mask: `[batch, pos]` 0/1 attention mask, or `None` when nothing is padded.
        bos: `[batch, pos]` True where a row's first real token is the tokenizer's BOS.
    """

    tokens: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"] | None
    bos: Bool[Tensor, "batch pos"]

    @property
    def real(self) -> Bool[Tensor, "batch pos"]:
        return torch.ones_like(self.bos) if self.mask is None else self.mask.bool()


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def prepare_prompt(model, inputs, attention_mask, tokenizer) -> Prompt:
    """Token ids (`[pos]` or `[batch, pos]`, with an optional mask) or text (a string or a
    list of strings, tokenised by `model.to_tokens` and left-padded) as a `Prompt`."""
    device = model_device(model)
    if isinstance(inputs, str) or (
        isinstance(inputs, (list, tuple)) and inputs and all(isinstance(s, str) for s in inputs)
    ):
        if attention_mask is not None:
            raise GimlensError("attention_mask is built from text inputs; pass it only with token ids")
        tokens, mask = _tokenize(model, [inputs] if isinstance(inputs, str) else list(inputs), tokenizer)
    elif isinstance(inputs, Tensor):
        tokens = check_tokens(inputs, model).to(device)
        mask = check_mask(attention_mask, tokens)
    else:
        raise GimlensError(
            "inputs must be a string, a non-empty list of strings, or an integer tensor of token "
            f"ids [pos] or [batch, pos]; got {type(inputs).__name__}"
            + (" (empty)" if isinstance(inputs, (list, tuple)) and not inputs else "")
        )
    tokens = tokens.to(device)
    mask = None if mask is None else mask.to(device)
    return Prompt(tokens, mask, _bos_positions(tokens, mask, tokenizer))


def resolve_baseline(baseline, tokenizer, vocab: int) -> int:
    """The baseline token id: `None` → the token of `" "` (else pad, else unk); an id; or a
    string that is exactly one token."""
    if baseline is None:
        token_id = default_baseline_token(tokenizer)
    elif isinstance(baseline, str):
        if tokenizer is None:
            raise GimlensError("a string baseline needs a tokenizer; pass a token id")
        ids = tokenizer.encode(baseline, add_special_tokens=False)
        if len(ids) != 1:
            raise GimlensError(
                f"baseline {baseline!r} is {len(ids)} tokens for this tokenizer; expected a string "
                "that is exactly one token (e.g. ' '), or a token id"
            )
        token_id = int(ids[0])
    elif isinstance(baseline, Tensor) and baseline.ndim == 0 and not baseline.is_floating_point():
        token_id = int(baseline)
    else:
        token_id = baseline
    check_int("baseline", token_id, minimum=0, maximum=vocab - 1, note="a token id, or a one-token string")
    return token_id


def _tokenize(model, texts: Sequence[str], tokenizer) -> tuple[Tensor, Tensor | None]:
    bos = getattr(tokenizer, "bos_token_id", None)
    rows = []
    for i, text in enumerate(texts):
        ids = model.to_tokens(text)[0] if text else torch.zeros(0, dtype=torch.long)
        real = ids[1:] if (len(ids) and bos is not None and int(ids[0]) == bos) else ids
        if len(real) == 0:
            raise GimlensError(
                f"text {i} ({text!r}) is empty after tokenisation; expected at least one token"
            )
        rows.append(ids)
    if len(rows) == 1:
        return rows[0][None], None
    width = max(len(r) for r in rows)
    pad = next(
        (v for v in (getattr(tokenizer, "pad_token_id", None), bos) if v is not None), 0
    )
    tokens = torch.full((len(rows), width), int(pad), dtype=torch.long, device=rows[0].device)
    mask = torch.zeros_like(tokens)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return tokens, mask


def _bos_positions(tokens: Tensor, mask: Tensor | None, tokenizer) -> Tensor:
    bos = getattr(tokenizer, "bos_token_id", None)
    out = torch.zeros_like(tokens, dtype=torch.bool)
    if bos is None:
        return out
    first = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    if mask is not None:
        first = mask.argmax(-1)  # the first 1 of each row
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    out[rows, first] = tokens[rows, first] == bos
    return out
