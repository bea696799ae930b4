"""Accuracy against latency on this device: unpruned, POMT, ToMe and Top-K.

    python evaluate.py --config configs/digits_evaluate.yaml

A LightningCLI entry point: ``model:`` (:class:`pomt.lightning.ViTClassifier`, with the
checkpoint in ``model.weights``), ``data:`` (any datamodule of ``datamodules``),
``trainer:`` (device, precision, devices/strategy) and ``sweep:``
(:class:`pomt.lightning.sweep.settings.SweepSettings`: methods, r values, POMT's search
settings, the Target, output and W&B). It writes ``<sweep.out_dir>/<run_name>/`` with ``report.csv``,
``report.json``, ``tradeoff.png``, the latency/accuracy profiles and the config, prints the
table, and leaves one (offline) W&B run per configuration in one group plus a summary run.
When ``model.weights`` does not exist yet and ``--train_config`` is given, the model is
trained first with ``train.py``. ``--sweep.heal_epochs K`` also fine-tunes every pruned
configuration at its r for K epochs and reports it as a healed row
(``configs/digits_heal_evaluate.yaml``). ``--print_config`` shows every option.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from pomt.datamodules import ClassificationDataModule
from pomt.errors import require
from pomt.lightning import ViTClassifier
from pomt.lightning.sweep import TradeoffEvaluation, TradeoffResult
from pomt.lightning.sweep.context import no_trainer_limit
from pomt.lightning.sweep.entry import command_line, quiet_console
from pomt.lightning.sweep.settings import SweepSettings


class EvaluateCLI(LightningCLI):
    """LightningCLI with a ``sweep:`` section and an optional train-first step."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(SweepSettings, "sweep")
        parser.add_argument(
            "--train_config",
            type=str | None,
            default=None,
            help="train.py config to run first when model.weights does not exist yet",
        )

    def before_instantiate_classes(self) -> None:
        no_trainer_limit(self.config.trainer.get("limit_test_batches"))  # before any training
        weights = self.config.model.get("weights")
        train_config = self.config.get("train_config")
        if weights and not Path(weights).is_file():
            if not train_config:
                raise FileNotFoundError(
                    f"model.weights {weights} does not exist: train first "
                    f"(python train.py --config configs/digits_train.yaml) or pass --train_config"
                )
            print(f"{weights} not found: training first with {train_config}")
            train_script().main(["--config", train_config])
            _finish_wandb()
            if not Path(weights).is_file():
                raise FileNotFoundError(f"training with {train_config} did not write {weights}")


def train_script() -> ModuleType:
    """``train.py`` beside this file, loaded by its path: found from any working directory,
    with no ``import train`` that needs the repository root on ``sys.path``."""
    path = Path(__file__).resolve().with_name("train.py")
    spec = importlib.util.spec_from_file_location("pomt_train_script", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise FileNotFoundError(f"{path} not found: evaluate.py trains first with the train.py beside it")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finish_wandb() -> None:
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def main(args: list[str] | None = None) -> TradeoffResult:
    """Parse the config, run the sweep and return its result (report rows and paths)."""
    require("jsonargparse", "cli")  # LightningCLI's parser: the cli extra
    quiet_console()
    with command_line(args):
        cli = EvaluateCLI(
            ViTClassifier,
            ClassificationDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_callback=None,  # the sweep saves the config into its own run directory
            trainer_defaults={"logger": False, "enable_checkpointing": False},
            run=False,
        )
    sweep = TradeoffEvaluation(cli.config_init["sweep"])

    def save_config(run_dir: Path) -> None:  # first, so that an interrupted run keeps it too
        cli.parser.save(cli.config, str(run_dir / "config.yaml"), overwrite=True)

    return sweep.run(cli.model, cli.datamodule, trainer_factory=cli.instantiate_trainer, on_start=save_config)


if __name__ == "__main__":
    main()
