"""What ``POMTCallback`` needs besides its hooks: its log lines, the data it estimates A(n) on
(for ``train``: the training data when nothing else is given), the search under the Trainer's
precision, and the report of a model pruned by someone else.

The callback's lines go to the ``pomt.callbacks`` logger (rank 0 only), so an application that
configures logging (Hydra's ``train.log``, ``logging.basicConfig``) receives them in its files;
while nothing is configured, they are printed to stderr.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng

from pomt.data import UnlabelledDataError, check_accuracy_data
from pomt.finder import Search, find_r
from pomt.models import find_vit, image_size
from pomt.pruning import pruning_config

__all__ = [
    "say",
    "unlabelled",
    "first_loader",
    "stage_loader",
    "accuracy_data",
    "check_data",
    "search",
    "report_pruning",
    "search_all_ranks",
]

logger = logging.getLogger(__name__.rsplit(".", 1)[0])  # "pomt.callbacks": printed as pomt's loggers are

LOADERS = {
    "train": "train_dataloader",
    "validate": "val_dataloaders",
    "test": "test_dataloaders",
    "predict": "predict_dataloaders",
}
FIXES = (
    "give the datamodule a selection_dataloader() (a held-out split), set accuracy_split='val' (or "
    "'train'), or pass accuracy_data="
)


@rank_zero_only
def say(line: str) -> None:
    """One line of the callback, on global rank 0."""
    logger.info(line if line.startswith("POMTCallback") else f"POMTCallback: {line}")


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


def check_data(callback: Any, data: Any, stage: str = "the search") -> None:
    """Labelled images of the size the ViT takes (from the first example), or a clear error."""
    dynamic = getattr(getattr(callback._vit, "patch_embed", None), "dynamic_img_size", False)
    try:
        check_accuracy_data(data, None if dynamic else image_size(callback._vit, None))
    except UnlabelledDataError as err:
        raise unlabelled(stage) from err
    except ValueError as err:
        raise ValueError(f"POMTCallback: {err}") from err


def accuracy_data(callback: Any, trainer: pl.Trainer, stage: str | None) -> Any:
    """The data of the accuracy estimate (None at setup when it is the stage's own data)."""
    if callback.accuracy_data is not None:
        return callback.accuracy_data
    datamodule = getattr(trainer, "datamodule", None)
    split = callback.accuracy_split or ("selection" if hasattr(datamodule, "selection_dataloader") else None)
    if split is not None:
        method = getattr(datamodule, f"{split}_dataloader", None)
        if not callable(method):
            raise ValueError(
                f"POMTCallback: accuracy_split={split!r} but the datamodule has no {split}_dataloader()"
            )
        return method()
    if stage is None:
        return None
    loader = stage_loader(trainer, stage)
    check_data(callback, loader, stage)  # unlabelled data is an error, said before any warning
    if not callback._warned_split and stage != "train":  # the training data is not reported on
        rank_zero_warn(
            f"POMTCallback chooses R on the {stage} data, the split this {stage} reports: the accuracy "
            f"it estimates is not held out. To choose R on other data, {FIXES}."
        )
        callback._warned_split = True
    return loader


def search(callback: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Search:
    """``find_r`` on the Trainer's device and precision (under its autocast), the RNG kept."""
    device = pl_module.device
    batch_size = callback.batch_size or getattr(stage_loader(trainer, stage), "batch_size", None) or 1
    data = accuracy_data(callback, trainer, stage)
    was_training = pl_module.training
    pl_module.eval()
    try:
        with isolate_rng(include_cuda=True), trainer.precision_plugin.forward_context():
            return find_r(
                pl_module,
                data,
                layer=callback.layer,
                batch_size=int(batch_size),
                device=device,
                config=callback.search_config,
                vit=callback._vit,
                latency_path=callback.latency_profile_path,
                accuracy_path=callback.accuracy_profile_path,
                previous=callback.result if callback.reuse else None,
                progress=False,  # under a Trainer, its progress bar is the only one; each step is logged
                log=say,
                precision=str(trainer.precision),
                warn=lambda text: rank_zero_warn(f"POMTCallback: {text}"),
                runtime=getattr(callback, "runtime", "torch"),
            )
    except UnlabelledDataError as err:
        raise unlabelled(stage) from err
    finally:
        pl_module.train(was_training)


def report_pruning(callback: Any, what: str) -> Any:
    """The pruning the callback's ViT has now (``pruning_config``); a warning naming it when the
    callback did not leave it there (``what``: ``training`` or the stage about to run)."""
    found = pruning_config(callback._vit)
    if found is not None and found != callback._left:
        rank_zero_warn(
            f"POMTCallback: the ViT at `{callback._found_path or '<module>'}` is already pruned before "
            f"{what}, not by this callback: {found}. "
            + (
                "Training runs on that pruned model; call pomt.remove_pruning(vit) to train the whole one."
                if what == "training"
                else "The search and the pruning start from the unpruned model; it is pruned as found again after."
            )
        )
    elif found is not None and what == "training":
        rank_zero_warn(
            f"POMTCallback: training runs on the model this callback left pruned (restore=False): {found}"
        )
    return found


def search_all_ranks(callback: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Search:
    """Rank 0 searches (``callback._search``); every rank receives its result, or its error."""
    result: Any = None
    if trainer.is_global_zero:
        try:
            result = callback._search(trainer, pl_module, stage)
        except Exception as err:  # tell the other ranks instead of leaving them waiting
            result = err
    result = trainer.strategy.broadcast(result, src=0)
    if isinstance(result, Exception):
        raise result
    return result
