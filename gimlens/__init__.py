"""gimlens: faithful gradient-based interpretability for TransformerLens models.

- `GIM` / `GIMConfig`: GIM's backward rules on TransformerLens hook points.
- `explain` (the `gim-explain` call form) and `attribute` (every method and target)
  for token attribution; `gimlens.evaluate` for faithfulness metrics.
- `layerwise_ig`: token-to-token flows inside each layer.
- `load_model`: the embedded SmolLM2 model, or any name, folder or HuggingFace model.

The package is two floors: a kernel (`errors`, `runtime`, `validation`, `distributed`,
`quadrature`, `heads`, `rules`, `gim`, `models`, `memory`) that `circuits` builds on, and the
token-attribution apps (`attribution`, `layerwise`, `evaluate`, `plot`). The names below are
loaded on first use (PEP 562), so importing the kernel, or `circuits`, never loads the apps.

Examples:
    >>> import gimlens
    >>> sorted(gimlens.__all__)[:3]
    ['Attribution', 'GIM', 'GIMConfig']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import GimlensError

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from . import evaluate
    from .attribution import Attribution, attribute, explain
    from .gim import GIM, GIMConfig, gim_hooks
    from .layerwise import LayerwiseResult, layerwise_ig
    from .models import load_model

__all__ = [
    "Attribution",
    "GIM",
    "GIMConfig",
    "GimlensError",
    "LayerwiseResult",
    "attribute",
    "evaluate",
    "explain",
    "gim_hooks",
    "layerwise_ig",
    "load_model",
]
__version__ = "0.1.0"

#: public name -> the module that owns it (relative to `gimlens`); a module itself when it is the name
_LAZY = {
    "Attribution": ".attribution",
    "attribute": ".attribution",
    "explain": ".attribution",
    "GIM": ".gim",
    "GIMConfig": ".gim",
    "gim_hooks": ".gim",
    "LayerwiseResult": ".layerwise",
    "layerwise_ig": ".layerwise",
    "load_model": ".models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name == "evaluate":
        value = importlib.import_module(".evaluate", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
