"""The Lightning glue of the package: ``ViTClassifier`` (``classifier``, a LightningModule
around a timm ViT) and ``loggers`` (what the callback and the sweep send to any Lightning
logger, and ``OfflineWandbLogger``).

With ``pomt.callbacks``, ``pomt.datamodules`` and ``pomt.lightning.sweep`` this is the Lightning
layer, which the method (every other ``pomt`` module) never imports. ``ViTClassifier`` is
imported on first use, so ``import pomt.lightning.loggers`` does not build the classifier's
module; ``pomt.lightning.ViTClassifier`` (the class path in the configs) stays valid.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HEADS", "ViTClassifier", "dinov2_linear_features"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pomt.lightning import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
