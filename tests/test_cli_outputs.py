"""Outputs and devices that cannot be used are refused before any work, by every command and every
`save`; long commands show progress on stderr unless `--no-progress`.

Unwritable paths here fail for root too (tests may run as root, where chmod does not block
writes): a path under a regular file, and a folder that does not exist.
"""

import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

import gimlens.models
from circuits.graph import Graph
from conftest import TINY
from gimlens import GimlensError
from gimlens_cli import main
from gimlens.testing import tiny_hf_model, tiny_tokenizer

TASK = ["--task", "ioi", "--n", "4", "--batch-size", "4", "--ig-steps", "1", "--edges", "30"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-outputs")
    tiny_hf_model(**TINY["llama"]).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the refusals must come before the model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(gimlens.models, "load_model", refuse)


def _read_only_folder():
    """An existing folder no one can create files in, root included (sysfs is mounted
    read-only in containers), or None."""
    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys")
    os.close(fd)
    os.unlink(name)
    return None


def _unwritable(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, not a folder")
    cases = {"under a file": blocker / "out", "missing folder": tmp_path / "missing" / "out"}
    if _read_only_folder() is not None:
        cases["read-only folder"] = _read_only_folder() / "gimlens-out"
    return cases


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


COMMANDS = {
    "explain": (["explain", "Hello there"], {"-o": ".json", "--plot": ".png"}),
    "layerwise": (["layerwise", "Hello there", "--layers", "0"], {"-o": ".json", "--plot": ".png"}),
    "discover": (["discover", *TASK], {"-o": ".json", "--png": ".png", "--graphml": ".graphml",
                                       "--eap-json": ".json"}),
}


@pytest.mark.parametrize("case", ["under a file", "missing folder", "read-only folder"])
@pytest.mark.parametrize("command, flag", [(c, f) for c, (_, flags) in COMMANDS.items() for f in flags])
def test_every_command_refuses_an_unwritable_output_before_loading_the_model(
        tmp_path, capsys, no_model, command, flag, case):
    if case not in _unwritable(tmp_path):
        pytest.skip("no read-only folder on this machine")
    argv, flags = COMMANDS[command]
    good = {f: str(tmp_path / f"ok{i}{suffix}") for i, (f, suffix) in enumerate(flags.items())}
    bad = str(_unwritable(tmp_path)[case]) + flags[flag]
    before = _tree(tmp_path)
    outputs = [a for f, p in {**good, flag: bad}.items() for a in (f, p)]
    assert main([*argv, *outputs]) == 2
    err = capsys.readouterr().err
    assert f"gimlens {command}: error:" in err and bad in err and flag.split("/")[0] in err
    assert _tree(tmp_path) == before  # nothing written, no temporary file left


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("device, message", [("bogus", "is not a torch device"),
                                             ("cuda", "no cuda device"), ("cuda:99", "cuda")])
def test_every_command_refuses_a_device_it_cannot_use(tmp_path, capsys, no_model, command, device,
                                                      message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv, flags = COMMANDS[command]
    outputs = [a for i, (f, s) in enumerate(flags.items()) for a in (f, str(tmp_path / f"o{i}{s}"))]
    assert main([*argv, "--device", device, *outputs]) == 2
    err = capsys.readouterr().err
    assert f"--device {device!r}" in err and message in err and "Traceback" not in err
    assert _tree(tmp_path) == []


# ------------------------------------------------------------------------------------ saves


def _saves(model):
    graph = Graph.from_model(model)
    graph.scores = torch.randn(graph.scores.shape)
    graph.apply_topn(20)
    attribution = gimlens.attribute(model, "Hello there", method="gradient_x_input")
    layerwise = gimlens.layerwise_ig(model, "Hello there", layers=0, steps=2)
    return {
        "Graph.save json": lambda p: graph.save(p.with_suffix(".json")),
        "Graph.save graphml": lambda p: graph.save(p.with_suffix(".graphml")),
        "Graph.save eap-json": lambda p: graph.save(p.with_suffix(".json"), format="eap-json"),
        "Graph.save png": lambda p: graph.save(p.with_suffix(".png")),
        "Graph.save dot": lambda p: graph.save(p.with_suffix(".dot")),
        "Attribution.save": lambda p: attribution.save(p.with_suffix(".json")),
        "LayerwiseResult.save": lambda p: layerwise.save(p.with_suffix(".json")),
        "LayerwiseResult.save_plot": lambda p: layerwise.save_plot(p.with_suffix(".png")),
    }


def test_every_save_names_the_unwritable_path_in_a_gimlens_error(llama_model, tmp_path):
    saves = _saves(llama_model)
    for case, path in _unwritable(tmp_path).items():
        for name, save in saves.items():
            with pytest.raises(GimlensError) as info:
                save(path)
            assert str(path.parent) in str(info.value), (name, case, info.value)
        assert _tree(tmp_path) == ["file.txt"]
    for name, save in saves.items():  # and each writes where it can
        assert save(tmp_path / name.replace(" ", "_")).is_file()


# ------------------------------------------------------------------------------- all or nothing


def test_explain_and_layerwise_leave_no_json_when_the_image_fails(model_dir, tmp_path, monkeypatch):
    import gimlens.attribution.cli as explain_cli
    from gimlens.layerwise.result import LayerwiseResult

    def failing_image(*args, **kwargs):
        raise GimlensError("cannot write the image: disk full")

    monkeypatch.setattr(explain_cli, "atomic_write", failing_image)
    monkeypatch.setattr(LayerwiseResult, "save_plot", failing_image)
    for argv in (["explain", "Hello there"], ["layerwise", "Hello there", "--layers", "0", "--steps", "2"]):
        assert main([*argv, "--model", model_dir, "--no-progress", "-o", str(tmp_path / "r.json"),
                     "--plot", str(tmp_path / "r.png")]) == 2
        assert _tree(tmp_path) == []


# ----------------------------------------------------------------------------------- progress

# tqdm's counter and rate, e.g. "2/2 [00:01<00:00, 1.52flow/s]": printed by a bar, nothing else
def _bar(unit):
    return re.compile(r"\d+/\d+ \[[^\]]*(" + unit + r"/s|s/" + unit + r")\]")


def test_layerwise_shows_a_progress_bar_that_no_progress_silences(model_dir, tmp_path, capsys):
    argv = ["layerwise", "Hello there", "--model", model_dir, "--layers", "0,1",
            "--granularity", "layer,att", "--steps", "2", "-o", str(tmp_path / "f.json")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert _bar("flow").search(err) and "4/4" in err, err
    assert main([*argv, "--no-progress"]) == 0
    assert not _bar("flow").search(capsys.readouterr().err)


def test_discover_shows_progress_for_the_warm_start_and_the_evaluation(model_dir, tmp_path, capsys):
    argv = ["discover", "--model", model_dir, *TASK, "--method", "edge-pruning", "--steps", "2",
            "-o", str(tmp_path / "c.json")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert re.search(r"attribute: .*" + _bar("it").pattern, err), err  # the warm start's scoring
    assert _bar("step").search(err)  # edge pruning's own steps
    assert re.search(r"evaluate: .*" + _bar("circuit").pattern, err), err  # the final evaluation
    assert main([*argv, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not any(_bar(u).search(err) for u in ("it", "step", "circuit")), err


# --------------------------------------------------------------------------- other raw errors


def test_apply_topn_refuses_a_graph_that_was_never_scored(llama_model):
    graph = Graph.from_model(llama_model)
    with pytest.raises(GimlensError, match="never scored"):
        graph.apply_topn(10)
    assert graph.n_edges_in_graph == graph.n_valid_edges  # left as it was
    graph.scores = torch.randn(graph.scores.shape, generator=torch.Generator().manual_seed(0))
    assert graph.apply_topn(10, prune=False).n_edges_in_graph == 10  # scored: selects


def test_layerwise_ig_refuses_a_plain_module():
    with pytest.raises(GimlensError, match="TransformerLens model"):
        gimlens.layerwise_ig(torch.nn.Linear(2, 2), "Hello there")
