"""Validation of `layerwise_ig`'s arguments (before anything touches the model)."""

from __future__ import annotations

__all__ = ["baseline_map", "granularity_list", "is_sequence", "layer_list", "prompt_tokens"]

from typing import Mapping, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import GimlensError
from ..validation import coerce_enum
from ..runtime import check_tokens
from .baselines import Baseline
from .boundaries import Granularity


def prompt_tokens(model, text) -> tuple[Int[Tensor, "1 pos"], str | None]:
    if isinstance(text, str):
        if not text.strip():
            raise GimlensError("text is empty; expected a prompt with at least one token")
        return model.to_tokens(text), text
    if isinstance(text, torch.Tensor):
        tokens = check_tokens(text, model, name="text")
        if tokens.shape[0] != 1:
            raise GimlensError(f"expected one prompt, got a batch of {tokens.shape[0]}")
        param = next(model.parameters(), None)
        return (tokens if param is None else tokens.to(param.device)), None
    raise GimlensError(f"text must be a string or a tensor of token ids, got {type(text).__name__}")


def layer_list(model, layers) -> list[int]:
    n = int(model.cfg.n_layers)
    if layers is None:
        return list(range(n))
    items = [layers] if isinstance(layers, int) else list(layers) if is_sequence(layers) else None
    if not items or any(isinstance(l, bool) or not isinstance(l, int) for l in items):
        raise GimlensError(f"layers must be an int or a non-empty list of ints, got {layers!r}")
    bad = [l for l in items if not -n <= l < n]
    if bad:
        raise GimlensError(f"layer(s) {bad} out of range for a model with {n} layers (0..{n - 1})")
    return list(dict.fromkeys(l % n for l in items))


def is_sequence(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str)


def granularity_list(granularity) -> list[Granularity]:
    if granularity == "all":
        return list(Granularity)
    items = [granularity] if isinstance(granularity, (str, Granularity)) else granularity
    if not is_sequence(items) or not items:
        raise GimlensError(f"granularity must be a name or a non-empty list, got {granularity!r}")
    return list(dict.fromkeys(coerce_enum(Granularity, g, "granularity") for g in items))


def baseline_map(baseline, grans: list[Granularity]) -> dict[Granularity, Baseline]:
    if isinstance(baseline, Mapping):
        keys = {coerce_enum(Granularity, k, "granularity"): v for k, v in baseline.items()}
        chosen = {g: Baseline.parse(keys.get(g, Baseline.INPUT_TOKEN)) for g in grans}
    else:
        b = Baseline.parse(baseline)
        chosen = {g: b for g in grans}
    for g, b in chosen.items():
        if g is Granularity.MLP and b.is_ratio:
            raise GimlensError(
                f"baseline {b.value!r} is not defined for the mlp granularity (the MLP map has no "
                "token-to-token self term); use 'zero' or 'input_token'"
            )
        if g is Granularity.LAYER and b is Baseline.ITB_MAP_RATIO:
            raise GimlensError(
                "baseline 'itb_map_ratio' needs one attention weight per target and is defined "
                "for 'att' only (as in LIG); use 'itb_zero_ratio' for 'layer'"
            )
    return chosen
