"""The callback in someone else's project: its own LightningModule (the ViT nested at
``net.backbone``, compiled), its own datamodule, checkpoints that outlive their weights;
selections that are verified on the device, that follow the weights, that are made on
held-out data; and every mistake that needs no timing caught at ``setup``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_trainer, image_loader, make_tiny_vit, staircase_profile, tiny_classifier
from torch import nn

import pomt
import pomt.offline.finder
from pomt import Console, Reuse, SearchConfig, Target
from pomt.callbacks import POMTCallback
from pomt.offline.selection import select_r
from pomt.offline.verify import check_candidates

N, LAYER = 17, 1
QUICK = dict(accuracy_samples=16, accuracy_grid=(17, 9, 5), grid=(17, 13, 9, 5), min_run_time=0.0, warmup=1)


class Net(nn.Module):
    """A project's network: a backbone (the ViT) and its own head."""

    def __init__(self, depth: int = 4, patch_size: int = 8) -> None:
        super().__init__()
        self.backbone = make_tiny_vit(depth=depth, patch_size=patch_size, num_classes=0)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class Project(pl.LightningModule):
    """Not our ViTClassifier: the ViT is at ``net.backbone`` (``net._orig_mod.backbone`` compiled)."""

    def __init__(self, compile: bool = False, **net) -> None:
        super().__init__()
        self.net = torch.compile(Net(**net), backend="eager") if compile else Net(**net)
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(-1) == y).float().mean())

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ProjectData(pl.LightningDataModule):
    """A project's datamodule: train/val/test, no holdout split."""

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.size = size

    def train_dataloader(self):
        return image_loader(n=16, seed=0, size=self.size)

    def val_dataloader(self):
        return image_loader(n=16, seed=1, size=self.size)

    def test_dataloader(self):
        return image_loader(n=16, seed=2, size=self.size)


def search(**overrides) -> SearchConfig:
    return SearchConfig(**(QUICK | {"verify": False} | overrides))


# ----------------------------------------------------------------------------- a namespaced import


def test_the_package_installs_under_pomt_only(tmp_path):
    code = (
        "import importlib.util as u\n"
        "from pomt.callbacks import POMTCallback\n"
        "from pomt.datamodules import DigitsDataModule, ImageNetDataModule\n"
        "print(u.find_spec('callbacks') is None, u.find_spec('datamodules') is None)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]  # no generic top-level names of ours


# ----------------------------------------------------------------------------- one way to find the ViT


def test_every_function_that_takes_a_model_finds_the_vit_inside_it():
    module = Project()
    assert pomt.token_layout(module).n_total == N
    assert pomt.token_schedule(module, "pomt", 4, LAYER) == [17, 13, 13, 13]
    pomt.apply_pruning(module, "pomt", r=4, layer=LAYER)  # a LightningModule, as profile_latency takes
    assert pomt.pruning_config(module.net.backbone).r == 4 and pomt.pruning_config(module).r == 4
    with torch.no_grad():
        assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    pomt.remove_pruning(module)
    assert pomt.pruning_config(module) is None
    with pytest.raises(ValueError, match="did you mean vit_path='net.backbone'"):
        pomt.find_vit(module, "backbone")


def test_a_compiled_network_is_searched_eagerly_and_stays_compiled():
    module = Project(compile=True)
    from torch._dynamo.utils import counters

    compiled_before = sum(counters["frames"].values())
    lines: list[str] = []
    result = pomt.find_r(
        module,
        image_loader(),
        target=Target(batch_size=4),
        layer=LAYER,
        search=search(),
        console=Console(progress=False, log=lines.append),
    )
    assert sum(counters["frames"].values()) == compiled_before  # no compilation: no recompile storm
    assert result.latency.grid == [5, 9, 13, 17]
    assert any("timing the eager module: net torch.compile'd" in line for line in lines)
    assert type(module.net).__name__ == "OptimizedModule"  # the user's wrapper is back
    callback = POMTCallback(r=4, layer=LAYER)
    cpu_trainer(callbacks=[callback]).test(module, image_loader())
    assert callback.found_vit_path == "net._orig_mod.backbone"


# ----------------------------------------------------------------------------- fail fast


def test_mistakes_that_need_no_timing_fail_at_setup_before_training():
    class NoViT(Project):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

    fit = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    for module, callback, message in (
        (NoViT(), POMTCallback(), "no supported ViT found inside NoViT"),
        (Project(), POMTCallback(layer=7), r"layer must be an int in 0\.\.3"),
        (Project(), POMTCallback(r=40, layer=LAYER), r"r must be an int in 0\.\.15"),
        (Project(), POMTCallback(accuracy_data=image_loader(size=28)), "28x28 images, the ViT takes 32x32"),
        (Project(), POMTCallback(accuracy_data=image_loader(labels=False)), "needs labelled images"),
    ):
        with pytest.raises(ValueError, match=message):
            cpu_trainer(callbacks=[callback], **fit).fit(module, datamodule=ProjectData())
        assert module.steps == 0, message  # failed before the first training step


# ----------------------------------------------------------------------------- honest data for A(n)


def test_choosing_r_on_the_reported_split_is_said_once_and_a_split_can_be_named(monkeypatch, caplog):
    seen: list[object] = []
    real = pomt.offline.finder.estimate_accuracy

    def estimate(model, data, **kwargs):
        seen.append(data)
        return real(model, data, **kwargs)

    monkeypatch.setattr(pomt.offline.finder, "estimate_accuracy", estimate)
    callback = POMTCallback(layer=LAYER, search=search())
    caplog.set_level("WARNING", logger="pomt.callbacks")  # logging is configured (by pytest)
    cpu_trainer(callbacks=[callback]).test(Project(), datamodule=ProjectData())
    cpu_trainer(callbacks=[callback]).test(Project(), datamodule=ProjectData())  # warned once
    messages = [
        r.getMessage()
        for r in caplog.records
        if "chooses R on the test data, the split this test" in r.getMessage()
    ]
    assert len(messages) == 1 and "accuracy_split='val'" in messages[0]
    named = POMTCallback(layer=LAYER, search=search(), accuracy_split="val")
    cpu_trainer(callbacks=[named]).test(Project(), datamodule=ProjectData())
    assert torch.equal(seen[-1].dataset.tensors[0], ProjectData().val_dataloader().dataset.tensors[0])
    with pytest.raises(ValueError, match="accuracy_split must be one of holdout, val, train, test"):
        POMTCallback(accuracy_split="selection")  # the old name of the split: not a split any more


# ----------------------------------------------------------------------------- selections follow the weights


def test_a_checkpointed_selection_is_reused_only_for_the_same_weights(tmp_path):
    module = tiny_classifier(latency_warmup_batches=0)
    callback = POMTCallback(layer=LAYER, search=search())
    trainer = cpu_trainer(callbacks=[callback], default_root_dir=tmp_path)
    trainer.test(module, image_loader())
    state = callback.state_dict()

    same = POMTCallback(layer=LAYER, search=search())
    same.load_state_dict(state)
    cpu_trainer(callbacks=[same]).test(module, image_loader())
    assert "reusing the accuracy profile loaded from the checkpoint" in same.result.notes

    with torch.no_grad():  # the weights change (e.g. trained further): A(n) must be estimated again
        module.model.head.weight.add_(1.0)
    changed = POMTCallback(layer=LAYER, search=search())
    changed.load_state_dict(state)
    cpu_trainer(callbacks=[changed]).test(module, image_loader())
    notes = " | ".join(changed.result.notes)
    assert "not reusing the accuracy profile loaded from the checkpoint" in notes and "weights" in notes
    assert (
        "reusing the latency profile loaded from the checkpoint" in notes
    )  # latency does not depend on weights
    assert changed.accuracy_profile.weights != callback.accuracy_profile.weights


def test_a_latency_profile_is_reused_only_for_the_same_architecture(tmp_path):
    path = tmp_path / "latency.json"
    pomt.find_r(Project(depth=2), image_loader(), target=Target(batch_size=4), layer=LAYER, search=search(), reuse=Reuse(latency_path=path), console=Console(progress=False, log=lambda line: None))  # fmt: skip
    for net, reason in ((dict(depth=4), "depth=4"), (dict(patch_size=4), "patch=4x4")):
        lines: list[str] = []
        result = pomt.find_r(Project(**net), image_loader(), target=Target(batch_size=4), layer=LAYER, search=search(), reuse=Reuse(latency_path=path), console=Console(progress=False, log=lines.append))  # fmt: skip
        stale = next(line for line in lines if line.startswith(f"not reusing the latency profile {path}"))
        assert "architecture" in stale and reason in stale  # said, with the reason, and measured again
        assert any(line.startswith("measured L(n)") for line in lines)
        assert result.latency.architecture == pomt.models.architecture(Project(**net).net.backbone)


# ----------------------------------------------------------------------------- verified speed-ups


# three levels: n = 5 is faster than n = 9 on the profile, so it is a fallback worth timing
# (with 5 as fast as 9 it would be dominated, and the verification would not try it)
STAIRCASE = {17: 10.0, 13: 10.0, 9: 5.0, 5: 4.0}
ACCURACY = {17: 0.9, 13: 0.9, 9: 0.88, 5: 0.5}


def _fake(speedups: dict[int, float]):
    def measure(r: int, decided=None) -> tuple[list[float], float]:
        s = speedups.get(r, 1.0)
        return [s * (1 + 0.01 * (i % 5 - 2)) for i in range(20)], 10.0

    return measure


def test_verification_keeps_a_real_speedup_and_falls_back_otherwise():
    selection = select_r(STAIRCASE, ACCURACY, alpha=0.5)
    assert (selection.n_star, selection.candidates[:3]) == (9, (9, 5, 17))  # best first
    kept = check_candidates(selection, _fake({8: 1.9}), log=lambda line: None)
    assert (kept.r, kept.verified) == (8, True) and kept.measured_speedup == pytest.approx(1.9)
    low, high = kept.measured_speedup_interval
    assert low < 1.9 < high and "verified" in kept.verification and "x1.900 measured" in kept.summary()

    lines: list[str] = []
    noise = check_candidates(selection, _fake({}), log=lines.append)  # the step was a timing fluke
    assert noise.r == 0 and noise.rejected == (9, 5) and not noise.verified  # n = 17 is next: R = 0
    assert "not significantly faster" in lines[0] and "keeping the unpruned model" in lines[-1]
    second = check_candidates(selection, _fake({12: 3.0}), log=lambda line: None)  # the next candidate pays
    assert (second.r, second.rejected, second.measured_speedup) == (12, (9,), pytest.approx(3.0))
    # a dominated count is no fallback: with n = 5 as slow as n = 9 on the profile, a failed
    # n* = 9 goes straight to R = 0 (n = 13 is dominated by 17 as well)
    flat = select_r(STAIRCASE | {5: 5.0}, ACCURACY, alpha=0.5)
    assert (flat.n_star, flat.candidates) == (9, (9, 17))
    assert check_candidates(flat, _fake({12: 3.0}), log=lambda line: None).rejected == (9,)

    # significantly faster, but by too little for the accuracy it costs: not worth it either
    costly = select_r(STAIRCASE | {5: 5.0}, {17: 0.9, 13: 0.9, 9: 0.3, 5: 0.2}, alpha=0.9)
    assert costly.n_star == 9
    rejected = check_candidates(costly, _fake({8: 1.05}), log=lambda line: None)
    assert rejected.r == 0 and "does not beat R = 0" in rejected.verification


def test_the_callback_logs_and_prints_the_verified_speedup(monkeypatch, caplog, tmp_path):
    # a profile with a step at n = 12 (R = 6 at alpha 0.9); what the timing then finds is faked
    path = str(staircase_profile(tiny_classifier(), tmp_path / "latency.json"))
    monkeypatch.setattr(
        pomt.offline.finder, "speedups", lambda prepared, r, search, decided=None: _fake({r: 1.25})(r)
    )
    callback = POMTCallback(layer=LAYER, latency_profile_path=path, search=search(verify=True, alpha=0.9))
    with caplog.at_level("INFO"):
        result = cpu_trainer(callbacks=[callback]).test(tiny_classifier(), image_loader())[0]
    sel = callback.selection
    assert (
        sel.verified and sel.r == 6 and result["pomt/measured_speedup"] == pytest.approx(sel.measured_speedup)
    )
    assert (
        result["pomt/measured_speedup_low"]
        < result["pomt/measured_speedup"]
        < result["pomt/measured_speedup_high"]
    )
    assert "measured x1.25" in caplog.text and "verified" in caplog.text

    monkeypatch.setattr(
        pomt.offline.finder, "speedups", lambda prepared, r, search, decided=None: _fake({})(r)
    )  # no real gain
    callback = POMTCallback(layer=LAYER, latency_profile_path=path, search=search(verify=True, alpha=0.9))
    result = cpu_trainer(callbacks=[callback]).test(tiny_classifier(), image_loader())[0]
    # R = 0 kept: what was measured is still logged, with the R it was measured at
    assert result["pomt/r"] == 0 and result["pomt/measured_speedup"] == pytest.approx(1.0)
    assert result["pomt/measured_r"] == 6 and result["pomt/measured_speedup_low"] <= 1.0


def test_timing_relative_to_the_unpruned_model_is_the_cpu_default():
    assert SearchConfig().timing.relative_on("cpu") and not SearchConfig().timing.relative_on("cuda")
    assert not SearchConfig(relative=False).timing.relative_on("cpu")
    result = pomt.find_r(Project(), image_loader(), target=Target(batch_size=4), layer=LAYER, search=SearchConfig(**(QUICK | {"verify": False})), console=Console(progress=False, log=lambda line: None))  # fmt: skip
    assert result.latency.sampling.endswith("relative to N")


def test_a_real_verification_on_this_machine_measures_both_models():
    from pomt.offline.verify import speedups

    vit = make_tiny_vit()
    search = SearchConfig(warmup=1, verify_max_time=0.0, verify_pairs=8, verify_groups=4)
    with Target(batch_size=8, device="cpu", dtype="float32").prepare(vit, layer=0) as prepared:
        samples, unpruned_ms = speedups(prepared, 15, search)
    assert len(samples) == 4 and unpruned_ms > 0 and all(s > 0 for s in samples)  # one speed-up per block
    assert pomt.pruning_config(vit) is None  # put back as it was


def test_readme_shows_the_namespaced_import_and_the_verified_line():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Add POMT to an existing Lightning project") :]
    section = section[: section.index("\n## ", 5)]
    for text in ("from pomt.callbacks import POMTCallback", "measured x", "accuracy_split", "stages"):
        assert text in section, text
