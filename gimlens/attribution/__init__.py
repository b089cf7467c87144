"""Token attribution: which input tokens a prediction depends on.

`attribute` is the entry point (methods, targets, text or token inputs) and returns an
`Attribution`; `explain` is its `gim-explain`-compatible special case.
"""

from .attribute import attribute
from .explain import explain
from .methods import Method
from .result import Attribution
from .targets import Continuation, LogitDiff, Readout, TokenTarget

__all__ = [
    "attribute",
    "explain",
    "Attribution",
    "Method",
    "TokenTarget",
    "LogitDiff",
    "Continuation",
    "Readout",
]
