"""Heatmaps of layer-wise IG flows (matplotlib, imported lazily; no pyplot state).

Examples:
    >>> import torch
    >>> from gimlens.layerwise.result import Flow
    >>> from gimlens.layerwise.boundaries import Granularity
    >>> from gimlens.layerwise.baselines import Baseline
    >>> f = Flow(0, Granularity.LAYER, Baseline.ZERO, torch.eye(3), torch.ones(3))
    >>> fig = plot_flows([f], ["a", "b", "c"])
    >>> len(fig.axes), fig.axes[0].images[0].get_cmap().name  # the panel and its colour bar
    (2, 'viridis')
"""

from __future__ import annotations

import math

from ..errors import GimlensError
from .boundaries import Granularity

__all__ = ["plot_flows"]


def _grid(flows: list) -> tuple[int, int, list[tuple[int, int]]]:
    """Rows, columns and each flow's cell: a layer's flows side by side, about as many layers per
    grid row as grid rows (30 layers of one granularity: 5 rows of 6)."""
    layers = sorted({f.layer for f in flows})
    per_layer = max(sum(f.layer == l for f in flows) for l in layers)
    layers_per_row = max(1, math.ceil(math.sqrt(len(layers)) / per_layer))
    cells, slots = [], {l: 0 for l in layers}
    for f in flows:
        i = layers.index(f.layer)
        cells.append((i // layers_per_row, (i % layers_per_row) * per_layer + slots[f.layer]))
        slots[f.layer] += 1
    return math.ceil(len(layers) / layers_per_row), layers_per_row * per_layer, cells


def plot_flows(flows: list, tokens: list[str], *, head: int | None = None, ax=None):
    """One heatmap per flow: rows are targets; columns are sources (`mlp`: dimensions).

    When no panel has a negative value the colours are a sequential map from 0 (`viridis`); when
    any has, every panel uses a diverging map centred on 0 (red positive, blue negative), so one
    figure reads one way. Each panel has its own colour bar. With `ax` exactly one
    flow is drawn into it; otherwise a new `Figure` holds a grid of panels, a layer's flows side by
    side and about as many layers per row as rows; token labels on the left column and bottom row.
    """
    from matplotlib.figure import Figure

    if ax is not None and len(flows) != 1:
        raise GimlensError(f"ax= draws one flow; {len(flows)} match, pick a layer and granularity")
    if ax is None:
        panels = [_panel(f, head) for f in flows]
        signed = any(float(data.min()) < 0 for data, _ in panels)
        n_rows, n_cols, cells = _grid(flows)
        n = len(tokens)
        side = max(2.2, 0.2 * n + 0.9)  # inches per panel: ~0.2 in (14 pt) per token
        fig = Figure(figsize=(side * n_cols + 1.2, side * n_rows + 0.8), layout="constrained")
        axes = fig.subplots(n_rows, n_cols, squeeze=False)
        for f, panel, (r, c) in zip(flows, panels, cells):
            _draw(axes[r][c], f, panel, tokens, signed, left=c == 0, bottom=(r + 1, c) not in cells)
        for r in range(n_rows):
            for c in range(n_cols):
                if (r, c) not in cells:
                    axes[r][c].set_axis_off()
        return fig
    panel = _panel(flows[0], head)
    _draw(ax, flows[0], panel, tokens, float(panel[0].min()) < 0)
    return ax.figure


def _panel(flow, head: int | None):
    """The values a panel shows (rows: targets) and what they are."""
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
    return data.detach().float().cpu().numpy(), what


def _draw(ax, flow, panel, tokens: list[str], signed: bool, *, left: bool = True, bottom: bool = True) -> None:
    data, what = panel
    lim = float(abs(data).max()) or 1.0
    if signed:  # diverging, centred on 0
        im = ax.imshow(data, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    else:  # never negative: a sequential scale from 0
        im = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=lim, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    labels = [repr(t)[1:-1] for t in tokens]
    ax.set_yticks(range(len(tokens)), labels if left else [], fontsize=7)
    if left:
        ax.set_ylabel("target", fontsize=8)
    if flow.granularity is Granularity.MLP:
        ax.set_xlabel("residual dimension of u" if bottom else "", fontsize=8)
        ax.tick_params(axis="x", labelsize=6, labelbottom=bottom)
    else:
        ax.set_xticks(range(len(tokens)), labels if bottom else [], fontsize=7, rotation=90)
        if bottom:
            ax.set_xlabel("source", fontsize=8)
    title = f"layer {flow.layer} {flow.granularity.value} ({flow.baseline.value})"
    ax.set_title(f"{title} {what}".strip(), fontsize=8)
