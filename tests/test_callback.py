"""POMTCallback: search, patch, restore, checkpoint state, logging, DDP (CPU, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import cpu_trainer, image_loader, staircase_profile, tiny_classifier
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from pomt import SearchConfig
from pomt.callbacks import POMTCallback
from pomt.lightning import ViTClassifier
from pomt.method.pruning import apply_pruning, pruning_config
from pomt.offline.profiles import LatencyProfile

REPO = Path(__file__).resolve().parents[1]
N = 17  # 16 patches + CLS
LAYER = 1
FAST_SEARCH = dict(
    accuracy_samples=32, accuracy_grid=(17, 13, 9, 5), min_run_time=0.0, warmup=1, verify=False
)


def fast(**search) -> dict:
    """Callback arguments for a quick search (fewer images and timing) with ``search`` settings."""
    return dict(layer=LAYER, search=SearchConfig(**(FAST_SEARCH | search)))


def tiny_module():
    return tiny_classifier(latency_warmup_batches=0)


def loader(n: int = 32, batch_size: int = 8, seed: int = 0, labels: bool = True):
    return image_loader(n=n, batch_size=batch_size, seed=seed, labels=labels)


trainer = cpu_trainer


class TokenProbe:
    """Records how many tokens leave block ``index`` on every forward pass."""

    def __init__(self, vit: nn.Module, index: int) -> None:
        self.seen: list[int] = []
        vit.blocks[index].register_forward_hook(lambda _m, _i, out: self.seen.append(int(out.shape[1])))


def test_test_selects_r_prunes_and_returns_metrics(tmp_path):
    module = tiny_module()
    path = staircase_profile(module, tmp_path / "latency.json")
    callback = POMTCallback(latency_profile_path=str(path), **fast(alpha=0.9))
    probe = TokenProbe(module.model, LAYER)
    result = trainer(callbacks=[callback]).test(module, loader())[0]

    # 5 ms below 12 tokens, 10 ms above: the utility is best at the largest n on the fast step
    assert (callback.selection.n_star, callback.selection.r) == (11, N - 11)
    assert callback.latency_profile.grid == list(range(2, N + 1))
    assert callback.accuracy_profile.grid == [5, 9, 13, 17]
    assert probe.seen[-4:] == [11, 11, 11, 11]  # the test loop ran the pruned model: exactly n* tokens
    assert result["pomt/r"] == N - 11 and result["pomt/n_star"] == 11
    assert result["pomt/predicted_latency_ms"] == pytest.approx(5.0)
    assert {"test/acc1", "test/acc5", "test/latency_ms"} <= set(result)
    assert pruning_config(module.model) is None  # restored after the stage


def test_measured_search_writes_profile_and_keeps_rng(tmp_path):
    path = tmp_path / "profiles" / "latency.json"
    callback = POMTCallback(latency_profile_path=str(path), **fast(grid=(17, 14, 11, 8, 5)))
    module = tiny_module()
    probe = TokenProbe(module.model, LAYER)

    plain = tiny_module()
    pl.seed_everything(123)
    trainer().test(plain, loader())
    expected = torch.rand(3)
    pl.seed_everything(123)
    trainer(callbacks=[callback]).test(module, loader())
    assert torch.equal(torch.rand(3), expected)  # the search left the global RNG as it was

    sel = callback.selection
    assert sel.n_star in (17, 14, 11, 8, 5) and sel.r == N - sel.n_star
    assert probe.seen[-1] == sel.n_star
    saved = LatencyProfile.load(path)
    assert saved.grid == [5, 8, 11, 14, 17] and saved.batch_size == 8 and saved.layer == LAYER
    assert callback.latency_profile.batch_size == 8


def test_fixed_r_skips_the_search_and_other_methods():
    module = tiny_module()
    probe = TokenProbe(module.model, LAYER)
    callback = POMTCallback(r=4, layer=LAYER)
    result = trainer(callbacks=[callback]).test(module, loader())[0]
    assert callback.latency_profile is None and callback.selection is None
    assert probe.seen[-1] == N - 4 and result["pomt/r"] == 4

    last = TokenProbe(module.model, 3)
    callback = POMTCallback(method="topk", r=2)
    trainer(callbacks=[callback]).test(module, loader())
    assert callback.applied_schedule == [15, 13, 11, 9] and last.seen[-1] == 9

    with pytest.raises(ValueError, match="fixed r"):
        POMTCallback(method="tome")
    with pytest.raises(ValueError, match="method"):
        POMTCallback(method="random", r=1)


def test_restore_false_keeps_pruning_and_restore_puts_back_earlier_pruning():
    module = tiny_module()
    trainer(callbacks=[POMTCallback(r=3, layer=LAYER, restore=False)]).test(module, loader())
    config = pruning_config(module.model)
    assert config is not None and (config.method, config.r, config.layer) == ("pomt", 3, LAYER)

    apply_pruning(module.model, "topk", r=1)
    probe = TokenProbe(module.model, LAYER)
    trainer(callbacks=[POMTCallback(r=5, layer=LAYER)]).test(module, loader())
    assert probe.seen[-1] == N - 5
    config = pruning_config(module.model)
    assert (config.method, config.r) == ("topk", 1)

    with pytest.raises(ValueError, match="40"):  # an impossible r: clear error, model unchanged
        trainer(callbacks=[POMTCallback(r=40, layer=LAYER)]).test(module, loader())
    config = pruning_config(module.model)
    assert (config.method, config.r) == ("topk", 1)


def test_checkpoint_round_trip_of_the_results(tmp_path):
    module = tiny_module()
    path = staircase_profile(module, tmp_path / "latency.json")
    callback = POMTCallback(latency_profile_path=str(path), **fast(alpha=0.9))
    t = trainer(callbacks=[callback], default_root_dir=tmp_path)
    t.test(module, loader())
    ckpt_path = tmp_path / "model.ckpt"
    t.save_checkpoint(ckpt_path)

    checkpoint = torch.load(ckpt_path, weights_only=False)
    state = checkpoint["callbacks"][callback.state_key]
    # plain values only (no pickled classes), so it loads where weights_only=True is enforced
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = POMTCallback(**fast(alpha=0.9))
    fresh.load_state_dict(state)
    assert fresh.selection == callback.selection
    assert fresh.latency_profile == callback.latency_profile
    assert fresh.accuracy_profile == callback.accuracy_profile

    # the restored selection is reused for the same device and batch size: no new search
    probe = TokenProbe(module.model, LAYER)
    result = trainer(callbacks=[fresh]).test(module, loader())[0]
    assert fresh.latency_profile == callback.latency_profile  # a new search would time a new grid
    assert result["pomt/r"] == callback.selection.r and probe.seen[-1] == 11

    # reused profiles are selected again with the current settings: accuracy only keeps all tokens
    accuracy_only = POMTCallback(**fast(alpha=0.0))
    accuracy_only.load_state_dict(state)
    trainer(callbacks=[accuracy_only]).test(module, loader())
    assert accuracy_only.latency_profile == callback.latency_profile
    assert accuracy_only.selection.r == 0 and probe.seen[-1] == N


def test_missing_vit_is_a_clear_error_at_setup():
    class CNN(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
            )

        def forward(self, x):
            return self.net(x)

        def test_step(self, batch, batch_idx):
            return None

    with pytest.raises(
        ValueError, match="no supported ViT found inside CNN: CNN has no `blocks` attribute; searched"
    ):
        trainer(callbacks=[POMTCallback(r=1)]).test(CNN(), loader())
    with pytest.raises(ValueError, match="no submodule at path 'encoder'"):
        trainer(callbacks=[POMTCallback(r=1, vit_path="encoder")]).test(tiny_module(), loader())


def count_searches(monkeypatch) -> list[int]:
    """A list that grows by one at each search of any POMTCallback (``stage_support.choose_r``)."""
    from pomt.callbacks import stage_support

    searches, search = [], stage_support.choose_r

    def counting(*args, **kwargs):
        searches.append(1)
        return search(*args, **kwargs)

    monkeypatch.setattr(stage_support, "choose_r", counting)
    return searches


def test_fit_validation_only_when_asked_searched_per_weights_and_training_unpruned(monkeypatch):
    fit = dict(max_epochs=2, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=1)
    module = tiny_module()
    probe = TokenProbe(module.model, LAYER)
    trainer(callbacks=[POMTCallback(r=4, layer=LAYER)], **fit).fit(module, loader(), loader(seed=1))
    assert set(probe.seen) == {N}  # not asked: neither sanity check nor validation in fit is pruned

    searches = count_searches(monkeypatch)
    module = tiny_module()
    phases: list[tuple[str, int]] = []

    class Phase(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            phases.append(("train", probe.seen[-1]))

        def on_validation_batch_end(self, trainer, *args):
            phases.append(("sanity" if trainer.sanity_checking else "val", probe.seen[-1]))

    probe = TokenProbe(module.model, LAYER)
    callback = POMTCallback(stages=("fit",), **fast(grid=(17, 9)))
    trainer(callbacks=[callback, Phase()], **fit).fit(module, loader(), loader(seed=1))
    n_star = callback.selection.n_star
    # one search per validation: the weights changed in between, so A(n) is estimated again
    # while L(n), which does not depend on the weights, is reused
    assert len(searches) == 2
    notes = " | ".join(callback.result.notes)
    assert "reusing the latency profile measured earlier" in notes and "weights" in notes
    assert {n for phase, n in phases if phase == "sanity"} == {N}
    assert {n for phase, n in phases if phase == "train"} == {N}
    val = [n for phase, n in phases if phase == "val"]
    assert len(val) == 4 and set(val) <= {17, 9} and val[-2:] == [n_star] * 2
    assert pruning_config(module.model) is None


def test_monitoring_a_pruned_fit_validation_is_said_at_setup(caplog):
    from lightning.pytorch.callbacks import EarlyStopping

    stopping = EarlyStopping(monitor="val/acc1", mode="max", strict=False)
    fit = dict(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0)
    with caplog.at_level("WARNING", logger="pomt.callbacks"):  # logging is configured (by pytest)
        trainer(callbacks=[POMTCallback(r=4, layer=LAYER, stages=("fit",)), stopping], **fit).fit(
            tiny_module(), loader(), loader(seed=1)
        )
    assert "val/acc1 will be the pruned model's" in caplog.text


def test_predict_uses_given_labelled_data_and_needs_labels_otherwise():
    module = tiny_module()
    probe = TokenProbe(module.model, LAYER)
    callback = POMTCallback(accuracy_data=loader(seed=2).dataset, **fast(grid=(17, 9)))
    predictions = trainer(callbacks=[callback]).predict(module, loader(labels=False))
    assert len(predictions) == 4 and predictions[0].shape == (8, 10)
    assert probe.seen[-1] == callback.selection.n_star

    # unlabelled predict data and nothing else to estimate A(n) on: an error that says what to do
    with pytest.raises(ValueError, match="POMTCallback needs labelled images") as error:
        trainer(callbacks=[POMTCallback(**fast(grid=(17, 9)))]).predict(tiny_module(), loader(labels=False))
    for fix in ("holdout_dataloader()", "accuracy_split='val'", "accuracy_data=", "fix r="):
        assert fix in str(error.value)


def test_csv_logger_gets_curves_table_and_figure(tmp_path):
    callback = POMTCallback(**fast(grid=(17, 11, 5)))
    logger = CSVLogger(tmp_path, name="run")
    trainer(callbacks=[callback], logger=logger).test(tiny_module(), loader())
    folder = Path(logger.log_dir)
    rows = (folder / "pomt_curves.csv").read_text().splitlines()
    assert rows[0].startswith("n,r,latency_ms")
    assert len(rows) == 1 + 3
    assert (folder / "pomt_profiles.png").stat().st_size > 0
    assert f"pomt/r: {callback.selection.r}" in (folder / "hparams.yaml").read_text()


def test_wandb_offline_run_holds_curves_table_and_chosen_r(tmp_path, monkeypatch, caplog):
    wandb = pytest.importorskip("wandb")
    from pomt.lightning.loggers import wandb_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    module = tiny_module()
    path = staircase_profile(module, tmp_path / "latency.json")
    callback = POMTCallback(latency_profile_path=str(path), **fast(alpha=0.9))
    logger = wandb_logger(project="pomt-test", save_dir=tmp_path / "wb")
    try:
        with caplog.at_level("INFO"):
            trainer(callbacks=[callback], logger=logger).test(module, loader())
        run_dir = Path(logger.experiment.dir).parent
        assert logger.experiment.config["pomt/precision"] == "32-true"  # what L(n) was timed at
        assert logger.experiment.summary["pomt/precision"] == "32-true"
        assert logger.experiment.summary["pomt/stability"] == callback.selection.stability_line != ""
    finally:
        wandb.finish()
    assert run_dir.name.startswith("offline-run-")
    tables = list((run_dir / "files" / "media" / "table").rglob("*.json"))
    curves = [json.loads(p.read_text()) for p in tables if "curves" in p.name]
    assert len(curves) == 1
    table = curves[0]
    cols = table["columns"]
    selected = [row for row in table["data"] if row[cols.index("selected")] == 1]
    assert len(selected) == 1 and selected[0][cols.index("r")] == callback.selection.r == N - 11
    assert len(table["data"]) == len(callback.selection.curve_n)
    plots = {p.name.split("_table")[0] for p in tables if p.parent.name == "plot"}
    assert plots == {"latency_ms", "accuracy", "utility"}  # one line plot each, n* marked
    assert list((run_dir / "files" / "media" / "images").rglob("*.png"))
    # the scalars (R, n*, ...) are in the binary run file, which W&B finishes writing just after
    # wandb.finish() returns
    run_file = next(run_dir.glob("*.wandb"))
    deadline = time.monotonic() + 20
    while b"pomt/n_star" not in run_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"pomt/r" in run_file.read_bytes() and b"pomt/n_star" in run_file.read_bytes()
    assert f"wandb sync {run_dir}" in caplog.text  # the user is told how to upload the run


def test_wandb_online_without_credentials_does_not_prompt(monkeypatch, tmp_path):
    from pomt.lightning.loggers import wandb_logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ValueError, match="WANDB_API_KEY"):
        wandb_logger(save_dir=tmp_path, offline=False)


DDP_SCRIPT = """
import json, os, sys
import torch
import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset
sys.path.insert(0, {repo!r})
from pomt import SearchConfig
from pomt.callbacks import POMTCallback
from pomt.lightning import ViTClassifier

from pomt.callbacks import stage_support
searches, search = [], stage_support.choose_r

def counting(*args, **kwargs):
    searches.append(1)
    return search(*args, **kwargs)

stage_support.choose_r = counting

torch.set_num_threads(1)
torch.manual_seed(0)
module = ViTClassifier("vit_tiny_patch16_224", num_classes=10, img_size=32,
                       model_kwargs=dict(patch_size=8, embed_dim=64, depth=4, num_heads=2))
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
callback = POMTCallback(layer=1, latency_profile_path={profile!r},
                    search=SearchConfig(alpha=0.9, accuracy_grid=(17, 9, 5), accuracy_samples=16, verify=False))
seen = []
module.model.blocks[1].register_forward_hook(lambda m, i, o: seen.append(int(o.shape[1])))
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", callbacks=[callback], logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
result = trainer.test(module, DataLoader(data, batch_size=4))
out = dict(rank=trainer.global_rank, r=callback.applied_r, searches=len(searches),
           tokens_seen=sorted(set(seen[-4:])), result=result[0])
with open(os.path.join({out!r}, f"rank{{trainer.global_rank}}.json"), "w") as f:
    json.dump(out, f)
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_get_the_same_r(tmp_path):
    """Rank 0 selects R (here from a staircase profile: R = 6), rank 1 receives it; ~20 s."""
    profile = staircase_profile(tiny_module(), tmp_path / "latency.json", batch_size=4)
    script = tmp_path / "ddp_run.py"
    script.write_text(
        textwrap.dedent(DDP_SCRIPT.format(repo=str(REPO), out=str(tmp_path), profile=str(profile)))
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [rank["searches"] for rank in ranks] == [1, 0]  # only rank 0 measured
    assert ranks[0]["r"] == ranks[1]["r"] == N - 11
    assert ranks[0]["tokens_seen"] == ranks[1]["tokens_seen"] == [11]  # both ranks ran pruned
    synced = [{k: v for k, v in rank["result"].items() if "latency" not in k} for rank in ranks]
    assert synced[0] == synced[1]  # synced metrics (latency is each process's own device)


def test_lightning_cli_builds_module_and_callback_from_plain_arguments():
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        ViTClassifier,
        run=False,
        save_config_kwargs={"overwrite": True},
        args=[
            "--model.model_name=vit_tiny_patch16_224",
            "--model.num_classes=10",
            "--model.img_size=32",
            '--model.model_kwargs={"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}',
            "--trainer.callbacks+=pomt.callbacks.POMTCallback",
            "--trainer.callbacks.layer=1",
            '--trainer.callbacks.search={"alpha": 0.7, "grid": [17, 9]}',
            "--trainer.callbacks.accuracy_split=val",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            "--trainer.enable_checkpointing=false",
        ],
    )
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, POMTCallback))
    assert (callback.search_config.alpha, callback.layer, callback.search_config.grid) == (0.7, 1, (17, 9))
    assert isinstance(callback.search_config, SearchConfig) and callback.accuracy_split == "val"
    assert cli.model.vit.patch_embed.num_patches == 16
