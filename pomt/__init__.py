"""POMT: device-aware, training-free token pruning for Vision Transformers.

Importing ``pomt`` imports torch only; what a function needs besides is imported when it is
called: timm (building models, preprocessing), torchmetrics (``estimate_accuracy``), tqdm
(progress bars), matplotlib (``pomt.plots``). The Lightning layer (``pomt.lightning``,
``pomt.lightning.sweep``, ``pomt.callbacks``, ``pomt.datamodules``) is not imported here.
"""

import logging as _logging

from pomt import (
    _imports,  # noqa: F401 (finds pomt.callbacks/.datamodules in a source checkout)
    plots,  # (matplotlib itself is imported only when plotting)
)
from pomt.deploy.export import export_onnx
from pomt.deploy.targets import Target
from pomt.method.pruning import (
    METHODS,
    apply_pruning,
    pruned,
    pruning_config,
    pruning_restored,
    remove_pruning,
    token_groups,
    token_schedule,
)
from pomt.models import TokenLayout, find_vit, token_layout
from pomt.offline.config import SearchConfig
from pomt.offline.finder import Console, Reuse, SearchResult, find_r
from pomt.offline.profiles import AccuracyProfile, LatencyProfile
from pomt.offline.profiling import estimate_accuracy, profile_latency
from pomt.offline.selection import Selection, select_r
from pomt.offline.verify import verify
from pomt.timing import Timing
from pomt.weights import create_model, load_weights

__version__ = "0.1.0"


class _UnlessConfigured(_logging.StreamHandler):
    """Prints the ``pomt`` loggers' lines (INFO and up) while the application has configured no
    logging of its own; once the root logger has handlers (Hydra, a user's config), the lines
    go there only."""

    def emit(self, record: _logging.LogRecord) -> None:
        if not _logging.getLogger().hasHandlers():
            super().emit(record)


_logger = _logging.getLogger(__name__)
_logger.setLevel(_logging.INFO)
_logger.addHandler(_UnlessConfigured())

__all__ = [
    "METHODS",
    "AccuracyProfile",
    "Console",
    "LatencyProfile",
    "Reuse",
    "SearchConfig",
    "SearchResult",
    "Selection",
    "Target",
    "Timing",
    "TokenLayout",
    "apply_pruning",
    "create_model",
    "estimate_accuracy",
    "export_onnx",
    "find_r",
    "find_vit",
    "load_weights",
    "plots",
    "profile_latency",
    "pruned",
    "pruning_config",
    "pruning_restored",
    "remove_pruning",
    "select_r",
    "token_groups",
    "token_layout",
    "token_schedule",
    "verify",
]
