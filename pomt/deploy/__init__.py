"""Where and how a pruned model runs: a :class:`Target` (``targets``: the device, precision,
runtime, threads and batch size; the protocol every runtime implements), the runtimes
(``runtimes``: eager PyTorch, CUDA graphs, ONNX Runtime, OpenVINO; importing this package
registers them), export to ONNX/OpenVINO (``export``), and placing a model on its device
(``placement``)."""

from pomt.deploy import runtimes  # noqa: F401 (registers the runtimes a Target names)
from pomt.deploy.targets import RUNTIMES, Target

__all__ = ["RUNTIMES", "Target"]
