"""What ``POMTCallback`` needs besides its hooks: its log lines and warnings, the data it
estimates A(n) on (for ``train``: the training data when nothing else is given), the search
under the Trainer's precision, and the report of a model pruned by someone else. Like
Lightning's tuner functions, these take explicit arguments and return values; the callback
holds the state.

The callback's lines go to the ``pomt.callbacks`` logger (rank 0 only), so an application that
configures logging (Hydra's ``train.log``, ``logging.basicConfig``) receives them in its files;
while nothing is configured, they are printed to stderr.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn

import pomt
from pomt.data import UnlabelledDataError, check_accuracy_data
from pomt.deploy.targets import Target
from pomt.errors import PomtValueError, is_int
from pomt.method.pruning import PruningConfig, pruning_config
from pomt.models import find_vit, image_size, restore_train_modes, train_modes
from pomt.offline.finder import Console, SearchResult, find_r
from pomt.offline.profiles import AccuracyProfile

STAGES = ("validate", "test", "predict", "fit", "train")
SPLITS = ("holdout", "val", "train", "test")

__all__ = [
    "STAGES",
    "SPLITS",
    "check_options",
    "say",
    "warn",
    "unlabelled",
    "first_loader",
    "stage_loader",
    "accuracy_data",
    "check_data",
    "trainer_target",
    "choose_r",
    "report_pruning",
    "on_rank_zero",
    "warn_if_near_chance",
]

T = TypeVar("T")
logger = logging.getLogger(__name__.rsplit(".", 1)[0])  # "pomt.callbacks": printed as pomt's loggers are

STAGES = ("validate", "test", "predict", "fit", "train")
SPLITS = ("holdout", "val", "train", "test")
LOADERS = {
    "train": "train_dataloader",
    "validate": "val_dataloaders",
    "test": "test_dataloaders",
    "predict": "predict_dataloaders",
}
FIXES = (
    "give the datamodule a holdout_dataloader() (a held-out split), set accuracy_split='val' (or "
    "'train'), or pass accuracy_data="
)


# where our frames (and the libraries' that call us) are: a warning is attributed to the first
# frame outside them, the user's line that started the stage
_INTERNAL = tuple(
    {str(Path(m.__file__).parent) + os.sep for m in (pomt, pl, torch)}
    | {str(Path(m.__file__).resolve().parent) + os.sep for m in (pomt, pl, torch)}
    | {str(Path(__file__).parent) + os.sep, str(Path(__file__).resolve().parent) + os.sep}
    | {str(Path(pl.__file__).parent.parent)}  # lightning/, lightning_utilities/, lightning_fabric/
)


def check_options(method: str, r: int | None, *, accuracy_split: str | None, stages: Sequence[str]) -> None:
    """The callback's options that need no model: a ValueError naming the value and the valid range."""
    if method not in ("pomt", "topk", "tome"):
        raise PomtValueError(f"method must be one of pomt, topk, tome, got {method!r}")
    if method != "pomt" and r is None:
        raise PomtValueError(f"method={method!r} needs a fixed r (the search selects R for 'pomt' only)")
    if r is not None and (not is_int(r) or r < 0):
        raise PomtValueError(f"r must be a non-negative int or None, got {r!r}")
    if accuracy_split is not None and accuracy_split not in SPLITS:
        raise PomtValueError(
            f"accuracy_split must be one of {', '.join(SPLITS)} or None, got {accuracy_split!r}"
        )
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise PomtValueError(f"unknown stages {unknown}; valid: {', '.join(STAGES)}")
    if {"fit", "train"} <= set(stages):
        raise PomtValueError(
            "stages has 'fit' and 'train': 'train' already prunes the validations inside fit"
        )


@rank_zero_only
def say(line: str) -> None:
    """One line of the callback, on global rank 0."""
    logger.info(line if line.startswith("POMTCallback") else f"POMTCallback: {line}")


def _outside() -> int:
    """The ``stacklevel`` (for ``warnings.warn`` in ``warn``) of the first frame outside pomt,
    Lightning and torch."""
    frame, level = sys._getframe(1), 1  # 1: ``warn`` itself
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


@rank_zero_only
def warn(text: str) -> None:
    """A warning of the callback, on global rank 0, through one channel: the ``pomt.callbacks``
    logger at WARNING where the application configured logging (the root logger has handlers,
    as under Hydra: its console and its log file get it once each); else a ``UserWarning``
    (filterable), attributed to the user's line that started the stage, which Python prints once."""
    text = text if text.startswith("POMTCallback") else f"POMTCallback: {text}"
    if logging.getLogger().hasHandlers():
        logger.warning(text)
    else:
        warnings.warn(text, UserWarning, stacklevel=_outside())


def unlabelled(stage: str) -> UnlabelledDataError:
    return UnlabelledDataError(
        f"POMTCallback needs labelled images to estimate A(n) before {stage}, but its data yields images "
        f"only. To search on labelled data, {FIXES}; or fix r= to skip the search."
    )


def first_loader(loaders: Any) -> Any:
    """The first dataloader of what Lightning stores (a loader, or a list or dict of them)."""
    loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
    return (loaders[0] if loaders else None) if isinstance(loaders, (list, tuple)) else loaders


def stage_loader(trainer: pl.Trainer, stage: str) -> Any:
    return first_loader(getattr(trainer, LOADERS[stage], None))


def vit_hint(pl_module: pl.LightningModule, vit_path: str | None) -> str:
    """Where the first supported ViT is, when ``vit_path`` names something else."""
    if vit_path is None:
        return ""
    try:
        found = find_vit(pl_module)[0]
    except ValueError:
        return ""
    return f"; the module's ViT is at vit_path={found!r}" if found != vit_path else ""


def check_data(vit: nn.Module, data: Any, stage: str = "the search") -> None:
    """Labelled images of the size ``vit`` takes (from the first example), or a clear error."""
    dynamic = getattr(getattr(vit, "patch_embed", None), "dynamic_img_size", False)
    try:
        check_accuracy_data(data, None if dynamic else image_size(vit, None))
    except UnlabelledDataError as err:
        raise unlabelled(stage) from err
    except ValueError as err:
        raise PomtValueError(f"POMTCallback: {err}") from err


def accuracy_data(
    trainer: pl.Trainer, stage: str | None, *, vit: nn.Module, data: Any, split: str | None, warned: bool
) -> tuple[Any, bool]:
    """The data of the accuracy estimate (None at setup when it is the stage's own data): ``data``,
    else the datamodule's ``split`` (or its holdout split), else the stage's own data, which
    is warned about unless ``warned`` already. Returns the data and whether that was warned."""
    if data is not None:
        return data, warned
    datamodule = getattr(trainer, "datamodule", None)
    split = split or ("holdout" if hasattr(datamodule, "holdout_dataloader") else None)
    if split is not None:
        method = getattr(datamodule, f"{split}_dataloader", None)
        if not callable(method):
            raise PomtValueError(
                f"POMTCallback: accuracy_split={split!r} but the datamodule has no {split}_dataloader()"
            )
        return method(), warned
    if stage is None:
        return None, warned
    loader = stage_loader(trainer, stage)
    check_data(vit, loader, stage)  # unlabelled data is an error, said before any warning
    if not warned and stage != "train":  # the training data is not reported on
        warn(
            f"POMTCallback chooses R on the {stage} data, the split this {stage} reports: the accuracy "
            f"it estimates is not held out. To choose R on other data, {FIXES}."
        )
        warned = True
    return loader, warned


def trainer_target(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, target: Target) -> Target:
    """``target`` with what it leaves open taken from the Trainer: the module's device, the
    Trainer's precision (``32-true``, ``bf16-mixed``), the stage dataloader's batch size."""
    batch_size = target.batch_size or getattr(stage_loader(trainer, stage), "batch_size", None) or 1
    return dataclasses.replace(
        target,
        device=target.device or str(pl_module.device),
        precision=target.precision or str(trainer.precision),
        batch_size=int(batch_size),
    )


def choose_r(
    trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, target: Target, data: Any, **options: Any
) -> SearchResult:
    """``find_r`` on ``target`` (the Trainer's, see :func:`trainer_target`) under the Trainer's
    autocast, the RNG and each module's train/eval mode kept; ``options`` are find_r's
    (``layer``, ``search``, ``vit``, ``reuse``)."""
    modes = train_modes(pl_module)  # each module's, put back as found (not one flag for all)
    pl_module.eval()
    # under a Trainer, its progress bar is the only one; each step is logged
    console = Console(log=say, warn=warn, progress=False)
    try:
        with isolate_rng(include_cuda=True), trainer.precision_plugin.forward_context():
            return find_r(pl_module, data, target, console=console, **options)
    except UnlabelledDataError as err:
        raise unlabelled(stage) from err
    finally:
        restore_train_modes(pl_module, modes)


def report_pruning(
    vit: nn.Module, what: str, *, left: PruningConfig | None, where: str | None
) -> PruningConfig | None:
    """The pruning ``vit`` (at ``where``) has now; a warning naming it when it is not the pruning
    the callback ``left`` there (``what``: ``training`` or the stage about to run)."""
    found = pruning_config(vit)
    if found is not None and found != left:
        warn(
            f"POMTCallback: the ViT at `{where or '<module>'}` is already pruned before "
            f"{what}, not by this callback: {found}. "
            + (
                "Training runs on that pruned model; call pomt.remove_pruning(vit) to train the whole one."
                if what == "training"
                else "The search and the pruning start from the unpruned model; it is pruned as found again after."
            )
        )
    elif found is not None and what == "training":
        warn(f"POMTCallback: training runs on the model this callback left pruned (restore=False): {found}")
    return found


def on_rank_zero(trainer: pl.Trainer, compute: Callable[[], T]) -> T:
    """``compute()`` on global rank 0; every rank receives its result, or its error."""
    result: Any = None
    if trainer.is_global_zero:
        try:
            result = compute()
        except Exception as err:  # tell the other ranks instead of leaving them waiting
            result = err
    result = trainer.strategy.broadcast(result, src=0)
    if isinstance(result, Exception):
        raise result
    return result


def warn_if_near_chance(accuracy: AccuracyProfile, r: int) -> None:
    """Warn when R was chosen for training on weights whose unpruned accuracy estimate is near
    chance: below chance + max(1/classes, 3 standard errors of chance accuracy on the sample)
    (0.2 for 10 classes). There A(n) is flat and says nothing about the R training can afford."""
    estimate = accuracy.accuracy
    unpruned = estimate.get(accuracy.n_total, max(estimate.values()))
    classes = max(int(accuracy.num_classes), 2)
    chance = 1.0 / classes
    margin = max(chance, 3 * math.sqrt(chance * (1 - chance) / max(accuracy.num_samples, 1)))
    if unpruned >= chance + margin:
        return
    example = f"e.g. r={r // 2}" if r >= 2 else "e.g. the R a search chooses on trained weights"
    warn(
        f"R={r} was chosen for training on weights at chance: the unpruned model's accuracy estimate is "
        f"{unpruned:.3f} on {accuracy.num_samples} images, near chance for {classes} classes (1/{classes} = "
        f"{chance:.3f}; near: below {chance + margin:.3f}). On such weights every R looks alike, and "
        f"training runs at R={r} throughout. To train from scratch, fix the R: r= ({example}); or "
        "choose R after some training (fit without 'train' first, then fit again with stages=('train', ...))."
    )
