"""The result of [`attribute`][gimlens.attribution.attribute.attribute]: scores with their
tokens, target, method and config.

Tensors are the source of truth; JSON, figures and HTML are views built on demand.

Examples:
    >>> from gimlens.attribution import Attribution, attribute
    >>> from gimlens.testing import tiny_model
    >>> attr = attribute(tiny_model("llama"), "The capital of France is")
    >>> attr.scores.shape, attr.tokens[0][:2]
    (torch.Size([1, 7]), ['<|endoftext|>', 'T'])
    >>> Attribution.from_json(attr.to_json()) == attr
    True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import GimlensError
from ..runtime import atomic_write, read_text

__all__ = ["Attribution"]

_FORMAT = "gimlens.attribution/1"
_TENSORS = {  # field -> dtype of the stored tensor
    "token_ids": torch.long,
    "attention_mask": torch.long,
    "scores": torch.float32,
    "scored": torch.bool,
    "target_ids": torch.long,
    "contrast_ids": torch.long,
    "target_positions": torch.long,
    "target_values": torch.float32,
    "delta": torch.float32,
}


@dataclass(eq=False)
class Attribution:
    """Token attribution scores for a batch of prompts (all tensors on the CPU).

    Attributes:
        tokens: decoded prompt tokens, `[batch][pos]`.
        token_ids: `[batch, pos]` prompt token ids (left-padded for text batches).
        attention_mask: `[batch, pos]` 0/1, or `None` when nothing is padded.
        scores: `[batch, pos]`, or `[batch, n_targets, pos]` for a continuation; float32.
            Unscored positions (padding, BOS unless `score_bos`) are exactly 0.
        scored: `[batch, pos]` True where a position was replaced by the baseline.
        target: description: `kind` (token / logit_diff / continuation), `readout`,
            decoded target (and contrast) tokens.
        target_ids, contrast_ids: `[batch, n_targets]` token ids (contrast only for logit_diff).
        target_positions: `[batch, n_targets]` positions in the model input that the targets
            are read at (for continuations the input is the prompt plus the continuation).
        target_values: `[batch, n_targets]` the explained quantity `F(x)` on the input.
        method: the method's name.
        config: baseline token id, GIM config (`None` when off), steps, quadrature, ...
        delta: integrated gradients' completeness delta `|Σ a − (F(x) − F(x'))|`,
            `[batch]` (`[batch, n_targets]` for continuations); `None` for other methods.
    """

    tokens: list[list[str]]
    token_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"] | None
    scores: Float[Tensor, "batch pos"] | Float[Tensor, "batch n_targets pos"]
    scored: Bool[Tensor, "batch pos"]
    target: dict
    target_ids: Int[Tensor, "batch n_targets"]
    contrast_ids: Int[Tensor, "batch n_targets"] | None
    target_positions: Int[Tensor, "batch n_targets"]
    target_values: Float[Tensor, "batch n_targets"]
    method: str
    config: dict = field(default_factory=dict)
    delta: Tensor | None = None

    @property
    def is_continuation(self) -> bool:
        return self.target.get("kind") == "continuation"

    @property
    def seq(self) -> Float[Tensor, "batch pos"]:
        """Scores summed over a continuation's tokens (captum's `seq_attr`); else `scores`."""
        return self.scores.sum(1) if self.is_continuation else self.scores

    @property
    def baseline_token_id(self) -> int:
        return int(self.config["baseline_token_id"])

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def target_spec(self):
        """A target object that resolves to exactly these targets (for another method on the
        same inputs: `attribute(model, a.token_ids, attention_mask=a.attention_mask,
        target=a.target_spec(), baseline=a.baseline_token_id)`)."""
        from .targets import Continuation, LogitDiff, TokenTarget

        kind, readout = self.target.get("kind"), self.target.get("readout", "logit")
        if kind == "continuation":
            return Continuation(self.target_ids[0].tolist(), readout=readout)
        pos = self.target_positions[:, 0]
        if self.attention_mask is not None:  # positions count real tokens
            pos = (self.attention_mask.cumsum(-1) - 1).gather(1, pos[:, None])[:, 0]
        if kind == "logit_diff":
            return LogitDiff(self.target_ids[:, 0], self.contrast_ids[:, 0], position=pos)
        return TokenTarget(self.target_ids[:, 0], position=pos, readout=readout)

    def describe_target(self, row: int = 0) -> str:
        """A one-line human description of row `row`'s target."""
        toks = self.target.get("tokens", [[]])[row]
        readout = self.target.get("readout", "logit")
        kind = self.target.get("kind")
        if kind == "continuation":
            return f"{readout} of the continuation {''.join(toks)!r}"
        if kind == "logit_diff":
            return f"logit({toks[0]!r}) − logit({self.target['contrast_tokens'][row][0]!r})"
        return f"{readout} of {toks[0]!r}"

    # --- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        out = {"format": _FORMAT}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, Tensor) else v
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Attribution":
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise GimlensError(
                f"not a gimlens attribution: expected a JSON object with format {_FORMAT!r}"
            )
        kwargs = {}
        for f in fields(cls):
            if f.name not in data:
                raise GimlensError(f"attribution JSON lacks the field {f.name!r}")
            v = data[f.name]
            if f.name in _TENSORS and v is not None:
                v = torch.tensor(v, dtype=_TENSORS[f.name])
            kwargs[f.name] = v
        return cls(**kwargs)

    def to_json(self, *, indent: int | None = None) -> str:
        """The JSON text (exact round trip through [`from_json`][gimlens.attribution.result.Attribution.from_json])."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Attribution":
        """Inverse of [`to_json`][gimlens.attribution.result.Attribution.to_json]."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise GimlensError(f"attribution JSON does not parse: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike, *, indent: int | None = None) -> Path:
        """Write the JSON to `path` atomically (complete or not at all; the folder must exist).

        Examples:
            >>> import os, tempfile
            >>> from gimlens.attribution import attribute
            >>> from gimlens.testing import tiny_model
            >>> a = attribute(tiny_model("gpt2"), "Hello there")
            >>> path = a.save(os.path.join(tempfile.mkdtemp(), "a.json"))
            >>> Attribution.load(path) == a
            True
        """
        return atomic_write(path, self.to_json(indent=indent))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Attribution":
        """Read a file written by [`save`][gimlens.attribution.result.Attribution.save]."""
        return cls.from_json(read_text(path, "attribution file"))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Attribution):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, Tensor) or isinstance(b, Tensor):
                if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
                    return False
                if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    # --- views -----------------------------------------------------------------------------

    def plot(self, row: int | None = None, **kwargs):
        """A matplotlib `Figure`: a signed heatmap over the tokens (one strip per row), or a
        target × input matrix for a continuation. See
        [`plot_attribution`][gimlens.plot.plot_attribution]."""
        from ..plot import plot_attribution

        return plot_attribution(self, row=row, **kwargs)

    def _repr_html_(self) -> str:
        from ..plot import attribution_html

        return attribution_html(self)
