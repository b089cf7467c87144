"""Plots and HTML views of an Attribution, and its JSON round-trip."""

import html
import io
import json
import os
import re
import subprocess
import sys

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch

from gimlens import GimlensError
from gimlens.attribution import Attribution, attribute

TEXTS = ["The capital of France is", "Alice and Bob went to the park"]


def _heatmaps(fig):
    return [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]


def _colours(scores, vmax, cmap="RdBu_r"):
    """The RGBA colours the scores should get: symmetric normalisation, then the colormap."""
    return matplotlib.colormaps[cmap]((np.asarray(scores, dtype=np.float64) + vmax) / (2 * vmax))


def test_one_prompt_is_one_signed_strip_over_its_tokens(llama_model):
    a = attribute(llama_model, TEXTS[0], method="integrated_gradients", steps=4)
    fig = a.plot()
    (ax,) = _heatmaps(fig)
    image = ax.images[0]
    np.testing.assert_allclose(image.get_array(), a.scores.numpy(), rtol=1e-6)
    vmax = float(a.scores.abs().max())
    assert image.get_clim() == pytest.approx((-vmax, vmax))  # zero sits at the centre
    # the drawn colours are the scores mapped through the colormap on that symmetric scale
    np.testing.assert_allclose(image.to_rgba(image.get_array()), _colours(a.scores.numpy(), vmax), atol=1e-6)
    top, bottom = int(a.scores[0].argmax()), int(a.scores[0].argmin())
    rgba = image.to_rgba(image.get_array())[0]
    assert rgba[top, 0] > rgba[top, 2] and rgba[bottom, 2] > rgba[bottom, 0]  # red up, blue down
    assert [t.get_text() for t in ax.get_xticklabels()] == a.tokens[0]
    assert "integrated_gradients" in ax.get_title()


def test_a_padded_batch_gets_one_strip_per_row_without_padding(llama_model):
    a = attribute(llama_model, TEXTS)
    axes = _heatmaps(a.plot())
    assert len(axes) == 2
    for row, ax in enumerate(axes):
        real = a.attention_mask[row].bool()
        np.testing.assert_allclose(ax.images[0].get_array()[0], a.scores[row][real].numpy(), rtol=1e-6)
    (one,) = _heatmaps(a.plot(row=1))
    assert len(one.get_xticklabels()) == int(a.attention_mask[1].sum())
    with pytest.raises(GimlensError, match="row"):
        a.plot(row=2)


def test_a_continuation_is_a_target_by_input_matrix_with_its_sum(gpt2_model):
    a = attribute(gpt2_model, TEXTS[0], target=" Paris is")
    matrix, total = _heatmaps(a.plot())
    np.testing.assert_allclose(matrix.images[0].get_array(), a.scores[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(total.images[0].get_array()[0], a.seq[0].numpy(), rtol=1e-6)
    assert [t.get_text() for t in matrix.get_yticklabels()] == [" Paris", " is"]
    assert [t.get_text() for t in total.get_xticklabels()] == a.tokens[0]


def test_the_saved_png_decodes_to_the_figure_size_with_each_cell_in_its_score_colour(gpt2_model):
    a = attribute(gpt2_model, TEXTS[0])
    fig = a.plot(annotate=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    pixels = matplotlib.image.imread(buf, format="png")
    width, height = fig.get_size_inches() * 100
    assert pixels.shape == (int(height), int(width), 4)  # Agg truncates
    (ax,) = _heatmaps(fig)
    expected = _colours(a.scores[0].numpy(), float(a.scores.abs().max()))[:, :3]
    got = []
    for j in range(a.scores.shape[1]):  # the pixel at each cell's centre
        x, y = ax.transData.transform((j, 0))
        got.append(pixels[int(height - y), int(x), :3])
    np.testing.assert_allclose(np.array(got), expected, atol=2 / 255)


def test_html_shows_every_real_token_escaped_with_its_score(llama_model):
    a = attribute(llama_model, TEXTS)
    page = a._repr_html_()
    assert page.count("<span title=") == int(a.attention_mask.sum())
    assert html.escape("<|endoftext|>") in page and "<|endoftext|>" not in page
    assert f"title='{float(a.scores[1, -1]):.4g}'" in page
    # each token's background: red for a positive score, blue for a negative one, opacity |s| / max|s|
    spans = re.findall(r"<span title='([^']+)' style='background:rgba\((\d+),(\d+),(\d+),([0-9.]+)\)", page)
    for row in range(2):
        scores = a.scores[row][a.attention_mask[row].bool()]
        vmax = float(scores.abs().max())
        mine, spans = spans[: len(scores)], spans[len(scores):]
        for score, (title, r, g, b, alpha) in zip(scores.tolist(), mine):
            assert title == f"{score:.4g}"
            assert (int(r), int(g), int(b)) == ((215, 48, 39) if score > 0 else (33, 102, 172))
            assert float(alpha) == pytest.approx(abs(score) / vmax, abs=1e-3)
    assert not spans
    cont = attribute(llama_model, TEXTS[0], target=" Paris is")._repr_html_()
    assert cont.count("<span title=") == 3 * len(llama_model.to_str_tokens(TEXTS[0]))  # 2 targets + sum


@pytest.mark.parametrize("target", [None, " Paris is", "logit_diff"])
def test_json_round_trip_is_exact(gpt2_model, tmp_path, target):
    from gimlens.attribution import LogitDiff

    spec = LogitDiff(" Paris", " Rome") if target == "logit_diff" else target
    a = attribute(gpt2_model, TEXTS, target=spec, method="integrated_gradients", steps=3)
    path = a.save(tmp_path / "a.json")
    assert path == tmp_path / "a.json"
    assert json.loads(path.read_text()) == json.loads(a.to_json())
    assert Attribution.from_json(a.to_json(indent=2)) == a
    b = Attribution.load(path)
    assert b == a and b is not a
    for name in ("scores", "token_ids", "target_values", "delta", "attention_mask", "scored"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert b.tokens == a.tokens and b.config == a.config and b.target == a.target
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_bad_json_is_a_gimlens_error(tmp_path):
    with pytest.raises(GimlensError, match="format"):
        Attribution.from_json('{"scores": []}')
    with pytest.raises(GimlensError, match="parse"):
        Attribution.from_json("{not json")
    with pytest.raises(GimlensError, match="cannot read"):
        Attribution.load(tmp_path / "missing.json")


def test_save_honours_the_umask_and_needs_an_existing_folder(gpt2_model, tmp_path):
    a = attribute(gpt2_model, TEXTS[0])
    old = os.umask(0o022)
    try:
        path = a.save(tmp_path / "a.json")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
    with pytest.raises(GimlensError, match="does not exist"):
        a.save(tmp_path / "missing" / "a.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_matplotlib_is_imported_only_when_drawing():
    code = "import sys, gimlens.plot, gimlens.attribution, gimlens.evaluate; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ layer-wise flows (gimlens.layerwise.plot)
def _flows(n_layers, n_tokens=12, signed_layer=None):
    from gimlens.layerwise.baselines import Baseline
    from gimlens.layerwise.boundaries import Granularity
    from gimlens.layerwise.result import Flow

    gen = torch.Generator().manual_seed(0)
    out = []
    for layer in range(n_layers):
        m = torch.rand(n_tokens, n_tokens, generator=gen) * (layer + 1)  # never negative
        if layer == signed_layer:
            m = m - m.mean()
        out.append(Flow(layer, Granularity.LAYER, Baseline.ZERO, m, m.sum(0)))
    return out


def test_all_layer_flows_are_a_grid_with_readable_panels():
    from gimlens.layerwise.plot import plot_flows

    tokens = [f"tok{i}" for i in range(12)]
    fig = plot_flows(_flows(30), tokens)
    panels = _heatmaps(fig)
    assert len(panels) == 30
    rows = {round(ax.get_position().y0, 3) for ax in panels}
    cols = {round(ax.get_position().x0, 3) for ax in panels}
    assert (len(rows), len(cols)) == (5, 6)  # was one column of 30 panels (352 x 8990 px)
    w, h = fig.get_size_inches()
    assert 0.5 < h / w < 2
    assert all(ax.title.get_fontsize() >= 7 for ax in panels)
    labelled = [ax for ax in panels if [t.get_text() for t in ax.get_yticklabels()] == tokens]
    assert len(labelled) == 5  # token names on the left column only


def test_non_negative_flows_get_a_sequential_scale_and_signed_ones_a_centred_one():
    from gimlens.layerwise.plot import plot_flows

    flows = _flows(4, n_tokens=5)
    for ax, f in zip(_heatmaps(plot_flows(flows, list("abcde"))), flows):
        image, data = ax.images[0], f.matrix.T.numpy()
        assert image.get_cmap().name == "viridis" and image.get_clim() == (0.0, data.max())
        rgba = image.to_rgba(data)  # the largest flow gets the top colour
        np.testing.assert_allclose(rgba[np.unravel_index(data.argmax(), data.shape)],
                                   matplotlib.colormaps["viridis"](1.0))
    flows = _flows(4, n_tokens=5, signed_layer=2)  # one signed panel: the whole figure diverging
    for ax, f in zip(_heatmaps(plot_flows(flows, list("abcde"))), flows):
        lo, hi = ax.images[0].get_clim()
        assert ax.images[0].get_cmap().name == "RdBu_r" and lo == -hi == -abs(f.matrix).max()
