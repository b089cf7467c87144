"""Data shipped with gimlens: a prompt set for token-attribution benchmarks.

`prompts.jsonl` holds 148 prompts in three tasks, one JSON object per line: `task` (`ioi`,
`capitals` or `factual`), `prompt`, the expected next token `answer` (one token with its
leading space for SmolLM2's tokenizer) and, for IOI, the `contrast` (the repeated name).
SmolLM2-135M-Instruct predicts 114 of the answers (IOI 51/56, capitals 32/38, factual 31/54).

Examples:
    >>> from gimlens.data import load_prompts
    >>> rows = load_prompts()
    >>> len(rows), rows[0]["task"], sorted({r["task"] for r in rows})
    (148, 'ioi', ['capitals', 'factual', 'ioi'])
    >>> len(load_prompts("capitals"))
    38
"""

from __future__ import annotations

import json
from importlib import resources

from ..errors import GimlensError

__all__ = ["load_prompts", "TASKS"]

TASKS = ("ioi", "capitals", "factual")


def load_prompts(task: str | None = None) -> list[dict]:
    """The shipped prompts, optionally of one task (`"ioi"`, `"capitals"`, `"factual"`)."""
    if task is not None and task not in TASKS:
        raise GimlensError(f"unknown prompt task {task!r}; expected one of: {', '.join(TASKS)}")
    text = resources.files(__name__).joinpath("prompts.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in rows if task is None or r["task"] == task]
