"""`explain`: GIM token attribution with the call form of the `gim-explain` package."""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor

from ..validation import check_int
from ..gim import GIMConfig
from ..runtime import check_tokens
from .attribute import attribute
from .gradients import as_bridge
from .inputs import model_device
from .targets import TokenTarget, _per_row_ids

__all__ = ["explain"]


def explain(
    model,
    input_ids: Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    *,
    target_token_id: int | Tensor | None = None,
    target_position: int | Tensor = -1,
    baseline_token_id: int | None = None,
    tokenizer=None,
    attention_mask: Tensor | None = None,
    freeze_norm: bool | None = True,
    softmax_temperature: float | None = 2.0,
    q_scale: float | None = 0.25,
    k_scale: float | None = 0.25,
    v_scale: float | None = 0.5,
    gate_scale: float | None = 0.5,
    up_scale: float | None = 0.5,
) -> Float[Tensor, "batch pos"] | Float[Tensor, " pos"]:
    """GIM attribution of one target logit to every input token.

    Score of token `i` = `grad_i · (embed(x_i) − embed(baseline))`, the gradient taken under
    GIM for the target logit, summed over `d_model`. Every row of a batch gets its own target
    and its own gradient (one backward for the batch). Every position, BOS included, is compared
    with the baseline. This is [`attribute`][gimlens.attribution.attribute.attribute] with
    `method="gradient_x_input"`, `score_bos=True` and the whole batch in one pass; use that for
    other methods, targets and text inputs.

    Args:
        model: a TransformerLens model, or a HuggingFace `AutoModelForCausalLM`, which is
            wrapped in a `TransformerBridge` once (booting swaps submodules of that object in
            place, so keep using the result of [`load_model`][gimlens.models.load_model]
            afterwards).
        input_ids: token ids `[pos]` or `[batch, pos]`.
        target_token_id: the token whose logit is explained: an int, or one per row
            (`[batch]`), or the token's text if it is exactly one token for the tokenizer
            (`" Paris"`; a string of several tokens is refused: use
            [`attribute`][gimlens.attribution.attribute.attribute] for continuations).
            Default: the model's top prediction at `target_position`.
        target_position: position of the target logit (int or `[batch]`); with an
            `attention_mask` it counts real tokens only, so `-1` is each row's last real
            token whatever the padding side.
        baseline_token_id: the reference token; default the token of `" "`, else pad, else unk.
        tokenizer: used to infer the baseline (default: the model's tokenizer).
        attention_mask: `[batch, pos]` of 0/1 for padded batches; padded positions score 0.
        freeze_norm, softmax_temperature, q_scale, k_scale, v_scale, gate_scale, up_scale:
            GIM's rules, the fields of [`GIMConfig`][gimlens.gim.GIMConfig] with its defaults;
            `None` switches a rule off.

    Returns:
        Scores `[pos]` for a 1-D input, else `[batch, pos]`; float32, on the model's device.

    Examples:
        >>> import gimlens
        >>> from gimlens.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> ids = model.to_tokens("The capital of France is")
        >>> gimlens.explain(model, ids[0], q_scale=0.5).shape == ids[0].shape
        True
    """
    config = GIMConfig(freeze_norm=freeze_norm, softmax_temperature=softmax_temperature,
                       q_scale=q_scale, k_scale=k_scale, v_scale=v_scale,
                       gate_scale=gate_scale, up_scale=up_scale)
    model = as_bridge(model, tokenizer)
    single = isinstance(input_ids, Tensor) and input_ids.ndim == 1
    batch = check_tokens(input_ids, model).shape[0]
    if baseline_token_id is not None:
        _check_token_id(baseline_token_id, model, "baseline_token_id")
    targets = None
    if target_token_id is not None:
        tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        targets = _per_row_ids(target_token_id, tok, batch, int(model.cfg.d_vocab), "target_token_id")
    result = attribute(
        model,
        input_ids,
        method="gradient_x_input",
        target=TokenTarget(token=targets, position=target_position),
        baseline=baseline_token_id,
        gim=config,
        attention_mask=attention_mask,
        score_bos=True,
        tokenizer=tokenizer,
        batch_size=max(1, batch),
    )
    scores = result.scores.to(model_device(model))
    return scores[0] if single else scores


def _check_token_id(token_id, model, name: str) -> None:
    vocab = int(model.cfg.d_vocab)
    check_int(name, token_id, minimum=0, maximum=vocab - 1, note="a token id of the vocabulary")
