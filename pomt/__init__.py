"""POMT: device-aware, training-free token pruning for Vision Transformers.

``pomt`` depends on torch and timm only; the Lightning module lives in ``pomt.lightning``
and is not imported here.
"""

from pomt.models import TokenLayout, create_model, find_vit, load_weights, token_layout
from pomt.pruning import METHODS, apply_pruning, pruning_config, remove_pruning, token_schedule

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "TokenLayout",
    "apply_pruning",
    "create_model",
    "find_vit",
    "load_weights",
    "pruning_config",
    "remove_pruning",
    "token_layout",
    "token_schedule",
]
