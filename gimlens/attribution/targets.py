"""What an attribution explains: a target token's logit, a logit difference, or a continuation.

Three frozen dataclasses describe targets; `resolve_target` turns one into tensors for a
batch (`ResolvedTarget`), and `with_continuation` builds the model input when the
target is a multi-token continuation (the continuation is appended after each row's last real
token and every continuation token's logit is read at the position that predicts it, as captum's
`LLMAttribution` does; only prompt tokens are scored).

Examples:
    >>> from gimlens.attribution.targets import LogitDiff, TokenTarget, as_target
    >>> as_target(" Paris")
    TokenTarget(token=' Paris', position=-1, readout=<Readout.LOGIT: 'logit'>)
    >>> from gimlens.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> ids = model.to_tokens("The capital of France is")
    >>> resolve_target(as_target(" Paris Berlin"), model.tokenizer, ids, None, 512).kind.value
    'continuation'
    >>> LogitDiff(" Paris", " Rome").contrast
    ' Rome'
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence, Union

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import GimlensError
from ..validation import check_int
from ..runtime import coerce_enum
from .gradients import resolve_positions

__all__ = [
    "Readout",
    "TokenTarget",
    "LogitDiff",
    "Continuation",
    "Target",
    "ResolvedTarget",
    "as_target",
    "resolve_target",
    "with_continuation",
]

TokenSpec = Union[None, int, str, Sequence, Tensor]


class Readout(str, Enum):
    """Which quantity of the output distribution is explained."""

    LOGIT = "logit"
    LOGPROB = "logprob"


class TargetKind(str, Enum):
    TOKEN = "token"
    LOGIT_DIFF = "logit_diff"
    CONTINUATION = "continuation"


@dataclass(frozen=True)
class TokenTarget:
    """The logit (or log-probability) of `token` at `position`.

    Args:
        token: `None` (the model's top prediction there), a token id, a string that is one
            token (`" Paris"`; a multi-token string makes `as_target` build a
            `Continuation`), or one per row (a list or a `[batch]` tensor).
        position: position of the logit, counting real tokens (`-1`: each row's last real
            token); an int or one per row.
        readout: `"logit"` or `"logprob"`.
    """

    token: TokenSpec = None
    position: int | Sequence[int] | Tensor = -1
    readout: Readout | str = Readout.LOGIT


@dataclass(frozen=True)
class LogitDiff:
    """`logit(token) − logit(contrast)` at `position` (`token=None`: the top prediction).

    The log-probability difference equals the logit difference, so there is no readout choice.
    """

    token: TokenSpec = None
    contrast: TokenSpec = None
    position: int | Sequence[int] | Tensor = -1


@dataclass(frozen=True)
class Continuation:
    """A multi-token continuation shared by all rows: one row of scores per continuation token
    (its logit or log-probability at the position that predicts it) plus their sum.

    Args:
        tokens: a string (tokenised without special tokens) or a sequence of token ids.
        readout: `"logit"` or `"logprob"` (summed log-probabilities = the sequence's).
    """

    tokens: str | Sequence[int] | Tensor
    readout: Readout | str = Readout.LOGIT


Target = Union[TokenTarget, LogitDiff, Continuation]


def as_target(spec) -> Target:
    """A target from shorthand: `None`, a token id, a string (a multi-token string resolves to
    a continuation), a per-row list or tensor, or a target object (returned as is)."""
    if isinstance(spec, (TokenTarget, LogitDiff, Continuation)):
        return spec
    return TokenTarget(token=spec)


@dataclass
class ResolvedTarget:
    """A target as tensors for a batch of `B` rows and `T` target tokens (`T > 1` only for
    continuations). `ids < 0` marks "the top prediction", fixed by `fill_argmax` or by the
    first evaluation on the clean input. `positions` index the model input."""

    kind: TargetKind
    readout: Readout
    ids: Int[Tensor, "batch n_targets"]
    positions: Int[Tensor, "batch n_targets"]
    contrast: Int[Tensor, "batch n_targets"] | None = None
    continuation: Int[Tensor, " n_targets"] | None = None

    @property
    def n_targets(self) -> int:
        return int(self.ids.shape[1])

    def pick(
        self,
        logits: Float[Tensor, "n pos vocab"],
        b: Int[Tensor, " m"],
        t: Int[Tensor, " m"],
        rows: Int[Tensor, " m"] | None = None,
    ) -> tuple[Float[Tensor, " m"], Int[Tensor, " m"]]:
        """The objective of target `t` of prompt row `b`, read from logits row `rows`
        (default: one logits row each), in float32 with gradient; and the token ids used (top
        predictions filled in from these logits)."""
        if rows is None:
            rows = torch.arange(logits.shape[0], device=logits.device)
        at = logits[rows, self.positions[b, t]].float()
        if self.readout is Readout.LOGPROB:
            at = at.log_softmax(-1)
        ids = self.ids[b, t]
        ids = torch.where(ids < 0, at.detach().argmax(-1), ids)
        value = at.gather(-1, ids[:, None]).squeeze(-1)
        if self.contrast is not None:
            value = value - at.gather(-1, self.contrast[b, t][:, None]).squeeze(-1)
        return value, ids

    def values(self, logits: Float[Tensor, "n pos vocab"], b: Int[Tensor, " n"]) -> Float[Tensor, "n n_targets"]:
        """Every target of prompt rows `b` at once: `[n, T]`."""
        n, T = logits.shape[0], self.n_targets
        rows = torch.arange(n, device=logits.device).repeat_interleave(T)
        tt = torch.arange(T, device=logits.device).repeat(n)
        value, _ = self.pick(logits, b.repeat_interleave(T), tt, rows)
        return rearrange(value, "(n t) -> n t", n=n)  # prompt-major, as built above

    def fill_argmax(self, logits: Float[Tensor, "n pos vocab"], b: Int[Tensor, " n"]) -> None:
        """Fix "top prediction" targets of prompt rows `b` from their clean logits."""
        T = self.n_targets
        if not bool((self.ids[b] < 0).any()):
            return
        rows = torch.arange(logits.shape[0], device=logits.device).repeat_interleave(T)
        bb, tt = b.repeat_interleave(T), torch.arange(T, device=logits.device).repeat(len(b))
        _, ids = self.pick(logits, bb, tt, rows)
        self.ids = self.ids.clone()
        self.ids[bb, tt] = ids

    def describe(self, tokenizer) -> dict:
        """A JSON-able description (token strings decoded with `tokenizer`)."""
        dec = (lambda i: _decode(tokenizer, i)) if tokenizer is not None else str
        out = {
            "kind": self.kind.value,
            "readout": self.readout.value,
            "tokens": [[dec(i) for i in row] for row in self.ids.tolist()],
        }
        if self.contrast is not None:
            out["contrast_tokens"] = [[dec(i) for i in row] for row in self.contrast.tolist()]
        return out


def resolve_target(
    target: Target,
    tokenizer,
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"] | None,
    vocab: int,
) -> ResolvedTarget:
    """Validate `target` against the batch and return it as tensors on `tokens`' device.

    Positions are those of the model input: for a continuation, of `with_continuation`'s.
    """
    batch, device = tokens.shape[0], tokens.device
    if isinstance(target, TokenTarget) and isinstance(target.token, str) and tokenizer is not None:
        if len(_encode(tokenizer, target.token)) > 1:  # a multi-token string is a continuation
            if not (isinstance(target.position, int) and target.position == -1):
                raise GimlensError(
                    f"target {target.token!r} is several tokens, i.e. a continuation after the last "
                    f"token; a position ({target.position!r}) applies only to one-token targets"
                )
            target = Continuation(target.token, readout=target.readout)
    if isinstance(target, Continuation):
        cont = _continuation_ids(target.tokens, tokenizer, vocab)
        T = cont.numel()
        positions = _row_ends(tokens, mask)[:, None] - 1 + torch.arange(T, device=device)[None, :]
        return ResolvedTarget(
            TargetKind.CONTINUATION,
            _readout(target.readout),
            cont.to(device)[None, :].expand(batch, T).clone(),
            positions,
            continuation=cont.to(device),
        )
    if not isinstance(target, (TokenTarget, LogitDiff)):
        raise GimlensError(
            f"target must be None, a token id, a string, a per-row list/tensor, or a TokenTarget, "
            f"LogitDiff or Continuation; got {type(target).__name__}"
        )
    positions = resolve_positions(target.position, tokens, mask)[:, None]
    ids = _per_row_ids(target.token, tokenizer, batch, vocab, "target", allow_none=True).to(device)
    if isinstance(target, LogitDiff):
        if target.contrast is None:
            raise GimlensError("LogitDiff needs a contrast token (an id or a one-token string)")
        contrast = _per_row_ids(target.contrast, tokenizer, batch, vocab, "contrast").to(device)
        return ResolvedTarget(TargetKind.LOGIT_DIFF, Readout.LOGIT, ids[:, None], positions, contrast[:, None])
    return ResolvedTarget(TargetKind.TOKEN, _readout(target.readout), ids[:, None], positions)


def with_continuation(
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"] | None,
    continuation: Int[Tensor, " n_targets"] | None,
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"] | None, Int[Tensor, "batch pos"]]:
    """The model input for a continuation target: its tokens but the last inserted after each
    row's last real token (padding keeps its side). Returns `(tokens, mask, index)` where
    `index[b, j]` is where prompt position `j` of row `b` went."""
    batch, pos = tokens.shape
    device = tokens.device
    index = torch.arange(pos, device=device).expand(batch, pos).clone()
    if continuation is None or continuation.numel() <= 1:
        return tokens, mask, index
    extra = continuation[:-1].to(device)
    n = extra.numel()
    ends = _row_ends(tokens, mask)
    index = index + n * (index >= ends[:, None]).long()
    out = torch.empty(batch, pos + n, dtype=tokens.dtype, device=device)
    out.scatter_(1, index, tokens)
    slots = ends[:, None] + torch.arange(n, device=device)[None, :]
    out.scatter_(1, slots, extra[None, :].expand(batch, n).to(tokens.dtype))
    new_mask = None
    if mask is not None:
        new_mask = torch.empty_like(out)
        new_mask.scatter_(1, index, mask)
        new_mask.scatter_(1, slots, torch.ones_like(slots))
    return out, new_mask, index


# ---------------------------------------------------------------------------------------------


def _row_ends(tokens: Tensor, mask: Tensor | None) -> Int[Tensor, " batch"]:
    """One past each row's last real position."""
    batch, pos = tokens.shape
    if mask is None:
        return torch.full((batch,), pos, device=tokens.device, dtype=torch.long)
    where = torch.arange(1, pos + 1, device=tokens.device)[None, :] * mask
    return where.max(-1).values.long()


def _readout(value) -> Readout:
    return coerce_enum(Readout, value, "readout")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _decode(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def _check_id(token_id, vocab: int, what: str) -> int:
    check_int(what, token_id, minimum=0, maximum=vocab - 1, note="a token id of the vocabulary")
    return token_id


def _one_token(spec, tokenizer, vocab: int, what: str) -> int:
    """A single token id from an int or a one-token string."""
    if isinstance(spec, Tensor) and spec.ndim == 0 and not spec.is_floating_point():
        spec = int(spec)
    if isinstance(spec, str):
        if tokenizer is None:
            raise GimlensError(f"{what} {spec!r} is a string but there is no tokenizer; pass token ids")
        ids = _encode(tokenizer, spec)
        if len(ids) != 1:
            raise GimlensError(
                f"{what} {spec!r} is {len(ids)} tokens for this tokenizer {ids}; expected exactly "
                "one token (a multi-token target string is a Continuation)"
            )
        return _check_id(int(ids[0]), vocab, f"{what} {spec!r}")
    return _check_id(spec, vocab, what)


def _per_row_ids(spec, tokenizer, batch: int, vocab: int, what: str, allow_none: bool = False) -> Tensor:
    """`[batch]` ids (`-1` = top prediction) from one spec or one per row."""
    if spec is None:
        if not allow_none:
            raise GimlensError(f"{what} is missing")
        return torch.full((batch,), -1, dtype=torch.long)
    if isinstance(spec, Tensor):
        if spec.is_floating_point() or spec.dtype == torch.bool:
            raise GimlensError(f"{what} must hold integer token ids, got dtype {spec.dtype}")
        if spec.ndim == 0:
            return torch.full((batch,), _one_token(spec, tokenizer, vocab, what), dtype=torch.long)
        spec = spec.tolist()
    if isinstance(spec, (list, tuple)):
        if len(spec) != batch:
            raise GimlensError(f"{what} has {len(spec)} entries; expected one per row ({batch})")
        return torch.tensor([_one_token(s, tokenizer, vocab, f"{what}[{i}]") for i, s in enumerate(spec)])
    return torch.full((batch,), _one_token(spec, tokenizer, vocab, what), dtype=torch.long)


def _continuation_ids(spec, tokenizer, vocab: int) -> Tensor:
    if isinstance(spec, str):
        if tokenizer is None:
            raise GimlensError("a string continuation needs a tokenizer; pass token ids")
        ids = _encode(tokenizer, spec)
    elif isinstance(spec, Tensor):
        if spec.is_floating_point() or spec.ndim != 1:
            raise GimlensError(f"continuation ids must be a 1-D integer tensor, got {spec.dtype} {tuple(spec.shape)}")
        ids = spec.tolist()
    elif isinstance(spec, (list, tuple)):
        ids = list(spec)
    else:
        raise GimlensError(f"a continuation is a string or a sequence of token ids, got {type(spec).__name__}")
    if not ids:
        raise GimlensError(f"the continuation {spec!r} is empty; expected at least one token")
    return torch.tensor([_check_id(i, vocab, "continuation token") for i in ids], dtype=torch.long)
