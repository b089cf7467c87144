"""``gimlens discover`` on a tiny saved model: outputs equal a direct library run; bad input writes nothing."""

import json
import re
import warnings

import pytest
import torch
from torch.testing import assert_close

from circuits.attribute import attribute
from circuits.gim_advice import gim_for
from circuits.evaluate import faithfulness
from circuits.graph import Graph
from circuits.tasks import make
from conftest import TINY
from gimlens_cli import main
from gimlens.models import load_model
from gimlens.testing import tiny_hf_model, tiny_tokenizer

ARGS = ["--task", "ioi", "--n", "8", "--batch-size", "4", "--ig-steps", "2", "--edges", "40", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model(**TINY["llama"]).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_discover_writes_the_circuit_a_direct_library_run_finds(model_dir, tmp_path, capsys):
    out = {k: tmp_path / f"circuit.{k}" for k in ("json", "png", "graphml")}
    eap = tmp_path / "eap.json"
    rc = main(["discover", "--model", model_dir, *ARGS, "--gim", "-o", str(out["json"]),
               "--png", str(out["png"]), "--graphml", str(out["graphml"]), "--eap-json", str(eap)])
    assert rc == 0
    assert _files(tmp_path) == ["circuit.graphml", "circuit.json", "circuit.png", "eap.json"]
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(eap.read_text())["edges"]

    # the same steps through the library
    model = load_model(model_dir)
    task = make("ioi", model, n=8, seed=0)
    expected = Graph.from_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attribute(model, expected, task, method="EAP-IG-inputs", ig_steps=2, gim=gim_for("EAP-IG-inputs", True),
                  batch_size=4)  # `--gim`: the method's measured defaults
        expected.apply_topn(40, absolute=True)
        faith = faithfulness(model, expected, task, batch_size=4)

    got = Graph.load(out["json"])
    assert_close(got.scores, expected.scores, rtol=1e-5, atol=1e-7)
    assert torch.equal(got.in_graph, expected.in_graph)
    assert 0 < got.n_edges_in_graph <= 40
    assert Graph.load(out["graphml"]).n_edges_in_graph == got.n_edges_in_graph
    printed = capsys.readouterr().out
    assert f"{got.n_edges_in_graph} edges" in printed
    reported = float(re.search(r"faithfulness (-?[0-9.]+)", printed).group(1))
    assert reported == pytest.approx(faith, abs=1e-3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--edges", "0"], "--edges must be >= 1"),
        (["--n", "0"], "--n-examples must be >= 1"),
        (["--png", "{tmp}/circuit.txt"], "--png"),
        (["--graphml", "{tmp}/missing/c.graphml"], "does not exist"),
        (["--eap-json", "{tmp}/circuit.json"], "distinct files"),
        (["--edges", "1000000"], "exceeds"),
    ],
)
def test_bad_arguments_fail_with_a_message_and_write_nothing(model_dir, tmp_path, capsys, bad, message):
    argv = ["discover", "--model", model_dir, *ARGS, "-o", str(tmp_path / "circuit.json"),
            "--png", str(tmp_path / "circuit.png")]
    rc = main(argv + [a.replace("{tmp}", str(tmp_path)) for a in bad])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert _files(tmp_path) == []


def test_a_failure_while_writing_leaves_no_output_at_all(model_dir, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(self, path, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["discover", "--model", model_dir, *ARGS, "-o", str(tmp_path / "c.json"),
              "--png", str(tmp_path / "c.png")])
    assert _files(tmp_path) == []  # not even the JSON written before the image, nor temp folders


def test_unknown_task_is_refused_by_the_parser(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["discover", "--task", "nope", "-o", str(tmp_path / "c.json")])
    assert exc.value.code == 2 and _files(tmp_path) == []


def test_discover_with_iterative_method_writes_the_library_circuit(model_dir, tmp_path):
    out = tmp_path / "c.json"
    args = ["--task", "ioi", "--n", "4", "--batch-size", "4", "--ig-steps", "1", "--edges", "30",
            "--no-progress"]
    assert main(["discover", "--model", model_dir, *args, "--method", "EAP-IG-iterative",
                 "--rounds", "2", "-o", str(out)]) == 0
    model = load_model(model_dir)
    task = make("ioi", model, n=4, seed=0)
    from circuits import discover

    expected = discover(model, Graph.from_model(model), task, n_edges=30, method="EAP-IG-iterative",
                        ig_steps=1, rounds=2, batch_size=4)
    got = Graph.load(out)
    assert torch.equal(got.in_graph, expected.in_graph)
    assert 0 < got.n_edges_in_graph <= 30


@pytest.mark.parametrize("bad, message", [
    (["--steps", "5"], "--steps applies to --method edge-pruning only"),
    (["--method", "edge-pruning", "--steps", "0"], "--steps must be >= 1"),
    (["--method", "edge-pruning", "--lr", "-1"], "--lr must be > 0"),
])
def test_method_options_are_checked_before_the_model_loads(model_dir, tmp_path, capsys, bad, message):
    rc = main(["discover", "--model", model_dir, *ARGS, "-o", str(tmp_path / "c.json"), *bad])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert _files(tmp_path) == []
