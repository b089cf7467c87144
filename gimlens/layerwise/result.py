"""Results of layer-wise IG: dense tensors, a JSON view (with LIG 0.1.0's fields) and heatmaps.

JSON schema (`LayerwiseResult.to_json`; `format` = `"gimlens.layerwise"`, `version` 1).
Matrices are nested lists; `T` tokens, `H` heads, `d` = d_model:

```text
    {"format": "gimlens.layerwise", "version": 1,
     "text": str | null, "model": str | null, "tokens": [T str], "token_ids": [T int],
     "config": {"num_steps": int, "quadrature": str, "granularity": ["layer"|"att"|"mlp"],
                "baseline": {granularity: name}, "baseline_layer"/"baseline_att"/"baseline_mlp": name,
                "layers": [int], "target_tokens": [0..T-1], "target_head": null,
                "head_scores": "own"|"shared", "gim": {GIMConfig fields} | null,
                "include_residual_connection": true},
     "layers": {"<l>": {
         "layer_idx": l,
         "z2z": {... layer: "matrix" [T src][T tgt] ...},
         "z2u": {... att: "matrix" = whole attention output [T][T], "heads" [H][T][T] ...},
         "u2z": {... mlp: "matrix" [T tgt][d] ...},
         each with "baseline", "description", "shape",
             "completeness": {"total": [T], "error": [T]
                              (+ att own: "head_total": [H][T], "head_error": [H][T])},
         "z2z" also "token_to_token" (LIG: per target, labelled source values),
         "targets": {"<j>": {"target_token_idx": j, "target_token": str,
             "z2u": {"baseline", "description",
                     "heads": {"<h>": {"contributions": [T src], "token_l2_norm": float}}},
             "u2z": {"baseline", "description", "contributions": [d], "l2_total": float,
                     "completeness": {"error", "mean_abs_error", "max_abs_error"}}}}}}}
```

`total[j]` is `||Φ_j(z) - Φ_j(z')||` (for the ratio baselines the input-token one, which
their columns keep) and `error[j]` the column sum minus it. `z2z`/`z2u`/`u2z` and the
`targets` section follow LIG 0.1.0's `explain()` output; `LayerwiseResult.from_json`
reads the dense fields back.

Examples:
    >>> import torch
    >>> from gimlens.layerwise.boundaries import Granularity
    >>> from gimlens.layerwise.baselines import Baseline
    >>> f = Flow(0, Granularity.LAYER, Baseline.ZERO, torch.eye(2), torch.ones(2))
    >>> r = LayerwiseResult(["a", "b"], [1, 2], {(0, Granularity.LAYER): f}, steps=8)
    >>> LayerwiseResult.from_json(r.to_json()).flow(0, "layer").matrix.tolist()
    [[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import GimlensError
from ..validation import coerce_enum
from ..gim import GIMConfig
from ..runtime import atomic_write, read_text
from .baselines import Baseline
from .boundaries import Granularity, HeadScores

__all__ = ["Flow", "LayerwiseResult"]

FORMAT, VERSION = "gimlens.layerwise", 1
#: granularity -> LIG's JSON key and description
_LIG = {
    Granularity.LAYER: ("z2z", "Layer-whole IG (z -> z), L2-scalarized"),
    Granularity.ATT: ("z2u", "ATT IG (z -> u), per-head token scores, L2-scalarized"),
    Granularity.MLP: ("u2z", "MLP IG (u -> z), per hidden dimension, L2-scalarized"),
}


@dataclass(frozen=True)
class Flow:
    """One layer at one granularity.

    Attributes:
        matrix: `layer`/`att`: `[source, target]` (`att`: the whole attention output);
            `mlp`: `[target, d_model]`.
        total: `[target]`, `||Φ_j(z) - Φ_j(z')||`, what each column should sum to.
        heads: `att` only, `[head, source, target]`.
        head_total: `att` with `head_scores="own"`: `[head, target]`.
    """

    layer: int
    granularity: Granularity
    baseline: Baseline
    matrix: Float[Tensor, "a b"]
    total: Float[Tensor, " tgt"]
    heads: Float[Tensor, "head src tgt"] | None = None
    head_total: Float[Tensor, "head tgt"] | None = None

    @property
    def completeness_error(self) -> Float[Tensor, " tgt"]:
        """Per target: sum of its attributions minus `total`."""
        axis = 1 if self.granularity is Granularity.MLP else 0
        return self.matrix.sum(axis) - self.total

    @property
    def head_completeness_error(self) -> Float[Tensor, "head tgt"] | None:
        """`att` with own head scores: per head and target, column sum minus `head_total`."""
        if self.heads is None or self.head_total is None:
            return None
        return self.heads.sum(1) - self.head_total


@dataclass
class LayerwiseResult:
    """Every flow of one `layerwise_ig` call, keyed by (layer, granularity)."""

    tokens: list[str]
    token_ids: list[int]
    flows: dict[tuple[int, Granularity], Flow]
    steps: int
    quadrature: str = "gauss_legendre"
    gim: GIMConfig | None = None
    head_scores: HeadScores = HeadScores.OWN
    text: str | None = None
    model: str | None = None

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.flows})

    @property
    def granularities(self) -> list[Granularity]:
        return [g for g in Granularity if any(g is k for _, k in self.flows)]

    def flow(self, layer: int, granularity: Granularity | str) -> Flow:
        """The flow of `layer` at `granularity`."""
        key = (layer, coerce_enum(Granularity, granularity, "granularity"))
        if key not in self.flows:
            have = ", ".join(f"({l}, {g.value})" for l, g in self.flows)
            raise GimlensError(f"no flow for layer {layer}, {key[1].value}; this result has {have}")
        return self.flows[key]

    # -- JSON ------------------------------------------------------------------------------

    def to_dict(self, *, lig_compat: bool = True) -> dict[str, Any]:
        """The JSON-ready dict (see the module docstring); `lig_compat` adds LIG's sections."""
        T = len(self.tokens)
        grans = self.granularities
        base = {g.value: self._baseline_of(g).value for g in grans}
        config = {
            "num_steps": self.steps,
            "quadrature": self.quadrature,
            "granularity": [g.value for g in grans],
            "baseline": base,
            **{f"baseline_{g}": b for g, b in base.items()},
            "layers": self.layers,
            "target_tokens": list(range(T)),
            "target_head": None,
            "head_scores": HeadScores(self.head_scores).value,
            "gim": None if self.gim is None else dataclasses.asdict(self.gim),
            "include_residual_connection": True,
        }
        layers: dict[str, Any] = {}
        for l in self.layers:
            entry: dict[str, Any] = {"layer_idx": l}
            targets: dict[str, Any] = {
                str(j): {"target_token_idx": j, "target_token": self.tokens[j]} for j in range(T)
            }
            for g in grans:
                if (l, g) in self.flows:
                    entry[_LIG[g][0]] = self._flow_dict(self.flows[(l, g)], lig_compat, targets)
            if lig_compat and any(g is not Granularity.LAYER for g in grans):
                entry["targets"] = targets
            layers[str(l)] = entry
        return {
            "format": FORMAT, "version": VERSION, "text": self.text, "model": self.model,
            "tokens": list(self.tokens), "token_ids": list(self.token_ids), "config": config,
            "layers": layers,
        }

    def _baseline_of(self, g: Granularity) -> Baseline:
        return next(f.baseline for (_, k), f in self.flows.items() if k is g)

    def _flow_dict(self, f: Flow, lig: bool, targets: dict) -> dict[str, Any]:
        key, desc = _LIG[f.granularity]
        out: dict[str, Any] = {
            "baseline": f.baseline.value, "description": desc,
            "shape": list(f.matrix.shape), "matrix": f.matrix.tolist(),
        }
        comp = {"total": f.total.tolist(), "error": f.completeness_error.tolist()}
        if f.heads is not None:
            out["heads"] = f.heads.tolist()
        if f.head_total is not None:
            comp["head_total"] = f.head_total.tolist()
            comp["head_error"] = f.head_completeness_error.tolist()
        out["completeness"] = comp
        if not lig:
            return out
        tok = self.tokens
        if f.granularity is Granularity.LAYER:
            out["token_to_token"] = [
                {"target_token_idx": j, "target_token": tok[j], "contributions": [
                    {"source_token_idx": i, "source_token": tok[i], "value": float(f.matrix[i, j])}
                    for i in range(len(tok))]}
                for j in range(len(tok))
            ]
        elif f.granularity is Granularity.ATT:
            heads = f.heads if f.heads is not None else f.matrix[None]
            for j, t in targets.items():
                col = heads[:, :, int(j)]
                t["z2u"] = {"baseline": f.baseline.value, "description": desc, "heads": {
                    str(h): {"contributions": col[h].tolist(), "token_l2_norm": float(col[h].norm())}
                    for h in range(col.shape[0])}}
        else:
            err = f.completeness_error
            for j, t in targets.items():
                e = float(err[int(j)])
                t["u2z"] = {
                    "baseline": f.baseline.value, "description": desc,
                    "contributions": f.matrix[int(j)].tolist(), "l2_total": float(f.total[int(j)]),
                    "completeness": {"error": e, "mean_abs_error": abs(e), "max_abs_error": abs(e)},
                }
        return out

    def to_json(self, *, lig_compat: bool = True, indent: int | None = None) -> str:
        """The result as a JSON string (schema in the module docstring)."""
        return json.dumps(self.to_dict(lig_compat=lig_compat), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerwiseResult":
        """Inverse of `to_dict` (reads the dense fields)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise GimlensError(f"not a {FORMAT} JSON document (missing or wrong 'format' field)")
        if data.get("version") != VERSION:
            raise GimlensError(
                f"unsupported {FORMAT} version {data.get('version')!r}; expected {VERSION}"
            )
        cfg = data["config"]
        keys = {v[0]: g for g, v in _LIG.items()}
        flows: dict[tuple[int, Granularity], Flow] = {}
        for l_str, entry in data["layers"].items():
            for key, g in keys.items():
                if key not in entry:
                    continue
                e = entry[key]
                flows[(int(l_str), g)] = Flow(
                    int(l_str), g, Baseline.parse(e["baseline"]),
                    torch.tensor(e["matrix"], dtype=torch.float32).reshape(e["shape"]),
                    _tensor(e["completeness"], "total"), _tensor(e, "heads"),
                    _tensor(e["completeness"], "head_total"),
                )
        gim = cfg.get("gim")
        return cls(
            tokens=list(data["tokens"]), token_ids=list(data["token_ids"]), flows=flows,
            steps=int(cfg["num_steps"]), quadrature=cfg.get("quadrature", "gauss_legendre"),
            gim=None if gim is None else GIMConfig(**gim),
            head_scores=coerce_enum(HeadScores, cfg.get("head_scores", "own"), "head_scores"),
            text=data.get("text"), model=data.get("model"),
        )

    @classmethod
    def from_json(cls, text: str) -> "LayerwiseResult":
        """Inverse of `to_json`."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as err:
            raise GimlensError(f"invalid JSON for a layer-wise result: {err}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike, *, lig_compat: bool = True,
             indent: int | None = None) -> Path:
        """Write [`to_json`][gimlens.layerwise.result.LayerwiseResult.to_json] to `path`
        atomically (complete or not at all; the folder must exist)."""
        return atomic_write(path, self.to_json(lig_compat=lig_compat, indent=indent))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LayerwiseResult":
        """Read a file written by [`save`][gimlens.layerwise.result.LayerwiseResult.save]."""
        return cls.from_json(read_text(path, "layer-wise result"))

    # -- plots -----------------------------------------------------------------------------

    def plot(self, layer: int | None = None, granularity: Granularity | str | None = None,
             *, head: int | None = None, ax=None):
        """Heatmaps (target rows, source columns; `mlp`: target rows, dimension columns).

        Without `layer`/`granularity` every flow gets a panel (rows: layers). `head` shows
        one head of `att`. Returns the matplotlib `Figure` (no pyplot state is touched).
        """
        from .plot import plot_flows

        gran = None if granularity is None else coerce_enum(Granularity, granularity, "granularity")
        order = list(Granularity)
        chosen = [
            self.flows[(l, g)]
            for l, g in sorted(self.flows, key=lambda k: (k[0], order.index(k[1])))
            if (layer is None or l == layer) and (gran is None or g is gran)
        ]
        if not chosen:
            raise GimlensError(f"no flow matches layer={layer!r}, granularity={granularity!r}")
        return plot_flows(chosen, self.tokens, head=head, ax=ax)

    def save_plot(self, path: str | os.PathLike, **kwargs) -> Path:
        """`plot` written to `path` (format from the suffix), atomically."""
        fig = self.plot(**kwargs)
        fmt = Path(path).suffix.lstrip(".") or "png"
        return atomic_write(path, lambda f: fig.savefig(f, format=fmt, bbox_inches="tight"))


def _tensor(src: dict, key: str) -> Tensor | None:
    return torch.tensor(src[key], dtype=torch.float32) if key in src else None
