"""gimlens: faithful gradient-based interpretability for TransformerLens models.

- `GIM` / `GIMConfig`: GIM's backward rules on TransformerLens hook points.
- `explain` (the `gim-explain` call form) and `attribute` (every method and target)
  for token attribution; `gimlens.evaluate` for faithfulness metrics.
- `layerwise_ig`: token-to-token flows inside each layer.
- `load_model`: the embedded SmolLM2 model, or any name, folder or HuggingFace model.

Examples:
    >>> import gimlens
    >>> sorted(gimlens.__all__)[:3]
    ['Attribution', 'GIM', 'GIMConfig']
"""

from . import evaluate
from .attribution import Attribution, attribute, explain
from .errors import GimlensError
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
