"""Heatmaps of layer-wise IG flows (matplotlib, imported lazily; no pyplot state).

Examples:
    >>> import torch
    >>> from gimlens.layerwise.result import Flow
    >>> from gimlens.layerwise.boundaries import Granularity
    >>> from gimlens.layerwise.baselines import Baseline
    >>> f = Flow(0, Granularity.LAYER, Baseline.ZERO, torch.eye(3), torch.ones(3))
    >>> len(plot_flows([f], ["a", "b", "c"]).axes)  # the panel and its colour bar
    2
"""

from __future__ import annotations

import math

from ..errors import GimlensError
from .boundaries import Granularity

__all__ = ["plot_flows"]


def plot_flows(flows: list, tokens: list[str], *, head: int | None = None, ax=None):
    """One heatmap per flow: rows are targets; columns are sources (`mlp`: dimensions).

    Colours are symmetric around 0 (red positive, blue negative). With `ax` exactly one flow
    is drawn into it; otherwise a new `Figure` holds a grid (one row per layer).
    """
    from matplotlib.figure import Figure

    if ax is not None and len(flows) != 1:
        raise GimlensError(f"ax= draws one flow; {len(flows)} match, pick a layer and granularity")
    if ax is None:
        layers = sorted({f.layer for f in flows})
        cols = math.ceil(len(flows) / len(layers))
        n = len(tokens)
        fig = Figure(figsize=(max(3.5, 0.35 * n + 1.5) * cols, max(3.0, 0.3 * n + 1.2) * len(layers)))
        axes = fig.subplots(len(layers), cols, squeeze=False)
        slots = {l: 0 for l in layers}
        for f in flows:
            r = layers.index(f.layer)
            _draw(axes[r][slots[f.layer]], f, tokens, head)
            slots[f.layer] += 1
        for r, l in enumerate(layers):
            for c in range(slots[l], cols):
                axes[r][c].set_axis_off()
        fig.tight_layout()
        return fig
    _draw(ax, flows[0], tokens, head)
    return ax.figure


def _draw(ax, flow, tokens: list[str], head: int | None) -> None:
    if head is not None:
        if flow.heads is None:
            raise GimlensError(f"head= needs the att granularity, got {flow.granularity.value}")
        if not 0 <= head < flow.heads.shape[0]:
            raise GimlensError(f"head {head} out of range (0..{flow.heads.shape[0] - 1})")
        data, what = flow.heads[head], f"head {head}"
    else:
        data, what = flow.matrix, "all heads" if flow.granularity is Granularity.ATT else ""
    if flow.granularity is not Granularity.MLP:
        data = data.T  # rows: targets, columns: sources
    data = data.detach().float().cpu().numpy()
    lim = float(abs(data).max()) or 1.0
    im = ax.imshow(data, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    labels = [repr(t)[1:-1] for t in tokens]
    ax.set_yticks(range(len(tokens)), labels, fontsize=7)
    ax.set_ylabel("target")
    if flow.granularity is Granularity.MLP:
        ax.set_xlabel("residual dimension of u")
    else:
        ax.set_xticks(range(len(tokens)), labels, fontsize=7, rotation=90)
        ax.set_xlabel("source")
    title = f"layer {flow.layer} {flow.granularity.value} ({flow.baseline.value})"
    ax.set_title(f"{title} {what}".strip(), fontsize=9)
