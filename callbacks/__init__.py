"""Lightning callbacks of the project: ``POMTCallback`` selects R on the target device and
prunes the model's ViT before validate/test/predict; ``callbacks.logging`` has the helpers
that send its curves to any Lightning logger; ``TradeoffEvaluation`` evaluates one model
unpruned, with POMT, ToMe and Top-K, and reports accuracy against latency."""

from callbacks.pomt_callback import POMTCallback
from callbacks.tradeoff import TradeoffEvaluation, TradeoffResult

__all__ = ["POMTCallback", "TradeoffEvaluation", "TradeoffResult"]
