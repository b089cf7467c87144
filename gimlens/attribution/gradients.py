"""The attribution methods' shared passes: the model as a bridge, inputs and positions, token
embeddings, and the gradient of an objective at the embedding leaf."""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import GimlensError
from ..gim import GIMConfig, gim_hooks
from ..runtime import is_lens_model, prepared, run_hooked

def as_bridge(model, tokenizer=None):
    """A TransformerLens model for `model`: returned as is, or booted around an HF model.

    Booting a `TransformerBridge` around a HuggingFace `PreTrainedModel` wraps it in place
    (TransformerLens swaps its submodules for bridge components); `load_model` keeps one bridge
    per HF object, so later calls (and `load_model` itself) reuse it, and it refuses an HF
    object wrapped outside gimlens. Keep using the returned bridge rather than the HF object.
    """
    if is_lens_model(model):
        return model
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency of transformer-lens
        PreTrainedModel = ()
    if isinstance(model, PreTrainedModel):
        from ..models import load_model

        return load_model(model, tokenizer=tokenizer)
    raise GimlensError(
        f"expected a TransformerLens model (TransformerBridge or HookedTransformer) or a "
        f"HuggingFace PreTrainedModel, got {type(model).__name__}"
    )


def check_mask(mask, tokens: Tensor) -> Int[Tensor, "batch pos"] | None:
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    if mask.ndim == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != tuple(tokens.shape):
        raise GimlensError(
            f"attention_mask must have the shape of input_ids {tuple(tokens.shape)}, got {tuple(mask.shape)}"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise GimlensError("attention_mask must hold only 0 and 1")
    if bool((mask.sum(-1) == 0).any()):
        raise GimlensError("every row of attention_mask needs at least one real (1) position")
    return mask.to(device=tokens.device, dtype=torch.long)


def resolve_positions(
    position: int | Tensor, tokens: Tensor, mask: Tensor | None
) -> Int[Tensor, " batch"]:
    """Absolute target positions per row. With a mask, `position` counts real tokens only
    (`-1` = each row's last real token, whatever the padding side)."""
    batch, seq = tokens.shape
    pos = torch.as_tensor(position, device=tokens.device).long()
    if pos.ndim == 0:
        pos = pos.expand(batch)
    if pos.shape != (batch,):
        raise GimlensError(f"target_position must be an int or have shape [{batch}], got {tuple(pos.shape)}")
    lengths = mask.sum(-1) if mask is not None else torch.full((batch,), seq, device=tokens.device)
    if bool(((pos >= lengths) | (pos < -lengths)).any()):
        raise GimlensError(
            f"target_position {pos.tolist()} lies outside the sequence (real lengths {lengths.tolist()})"
        )
    rel = torch.where(pos < 0, pos + lengths, pos)
    if mask is None:
        return rel
    # the rel-th real position of each row
    order = torch.cumsum(mask, dim=-1) - 1
    hit = (order == rel[:, None]) & (mask == 1)
    return hit.float().argmax(dim=-1)


def default_baseline_token(tokenizer) -> int:
    """The token of `" "`, else the pad token, else the unk token."""
    if tokenizer is None:
        raise GimlensError("a tokenizer is needed to infer the baseline token; pass baseline_token_id")
    ids = tokenizer.encode(" ", add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    for attr in ("pad_token_id", "unk_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    raise GimlensError(
        "cannot infer a baseline token: ' ' is not a single token and the tokenizer has no pad "
        "or unk token; pass baseline_token_id"
    )


def token_embeddings(model, tokens: Tensor) -> Float[Tensor, "batch pos d_model"]:
    """The model's `hook_embed` values for `tokens` (no gradient)."""
    captured: list[Tensor] = []

    def grab(t, hook):
        captured.append(t.detach())

    with torch.no_grad(), model.hooks(fwd_hooks=[("hook_embed", grab)]):
        model.embed(tokens)
    if not captured:  # the embedding module fires hook_embed; fall back to the module output
        with torch.no_grad():
            return model.embed(tokens).detach()
    return captured[0]


Objective = Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, " batch"]]


def embedding_gradients(
    model,
    tokens: Int[Tensor, "batch pos"],
    objective: Objective,
    *,
    embeds: Float[Tensor, "batch pos d_model"] | None = None,
    attention_mask: Tensor | None = None,
    gim: GIMConfig | None = None,
) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos vocab"], Float[Tensor, " batch"]]:
    """Gradient of `objective(logits)` (one value per row) w.r.t. the token embeddings.

    One forward and one backward for the whole batch: rows are independent, so the gradient of
    the summed objective gives every row its own gradient. `embeds` replaces the embeddings at
    `hook_embed` (for interpolation); by default the model's own are used. GIM's rules apply
    when `gim` is given and switched on. Parameters are frozen and the model in eval mode only
    for the duration.

    Returns:
        `(grads, logits, values)`: gradients like the embeddings, logits (detached), and the
        objective per row (detached).
    """
    config = gim if gim is not None else GIMConfig.off()
    if embeds is None:
        embeds = token_embeddings(model, tokens)
    leaf = embeds.detach().clone().requires_grad_(True)

    def replace_embed(t, hook):
        return leaf.to(t.dtype)

    hooks = [("hook_embed", replace_embed)] + (gim_hooks(model, config) if not config.is_off else [])
    with prepared(model), torch.enable_grad():
        logits = run_hooked(model, tokens, fwd_hooks=hooks, attention_mask=attention_mask)
        values = objective(logits)
        if values.shape != (tokens.shape[0],):
            raise GimlensError(
                f"the target objective must give one value per row, shape [{tokens.shape[0]}]; "
                f"got {tuple(values.shape)}"
            )
        (grads,) = torch.autograd.grad(values.sum(), leaf)
    return grads, logits.detach(), values.detach()
