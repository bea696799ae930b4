"""Training with the pruned model in the loop: ``"train"`` in ``POMTCallback``'s stages keeps the
ViT pruned at one R through the training steps and the validations inside ``fit`` (POMT, Top-K
and ToMe), and the model is put back afterwards, also after an error."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_trainer, image_loader, staircase_profile, tiny_classifier
from torch import nn

from pomt import SearchConfig, token_schedule
from pomt.callbacks import POMTCallback
from pomt.callbacks import stage_support as support
from pomt.method.pruning import pruning_config

N, LAYER = 17, 1
FAST_SEARCH = SearchConfig(
    accuracy_samples=32,
    accuracy_grid=(17, 13, 9, 5),
    grid=(17, 13, 9, 5),
    min_run_time=0.0,
    warmup=1,
    verify=False,
)


class ModeProbe:
    """Records ``(training, tokens)`` leaving block ``index`` on every forward pass."""

    def __init__(self, vit: nn.Module, index: int) -> None:
        self.seen: list[tuple[bool, int]] = []
        vit.blocks[index].register_forward_hook(
            lambda m, _i, out: self.seen.append((m.training, int(out.shape[1])))
        )

    def counts(self, training: bool) -> list[int]:
        return [n for mode, n in self.seen if mode == training]


def _fit(module, callback, epochs: int = 1, batches: int = 3, **kwargs):
    trainer = cpu_trainer(
        callbacks=[callback],
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        **kwargs,
    )
    trainer.fit(module, image_loader(n=32, batch_size=8), image_loader(n=16, batch_size=8, seed=1))
    return trainer


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


@pytest.mark.parametrize(("method", "r"), [("pomt", 6), ("topk", 2), ("tome", 2)])
def test_training_steps_run_pruned_change_the_weights_and_the_model_is_put_back(method, r):
    module = tiny_classifier(latency_warmup_batches=0)
    before = _weights(module)
    expected = token_schedule(module.model, method, r, LAYER)[LAYER]
    assert expected < N
    probe = ModeProbe(module.model, LAYER)
    callback = POMTCallback(method, r=r, layer=LAYER, stages=("train",))
    _fit(module, callback)

    assert probe.counts(True) == [expected] * 3  # every training step: N - R after the pruning block
    assert probe.counts(False) == [expected]  # the validation inside fit: the same R
    changed = [k for k, v in _weights(module).items() if not torch.equal(v, before[k])]
    assert "blocks.0.attn.qkv.weight" in changed and "head.weight" in changed
    assert pruning_config(module.model) is None  # unpruned after fit
    assert callback.trained_r == r


def test_r_is_chosen_once_on_the_starting_weights_and_held_through_fit_and_test(tmp_path, monkeypatch):
    searches = []
    search = support.choose_r

    def counting(*args, **kwargs):
        searches.append(_weights(module)["blocks.0.attn.qkv.weight"])
        return search(*args, **kwargs)

    monkeypatch.setattr(support, "choose_r", counting)

    module = tiny_classifier(latency_warmup_batches=0)
    start = _weights(module)["blocks.0.attn.qkv.weight"]
    probe = ModeProbe(module.model, LAYER)
    path = staircase_profile(module, tmp_path / "latency.json")  # a step below 12 tokens
    callback = POMTCallback(
        latency_profile_path=str(path),
        layer=LAYER,
        search=FAST_SEARCH,
        accuracy_data=image_loader(n=32),
        stages=("train", "test"),
    )
    _fit(module, callback, epochs=2, batches=2)
    r = callback.selection.r
    assert r == N - 11
    assert len(searches) == 1 and torch.equal(searches[0], start)  # once, before the first step
    first_step = next(i for i, (training, _) in enumerate(probe.seen) if training)
    after = probe.seen[first_step:]  # (before it: the search's own forward passes)
    assert {n for _, n in after} == {N - r} and sum(not training for training, _ in after) == 2
    assert callback.trained_r == r and pruning_config(module.model) is None

    probe.seen.clear()
    cpu_trainer(callbacks=[callback]).test(module, image_loader(n=16))
    assert len(searches) == 1  # the test runs at the R the weights were trained at
    assert set(probe.counts(False)) == {N - r} and pruning_config(module.model) is None
    assert callback.state_dict()["trained_r"] == r


def test_an_error_during_pruned_training_puts_the_model_back():
    class Failing(type(tiny_classifier())):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("step failed")
            return super().training_step(batch, batch_idx)

    module = Failing(**{k: v for k, v in tiny_classifier().hparams.items()})
    probe = ModeProbe(module.model, LAYER)
    callback = POMTCallback(r=6, layer=LAYER, stages=("train",))
    with pytest.raises(RuntimeError, match="step failed"):
        _fit(module, callback)
    assert probe.counts(True) == [N - 6]  # it did train pruned (one step, then the error)
    assert pruning_config(module.model) is None
    probe.seen.clear()  # a later fit without "train" trains the whole model
    _fit(module, POMTCallback(r=6, layer=LAYER, stages=("validate",)), batches=1)
    assert probe.counts(True) == [N]


def test_fit_and_train_together_are_rejected():
    with pytest.raises(ValueError, match="'train' already prunes the validations inside fit"):
        POMTCallback(r=4, stages=("fit", "train"))
    with pytest.raises(ValueError, match="valid: validate, test, predict, fit, train"):
        POMTCallback(r=4, stages=("training",))
