"""Healing in the sweep: fine-tune each pruned configuration at its r before testing it.

With ``heal_epochs`` K > 0, every pruned configuration (POMT at its R, each ToMe and Top-K r)
is fine-tuned for the same K epochs (and, as the control, the unpruned model), from the same
starting weights, with the same optimiser
settings (the LightningModule's own ``configure_optimizers``), the same training batches (the
datamodule's ``train_dataloader`` at the batch size the run started with, at most
``heal_batches`` per epoch) and the same seed, through a fixed-r :class:`POMTCallback` with
``stages=("train",)``. The healed weights are written to the run directory
(``healed/<key>.pt``) with a record of what they are valid for (``healed/<key>.json``: the
starting weights' fingerprint, the data, the method and r, the epochs and the settings
above); a rerun loads them instead of training again where the record still holds. After
each configuration the starting weights are put back.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng

from pomt.callbacks.pomt_callback import POMTCallback
from pomt.lightning.sweep.configurations import Configuration
from pomt.lightning.sweep.context import SweepRun
from pomt.lightning.sweep.settings import SweepSettings, check_heal_epochs
from pomt.models import restore_train_modes, train_modes
from pomt.weights import weights_fingerprint

__all__ = ["Healing", "heal_conditions", "healed_weights", "check_heal_epochs"]


@dataclass
class Healing:
    """How one configuration was healed: the seconds its fine-tuning took (when reused, the
    seconds it took when it was made) and whether the healed weights were reused."""

    seconds: float | None = None
    reused: bool = False


def _train_split(datamodule: Any) -> str:
    train = getattr(datamodule, "train_dataset", None)
    size = len(train) if hasattr(train, "__len__") else None
    return f"{type(datamodule).__name__}: train split of {size} images"


def heal_conditions(sweep: SweepRun, settings: SweepSettings, config: Configuration) -> dict[str, Any]:
    """What a healed checkpoint (and the accuracy measured on it) is valid for, beyond the
    run's conditions (which hold the starting weights' fingerprint)."""
    hparams = json.loads(json.dumps(dict(getattr(sweep.model, "hparams", {})), default=str))
    return {
        "method": config.method,
        "r": config.r,
        "heal_epochs": config.heal_epochs,
        "heal_batches": settings.heal_batches,
        "heal_batch_size": sweep.heal_batch_size,
        "heal_seed": settings.search.seed,
        "train_data": _train_split(sweep.datamodule),
        "train_augment": getattr(sweep.datamodule, "augment", None),
        "hparams": hparams,  # the optimiser settings among them (lr, weight decay, schedule)
    }


@contextlib.contextmanager
def healed_weights(sweep: SweepRun, settings: SweepSettings, config: Configuration) -> Iterator[Healing]:
    """While active, ``sweep.model`` holds ``config``'s healed weights (loaded when a valid
    checkpoint exists, trained and saved otherwise); the starting weights afterwards, also
    after an error. A training-free configuration is left alone."""
    healing = Healing()
    if not config.heal_epochs:
        yield healing
        return
    start = {k: v.detach().clone() for k, v in sweep.model.state_dict().items()}
    folder = sweep.run_dir.root / "healed"
    path, record = folder / f"{config.key}.pt", folder / f"{config.key}.json"
    valid_for = sweep.conditions | heal_conditions(sweep, settings, config)
    try:
        stored = sweep.run_dir.load(record, valid_for, f"the healed checkpoint of {config.label}")
        if stored is not None and _load(sweep, path, stored["fingerprint"], config):
            healing.seconds, healing.reused = float(stored["heal_s"]), True
            rank_zero_info(f"reusing the healed checkpoint of {config.label} ({path})")
        else:
            healing.seconds = _fit(sweep, settings, config)
            if sweep.zero:
                folder.mkdir(parents=True, exist_ok=True)
                torch.save({k: v.detach().cpu() for k, v in sweep.model.state_dict().items()}, path)
            payload = {"fingerprint": weights_fingerprint(sweep.model), "heal_s": healing.seconds}
            sweep.run_dir.save(record, valid_for, payload | {"file": path.name})
        yield healing
    finally:
        sweep.model.load_state_dict(start)


def _load(sweep: SweepRun, path: Path, fingerprint: str, config: Configuration) -> bool:
    """The healed weights at ``path`` into the model, when they are the ones the record names."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        sweep.model.load_state_dict(state)
    except (OSError, RuntimeError, ValueError) as err:
        rank_zero_info(f"not reusing the healed checkpoint of {config.label} ({path}): {err}")
        return False
    if weights_fingerprint(sweep.model) != fingerprint:
        rank_zero_info(
            f"not reusing the healed checkpoint of {config.label} ({path}): not the recorded weights"
        )
        return False
    return True


def _fit(sweep: SweepRun, settings: SweepSettings, config: Configuration) -> float:
    """``trainer.fit`` of ``config`` pruned at its r for ``config.heal_epochs`` epochs; its seconds."""
    rank_zero_info(f"healing {config.label}: {config.heal_epochs} epochs at r={config.r}")  # r=0: unpruned
    pruned = config.method != "none"  # the unpruned control trains without the callback
    callbacks = (
        [POMTCallback(config.method, r=config.r, layer=settings.layer, stages=("train",))] if pruned else []
    )
    limit = {} if settings.heal_batches is None else {"limit_train_batches": settings.heal_batches}
    datamodule, timed_batch = sweep.datamodule, getattr(sweep.datamodule, "batch_size", None)
    modes = train_modes(sweep.model)  # timed and tested in eval mode: trained in train mode
    start = time.perf_counter()
    try:
        sweep.model.train()  # dropout and drop-path on, as in any fine-tuning
        if sweep.heal_batch_size is not None:
            datamodule.batch_size = sweep.heal_batch_size
        trainer = sweep.trainer_factory(
            logger=False,
            callbacks=callbacks,
            max_epochs=config.heal_epochs,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            **limit,
        )
        with isolate_rng(include_cuda=True):
            seed_everything(settings.search.seed, verbose=False)
            trainer.fit(sweep.model, datamodule=datamodule)
    finally:
        restore_train_modes(sweep.model, modes)
        if timed_batch is not None:
            datamodule.batch_size = timed_batch
    seconds = time.perf_counter() - start
    rank_zero_info(f"healed {config.label} in {seconds:.1f} s")
    return seconds
