"""Plots and HTML views of an Attribution, and its JSON round-trip."""

import html
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from gimlens import GimlensError
from gimlens.attribution import Attribution, attribute

TEXTS = ["The capital of France is", "Alice and Bob went to the park"]


def _heatmaps(fig):
    return [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]


def test_one_prompt_is_one_signed_strip_over_its_tokens(llama_model):
    a = attribute(llama_model, TEXTS[0], method="integrated_gradients", steps=4)
    fig = a.plot()
    (ax,) = _heatmaps(fig)
    image = ax.images[0]
    np.testing.assert_allclose(image.get_array(), a.scores.numpy(), rtol=1e-6)
    vmax = float(a.scores.abs().max())
    assert image.get_clim() == pytest.approx((-vmax, vmax))  # zero sits at the centre
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


def test_the_figure_saves_as_png(gpt2_model):
    buf = io.BytesIO()
    attribute(gpt2_model, TEXTS[0]).plot().savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_shows_every_real_token_escaped_with_its_score(llama_model):
    a = attribute(llama_model, TEXTS)
    page = a._repr_html_()
    assert page.count("<span title=") == int(a.attention_mask.sum())
    assert html.escape("<|endoftext|>") in page and "<|endoftext|>" not in page
    assert f"title='{float(a.scores[1, -1]):.4g}'" in page
    cont = attribute(llama_model, TEXTS[0], target=" Paris is")._repr_html_()
    assert cont.count("<span title=") == 3 * len(llama_model.to_str_tokens(TEXTS[0]))  # 2 targets + sum


@pytest.mark.parametrize("target", [None, " Paris is", "logit_diff"])
def test_json_round_trip_is_exact(gpt2_model, tmp_path, target):
    from gimlens.attribution import LogitDiff

    spec = LogitDiff(" Paris", " Rome") if target == "logit_diff" else target
    a = attribute(gpt2_model, TEXTS, target=spec, method="integrated_gradients", steps=3)
    path = tmp_path / "a.json"
    text = a.to_json(path)
    assert json.loads(path.read_text()) == json.loads(text)
    b = Attribution.from_json(path)
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


def test_matplotlib_is_imported_only_when_drawing():
    code = "import sys, gimlens.plot, gimlens.attribution, gimlens.evaluate; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
