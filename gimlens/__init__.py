"""gimlens: faithful gradient-based interpretability for TransformerLens models."""

from .errors import GimlensError

__all__ = ["GimlensError"]
__version__ = "0.1.0"
