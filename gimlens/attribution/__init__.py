"""Token attribution: which input tokens a prediction depends on."""

from .explain import explain

__all__ = ["explain"]
