"""Attribution methods, one function each, behind one registry (`METHODS`).

Every method gets a `Job` (the model input, the baseline token of every position, the
resolved target) and returns a `MethodOutput` with scores `[batch, n_targets, seq]`:

- `gradient_x_input`: `grad_i · (e_i − e'_i)` summed over `d_model`; with `gim` on this is
  GIM (the `gim` method is this one with GIM's defaults).
- `integrated_gradients`: `(e_i − e'_i) · Σ_s w_s grad(e' + α_s (e − e'))_i` with quadrature
  nodes `α_s` and weights `w_s` (Gauss-Legendre by default); every step of every row is one
  row of a batched forward and backward. The completeness delta `|Σ_i a_i − (F(x) − F(x'))|`
  is returned per row.
- `feature_ablation`: leave-one-out, `F(x) − F(x with token i replaced by the baseline)`,
  all replacements in batched no-grad forwards.

Positions whose baseline is their own token (BOS unless scored, padding, continuation tokens)
score exactly 0 in every method.

Examples:
    >>> from gimlens.attribution.methods import Method, known_methods
    >>> Method("gim").value, known_methods()
    ('gim', 'gradient_x_input, gim, integrated_gradients, feature_ablation')
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..validation import coerce_enum
from ..distributed import is_main_process
from ..gim import GIMConfig
from ..memory import PassKind, fit_rows, row_bytes
from ..quadrature import Quadrature, nodes_and_weights
from ..runtime import prepared, progress, run_hooked
from .gradients import embedding_gradients, token_embeddings
from .targets import ResolvedTarget

__all__ = ["Method", "Job", "MethodOutput", "METHODS", "known_methods", "run_method"]


class Method(str, Enum):
    """The attribution methods (their values are the names users pass)."""

    GRADIENT_X_INPUT = "gradient_x_input"
    GIM = "gim"
    INTEGRATED_GRADIENTS = "integrated_gradients"
    FEATURE_ABLATION = "feature_ablation"


@dataclass
class Job:
    """What a method needs. `base_tokens` equals `tokens` wherever a position is not scored."""

    model: object
    tokens: Int[Tensor, "batch seq"]
    mask: Int[Tensor, "batch seq"] | None
    base_tokens: Int[Tensor, "batch seq"]
    target: ResolvedTarget
    gim: GIMConfig
    steps: int | None
    quadrature: Quadrature
    batch_size: int
    progress: bool = False
    max_memory: int | str | None = None  # None: a share of the device's free memory
    method: str = "attribution"  # named in the memory estimate


@dataclass
class MethodOutput:
    scores: Float[Tensor, "batch n_targets seq"]
    values: Float[Tensor, "batch n_targets"]  # the objective on the input, F(x)
    delta: Float[Tensor, "batch n_targets"] | None = None


@dataclass(frozen=True)
class MethodSpec:
    run: Callable[[Job], MethodOutput]
    gradients: bool  # whether GIM applies
    gim_default: bool  # GIM on unless the caller says otherwise
    default_steps: int | None  # None: the method takes no steps


def known_methods() -> str:
    return ", ".join(m.value for m in Method)


def as_method(name) -> Method:
    return coerce_enum(Method, name, "attribution method")


def run_method(method: Method, job: Job) -> MethodOutput:
    spec = METHODS[method]
    kind = PassKind.GRADIENTS if spec.gradients else PassKind.FORWARD
    # the heaviest row first: a budget too small for it fails before any pass runs
    fit_rows(f"{job.method} ({'gradients' if spec.gradients else 'forwards'})",
             per_row=row_bytes(job.model, job.tokens.shape[1], kind, gim=not job.gim.is_off),
             n_rows=1, max_memory=job.max_memory, device=job.tokens.device)
    return spec.run(job)


# ---------------------------------------------------------------------------------------------


def _gradient_x_input(job: Job) -> MethodOutput:
    one = torch.ones(1, dtype=torch.float64)
    scores, values = _path_gradients(job, one, one)
    return MethodOutput(scores, values)


def _integrated_gradients(job: Job) -> MethodOutput:
    assert job.steps is not None
    B = job.tokens.shape[0]
    rows = torch.arange(B, device=job.tokens.device)
    both = torch.cat([job.tokens, job.base_tokens])
    mask = None if job.mask is None else torch.cat([job.mask, job.mask])
    logits_rows = torch.cat([rows, rows])
    # F(x) fixes top-prediction targets; F(x') is the model on the baseline tokens (replacing
    # embeddings at hook_embed by the baseline's is the same as feeding the baseline tokens).
    out = _forward_values(job, both, mask, logits_rows, first_is_clean=B)
    clean, base = out[:B], out[B:]
    alpha, weights = nodes_and_weights(job.steps, job.quadrature, dtype=torch.float64)
    scores, _ = _path_gradients(job, alpha, weights)
    delta = (scores.sum(-1) - (clean - base)).abs()
    return MethodOutput(scores, clean, delta)


def _feature_ablation(job: Job) -> MethodOutput:
    tokens, base = job.tokens, job.base_tokens
    B, S = tokens.shape
    rows = torch.arange(B, device=tokens.device)
    clean = _forward_values(job, tokens, job.mask, rows, first_is_clean=B)
    b, i = (tokens != base).nonzero(as_tuple=True)  # positions that change; others score 0
    variants = tokens[b].clone()
    variants[torch.arange(len(b), device=tokens.device), i] = base[b, i]
    mask = None if job.mask is None else job.mask[b]
    ablated = _forward_values(job, variants, mask, b)
    scores = torch.zeros(B, job.target.n_targets, S, dtype=torch.float32, device=tokens.device)
    scores[b, :, i] = clean[b] - ablated
    return MethodOutput(scores, clean)


METHODS: dict[Method, MethodSpec] = {
    Method.GRADIENT_X_INPUT: MethodSpec(_gradient_x_input, gradients=True, gim_default=False, default_steps=None),
    Method.GIM: MethodSpec(_gradient_x_input, gradients=True, gim_default=True, default_steps=None),
    Method.INTEGRATED_GRADIENTS: MethodSpec(_integrated_gradients, gradients=True, gim_default=False, default_steps=20),
    Method.FEATURE_ABLATION: MethodSpec(_feature_ablation, gradients=False, gim_default=False, default_steps=None),
}


# ---------------------------------------------------------------------------------------------


def _chunks(job: Job, n: int, kind: PassKind, desc: str) -> Iterator[slice]:
    """Slices of `n` rows, as many per pass as the memory budget and `batch_size` allow."""
    show = job.progress and is_main_process()
    plan = fit_rows(
        f"{job.method} ({desc})", per_row=row_bytes(job.model, job.tokens.shape[1], kind, gim=not job.gim.is_off),
        n_rows=n, max_memory=job.max_memory, device=job.tokens.device, upper=job.batch_size,
        show=show,
    )
    starts = range(0, n, plan.rows)
    with progress(len(starts), show=show and len(starts) > 1, desc=desc, unit="batch") as bar:
        for s in starts:
            yield slice(s, min(s + plan.rows, n))
            bar.update(1)


def _path_gradients(
    job: Job, alpha: Float[Tensor, " steps"], weights: Float[Tensor, " steps"]
) -> tuple[Float[Tensor, "batch n_targets seq"], Float[Tensor, "batch n_targets"]]:
    """`Σ_s w_s grad(e' + α_s (e − e')) · (e − e')` for every (row, target); each (step, row,
    target) is one row of a batched forward+backward. Also returns the objective at the last
    chunk's points (`F(x)` when `alpha == [1]`) and fills top-prediction targets."""
    model, target, device = job.model, job.target, job.tokens.device
    B, S = job.tokens.shape
    T = target.n_targets
    emb = token_embeddings(model, job.tokens)
    diff = emb - token_embeddings(model, job.base_tokens)
    steps = len(alpha)
    alpha, weights = alpha.to(device), weights.to(device)
    # job j -> (step s, flat row r = b*T + t)
    n_jobs = steps * B * T
    scores = torch.zeros(B * T, S, dtype=torch.float32, device=device)
    values = torch.zeros(B * T, dtype=torch.float32, device=device)
    ids = target.ids.clone().view(-1)
    for sl in _chunks(job, n_jobs, PassKind.GRADIENTS, "gradients"):
        j = torch.arange(sl.start, sl.stop, device=device)
        s, r = j // (B * T), j % (B * T)
        b, t = r // T, r % T
        a = alpha[s].to(emb.dtype)[:, None, None]
        embeds = emb[b] - (1 - a) * diff[b]  # e' + a (e − e'), exact at a = 1
        picked: list[Tensor] = []

        def objective(logits, b=b, t=t, picked=picked):
            value, chosen = target.pick(logits, b, t)
            picked.append(chosen)
            return value

        mask = None if job.mask is None else job.mask[b]
        grads, _, vals = embedding_gradients(
            model, job.tokens[b], objective, embeds=embeds, attention_mask=mask, gim=job.gim
        )
        contrib = (grads.float() * diff[b].float()).sum(-1) * weights[s].float()[:, None]
        scores.index_add_(0, r, contrib)
        values[r] = vals.float()
        ids[r] = picked[0]
        del grads, _  # the pass's logits: not alive during the next pass
    target.ids = ids.view(B, T)
    return scores.view(B, T, S), values.view(B, T)


def _forward_values(
    job: Job,
    tokens: Int[Tensor, "n seq"],
    mask: Int[Tensor, "n seq"] | None,
    rows: Int[Tensor, " n"],
    first_is_clean: int = 0,
) -> Float[Tensor, "n n_targets"]:
    """Every target's objective for each input row (no gradient), in batches. The first
    `first_is_clean` rows must be the clean prompts in order: they fix top-prediction targets."""
    model = job.model
    out = torch.empty(tokens.shape[0], job.target.n_targets, dtype=torch.float32, device=tokens.device)
    with prepared(model), torch.no_grad():
        for sl in _chunks(job, tokens.shape[0], PassKind.FORWARD, "forwards"):
            logits = run_hooked(model, tokens[sl], attention_mask=None if mask is None else mask[sl])
            if sl.start < first_is_clean:  # clean rows come first, so before any row that needs them
                k = min(sl.stop, first_is_clean) - sl.start
                job.target.fill_argmax(logits[:k], rows[sl][:k])
            out[sl] = job.target.values(logits, rows[sl])
            del logits  # not alive during the next pass
    return out
