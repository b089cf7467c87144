"""Faithfulness of token attributions: comprehensiveness, sufficiency, agreement with ablation.

The protocol of the GIM paper (Edin et al. 2025, arXiv:2505.17630; its evaluation script
`src/evaluation/evaluate_feature_attributions.py` and `results/aopc_table.py`), per row:

- **Ranking.** Positions are sorted by their signed score, most positive first. The first and the
  last real position are never ranked (nor padding, nor an unscored BOS); `n` positions remain.
- **Comprehensiveness.** For `k = 1 .. K` with `K = min(max_k, n)` (`max_k = 50`), the top
  `k` positions (cumulative) are replaced by the baseline token and the model is rerun;
  `c_k = (F(x) − F(x_k)) / F(x)` with `F` the explained quantity (the target logit).
  Comprehensiveness is the mean of `c_k` over `k = 1 .. K` (`short_rows="cap"`, the
  default). The paper's script fills `c_k = 0` for `k > n` and averages over all 50 entries;
  `short_rows="zero_fill"` reproduces that (it shrinks short prompts' values by `K / 50`).
  Higher is better.
- **Sufficiency.** For each `r` in `{0.5, 0.8, 0.9, 0.95, 0.99}` the `int(r · n)` least
  important positions are replaced; `s_r = (F(x) − F(x_r)) / F(x)`, averaged over `r`.
  Lower is better.
- A data set's value is the mean over rows (`AttributionFaithfulness.summary`).

Dividing by `F(x)` follows the paper; it is unstable when the target logit is near zero or
negative (e.g. a logit difference), so the per-row values and `F(x)` are returned as well.

`ablation_agreement` adds the Spearman rank correlation between an attribution and
leave-one-out ablation (`feature_ablation` of [`gimlens.attribution.methods`][gimlens.attribution.methods])
over the scored positions, per row. All model runs are batched no-grad forwards, as many rows per
pass as `max_memory` allows ([`gimlens.memory`][gimlens.memory]); the model is left as found.
(`circuits.faithfulness` is the other faithfulness: of a circuit, not of a token attribution.)

Examples:
    >>> from gimlens.attribution import attribute
    >>> from gimlens.evaluate import attribution_faithfulness
    >>> from gimlens.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> attr = attribute(model, "When Mary and John went to the store, John gave a drink to")
    >>> f = attribution_faithfulness(model, attr)
    >>> sorted(f.summary())
    ['comprehensiveness', 'sufficiency']
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .attribution import Attribution, attribute
from .attribution.inputs import model_device
from .attribution.targets import Readout, ResolvedTarget, TargetKind, with_continuation
from .distributed import all_reduce_sum, is_main_process, shard_range
from .errors import GimlensError
from .validation import check_int
from .memory import PassKind, fit_rows, row_bytes
from .runtime import coerce_enum, parse_bytes, prepared, progress as progress_bar, require_lens_model, run_hooked

__all__ = [
    "SUFFICIENCY_RATIOS",
    "ShortRows",
    "AttributionFaithfulness",
    "attribution_faithfulness",
    "ablation_agreement",
    "rankable_positions",
    "spearman",
]

#: Fractions of the least important tokens replaced for sufficiency (the paper's).
SUFFICIENCY_RATIOS: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)


class ShortRows(str, Enum):
    """How comprehensiveness treats `k` beyond a row's number of rankable tokens."""

    CAP = "cap"  # average over k = 1 .. min(max_k, n)
    ZERO_FILL = "zero_fill"  # the paper's script: c_k = 0 for k > n, average over max_k


@dataclass
class AttributionFaithfulness:
    """Per-row faithfulness values (rows: `[batch]`, or `[batch, n_targets]` flattened to
    `batch · n_targets` for continuations, target-major within a row).

    Attributes:
        comprehensiveness: `[rows]` (higher is better).
        sufficiency: `[rows]` (lower is better).
        comprehensiveness_curve: `[rows, max_k]`, `c_k`; NaN for `k > n`.
        sufficiency_curve: `[rows, len(ratios)]`, `s_r`.
        original: `[rows]` `F(x)`, the explained quantity on the unchanged input.
        n_rankable: `[rows]` number of ranked positions `n`.
    """

    comprehensiveness: Float[Tensor, " rows"]
    sufficiency: Float[Tensor, " rows"]
    comprehensiveness_curve: Float[Tensor, "rows max_k"]
    sufficiency_curve: Float[Tensor, "rows n_ratios"]
    original: Float[Tensor, " rows"]
    n_rankable: Int[Tensor, " rows"]
    ratios: tuple[float, ...]
    max_k: int
    short_rows: str

    def summary(self) -> dict[str, float]:
        """Means over rows (rows without rankable tokens are left out)."""
        return {
            "comprehensiveness": float(torch.nanmean(self.comprehensiveness.double())),
            "sufficiency": float(torch.nanmean(self.sufficiency.double())),
        }


def rankable_positions(attribution: Attribution) -> Bool[Tensor, "batch pos"]:
    """Scored positions without each row's first and last real position."""
    a = attribution
    real = torch.ones_like(a.scored) if a.attention_mask is None else a.attention_mask.bool()
    idx = torch.arange(real.shape[1])[None, :].expand_as(real)
    first = torch.where(real, idx, real.shape[1]).min(-1).values
    last = torch.where(real, idx, -1).max(-1).values
    return a.scored & real & (idx != first[:, None]) & (idx != last[:, None])


def attribution_faithfulness(
    model,
    attribution: Attribution,
    *,
    max_k: int = 50,
    ratios: Sequence[float] = SUFFICIENCY_RATIOS,
    short_rows: ShortRows | str = ShortRows.CAP,
    batch_size: int = 64,
    progress: bool = False,
    max_memory: int | str | None = None,
) -> AttributionFaithfulness:
    """Comprehensiveness and sufficiency of `attribution` (made on `model`) by the GIM
    paper's protocol (see the module docstring); every replacement in batched forwards.

    Args:
        model: the TransformerLens model the attribution was computed on.
        attribution: any method's `Attribution`.
        max_k: largest number of top tokens replaced for comprehensiveness.
        ratios: fractions of least important tokens replaced for sufficiency.
        short_rows: `"cap"` or `"zero_fill"` (the paper's script), see `ShortRows`.
        batch_size: the most rows per forward pass.
        progress: a progress bar over the batches and the memory estimate (stderr).
        max_memory: bytes or a size like `"4GB"` the passes may add (rows per pass lowered to
            fit); `None`: half the memory free on the model's device.

    Returns:
        An `AttributionFaithfulness` with per-row values.

    Raises:
        GimlensError: on bad arguments, or when not even one variant fits `max_memory`.
    """
    short_rows = coerce_enum(ShortRows, short_rows, "short_rows")
    if max_memory is not None:
        parse_bytes(max_memory)
    check_int("max_k", max_k, minimum=1)
    ratios = tuple(float(r) for r in ratios)
    if not ratios or not all(0.0 <= r <= 1.0 for r in ratios):
        raise GimlensError(f"ratios must be fractions in [0, 1], got {ratios!r}")
    _check_batch_size(batch_size)
    a = _check(model, attribution)
    B, P = a.token_ids.shape
    T = int(a.target_ids.shape[1])
    scores = a.scores if a.is_continuation else a.scores[:, None, :]  # [B, T, P]
    rankable = rankable_positions(a)

    # One variant = a set of prompt positions replaced, for one (row, target).
    keep_rows, keep_t, replaced = [], [], []
    spans = []  # per (b, t): (start of comprehensiveness variants, K, start of sufficiency, n)
    for b in range(B):
        cand = rankable[b].nonzero()[:, 0]
        for t in range(T):
            s = scores[b, t, cand]
            order = cand[torch.sort(s, descending=True, stable=True).indices]
            n = len(order)
            K = min(max_k, n)
            start = len(replaced)
            for k in range(1, K + 1):
                replaced.append(order[:k])
            s_start = len(replaced)
            for r in ratios:
                m = int(r * n)
                replaced.append(order[n - m:] if m else order[:0])
            replaced.append(order[:0])  # the original input
            keep_rows += [b] * (len(replaced) - start)
            keep_t += [t] * (len(replaced) - start)
            spans.append((start, K, s_start, n))

    # Identical replacements of a row (e.g. sufficiency ratios that round to the same count, or
    # the targets of a continuation) share one forward.
    unique: dict[tuple, int] = {}
    slot = [unique.setdefault((b, tuple(sorted(p.tolist()))), len(unique)) for b, p in zip(keep_rows, replaced)]
    u_rows = torch.tensor([key[0] for key in unique], dtype=torch.long)
    variants = a.token_ids[u_rows].clone()
    for u, (_, pos) in enumerate(unique):
        variants[u, list(pos)] = a.baseline_token_id
    all_targets = _variant_values(model, a, variants, u_rows, batch_size, progress, max_memory)
    values = all_targets[torch.tensor(slot), torch.tensor(keep_t, dtype=torch.long)]

    n_ratios = len(ratios)
    comp = torch.full((B * T,), float("nan"), dtype=torch.float64)
    suff = torch.full((B * T,), float("nan"), dtype=torch.float64)
    comp_curve = torch.full((B * T, max_k), float("nan"), dtype=torch.float64)
    suff_curve = torch.full((B * T, n_ratios), float("nan"), dtype=torch.float64)
    original = torch.empty(B * T, dtype=torch.float64)
    n_rank = torch.empty(B * T, dtype=torch.long)
    for row, (start, K, s_start, n) in enumerate(spans):
        f = values[s_start + n_ratios]
        original[row], n_rank[row] = f, n
        c = (f - values[start: start + K]) / f
        s = (f - values[s_start: s_start + n_ratios]) / f
        comp_curve[row, :K] = c
        suff_curve[row] = s
        if K:
            comp[row] = c.mean() if short_rows is ShortRows.CAP else c.sum() / max_k
            suff[row] = s.mean()
    shape = (B, T) if a.is_continuation else (B,)
    return AttributionFaithfulness(
        comprehensiveness=comp.view(shape),
        sufficiency=suff.view(shape),
        comprehensiveness_curve=comp_curve,
        sufficiency_curve=suff_curve,
        original=original.view(shape),
        n_rankable=n_rank.view(shape),
        ratios=ratios,
        max_k=max_k,
        short_rows=short_rows.value,
    )


def ablation_agreement(
    model,
    attribution: Attribution,
    *,
    reference: Attribution | None = None,
    batch_size: int = 64,
    progress: bool = False,
    max_memory: int | str | None = None,
) -> Float[Tensor, " rows"]:
    """Spearman rank correlation between `attribution` and leave-one-out ablation, per row
    (`[batch]`, or `[batch, n_targets]`), over the scored positions; NaN where fewer than two
    positions are scored or either side is constant.

    Args:
        reference: a `feature_ablation` attribution of the same inputs and targets (computed
            here when `None`; pass it to share one across methods).
        batch_size, progress, max_memory: as for `attribution_faithfulness`, for the
            reference's forwards.
    """
    _check_batch_size(batch_size)
    a = _check(model, attribution)
    if reference is None:
        reference = attribute(
            model,
            a.token_ids.to(model_device(model)),
            attention_mask=None if a.attention_mask is None else a.attention_mask.to(model_device(model)),
            method="feature_ablation",
            target=a.target_spec(),
            baseline=a.baseline_token_id,
            score_bos=bool(a.config.get("score_bos", False)),
            batch_size=batch_size,
            progress=progress,
            max_memory=max_memory,
        )
    if not (
        torch.equal(reference.token_ids, a.token_ids)
        and torch.equal(reference.target_ids, a.target_ids)
        and reference.scores.shape == a.scores.shape
    ):
        raise GimlensError(
            "the reference attribution must be of the same inputs and targets as the attribution "
            f"(token ids {tuple(reference.token_ids.shape)} vs {tuple(a.token_ids.shape)})"
        )
    scores = a.scores if a.is_continuation else a.scores[:, None, :]
    ref = reference.scores if reference.is_continuation else reference.scores[:, None, :]
    B, T, _ = scores.shape
    out = torch.full((B, T), float("nan"), dtype=torch.float64)
    for b in range(B):
        where = a.scored[b] & reference.scored[b]
        for t in range(T):
            out[b, t] = spearman(scores[b, t, where], ref[b, t, where])
    return out if a.is_continuation else out[:, 0]


def spearman(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> Float[Tensor, ""]:
    """Spearman's rank correlation (ties get their average rank); NaN if undefined.

    Examples:
        >>> import torch
        >>> float(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])))
        0.5
    """
    if x.shape != y.shape or x.ndim != 1:
        raise GimlensError(f"spearman needs two 1-D tensors of one length, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() < 2:
        return torch.tensor(float("nan"), dtype=torch.float64)
    rx, ry = _average_ranks(x.double()), _average_ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    if float(denom) == 0.0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (rx * ry).sum() / denom


# ---------------------------------------------------------------------------------------------


def _average_ranks(v: Tensor) -> Tensor:
    values, order = torch.sort(v, stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # 1-based average rank of each tie group
    ranks = torch.empty_like(v)
    ranks[order] = mean_rank[inverse]
    return ranks


def _check_batch_size(batch_size) -> None:
    check_int("batch_size", batch_size, minimum=1)


def _check(model, attribution) -> Attribution:
    if not isinstance(attribution, Attribution):
        raise GimlensError(f"expected a gimlens Attribution, got {type(attribution).__name__}")
    require_lens_model(model)
    vocab = int(model.cfg.d_vocab)
    top = max(int(attribution.token_ids.max()), int(attribution.target_ids.max()), attribution.baseline_token_id)
    if top >= vocab:
        raise GimlensError(
            f"the attribution holds token id {top}, outside this model's vocabulary [0, {vocab}); "
            "evaluate it with the model it was computed on"
        )
    return attribution


def _resolved(a: Attribution, device) -> ResolvedTarget:
    kind = TargetKind(a.target["kind"])
    return ResolvedTarget(
        kind,
        Readout(a.target.get("readout", "logit")),
        a.target_ids.to(device),
        a.target_positions.to(device),
        None if a.contrast_ids is None else a.contrast_ids.to(device),
        a.target_ids[0].to(device) if kind is TargetKind.CONTINUATION else None,
    )


def _variant_values(model, a, variants, rows, batch_size, show, max_memory) -> Tensor:
    """Every target's objective on each variant of prompt row `rows`: `[n, T]` float64, CPU."""
    device = model_device(model)
    target = _resolved(a, device)
    variants, rows = variants.to(device), rows.to(device)
    mask = None if a.attention_mask is None else a.attention_mask.to(device)[rows]
    tokens, mask, _ = with_continuation(variants, mask, target.continuation)
    out = torch.zeros(len(variants), target.n_targets, dtype=torch.float64)
    own = shard_range(len(variants))  # under torch.distributed: this rank's block of variants
    show = show and is_main_process()
    plan = fit_rows(
        "attribution_faithfulness", per_row=row_bytes(model, tokens.shape[1], PassKind.FORWARD),
        n_rows=own.stop - own.start, max_memory=max_memory, device=device, upper=batch_size,
        show=show,
    )
    starts = range(own.start, own.stop, plan.rows)
    with prepared(model), torch.no_grad(), progress_bar(
        len(starts), show=show and len(starts) > 1, desc="faithfulness", unit="batch"
    ) as bar:
        for s in starts:
            sl = slice(s, min(s + plan.rows, own.stop))
            logits = run_hooked(model, tokens[sl], attention_mask=None if mask is None else mask[sl])
            out[sl] = target.values(logits, rows[sl]).double().cpu()
            del logits  # not alive during the next pass
            bar.update(1)
    return all_reduce_sum(out)  # each variant was computed by exactly one rank
