"""Unlearning: one shared DeepSpeed loop (loop.py) and a registry of methods, each only its loss (methods.py).

Add a method: write its loss in methods.py and register a MethodSpec in METHODS; the loop, data and reference
log-probs are shared.
"""

from stages.unlearn.loop import UnlearnDiverged, unlearn
from stages.unlearn.methods import METHODS, MethodSpec

__all__ = ["METHODS", "MethodSpec", "UnlearnDiverged", "unlearn"]
