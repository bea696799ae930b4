"""Healing in someone else's project: a pruned model saves, copies and loads like any model (also
inside a Lightning checkpoint that keeps the network in its hyperparameters), training runs in
train mode, and what the callback says is true and reaches the application's log files."""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_KWARGS, cpu_trainer, image_loader, make_tiny_vit, staircase_profile, tiny_classifier
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import pomt
from pomt import Console, Reuse, SearchConfig, Target
from pomt.callbacks import POMTCallback
from pomt.lightning.sweep.configurations import Configuration
from pomt.lightning.sweep.healing import _fit

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


@pytest.mark.parametrize(("method", "r"), METHODS)
def test_a_pruned_model_loaded_from_torch_save_exports_to_onnx(tmp_path, method, r):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    vit = _pruned(method, r)
    buffer = io.BytesIO()
    torch.save(vit, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 32, 32)
    record = pomt.export_onnx(loaded, tmp_path / f"{method}.onnx", example=x)  # checked against PyTorch
    assert (record.method, record.r) == (method, r)
    assert record.max_abs_diff is not None and record.max_abs_diff <= record.tolerance
    with torch.no_grad():  # the file computes the saved model, pruned
        assert torch.equal(loaded(x), vit(x))


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


# ----------------------------------------------------------------------------- training in train mode


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        return image_loader(n=16)


def _drop_path_modes(vit: nn.Module) -> list[bool]:
    seen: list[bool] = []
    for block in vit.blocks[1:]:  # (timm's rate rises from 0 at the first block)
        block.drop_path1.register_forward_hook(lambda m, _i, _o: seen.append(m.training))
    return seen


def test_the_sweep_heals_in_train_mode_with_drop_path_on_and_puts_the_modes_back():
    module = tiny_classifier(latency_warmup_batches=0, model_kwargs=TINY_KWARGS | {"drop_path_rate": 0.1})
    module.eval()  # as the sweep leaves it after timing and testing
    seen = _drop_path_modes(module.model)
    assert module.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    sweep = SimpleNamespace(
        model=module, datamodule=Data(), heal_batch_size=None, trainer_factory=cpu_trainer
    )
    settings = SimpleNamespace(heal_batches=2, layer=LAYER, search=SearchConfig())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(sweep, settings, Configuration("tome", 2, heal_epochs=1))
    assert not [w for w in caught if "eval mode at the start of training" in str(w.message)]
    assert seen and all(seen)  # every training step ran drop-path (train mode)
    assert not any(m.training for m in module.modules())  # and the modes are put back


def test_the_callbacks_train_stage_trains_in_train_mode_after_its_search(tmp_path):
    """Lightning checks the modes before the callback's search (on_train_start), so its warning
    cannot tell: every training step must see the modules in train mode, drop-path on."""

    class Recording(TemplateModule):
        def training_step(self, batch, batch_idx):
            steps.append(all(m.training for m in self.net.modules()))
            return super().training_step(batch, batch_idx)

    steps: list[bool] = []
    module = Recording(make_tiny_vit(drop_path_rate=0.1).train())
    callback = _search_callback(tmp_path, accuracy_data=image_loader(n=32), stages=("train",))
    trainer = cpu_trainer(callbacks=[callback], max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the chance warning: random weights)
        trainer.fit(module, image_loader(n=8, batch_size=4))
    assert callback.r_source == "search" and callback.trained_r is not None
    assert steps == [True, True]
    assert all(m.training for m in module.modules())  # and left as found


def test_an_error_in_an_evaluation_stage_puts_each_module_mode_back_as_found():
    class Failing(TemplateModule):
        def test_step(self, batch, batch_idx):
            raise RuntimeError("step failed")

    module = Failing(make_tiny_vit().train())
    module.net.norm.eval()  # a module the project keeps in eval mode on purpose
    found = {name: m.training for name, m in module.named_modules()}
    with pytest.raises(RuntimeError, match="step failed"):
        cpu_trainer(callbacks=[POMTCallback(r=6, layer=LAYER)]).test(module, image_loader(n=8))
    assert {name: m.training for name, m in module.named_modules()} == found
    assert pomt.pruning_config(module.net) is None


# ----------------------------------------------------------------------------- warnings reach the log files


# (tests/test_real_setups.py: under a Hydra-like logging setup each warning is said once on the
# console and once in the file; with no logging configured, once as a UserWarning at the user's line)


# ----------------------------------------------------------------------------- CPU threads


def test_a_one_thread_cpu_profile_is_not_reused_at_two_threads(tmp_path):
    vit = make_tiny_vit()
    path = staircase_profile(vit, tmp_path / "latency.json")  # timed (as if) on this 1-thread process
    assert pomt.LatencyProfile.load(path).threads == 1
    quick = SearchConfig(
        accuracy_samples=16,
        accuracy_grid=(17, 9, 5),
        grid=(17, 9, 5),
        min_run_time=0.0,
        warmup=1,
        verify=False,
    )
    kwargs = dict(layer=LAYER, search=quick, console=Console(progress=False, log=lambda _: None))
    same = pomt.find_r(
        vit, image_loader(n=16), Target(batch_size=8), reuse=Reuse(latency_path=path), **kwargs
    )
    assert "reusing the latency profile" in " ".join(same.notes)
    torch.set_num_threads(2)  # (the autouse fixture puts the count back)
    other = pomt.find_r(
        vit, image_loader(n=16), Target(batch_size=8), reuse=Reuse(previous=same, latency_path=path), **kwargs
    )
    notes = [note for note in other.notes if "latency profile" in note]
    assert len(notes) == 1 and notes[0].startswith("not reusing")  # one line for both sources, same reason
    assert "measured earlier or the latency profile" in notes[0]
    assert all(
        "it was timed on 1 CPU thread(s), this process runs 2 (torch.get_num_threads())" in n for n in notes
    )
    assert other.latency.threads == 2  # measured again


# ----------------------------------------------------------------------------- numbers that say what they are


def _search_callback(tmp_path, **kwargs) -> POMTCallback:
    path = staircase_profile(make_tiny_vit(), tmp_path / "latency.json")  # a step below 12 tokens
    quick = dict(accuracy_samples=32, accuracy_grid=(17, 13, 9, 5), grid=(17, 13, 9, 5), min_run_time=0.0)
    search = SearchConfig(**quick, warmup=1, verify=False)
    return POMTCallback(layer=LAYER, latency_profile_path=str(path), search=search, **kwargs)


def test_r_chosen_for_training_on_weights_at_chance_is_warned_about(tmp_path, caplog):
    module = TemplateModule(make_tiny_vit().train())  # random weights: chance on random labels
    callback = _search_callback(tmp_path, accuracy_data=image_loader(n=32), stages=("train", "test"))
    trainer = cpu_trainer(callbacks=[callback], max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    with caplog.at_level(logging.INFO):  # logging is configured (by pytest): the warning is logged
        trainer.fit(module, image_loader(n=8))
    r = callback.trained_r
    text = caplog.text
    assert (
        f"R={r} was chosen for training on weights at chance" in text and "10 classes (1/10 = 0.100" in text
    )
    assert "fix the R: r=" in text and "choose R after some training" in text

    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer.test(module, image_loader(n=8, seed=2))
    text = caplog.text
    # the test says where R came from, and the accuracy it measured, not the pre-training estimate
    assert f"r={r} on `net`" in text and "R from trained_r" in text and "selection estimate" not in text
    assert f"test of pomt r={r} (R from trained_r) measured test/acc=" in text


def test_a_searched_r_is_reported_with_the_estimate_named_and_the_measured_accuracy(tmp_path, caplog):
    callback = _search_callback(tmp_path, accuracy_data=image_loader(n=32))
    with caplog.at_level(logging.INFO):
        cpu_trainer(callbacks=[callback]).test(TemplateModule(make_tiny_vit()), image_loader(n=8))
    sel = callback.selection
    assert f"selection estimate A({sel.n_star})=" in caplog.text and "random tokens" in caplog.text
    assert "measured test/acc=" in caplog.text and "not this model's" in caplog.text


def test_profiles_from_a_checkpoint_are_named_so(tmp_path, caplog):
    module = TemplateModule(make_tiny_vit())
    callback = _search_callback(tmp_path, accuracy_data=image_loader(n=32))
    trainer = cpu_trainer(callbacks=[callback])
    trainer.test(module, image_loader(n=8))
    state = callback.state_dict()
    fresh = _search_callback(tmp_path, accuracy_data=image_loader(n=32))
    fresh.load_state_dict(state)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        cpu_trainer(callbacks=[fresh]).test(module, image_loader(n=8))
    assert "reusing the accuracy profile loaded from the checkpoint" in caplog.text
    assert "measured earlier" not in caplog.text


# ----------------------------------------------------------------------------- the plot shows the measured


def test_the_latency_plot_joins_measured_points_and_draws_no_riser_across_a_gap(tmp_path):
    from pomt.plots import plot_profiles, save_figure
    from pomt.timing import TimingStats

    grid = [5, 9, 11, 13, 17, 29, 41, 53, 65, 97, 129, 197]  # sparse above 65, as a fast search
    lat = {n: TimingStats.from_samples([20 + 0.2 * n, 20.4 + 0.2 * n, 20.8 + 0.2 * n]) for n in grid}
    acc = {n: 0.8 * (1 - math.exp(-n / 30)) for n in (5, 17, 41, 65, 129, 197)}
    sel = pomt.select_r(lat, acc, alpha=0.5)
    fig = plot_profiles(lat, acc, sel)
    latency_axis = fig.axes[0]
    curve = next(line for line in latency_axis.get_lines() if line.get_label().startswith("denoised"))
    assert curve.get_drawstyle() == "default"  # straight segments, not steps
    assert list(curve.get_xdata()) == list(sel.curve_n) == grid  # vertices only at measured n
    assert "straight between measured n" in curve.get_label()
    y = dict(zip(curve.get_xdata(), curve.get_ydata(), strict=True))
    assert y[65] < y[97] < y[129]  # across the gap: a slope between two measurements, no riser
    labels = [text.get_text() for text in latency_axis.get_legend().get_texts()]
    assert "median (IQR)" in labels  # the measured points, with their spread
    save_figure(fig, tmp_path / "profile.png")
    assert (tmp_path / "profile.png").stat().st_size > 10_000
