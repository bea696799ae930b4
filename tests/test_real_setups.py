"""Real setups: Lightning's true-precision modes, TF32, context-local kernels, one console channel."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_trainer, image_loader, tiny_classifier

from pomt import SearchConfig
from pomt.callbacks import POMTCallback
from pomt.pruning import pruning_config

N = 17
FAST = dict(accuracy_samples=32, accuracy_grid=(17, 13, 9, 5), min_run_time=0.0, warmup=1)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_the_callback_searches_under_lightnings_true_precision(precision):
    """Lightning's true-precision context makes the default dtype 16 bits during the stage: the
    search must still sample weights, time and select, and leave the default dtype as it was."""
    module = tiny_classifier(latency_warmup_batches=0)
    callback = POMTCallback(layer=1, search=SearchConfig(grid=(17, 13, 9, 5), verify_time=0.05, **FAST))
    trainer = cpu_trainer(callbacks=[callback], precision=precision)
    trainer.test(module, image_loader())
    sel = callback.selection
    assert sel.n_star in (17, 13, 9, 5) and sel.r == N - sel.n_star
    assert pruning_config(module.model) is None
    assert torch.get_default_dtype() == torch.float32
