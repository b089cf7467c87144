"""The README's two commands stay true: CI runs the test command verbatim, and the code in its
Python blocks runs (on a tiny model instead of the embedded one)."""

import re
from pathlib import Path

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
