"""``POMTCallback``: prune the ViT of a LightningModule at the R that is best for this device.

``setup`` checks all that needs no timing (the ViT, ``layer``, ``r``, the accuracy data). Before
each chosen stage, rank 0 calls :func:`pomt.find_r` on the Trainer's device and precision
(every rank receives the result) and the ViT is pruned in place; with ``"train"``, before the
first training step, at one R through training and fit's validations. The model is put back
after the stage (``restore``), always after an error in it (``on_exception``), and at the next
start if a stage died without either. Results stay on the callback and in checkpoints, and
are reused only where still valid; the global RNG state is the same after the search.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from pomt.callbacks import logs
from pomt.callbacks import stage_support as support
from pomt.callbacks.stage_support import SPLITS, STAGES
from pomt.data import split_batch
from pomt.deploy.targets import Target
from pomt.errors import PomtValueError
from pomt.method.pruning import PruningConfig, apply_pruning, pruning_config, remove_pruning, token_schedule
from pomt.models import find_vit, restore_train_modes, train_modes
from pomt.offline.config import SearchConfig
from pomt.offline.finder import Reuse, SearchResult
from pomt.offline.profiles import AccuracyProfile, LatencyProfile
from pomt.offline.selection import Selection

__all__ = ["POMTCallback", "STAGES", "SPLITS"]


class POMTCallback(Callback):
    """Select R on the target device and prune the model's ViT before evaluation.

    Args:
        method: ``"pomt"``, or ``"topk"``/``"tome"`` with a fixed ``r`` for comparisons.
        r: tokens to remove; given, the search is skipped (``pomt``: removed once at ``layer``;
            ``topk``/``tome``: removed at every block).
        layer: block where POMT prunes (the authors use 3, the fourth block).
        target: where and how latency is measured and R verified: a :class:`pomt.Target`, a
            runtime's name (``torch``, ``cuda_graphs``, or ``onnxruntime``/``openvino`` for an
            exported deployment, ``pomt[deploy]``) or a mapping of its fields. What it leaves open
            is the Trainer's: its device and precision, the stage dataloader's batch size. A saved
            or earlier profile is reused only for the same Target (runtime, version, precision, ...).
        search: how R is chosen, measured and verified: a :class:`pomt.SearchConfig` or a mapping
            of its fields (a dict, or Hydra's ``DictConfig``); an unknown key is a ValueError.
        accuracy_data: a Dataset/DataLoader of ``(image, label)`` for the accuracy estimate.
        accuracy_split: the datamodule's split for the estimate (``holdout``, ``val``, ``train``,
            ``test``) without ``accuracy_data``; default: ``holdout_dataloader()``, else the stage's.
        latency_profile_path, accuracy_profile_path: JSON profiles, reused when they are valid
            for this model and setup, written after measuring otherwise.
        restore: put the model back after the stage; ``False`` keeps it pruned (not after an error).
        reuse: reuse results of an earlier stage or a checkpoint where they are still valid.
        vit_path: dotted path of the ViT in the LightningModule (default: the first ViT found).
        stages: ``validate``, ``test``, ``predict``, ``fit`` (the validations inside ``fit`` pruned,
            training not), ``train`` (training and fit's validations pruned at one R, ``r`` or
            chosen on the starting weights; later stages keep it).
        log_plots: log the curves (table, line plots, PNG); scalars are always logged.
        log_token_maps: log this many images with the token each patch ended in (token maps).
    """

    def __init__(
        self,
        method: str = "pomt",
        r: int | None = None,
        layer: int = 3,
        *,
        search: SearchConfig | Mapping[str, Any] | None = None,
        target: Target | str | Mapping[str, Any] | None = None,
        accuracy_data: Any = None,
        accuracy_split: str | None = None,
        latency_profile_path: str | None = None,
        accuracy_profile_path: str | None = None,
        restore: bool = True,
        reuse: bool = True,
        vit_path: str | None = None,
        stages: tuple[str, ...] = ("validate", "test", "predict"),
        log_plots: bool = True,
        log_token_maps: int = 0,
    ) -> None:
        super().__init__()
        support.check_options(method, r, accuracy_split=accuracy_split, stages=stages)
        try:
            search, target = SearchConfig.coerce(search), Target.coerce(target)
        except (TypeError, ValueError) as err:
            raise type(err)(f"POMTCallback: {err}") from err
        self.method, self.r, self.layer, self.search_config, self.target = method, r, layer, search, target
        self.accuracy_data, self.accuracy_split = accuracy_data, accuracy_split
        self.latency_profile_path, self.accuracy_profile_path = latency_profile_path, accuracy_profile_path
        self.restore, self.reuse, self.vit_path = restore, reuse, vit_path
        self.stages, self.log_plots, self.log_token_maps = frozenset(stages), log_plots, log_token_maps
        self.result: SearchResult | None = None  # results, as BatchSizeFinder.optimal_batch_size: the search,
        self.applied_r: int | None = None  # and what was applied: R,
        self.applied_schedule: list[int] | None = None  # the tokens leaving each block
        self.trained_r: int | None = None  # the R training ran at ("train"): later stages use it
        self.r_source: str | None = None  # where applied_r came from: "r", "search" or "trained_r"
        self.found_vit_path: str | None = None  # where setup found the ViT ("" for the module itself)
        self._vit: Any = None  # that ViT
        self._previous: Any = None  # the pruning found at the start of the stage
        self._left: Any = None  # the pruning this callback left on the model (restore=False)
        self._applied, self._warned_split = False, False
        self._training = False  # pruned for training: held through fit's validations
        self._modes: dict[str, bool] | None = None  # each module's train/eval mode at setup
        self._result_origin = "measured earlier"  # or "loaded from the checkpoint"

    @property
    @override
    def state_key(self) -> str:
        """Separate checkpoint state for each ``method`` and ``layer`` (two callbacks, one Trainer)."""
        return self._generate_state_key(method=self.method, layer=self.layer)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Every check that needs no timing, before any training or evaluation starts."""
        self._modes = train_modes(pl_module)  # what on_exception puts back
        try:
            self.found_vit_path, self._vit = find_vit(pl_module, self.vit_path)
            token_schedule(self._vit, self.method, 0 if self.r is None else self.r, self.layer)
        except ValueError as err:
            raise PomtValueError(f"POMTCallback: {err}{support.vit_hint(pl_module, self.vit_path)}") from err
        if self.r is None:
            data, _ = support.accuracy_data(trainer, None, vit=self._vit, **self._data())
            if data is not None:
                support.check_data(self._vit, data, stage)
        if stage == "fit" and "fit" in self.stages:
            logs.warn_pruned_monitors(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "train" not in self.stages:
            self._recover()
            support.report_pruning(self._vit, "training", left=self._left, where=self.found_vit_path)
            return
        self._before_stage(trainer, pl_module, "train")  # R on the starting weights, held until the end
        self._training = True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._training:
            self._training, self.trained_r = False, self.applied_r
            self._after_stage()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._training:  # while training pruned, validation runs at its R
            return
        if ("fit" if trainer.state.fn == "fit" else "validate") in self.stages:
            self._before_stage(trainer, pl_module, "validate")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._training:
            fit = trainer.state.fn == "fit"
            self._after_stage(force_restore=fit, said=None if fit else ("validate", trainer.callback_metrics))

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.stages:
            self._before_stage(trainer, pl_module, "test")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_stage(said=("test", trainer.callback_metrics))

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "predict" in self.stages:
            self._before_stage(trainer, pl_module, "predict")

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_stage()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """After an error in a stage or training: the pruning and each module's train/eval mode as found."""
        self._training = False
        self._recover()
        if self._modes is not None:
            restore_train_modes(pl_module, self._modes)

    # ------------------------------------------------------------------ results and checkpoint state
    @property
    def selection(self) -> Selection | None:
        return None if self.result is None else self.result.selection

    @property
    def latency_profile(self) -> LatencyProfile | None:
        return None if self.result is None else self.result.latency

    @property
    def accuracy_profile(self) -> AccuracyProfile | None:
        return None if self.result is None else self.result.accuracy

    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain values only, so checkpoints load with ``weights_only=True``."""
        state = {} if self.result is None else self.result.to_dict()
        trained = self.applied_r if self._training else self.trained_r
        return state | dict(applied_r=self.applied_r, trained_r=trained, method=self.method, layer=self.layer)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint's search replaces the one in memory; one without a search (saved before
        any) leaves the results in memory, which are still reused only where valid."""
        if state_dict.get("trained_r") is not None:  # weights trained at that R are tested at it
            self.trained_r = int(state_dict["trained_r"])
        loaded = SearchResult.from_dict(state_dict)
        if loaded is None:
            if self.result is not None:
                support.say("the checkpoint holds no POMT results: keeping the ones measured here")
            return
        self.result, self.applied_r = loaded, state_dict.get("applied_r")
        self._result_origin = "loaded from the checkpoint"

    # ------------------------------------------------------------------ the work
    def _before_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        vit = self._vit
        self._recover()  # a stage that died without on_exception
        self._previous = support.report_pruning(vit, stage, left=self._left, where=self.found_vit_path)
        remove_pruning(vit)  # profile, and prune, the model as built
        try:
            r = self.r if self.r is not None or stage == "train" else self.trained_r
            source = "r" if self.r is not None else "trained_r" if r is not None else "search"
            if r is None:
                self.result = support.on_rank_zero(trainer, lambda: self._find_r(trainer, pl_module, stage))
                self._result_origin = "measured earlier"
                r = self.selection.r
                if stage == "train":
                    support.warn_if_near_chance(self.result.accuracy, r)
            schedule = token_schedule(vit, self.method, r, self.layer)  # validates r before patching
            if r:  # R = 0 is the model as built: no mark left in it (nor in a checkpoint of it)
                apply_pruning(vit, self.method, r=r, layer=self.layer)
        except BaseException:
            self._put_back()  # an error leaves the model as it was
            raise
        self._applied = True
        r, schedule = int(r), list(schedule)
        self.applied_r, self.applied_schedule, self.r_source = r, schedule, source
        found = dict(r_source=source, selection=self.selection)
        support.say(logs.describe(self.method, r, schedule, where=self.found_vit_path, **found))
        pruning = PruningConfig(self.method, r, self.layer, tuple(schedule))  # also at R = 0 (not applied)
        logs.log_pomt(
            trainer, pl_module, stage, pruning, result=self.result, r_source=source, log_plots=self.log_plots
        )
        if self.log_token_maps and trainer.loggers and trainer.is_global_zero:
            images = split_batch(next(iter(support.stage_loader(trainer, stage))))[0][: self.log_token_maps]
            label = f"{self.method} r={self.applied_r}"
            logs.log_token_maps(trainer, vit, images.to(pl_module.device), label)

    def _after_stage(self, force_restore: bool = False, said: tuple[str, Any] | None = None) -> None:
        if not self._applied or self._vit is None:
            return
        if said is not None:
            stage, metrics = said
            sel = dict(r_source=self.r_source, selection=self.selection)
            support.say(logs.measured(stage, metrics, method=self.method, r=self.applied_r, **sel))
        if self.restore or force_restore:
            self._put_back()
        else:
            self._left = pruning_config(self._vit)
        self._applied = False

    def _recover(self) -> None:
        """After a stage that ended in an error: the model as it was before it."""
        if self._applied and self._vit is not None:
            self._put_back()
            self._applied = False

    def _put_back(self) -> None:
        """The ViT as it was before the stage: unpruned, or pruned as the user had it."""
        remove_pruning(self._vit)
        if (prev := self._previous) is not None:
            apply_pruning(self._vit, prev.method, r=prev.r, layer=prev.layer)

    def _data(self) -> dict[str, Any]:
        return dict(data=self.accuracy_data, split=self.accuracy_split, warned=self._warned_split)

    def _find_r(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> SearchResult:
        """The search on this rank, from the callback's settings and results (explicit arguments)."""
        data, self._warned_split = support.accuracy_data(trainer, stage, vit=self._vit, **self._data())
        reuse = Reuse(
            previous=self.result if self.reuse else None, origin=self._result_origin,
            latency_path=self.latency_profile_path, accuracy_path=self.accuracy_profile_path,
        )  # fmt: skip
        target = support.trainer_target(trainer, pl_module, stage, self.target)
        return support.choose_r(
            trainer, pl_module, stage, target, data, layer=self.layer, search=self.search_config, vit=self._vit,
            reuse=reuse,
        )  # fmt: skip
