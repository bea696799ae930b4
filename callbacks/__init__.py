"""Lightning callbacks of the project: ``POMTCallback`` selects R on the target device and
prunes the model's ViT before validate/test/predict; ``callbacks.logging`` has the helpers
that send its curves to any Lightning logger."""

from callbacks.pomt_callback import POMTCallback

__all__ = ["POMTCallback"]
