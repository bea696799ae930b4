"""Lightning callbacks of the project: ``POMTCallback`` selects R on the target device and
prunes the model's ViT before validate/test/predict; ``pomt.callbacks.logging`` sends what
it found to any Lightning logger."""

from pomt.callbacks.pomt_callback import POMTCallback

__all__ = ["POMTCallback"]
