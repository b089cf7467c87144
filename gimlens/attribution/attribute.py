"""`attribute`: the entry point of token attribution (every method, target and input form)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..errors import GimlensError
from ..validation import check_int
from ..gim import GIMConfig
from ..quadrature import Quadrature, nodes_and_weights
from ..runtime import parse_bytes
from .gradients import as_bridge
from .inputs import prepare_prompt, resolve_baseline
from ..distributed import all_gather_rows, is_main_process, shard_range, world
from .methods import METHODS, Job, Method, MethodOutput, as_method, run_method
from .result import Attribution
from .targets import TargetKind, as_target, resolve_target, with_continuation

__all__ = ["attribute"]


def attribute(
    model,
    inputs: str | list[str] | Tensor,
    *,
    method: Method | str = "gim",
    target=None,
    baseline: int | str | None = None,
    gim: GIMConfig | bool | dict | None = None,
    steps: int | None = None,
    ig_steps: int | None = None,
    quadrature: Quadrature | str = "gauss_legendre",
    batch_size: int = 32,
    attention_mask: Tensor | None = None,
    score_bos: bool = False,
    tokenizer=None,
    progress: bool = False,
    max_memory: int | str | None = None,
) -> Attribution:
    """Attribute a prediction to every input token.

    Args:
        model: a TransformerLens model (or a HuggingFace causal LM, wrapped once).
        inputs: a string, a list of strings (tokenised with the model's `to_tokens`, so BOS is
            prepended when the model does that, and left-padded with an attention mask), or
            token ids `[pos]` / `[batch, pos]`.
        method: `"gim"` (gradient × input under GIM, the default), `"gradient_x_input"`,
            `"integrated_gradients"` or `"feature_ablation"` (see
            [`gimlens.attribution.methods`][gimlens.attribution.methods]).
        target: `None` (the top prediction at the last real position), a token id, a string
            (`" Paris"`; several tokens make a continuation), one target per row (list or
            `[batch]` tensor), or a `TokenTarget` / `LogitDiff` / `Continuation`.
        baseline: the token every scored position is compared with: an id, a one-token string,
            or `None` for the token of `" "` (else pad, else unk).
        gim: GIM's rules for the gradient methods: a `GIMConfig`, `True` (defaults), `False`,
            or a dict of overrides. Default: on for `"gim"`, off otherwise.
        steps: integration steps of `integrated_gradients` (default 20).
        ig_steps: the same as `steps` (the name `circuits.attribute` uses); give one of them.
        quadrature: the integration rule (default Gauss-Legendre).
        batch_size: the most rows per forward pass (an integration step of a row is a row).
        attention_mask: `[batch, pos]` 0/1 for padded token ids; text inputs build their own.
        score_bos: also score a leading BOS token (compared with the baseline). By default BOS is
            its own baseline, so it scores 0 and faithfulness metrics never rank it.
        tokenizer: default `model.tokenizer`.
        progress: show a progress bar over the batches and print the memory estimate (stderr).
        max_memory: the memory the passes may add, in bytes or a size like `"4GB"`; the rows
            per pass are lowered until the estimate ([`gimlens.memory`][gimlens.memory]) fits.
            `None`: half the memory free on the model's device. The scores do not depend on it.

    Returns:
        An `Attribution` (scores `[batch, pos]`, or `[batch, n_targets, pos]` for a
        continuation; float32, on the CPU). Under `torchrun` (an initialised
        `torch.distributed` process group) each rank computes a contiguous block of rows and
        every rank returns the whole result.

    Raises:
        GimlensError: on bad arguments, or when not even one row fits `max_memory`.

    Examples:
        >>> from gimlens.attribution import attribute
        >>> from gimlens.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> attr = attribute(model, "The capital of France is", target=" Paris",
        ...                   method="integrated_gradients", steps=8)
        >>> attr.scores.shape, attr.delta.shape
        (torch.Size([1, 7]), torch.Size([1]))
    """
    method = as_method(method)
    spec = METHODS[method]
    config = _gim_config(method, spec, gim)
    if steps is not None and ig_steps is not None:
        raise GimlensError(f"give steps or ig_steps (the same setting), not both: {steps!r} and {ig_steps!r}")
    steps = _steps(method, spec, steps if ig_steps is None else ig_steps, quadrature)
    if max_memory is not None:
        parse_bytes(max_memory)  # validated before any work
    check_int("batch_size", batch_size, minimum=1)
    if not isinstance(score_bos, bool):
        raise GimlensError(f"score_bos must be True or False, got {score_bos!r}")
    model = as_bridge(model, tokenizer)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    vocab = int(model.cfg.d_vocab)

    prompt = prepare_prompt(model, inputs, attention_mask, tokenizer)
    baseline_id = resolve_baseline(baseline, tokenizer, vocab)
    resolved = resolve_target(as_target(target), tokenizer, prompt.tokens, prompt.mask, vocab)
    tokens, mask, index = with_continuation(prompt.tokens, prompt.mask, resolved.continuation)
    scored_prompt = prompt.real & (~prompt.bos if not score_bos else torch.ones_like(prompt.bos))
    scored = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, index, scored_prompt)
    base_tokens = torch.where(scored, torch.full_like(tokens, baseline_id), tokens)

    out = _run_sharded(
        method,
        Job(model, tokens, mask, base_tokens, resolved, config, steps, Quadrature(quadrature), batch_size,
            progress, max_memory, method.value),
    )
    B, T, P = tokens.shape[0], resolved.n_targets, prompt.tokens.shape[1]
    scores = out.scores.gather(2, index[:, None, :].expand(B, T, P))
    delta = out.delta
    if resolved.kind is not TargetKind.CONTINUATION:
        scores = scores[:, 0]
        delta = None if delta is None else delta[:, 0]

    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    run_config = {
        "baseline_token_id": baseline_id,
        "gim": None if config.is_off else dataclasses.asdict(config),
        "score_bos": score_bos,
    }
    if steps is not None:
        run_config.update(steps=steps, quadrature=Quadrature(quadrature).value)
    return Attribution(
        tokens=[[tokenizer.decode([i]) for i in row] for row in prompt.tokens.tolist()]
        if tokenizer is not None
        else [[str(i) for i in row] for row in prompt.tokens.tolist()],
        token_ids=cpu(prompt.tokens).long(),
        attention_mask=cpu(prompt.mask),
        scores=cpu(scores).float(),
        scored=cpu(scored_prompt),
        target=resolved.describe(tokenizer),
        target_ids=cpu(resolved.ids),
        contrast_ids=cpu(resolved.contrast),
        target_positions=cpu(resolved.positions),
        target_values=cpu(out.values).float(),
        method=method.value,
        config=run_config,
        delta=None if delta is None else cpu(delta).float(),
    )


def _run_sharded(method: Method, job: Job) -> MethodOutput:
    """Run `job`; under torch.distributed each rank takes a contiguous block of rows and the
    rows (and the top-prediction targets they fixed) are gathered back in order on every rank."""
    if world()[1] == 1:
        return run_method(method, job)
    own = shard_range(job.tokens.shape[0])
    rows = slice(own.start, own.stop)
    t = job.target
    part = dataclasses.replace(
        t, ids=t.ids[rows].clone(), positions=t.positions[rows],
        contrast=None if t.contrast is None else t.contrast[rows],
    )
    out = run_method(method, dataclasses.replace(
        job, tokens=job.tokens[rows], base_tokens=job.base_tokens[rows], target=part,
        mask=None if job.mask is None else job.mask[rows], progress=job.progress and is_main_process(),
    ))
    t.ids.copy_(all_gather_rows(part.ids))
    return MethodOutput(
        all_gather_rows(out.scores), all_gather_rows(out.values),
        None if out.delta is None else all_gather_rows(out.delta),
    )


def _gim_config(method: Method, spec, gim) -> GIMConfig:
    if not spec.gradients:
        if gim not in (None, False):
            raise GimlensError(f"{method.value} uses no gradients, so GIM does not apply; leave gim=None")
        return GIMConfig.off()
    if gim is None:
        return GIMConfig() if spec.gim_default else GIMConfig.off()
    config = GIMConfig.coerce(gim)
    if method is Method.GIM and config.is_off:
        raise GimlensError(
            "method 'gim' with every GIM rule off is plain gradient x input; use "
            "method='gradient_x_input' (or switch a rule on)"
        )
    return config


def _steps(method: Method, spec, steps, quadrature) -> int | None:
    if spec.default_steps is None:
        if steps is not None:
            raise GimlensError(f"steps applies to integrated_gradients only, not to {method.value}")
        return None
    steps = spec.default_steps if steps is None else steps
    nodes_and_weights(steps, quadrature)  # validates both
    return steps
