"""gimlens: faithful gradient-based interpretability for TransformerLens models.

Example:
    >>> import gimlens
    >>> sorted(gimlens.__all__)[:3]
    ['GIM', 'GIMConfig', 'GimlensError']
"""

from .errors import GimlensError
from .attribution import explain
from .gim import GIM, GIMConfig, gim_hooks
from .models import load_model

__all__ = ["GIM", "GIMConfig", "GimlensError", "explain", "gim_hooks", "load_model"]
__version__ = "0.1.0"
