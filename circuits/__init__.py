"""circuits: edge attribution patching (EAP, EAP-IG) over a networkx-exportable circuit graph.

Examples:
    >>> import circuits
    >>> from gimlens.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> graph = circuits.Graph.from_model(model)
    >>> graph.n_valid_edges > 0
    True
"""

from . import mib, tasks
from ._engine.model import Ablation
from .attribute import Method, attribute
from .evaluate import FaithfulnessCurve, evaluate, faithfulness, faithfulness_curve
from .discover import discover
from .export import load, save
from .graph import Edge, Graph, Node
from .layout import KVEdges, NodeKind
from .prune import Selection, prune_dangling
from .run import Run

__all__ = [
    "Ablation",
    "Edge",
    "FaithfulnessCurve",
    "Graph",
    "KVEdges",
    "Method",
    "Node",
    "NodeKind",
    "Run",
    "Selection",
    "attribute",
    "discover",
    "evaluate",
    "faithfulness",
    "faithfulness_curve",
    "load",
    "mib",
    "prune_dangling",
    "save",
    "tasks",
]
