"""Layer-wise integrated gradients: token-to-token flows inside each transformer layer.

Exact (Gauss-Legendre quadrature, completeness reported per target) and batched over targets,
heads and quadrature nodes, on TransformerLens hook points. See `.core` for the
definition, `.boundaries` for the maps (`layer`, `att`, `mlp`), `.baselines` for
the baselines and `.result` for the JSON schema.

Examples:
    >>> from gimlens.layerwise import layerwise_ig
    >>> from gimlens.testing import tiny_model
    >>> res = layerwise_ig(tiny_model("llama"), "When Mary and John", layers=0, granularity="att")
    >>> res.flow(0, "att").heads.shape  # [head, source, target]
    torch.Size([4, 5, 5])
"""

from .baselines import Baseline
from .boundaries import Granularity, HeadScores
from .core import layerwise_ig
from .result import Flow, LayerwiseResult

__all__ = ["layerwise_ig", "LayerwiseResult", "Flow", "Granularity", "Baseline", "HeadScores"]
