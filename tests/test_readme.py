"""The README stays true: CI runs its test command verbatim, the code in its Python blocks runs
(on a tiny model instead of the embedded one), every number it states holds on SmolLM2 within its
stated interval (slow tests), and the examples run with the README's install (no IPython)."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    text = (ROOT / "README.md").read_text()
    return [l.strip() for l in re.findall(r"```bash\n(.*?)```", text, re.S) for l in l.splitlines()
            if l.strip() and not l.strip().startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_command():
    commands = _commands()
    assert len(commands) == 2
    install, test = commands
    assert install.startswith("pip install torch==2.13.0") and "gimlens " in install
    assert test.endswith("python -m pytest")
    assert test in (ROOT / ".ci" / "run").read_text()


def test_readme_python_blocks_run(llama_model, monkeypatch):
    import gimlens

    monkeypatch.setattr(gimlens, "load_model", lambda *a, **k: llama_model)
    text = (ROOT / "README.md").read_text()
    scope = {}  # the blocks build on each other, as in a notebook
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        exec(compile(block, "README.md", "exec"), scope)


# ------------------------------------------------------------------ the numbers the README states

def _readme_text() -> str:
    return " ".join((ROOT / "README.md").read_text().split())  # claims may wrap across lines


def _bootstrap(model, graph, held_out, resamples: int = 2000) -> tuple[float, float, float]:
    """Faithfulness on `held_out` and its percentile 95 % interval over the prompts (the README's
    procedure: 2000 resamples drawn with `torch.Generator().manual_seed(0)`)."""
    import torch

    from circuits.evaluate import evaluate

    clean = evaluate(model, graph.copy().reset(empty=False), held_out)
    base = evaluate(model, graph.copy().reset(empty=True), held_out)
    m = evaluate(model, graph, held_out)
    R = torch.randint(len(m), (resamples, len(m)), generator=torch.Generator().manual_seed(0))
    f = (m[R].mean(-1) - base[R].mean(-1)) / (clean[R].mean(-1) - base[R].mean(-1))
    lo, hi = torch.quantile(f, torch.tensor([0.025, 0.975])).tolist()
    return float((m.mean() - base.mean()) / (clean.mean() - base.mean())), lo, hi


def _assert_claim(text: str, claim: str, got: tuple[float, float, float]) -> None:
    """`claim` (with `{p}`, `{lo}`, `{hi}`) is in the README with the measured values, rounded."""
    stated = re.search(re.escape(claim).replace(r"\{p\}", r"(-?[0-9.]+)").replace(r"\{lo\}", r"(-?[0-9.]+)")
                       .replace(r"\{hi\}", r"(-?[0-9.]+)"), text)
    assert stated, f"README no longer states: {claim}"
    p, lo, hi = (float(v) for v in stated.groups())
    assert lo <= got[0] <= hi, (claim, got)  # the measurement lies in the stated interval
    assert got == pytest.approx((p, lo, hi), abs=0.0051), (claim, got)  # and rounds to the stated figures


@pytest.mark.slow
def test_readme_circuit_numbers_hold_on_smollm2(capsys):
    """The quick start's printed faithfulness, the 50-edge figure and the `seed=2` figure, each
    with its bootstrap interval, on the embedded SmolLM2 (about 10 CPU-minutes)."""
    import circuits

    text = _readme_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
                 if "circuits.faithfulness" in b)
    scope = {}
    exec(compile("import gimlens\nmodel = gimlens.load_model()\n" + block, "README.md", "exec"), scope)
    printed = float(capsys.readouterr().out.strip().splitlines()[-1])
    model, graph, held_out = scope["model"], scope["graph"], scope["held_out"]
    assert f"print(circuits.faithfulness(model, graph, held_out)) # {printed:.2f} on SmolLM2" in text
    assert "4,946 of SmolLM2's 70,651 edges" in text
    assert (graph.n_valid_edges, round(0.07 * graph.n_valid_edges)) == (70651, 4946)
    quick = _bootstrap(model, graph, held_out)
    assert quick[0] == pytest.approx(printed, abs=1e-6)
    _assert_claim(text, "the strongest 7 % of edges recover {p} on these held-out prompts (95 % bootstrap "
                  "interval over the 32 prompts: {lo}–{hi})", quick)
    top50 = graph.copy().apply_topn(50)
    _assert_claim(text, "the strongest 50 edges recover {p} ({lo}–{hi})", _bootstrap(model, top50, held_out))
    other = circuits.tasks.make("ioi", model, n=16, seed=2)
    g2 = circuits.attribute(model, circuits.Graph.from_model(model), other, method="EAP-IG-inputs", gim=True)
    g2.apply_topn(round(0.07 * g2.n_valid_edges))
    _assert_claim(text, "scored on another draw (`seed=2`) the same 7 % recover {p} ({lo}–{hi})",
                  _bootstrap(model, g2, held_out))


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.stem)
def test_examples_import_without_ipython(example, monkeypatch):
    """The README's install has no IPython: each example's imports (the cell that would need it)
    run with IPython absent, and `display` still works (it prints)."""
    monkeypatch.setitem(sys.modules, "IPython", None)
    monkeypatch.setitem(sys.modules, "IPython.display", None)
    cells = example.read_text().split("# %%")
    imports = next((c for c in cells if "import" in c and "[markdown]" not in c), "")
    scope = {}
    exec(compile(imports, str(example), "exec"), scope)
    if "display" in scope:
        scope["display"]("shown")


@pytest.mark.slow
def test_readme_discover_command_finds_a_circuit_that_does_the_task(tmp_path, capsys):
    """The README's `gimlens discover` command, run verbatim (output in a temporary folder), prints
    the faithfulness the README states (about 10 CPU-minutes on SmolLM2)."""
    from gimlens_cli import main

    text = _readme_text()
    command = re.search(r"`(gimlens discover [^`]*)` scores 64 IOI prompts and reports normalised "
                        r"faithfulness (-?[0-9.]+)", text)
    assert command, "README no longer states the discover command and its faithfulness"
    argv = command.group(1).split()[1:]
    argv[argv.index("-o") + 1] = str(tmp_path / "circuit.json")
    assert main([*argv, "--no-progress"]) == 0
    faith = float(re.search(r"normalised faithfulness (-?[0-9.]+)", capsys.readouterr().out).group(1))
    assert faith == pytest.approx(float(command.group(2)), abs=0.0051)
    assert (tmp_path / "circuit.json").is_file()
