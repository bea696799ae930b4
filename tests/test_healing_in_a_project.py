"""Healing in someone else's project: a pruned model saves, copies and loads like any model (also
inside a Lightning checkpoint that keeps the network in its hyperparameters), training runs in
train mode, and what the callback says is true and reaches the application's log files."""

from __future__ import annotations

import copy
import io

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_trainer, image_loader, make_tiny_vit
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import pomt
from pomt.callbacks import POMTCallback

N, LAYER = 17, 1
METHODS = [("pomt", 6), ("topk", 2), ("tome", 2)]


def _pruned(method: str, r: int) -> nn.Module:
    return pomt.apply_pruning(make_tiny_vit(), method, r=r, layer=LAYER)


# ----------------------------------------------------------------------------- a pruned model pickles


@pytest.mark.parametrize(("method", "r"), METHODS)
def test_a_pruned_model_saves_loads_and_copies_pruned_and_equal(method, r):
    vit = _pruned(method, r)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = vit(x)
    buffer = io.BytesIO()
    torch.save(vit, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(vit)
    if method == "tome":  # the blocks still share one size state, and not the original's
        states = {id(block._pomt_spec.state) for block in loaded.blocks}
        assert len(states) == 1 and id(vit.blocks[0]._pomt_spec.state) not in states
    for other in (loaded, copied):
        assert pomt.pruning_config(other) == pomt.pruning_config(vit)
        assert type(other.blocks[LAYER]) is type(vit.blocks[LAYER])  # the same patched class
        with torch.no_grad():
            assert torch.equal(other(x), expected)
        pomt.remove_pruning(other)  # and it unprunes like the model it was saved from
        assert pomt.pruning_config(other) is None and type(other.blocks[LAYER]) is type(
            make_tiny_vit().blocks[0]
        )
        with torch.no_grad():
            assert torch.equal(other(x), pomt.remove_pruning(copy.deepcopy(vit))(x))


# ----------------------------------------------------------------------------- the template's module


class TemplateModule(pl.LightningModule):
    """As lightning-hydra-template writes it: the network is a constructor argument kept in the
    hyperparameters (so every checkpoint pickles it), and it is also ``self.net``."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_the_template_healing_run_checkpoints_the_pruned_net_and_loads_it_back(tmp_path):
    module = TemplateModule(make_tiny_vit(drop_path_rate=0.1).train())
    callback = POMTCallback(r=6, layer=LAYER, stages=("train", "test"))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", save_last=True)
    trainer = cpu_trainer(
        callbacks=[callback, checkpoint],
        enable_checkpointing=True,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, image_loader(n=16), image_loader(n=8, seed=1))
    assert callback.trained_r == 6 and pomt.pruning_config(module.net) is None
    tested = trainer.test(module, image_loader(n=8, seed=2))
    assert "test/acc" in tested[0]

    path = checkpoint.best_model_path  # saved at the end of an epoch, while training pruned
    loaded = TemplateModule.load_from_checkpoint(path, weights_only=False)
    config = pomt.pruning_config(loaded.net)  # so it loads pruned
    assert config is not None and (config.method, config.r, config.layer) == ("pomt", 6, LAYER)
    module.load_state_dict(torch.load(path, weights_only=False)["state_dict"])  # the saved weights,
    pomt.apply_pruning(module.net, "pomt", r=6, layer=LAYER)  # pruned as they were saved
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.net.eval()(x), module.net.eval()(x))
    pomt.remove_pruning(loaded.net)
    assert pomt.pruning_config(loaded.net) is None
