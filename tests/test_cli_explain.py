"""``gimlens explain`` in-process on a tiny model saved to a folder."""

import json
import os
import re
import warnings

import matplotlib.image

import pytest
import torch
from torch.testing import assert_close

from conftest import TINY
from gimlens.attribution import Attribution, LogitDiff, attribute
from gimlens_cli import main
from gimlens.models import load_model
from gimlens.testing import tiny_hf_model, tiny_tokenizer

TEXT = "The capital of France is"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model(**TINY["llama"]).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(str(folder))


def test_explain_writes_the_attribution_json_and_a_png(folder, model, tmp_path, capsys):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    old = os.umask(0o022)
    try:
        rc = main(["explain", TEXT, "--model", str(folder), "--target", " Paris", "--contrast", " Rome",
                   "-o", str(out), "--plot", str(png), "--no-progress"])
    finally:
        os.umask(old)
    assert rc == 0
    assert [os.stat(p).st_mode & 0o777 for p in (out, png)] == [0o644, 0o644]  # umask honoured
    written = Attribution.load(out)
    expected = attribute(model, TEXT, target=LogitDiff(" Paris", " Rome"))
    assert written.target["kind"] == "logit_diff" and written.tokens == expected.tokens
    assert_close(written.scores, expected.scores, rtol=1e-5, atol=1e-6)
    assert json.loads(out.read_text())["method"] == "gim"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = written.plot()
    width, height = fig.get_size_inches() * 150  # the CLI draws at 150 dpi
    assert matplotlib.image.imread(png).shape == (int(height), int(width), 4)  # Agg truncates
    printed = capsys.readouterr().out
    assert "' France'" in printed and "(not scored)" in printed


def test_integrated_gradients_with_a_progress_bar_and_a_log_prob_continuation(folder, tmp_path, capsys):
    out = tmp_path / "ig.json"
    rc = main(["explain", TEXT, "--model", str(folder), "--method", "integrated_gradients", "--steps", "6",
               "--target", " Paris is", "--logprob", "--batch-size", "2", "-o", str(out)])
    assert rc == 0
    a = Attribution.load(out)
    assert a.is_continuation and a.target["readout"] == "logprob" and a.config["steps"] == 6
    assert a.scores.shape[:2] == (1, 2) and a.delta is not None
    captured = capsys.readouterr()
    # 6 steps x 2 continuation tokens = 12 gradient rows, 6 passes of 2: the bar, not the memory line
    assert re.search(r"gradients: 100%\|[^|]*\| 6/6 ", captured.err), captured.err
    assert "completeness delta" in captured.out


@pytest.mark.parametrize(
    "args, match",
    [
        (["", "--model", "{folder}"], "empty"),
        ([TEXT, "--model", "{folder}", "--plot", "{tmp}/x.nope"], "image type"),
        ([TEXT, "--model", "{folder}", "-o", "{tmp}/missing/out.json"], "does not exist"),
        ([TEXT, "--model", "{folder}", "--steps", "4"], "integrated_gradients only"),
        ([TEXT, "--model", "{folder}", "--baseline", " capital of"], "exactly one token"),
        ([TEXT, "--model", "{folder}", "--position", "50"], "outside the sequence"),
        ([TEXT, "--model", "{folder}", "--target", " Paris", "--contrast", " Rome", "--logprob"], "logprob"),
        ([TEXT, "--model", "{tmp}/no-such-model"], "does not exist"),
    ],
)
def test_failures_exit_2_with_a_message_and_write_nothing(folder, tmp_path, capsys, args, match):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    args = [a.format(folder=folder, tmp=tmp_path) for a in args]
    if "-o" not in args:
        args += ["-o", str(out)]
    if "--plot" not in args:
        args += ["--plot", str(png)]
    assert main(["explain", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gimlens explain: error:" in err and match in err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file


def test_the_default_model_is_the_embedded_one(monkeypatch, model, tmp_path):
    import gimlens.models

    seen = []

    def fake_load(name=None, **kw):
        seen.append(name)
        return model

    monkeypatch.setattr(gimlens.models, "load_model", fake_load)
    out = tmp_path / "o.json"
    assert main(["explain", TEXT, "-o", str(out), "--no-progress"]) == 0
    assert seen == [None] and out.exists()
    assert torch.equal(Attribution.load(out).token_ids, model.to_tokens(TEXT))
