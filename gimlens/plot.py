"""Views of an `Attribution`: matplotlib heatmaps and HTML for notebooks.

Scores are signed, so colours diverge around zero (red: the token raises the target, blue: it
lowers it) on a scale symmetric in the largest absolute score shown. matplotlib is imported only
when a figure is drawn, and figures are built without `pyplot` (no global state, any backend).

Examples:
    >>> from gimlens.attribution import attribute
    >>> from gimlens.testing import tiny_model
    >>> attr = attribute(tiny_model("llama"), "The capital of France is")
    >>> fig = attr.plot()
    >>> type(fig).__name__, "<span" in attr._repr_html_()
    ('Figure', True)
"""

from __future__ import annotations

import html

import torch

__all__ = ["plot_attribution", "attribution_html"]


def plot_attribution(attribution, row: int | None = None, *, cmap: str = "RdBu_r", annotate: bool | None = None):
    """A signed heatmap of `attribution`.

    Args:
        attribution: an `Attribution`.
        row: the prompt to draw; `None` draws every row, one panel each.
        cmap: a diverging matplotlib colormap.
        annotate: write each score in its cell (default: when a row has at most 40 tokens).

    Returns:
        A `matplotlib.figure.Figure`: per row a strip over the input tokens, or for a
        continuation a target × input matrix with the summed (`seq`) strip under it.
    """
    from matplotlib.figure import Figure

    a = attribution
    rows = range(len(a)) if row is None else [_row(a, row)]
    panels = []  # (row, matrix [n, P_real], y labels, x labels, title)
    for b in rows:
        real = _real(a, b)
        xlabels = [_label(t) for t, keep in zip(a.tokens[b], real) if keep]
        if a.is_continuation:
            matrix = a.scores[b][:, real]
            ylabels = [_label(t) for t in a.target["tokens"][b]]
            panels.append((matrix, ylabels, None, f"{a.method}: {a.describe_target(b)}"))
            panels.append((a.seq[b][real][None], ["sum"], xlabels, None))
        else:
            panels.append((a.scores[b][real][None], [""], xlabels, f"{a.method}: {a.describe_target(b)}"))
    vmax = max(float(p[0].abs().max()) if p[0].numel() else 0.0 for p in panels) or 1.0
    width = max(4.0, 0.55 * max(p[0].shape[1] for p in panels) + 2.0)
    heights = [0.45 * p[0].shape[0] + (0.4 if p[3] else 0.1) + (0.8 if p[2] else 0.0) for p in panels]
    fig = Figure(figsize=(width, sum(heights) + 0.4), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    image = None
    for ax, (matrix, ylabels, xlabels, title) in zip(axes, panels):
        data = matrix.float().numpy()
        image = ax.imshow(data, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
        if xlabels is None:  # a continuation matrix: the sum strip below carries the labels
            ax.set_xticks(range(data.shape[1]), [""] * data.shape[1])
        else:
            ax.set_xticks(range(len(xlabels)), xlabels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
        if title:
            ax.set_title(title, fontsize=9)
        show = annotate if annotate is not None else data.shape[1] <= 40
        if show:
            for (i, j), v in _cells(data):
                colour = "white" if abs(v) > 0.6 * vmax else "black"
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6, color=colour)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="attribution")
    return fig


def attribution_html(attribution, row: int | None = None) -> str:
    """HTML: each token on a background coloured by its score (hover for the value)."""
    a = attribution
    rows = range(len(a)) if row is None else [_row(a, row)]
    parts = [f"<div class='gimlens-attribution'><div><b>{html.escape(a.method)}</b></div>"]
    for b in rows:
        real = _real(a, b)
        tokens = [t for t, keep in zip(a.tokens[b], real) if keep]
        lines = [(a.scores[b][t][real], a.target["tokens"][b][t]) for t in range(a.scores.shape[1])] if (
            a.is_continuation
        ) else [(a.scores[b][real], None)]
        if a.is_continuation:
            lines.append((a.seq[b][real], "sum"))
        vmax = max(float(s.abs().max()) for s, _ in lines) or 1.0
        parts.append(f"<div style='margin-top:4px'><i>{html.escape(a.describe_target(b))}</i></div>")
        for scores, name in lines:
            spans = "".join(_span(tok, float(s), vmax) for tok, s in zip(tokens, scores))
            head = f"<span style='color:#666'>{html.escape(repr(name))}: </span>" if name else ""
            parts.append(f"<div style='font-family:monospace;line-height:1.9'>{head}{spans}</div>")
    parts.append("</div>")
    return "".join(parts)


def _row(a, row: int) -> int:
    from .validation import check_int

    check_int("row", row, minimum=-len(a), maximum=len(a) - 1)
    return row % len(a)


def _real(a, b: int) -> torch.Tensor:
    return torch.ones(a.token_ids.shape[1], dtype=torch.bool) if a.attention_mask is None else a.attention_mask[b].bool()


def _label(token: str) -> str:
    shown = token.replace("\n", "\\n").replace("\t", "\\t")
    return repr(shown) if not shown.strip() else shown


def _cells(data):
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            yield (i, j), float(data[i, j])


def _span(token: str, score: float, vmax: float) -> str:
    alpha = min(1.0, abs(score) / vmax)
    rgb = "215,48,39" if score > 0 else "33,102,172"
    text = html.escape(token).replace(" ", "&nbsp;").replace("\n", "\\n") or "&nbsp;"
    return (
        f"<span title='{score:.4g}' style='background:rgba({rgb},{alpha:.3f});"
        f"padding:1px 2px;border-radius:3px'>{text}</span>"
    )
