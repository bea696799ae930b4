"""``POMTCallback``: prune the ViT of a LightningModule at the R that is best for this device.

Before the chosen stages (``validate``, ``test``, ``predict``, and ``fit`` for the
validation inside ``fit``), on the device the Trainer placed the model on, under its
precision and in inference mode, the callback calls :func:`pomt.find_r` (rank 0 only; every
rank receives the result), prunes the ViT in place, and logs what it found. A fixed ``r``
skips the search. Like Lightning's ``BatchSizeFinder`` the results stay on the callback
(``selection``, ``latency_profile``, ``accuracy_profile``) and in checkpoints, and the
global RNG state is the same after the search as before it.
"""

from __future__ import annotations

import json
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng

from pomt.callbacks import logging as pomt_logging
from pomt.finder import Search, SearchConfig, find_r
from pomt.models import find_vit, token_layout
from pomt.profiles import AccuracyProfile, LatencyProfile
from pomt.pruning import apply_pruning, pruning_config, remove_pruning, token_schedule
from pomt.selection import Selection
from pomt.timing import device_name

__all__ = ["POMTCallback", "STAGES"]

STAGES = ("validate", "test", "predict", "fit")
_LOADERS = {"validate": "val_dataloaders", "test": "test_dataloaders", "predict": "predict_dataloaders"}


def _first_loader(loaders: Any) -> Any:
    """The first dataloader of what Lightning stores (a loader, a list, a dict or a CombinedLoader)."""
    flat = getattr(loaders, "flattened", None)
    if flat is not None:
        return flat[0] if flat else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _loader_batch_size(loader: Any) -> int | None:
    size = getattr(loader, "batch_size", None) or getattr(
        getattr(loader, "batch_sampler", None), "batch_size", None
    )
    return int(size) if size else None


class POMTCallback(Callback):
    """Select R on the target device and prune the model's ViT before evaluation.

    Args:
        method: ``"pomt"``, or ``"topk"``/``"tome"`` with a fixed ``r`` for comparisons.
        r: tokens to remove; given, the search is skipped (``pomt``: removed once at ``layer``;
            ``topk``/``tome``: removed at every block).
        layer: block where POMT prunes (the authors use 3, the fourth block).
        search: how R is chosen and how L(n) and A(n) are measured (:class:`pomt.SearchConfig`).
        batch_size: batch size of the latency profile; default: the stage dataloader's.
        accuracy_data: a Dataset/DataLoader of ``(image, label)`` for the accuracy estimate.
            Default: the datamodule's ``selection_dataloader()``, else the stage's own data.
        latency_profile_path, accuracy_profile_path: JSON profiles, reused when they are valid
            for this model and setup, written after measuring otherwise.
        restore: put the model back as it was after the stage; ``False`` keeps it pruned.
        reuse: reuse a selection from an earlier stage or a checkpoint made for this device,
            batch size and model (re-selected with the current ``search`` objective).
        vit_path: dotted path of the ViT in the LightningModule (default: the first ViT found).
        stages: when to run: ``validate``, ``test``, ``predict`` and ``fit`` (the validation
            inside ``fit``: searched once, pruned for each validation, unpruned for training).
        log_plots: log the curves (table, line plots, PNG); scalars are always logged.
    """

    def __init__(
        self,
        method: str = "pomt",
        r: int | None = None,
        layer: int = 3,
        search: SearchConfig | None = None,
        batch_size: int | None = None,
        accuracy_data: Any = None,
        latency_profile_path: str | None = None,
        accuracy_profile_path: str | None = None,
        restore: bool = True,
        reuse: bool = True,
        vit_path: str | None = None,
        stages: tuple[str, ...] = ("validate", "test", "predict"),
        log_plots: bool = True,
    ) -> None:
        super().__init__()
        if method not in ("pomt", "topk", "tome"):
            raise ValueError(f"method must be one of pomt, topk, tome, got {method!r}")
        if method != "pomt" and r is None:
            raise ValueError(f"method={method!r} needs a fixed r (the search selects R for 'pomt' only)")
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f"r must be a non-negative int or None, got {r!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stages {unknown}; valid: {', '.join(STAGES)}")
        self.method, self.r, self.layer = method, r, layer
        self.search = search or SearchConfig()
        self.batch_size = batch_size
        self.accuracy_data = accuracy_data
        self.latency_profile_path = latency_profile_path
        self.accuracy_profile_path = accuracy_profile_path
        self.restore, self.reuse, self.vit_path = restore, reuse, vit_path
        self.stages = frozenset(stages)
        self.log_plots = log_plots
        # results (like BatchSizeFinder.optimal_batch_size)
        self.selection: Selection | None = None
        self.latency_profile: LatencyProfile | None = None
        self.accuracy_profile: AccuracyProfile | None = None
        self.applied_r: int | None = None
        self.applied_schedule: list[int] | None = None
        self.profile_batch_size: int | None = None
        self.device_name: str | None = None
        self._vit: Any = None
        self._found_path: str | None = None
        self._previous: Any = None
        self._applied = False
        self._searched_this_fit = False

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        try:
            self._found_path, self._vit = find_vit(pl_module, self.vit_path)
        except ValueError as err:
            raise ValueError(f"POMTCallback cannot find the ViT to prune: {err}") from err
        if stage == "fit":
            self._searched_this_fit = False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            if "fit" in self.stages:
                self._before_stage(trainer, pl_module, "validate", search=not self._searched_this_fit)
                self._searched_this_fit = True
        elif "validate" in self.stages:
            self._before_stage(trainer, pl_module, "validate")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_stage(force_restore=trainer.state.fn == "fit")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.stages:
            self._before_stage(trainer, pl_module, "test")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_stage()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "predict" in self.stages:
            self._before_stage(trainer, pl_module, "predict")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_stage()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Plain values only (a JSON round trip), so checkpoints load with ``weights_only=True``."""
        state = {
            "selection": None if self.selection is None else self.selection.to_dict(),
            "latency_profile": None if self.latency_profile is None else self.latency_profile.to_dict(),
            "accuracy_profile": None if self.accuracy_profile is None else self.accuracy_profile.to_dict(),
            "applied_r": self.applied_r,
            "method": self.method,
            "layer": self.layer,
            "profile_batch_size": self.profile_batch_size,
            "device_name": self.device_name,
        }
        return json.loads(json.dumps(state))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sel, lat, acc = (state_dict.get(k) for k in ("selection", "latency_profile", "accuracy_profile"))
        self.selection = None if sel is None else Selection.from_dict(sel)
        self.latency_profile = None if lat is None else LatencyProfile.from_dict(lat)
        self.accuracy_profile = None if acc is None else AccuracyProfile.from_dict(acc)
        self.applied_r = state_dict.get("applied_r")
        self.profile_batch_size = state_dict.get("profile_batch_size")
        self.device_name = state_dict.get("device_name")

    # ------------------------------------------------------------------ the work
    def _before_stage(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, search: bool = True
    ) -> None:
        if self._vit is None:
            self._found_path, self._vit = find_vit(pl_module, self.vit_path)
        vit = self._vit
        self._previous = pruning_config(vit)
        remove_pruning(vit)  # profile, and prune, the model as built
        try:
            r = self.r
            if r is None:
                if search or self.selection is None:
                    self._search_all_ranks(trainer, pl_module, stage)
                r = self.selection.r
            schedule = token_schedule(vit, self.method, r, self.layer)  # validates r before patching
            apply_pruning(vit, self.method, r=r, layer=self.layer)
        except BaseException:
            if self._previous is not None:  # an error leaves the model as it was
                apply_pruning(vit, self._previous.method, r=self._previous.r, layer=self._previous.layer)
            raise
        self._applied = True
        self.applied_r, self.applied_schedule = int(r), list(schedule)
        rank_zero_info(pomt_logging.describe(self, self._found_path))
        pomt_logging.log_pomt(trainer, pl_module, self, stage)

    def _after_stage(self, force_restore: bool = False) -> None:
        if not self._applied or self._vit is None:
            return
        if self.restore or force_restore:
            remove_pruning(self._vit)
            if self._previous is not None:
                prev = self._previous
                apply_pruning(self._vit, prev.method, r=prev.r, layer=prev.layer)
        self._applied = False

    def _search_all_ranks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        result: Any = None
        if trainer.is_global_zero:
            try:
                result = self._search(trainer, pl_module, stage)
            except Exception as err:  # tell the other ranks instead of leaving them waiting
                result = err
        result = trainer.strategy.broadcast(result, src=0)
        if isinstance(result, Exception):
            raise result
        search, self.profile_batch_size, self.device_name = result
        self.selection, self.latency_profile, self.accuracy_profile = (
            search.selection,
            search.latency,
            search.accuracy,
        )

    def _stage_loader(self, trainer: pl.Trainer, stage: str) -> Any:
        return _first_loader(getattr(trainer, _LOADERS[stage], None))

    def _accuracy_data(self, trainer: pl.Trainer, stage: str) -> Any:
        if self.accuracy_data is not None:
            return self.accuracy_data
        datamodule = getattr(trainer, "datamodule", None)
        if callable(getattr(datamodule, "selection_dataloader", None)):
            return datamodule.selection_dataloader()
        return self._stage_loader(trainer, stage)

    def _search(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> tuple[Search, int, str]:
        device = pl_module.device
        batch_size = self.batch_size or _loader_batch_size(self._stage_loader(trainer, stage)) or 1
        name = device_name(device)
        n_total = token_layout(self._vit).n_total
        if (
            self.reuse
            and self.selection is not None
            and self.latency_profile is not None
            and self.accuracy_profile is not None
            and (self.device_name, self.profile_batch_size, self.selection.n_total)
            == (name, batch_size, n_total)
        ):
            rank_zero_info(
                "POMTCallback: reusing the profiles measured earlier for this device and batch size"
            )
            selection = self.search.select(self.latency_profile, self.accuracy_profile)
            return Search(selection, self.latency_profile, self.accuracy_profile), batch_size, name
        was_training = pl_module.training
        pl_module.eval()
        try:
            with isolate_rng(include_cuda=True), trainer.precision_plugin.forward_context():
                search = find_r(
                    pl_module,
                    self._accuracy_data(trainer, stage),
                    layer=self.layer,
                    batch_size=batch_size,
                    device=device,
                    config=self.search,
                    vit=self._vit,
                    latency_path=self.latency_profile_path,
                    accuracy_path=self.accuracy_profile_path,
                    progress=trainer.progress_bar_callback is not None,
                    log=lambda line: rank_zero_info(f"POMTCallback: {line}"),
                )
        finally:
            pl_module.train(was_training)
        return search, batch_size, name
