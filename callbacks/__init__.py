"""Lightning callbacks of the project: ``POMTCallback`` selects R on the target device and
prunes the model's ViT before validate/test/predict; ``pomt.callbacks.logs`` sends what it
found to any Lightning logger (through ``pomt.lightning.loggers``)."""

from pomt.callbacks.pomt_callback import POMTCallback

__all__ = ["POMTCallback"]
