"""Fine-tune a ViT on a datamodule, then test it: ``python train.py --config configs/digits_train.yaml``.

A LightningCLI entry point (``fit`` followed by ``test`` on the best checkpoint). The model
is :class:`pomt.lightning.ViTClassifier`; the datamodule any of ``datamodules`` (given by
``class_path``). The best checkpoint is written where ``checkpoint.dirpath`` /
``checkpoint.filename`` say (the digits config: ``checkpoints/digits_vit.ckpt``, which the
evaluate config reads). ``--print_config`` shows every option.

Healing (``configs/digits_heal.yaml``): with ``model.weights`` a trained checkpoint and a
``POMTCallback`` with ``"train"`` in its ``stages`` among ``trainer.callbacks``, the model is
fine-tuned with its ViT pruned at one R (chosen before the first step, or the callback's
``r``), validated and checkpointed at that R, and tested at it.
"""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from pomt.datamodules import ClassificationDataModule
from pomt.errors import require
from pomt.lightning import ViTClassifier
from pomt.lightning.sweep.entry import command_line, quiet_console


class TrainCLI(LightningCLI):
    """LightningCLI with one always-present ``ModelCheckpoint`` configured under ``checkpoint:``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.dirpath": "checkpoints",
                "checkpoint.filename": "vit",
                "checkpoint.monitor": "val/acc1",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 1,
                "checkpoint.enable_version_counter": False,  # same path on every run, not vit-v1.ckpt
            }
        )


def checkpoint_path(cli: LightningCLI) -> Path | None:
    """Where the best checkpoint of this run was written (None when none was, e.g. fast_dev_run)."""
    callback = cli.trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "") if callback is not None else ""
    return Path(best) if best else None


def main(args: list[str] | None = None) -> dict[str, float]:
    """Fit, test the best checkpoint, print the test accuracy; returns the test metrics."""
    require("jsonargparse", "cli")  # LightningCLI's parser: the cli extra
    quiet_console()
    with command_line(args):
        cli = TrainCLI(
            ViTClassifier,
            ClassificationDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},  # WandbLogger reuses one log dir: config.yaml exists
            run=False,
        )
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - start
    best = checkpoint_path(cli)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(best) if best else None)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    if cli.trainer.is_global_zero:
        acc = metrics.get("test/acc1")
        shown = f"{100 * acc:.2f}%" if acc is not None else "n/a"
        where = best if best else "none saved"
        healed = [
            f"{c.method} r={c.trained_r}" for c in cli.trainer.callbacks if getattr(c, "trained_r", None)
        ]
        pruned = f"  |  trained and tested pruned: {', '.join(healed)}" if healed else ""
        print(f"test accuracy (top-1): {shown}  |  fit time: {fit_s:.0f} s  |  checkpoint: {where}{pruned}")
    return metrics


if __name__ == "__main__":
    main()
