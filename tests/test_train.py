"""``train.py``: its ``--help``, and fit + test on the digits config with a tiny model and tiny limits,
twice into the same folders (the LightingCLI + WandbLogger config.yaml clash must not stop a rerun)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_train.yaml"


def _load_train(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT))
    spec = importlib.util.spec_from_file_location("pomt_train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_args(tmp: Path) -> list[str]:
    return [
        "--config",
        str(CONFIG),
        "--model.model_kwargs",
        "{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
        f"--checkpoint.dirpath={tmp / 'checkpoints'}",
    ]


def test_help_lists_the_options():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for option in (
        "--config",
        "--model.model_name",
        "--data CONFIG",
        "--checkpoint.dirpath",
        "--trainer.max_epochs",
    ):
        assert option in out.stdout


def test_fit_then_test_twice_into_the_same_folders(tmp_path, monkeypatch, capsys):
    import wandb

    from pomt.lightning import ViTClassifier

    monkeypatch.setenv("WANDB_MODE", "offline")
    train = _load_train(monkeypatch)
    for run in range(2):  # the second run meets the first one's config.yaml and checkpoint
        metrics = train.main(_tiny_args(tmp_path))
        wandb.finish()
        printed = capsys.readouterr().out
        assert "test accuracy (top-1):" in printed, f"run {run}: {printed[-1500:]}"
        assert 0.0 <= metrics["test/acc1"] <= 1.0
        assert f"{100 * metrics['test/acc1']:.2f}%" in printed

    checkpoint = tmp_path / "checkpoints" / "digits_vit.ckpt"
    assert checkpoint.is_file()  # the fixed path, no digits_vit-v1.ckpt on a rerun
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["digits_vit.ckpt"]
    assert (tmp_path / "runs" / "config.yaml").is_file()
    assert len(list((tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))) == 2

    # the checkpoint rebuilds the trained model from its own hyperparameters alone
    model = ViTClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    assert model.hparams.model_kwargs["embed_dim"] == 32 and model.num_classes == 10
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_heal_config_fine_tunes_a_checkpoint_pruned_and_tests_it_at_the_same_r(tmp_path, monkeypatch, capsys):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    train = _load_train(monkeypatch)
    train.main(_tiny_args(tmp_path))  # the starting checkpoint, as configs/digits_train.yaml writes it
    wandb.finish()
    start = tmp_path / "checkpoints" / "digits_vit.ckpt"
    capsys.readouterr()

    callback = '[{"class_path": "pomt.callbacks.POMTCallback", "init_args": {"r": 4, "layer": 1, "stages": ["train", "test"]}}]'
    heal = [
        str(ROOT / "configs" / "digits_heal.yaml") if a == str(CONFIG) else a for a in _tiny_args(tmp_path)
    ]
    metrics = train.main([*heal, f"--model.weights={start}", f"--trainer.callbacks={callback}"])
    wandb.finish()
    printed = capsys.readouterr().out
    assert "trained and tested pruned: pomt r=4" in printed
    assert metrics["pomt/r"] == 4 and 0.0 <= metrics["test/acc1"] <= 1.0  # the test ran pruned at r=4

    healed = tmp_path / "checkpoints" / "digits_vit_healed.ckpt"
    state = torch.load(healed, map_location="cpu", weights_only=True)
    pomt_state = next(v for k, v in state["callbacks"].items() if "POMTCallback" in k)
    assert pomt_state["trained_r"] == 4  # the R the weights were healed at
    before = torch.load(start, map_location="cpu", weights_only=True)["state_dict"]
    assert any(not torch.equal(before[k], v) for k, v in state["state_dict"].items())


def test_heal_config_parses_with_its_search():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/digits_heal.yaml", "--print_config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        "stages:\n      - train\n      - test" in out.stdout
        and "weights: checkpoints/digits_vit.ckpt" in out.stdout
    )
