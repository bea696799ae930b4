"""``POMTCallback``: prune the ViT of a LightningModule at the R that is best for this device.

Before ``validate``, ``test`` or ``predict`` (each configurable), on the device the Trainer
placed the model on and in inference mode, the callback

1. profiles the latency L(n) of the model with n tokens after the embedding,
2. estimates the accuracy A(n) with n random tokens on labelled data,
3. selects R (``pomt.select_r``) and
4. prunes the ViT in place (``pomt.apply_pruning``),

so the loop that follows runs the pruned model. A fixed ``r`` skips steps 1-3. Like
Lightning's ``BatchSizeFinder``/``LearningRateFinder`` the results stay on the callback
(``selection``, ``latency_profile``, ``accuracy_profile``) and in checkpoints. Under DDP
global rank 0 measures and every rank receives the same R. The global RNG state is the
same after the search as before it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn

from callbacks import logging as pomt_logging
from pomt.selection import Selection

__all__ = ["POMTCallback"]

_STAGE_OF_FN = {"validate": "validate", "fit": "validate", "test": "test", "predict": "predict"}
_PRUNING_METHODS = ("pomt", "topk", "tome")


def _first_loader(loaders: Any) -> Any:
    """The first dataloader of what Lightning stores (a loader, a list, a dict or a CombinedLoader)."""
    if loaders is None:
        return None
    flat = getattr(loaders, "flattened", None)
    if flat is not None:
        return flat[0] if flat else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _loader_batch_size(loader: Any) -> int | None:
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return int(size) if size else None


class POMTCallback(Callback):
    """Select R on the target device and prune the model's ViT before evaluation.

    Args:
        method: ``"pomt"`` (default), or ``"topk"``/``"tome"`` with a fixed ``r`` for comparisons.
        r: tokens to remove; given, the search is skipped (``pomt``: removed once at ``layer``;
            ``topk``/``tome``: removed at every block).
        layer: block index where POMT prunes (the authors use 3, the fourth block).
        alpha: weight of latency in the utility U(n) (``1 - alpha`` goes to accuracy).
        latency_budget_ms: instead of the utility, the most accurate n within this latency.
        accuracy_floor: instead of the utility, the fastest n whose estimated top-1 reaches this
            fraction (give at most one of ``latency_budget_ms``/``accuracy_floor``).
        batch_size: batch size for latency profiling; default: the stage dataloader's.
        tokens: explicit token counts to time (default: the profiler's fast search).
        coarse_points: points of the search's first coarse grid.
        max_points: most token counts the search times (default: the profiler's).
        min_run_time: seconds of timing per token count.
        warmup: untimed calls per token count.
        accuracy_samples: labelled images for the accuracy estimate.
        accuracy_tokens: token counts at which accuracy is estimated (default: the profiler's).
        accuracy_batch_size: batch size of the accuracy estimate (default: the data's).
        seed: seed of the accuracy sample and the random token subsets.
        accuracy_data: a Dataset/DataLoader of ``(image, label)`` for the accuracy estimate, so
            the split you report is not the one R is chosen on. Default: the datamodule's
            ``selection_dataloader()`` when it has one, else the stage's own dataloader.
        latency_profile_path: JSON file of a latency profile: reused when it exists (and matches
            model, batch size and device), written after profiling otherwise.
        accuracy_profile_path: the same for the accuracy profile (can come from another machine).
        restore: put the model back as it was after the stage (default); ``False`` leaves the
            pruned model in place.
        reuse: reuse a selection from an earlier stage or a loaded checkpoint when it was made
            for the same device, batch size and token count; ``False`` searches every stage.
        vit_path: dotted attribute path of the ViT in the LightningModule (e.g. ``"model"``);
            default: the first supported ViT submodule.
        on_validate, on_test, on_predict: run before ``trainer.validate``/``test``/``predict``.
        on_fit_validation: also run before the validation inside ``fit`` (searched once,
            pruned for each validation epoch and unpruned again for training).
        log_plots: log the curves (table, line plots, PNG); scalars are always logged.
        cuda_graphs: on CUDA, time each token count by replaying a captured CUDA graph, which
            removes the Python/launch overhead a deployed (graph-captured or TensorRT) model
            does not pay; ignored on other devices.
        relative_timing: time each token count call by call against the unpruned model
            (``profile_latency(relative=True)``): robust to a machine whose speed drifts.
    """

    def __init__(
        self,
        method: str = "pomt",
        r: int | None = None,
        layer: int = 3,
        alpha: float = 0.5,
        latency_budget_ms: float | None = None,
        accuracy_floor: float | None = None,
        batch_size: int | None = None,
        tokens: list[int] | None = None,
        coarse_points: int = 9,
        max_points: int | None = None,
        min_run_time: float = 0.2,
        warmup: int = 3,
        accuracy_samples: int = 1024,
        accuracy_tokens: list[int] | None = None,
        accuracy_batch_size: int | None = None,
        seed: int = 0,
        accuracy_data: Any = None,
        latency_profile_path: str | None = None,
        accuracy_profile_path: str | None = None,
        restore: bool = True,
        reuse: bool = True,
        vit_path: str | None = None,
        on_validate: bool = True,
        on_test: bool = True,
        on_predict: bool = True,
        on_fit_validation: bool = False,
        log_plots: bool = True,
        cuda_graphs: bool = False,
        relative_timing: bool = False,
    ) -> None:
        super().__init__()
        if method not in _PRUNING_METHODS:
            raise ValueError(f"method must be one of {', '.join(_PRUNING_METHODS)}, got {method!r}")
        if method != "pomt" and r is None:
            raise ValueError(f"method={method!r} needs a fixed r (the search selects R for 'pomt' only)")
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f"r must be a non-negative int or None, got {r!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if latency_budget_ms is not None and accuracy_floor is not None:
            raise ValueError("give either latency_budget_ms or accuracy_floor, not both")
        for name, value in (
            ("batch_size", batch_size),
            ("accuracy_batch_size", accuracy_batch_size),
            ("accuracy_samples", accuracy_samples),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if min_run_time < 0:
            raise ValueError(f"min_run_time must be >= 0, got {min_run_time!r}")
        self.method = method
        self.r = r
        self.layer = layer
        self.alpha = alpha
        self.latency_budget_ms = latency_budget_ms
        self.accuracy_floor = accuracy_floor
        self.batch_size = batch_size
        self.tokens = tokens
        self.coarse_points = coarse_points
        self.max_points = max_points
        self.min_run_time = min_run_time
        self.warmup = warmup
        self.accuracy_samples = accuracy_samples
        self.accuracy_tokens = accuracy_tokens
        self.accuracy_batch_size = accuracy_batch_size
        self.seed = seed
        self.accuracy_data = accuracy_data
        self.latency_profile_path = latency_profile_path
        self.accuracy_profile_path = accuracy_profile_path
        self.restore = restore
        self.reuse = reuse
        self.vit_path = vit_path
        self.stages = {
            "validate": on_validate,
            "test": on_test,
            "predict": on_predict,
            "fit": on_fit_validation,
        }
        self.log_plots = log_plots
        self.cuda_graphs = cuda_graphs
        self.relative_timing = relative_timing

        # results (like BatchSizeFinder.optimal_batch_size)
        self.selection: Any = None
        self.latency_profile: Any = None
        self.accuracy_profile: Any = None
        self.applied_r: int | None = None
        self.applied_tokens: list[int] | None = None
        self.profile_batch_size: int | None = None
        self.device_name: str | None = None

        self._vit: nn.Module | None = None
        self._found_path: str | None = None
        self._previous: Any = None
        self._applied = False
        self._searched_this_fit = False

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.stages.get(stage, False):
            return
        from pomt.models import find_vit

        try:
            self._found_path, self._vit = find_vit(pl_module, self.vit_path)
        except ValueError as err:
            raise ValueError(f"POMTCallback cannot find the ViT to prune: {err}") from err
        if stage == "fit":
            self._searched_this_fit = False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        fn = str(trainer.state.fn.value if hasattr(trainer.state.fn, "value") else trainer.state.fn)
        if fn == "fit":
            if not self.stages["fit"]:
                return
            self._before_stage(trainer, pl_module, "validate", search=not self._searched_this_fit)
            self._searched_this_fit = True
        elif self.stages["validate"]:
            self._before_stage(trainer, pl_module, "validate")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fn = str(trainer.state.fn.value if hasattr(trainer.state.fn, "value") else trainer.state.fn)
        self._after_stage(force_restore=fn == "fit")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stages["test"]:
            self._before_stage(trainer, pl_module, "test")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_stage()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stages["predict"]:
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
        from pomt.profiling import AccuracyProfile, LatencyProfile

        sel = state_dict.get("selection")
        self.selection = None if sel is None else Selection.from_dict(sel)
        lat = state_dict.get("latency_profile")
        self.latency_profile = None if lat is None else LatencyProfile.from_dict(lat)
        acc = state_dict.get("accuracy_profile")
        self.accuracy_profile = None if acc is None else AccuracyProfile.from_dict(acc)
        self.applied_r = state_dict.get("applied_r")
        self.profile_batch_size = state_dict.get("profile_batch_size")
        self.device_name = state_dict.get("device_name")

    # ------------------------------------------------------------------ the work
    def _vit_of(self, pl_module: pl.LightningModule) -> nn.Module:
        if self._vit is None:
            from pomt.models import find_vit

            self._found_path, self._vit = find_vit(pl_module, self.vit_path)
        return self._vit

    def _before_stage(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, search: bool = True
    ) -> None:
        from pomt.pruning import apply_pruning, pruning_config, remove_pruning, token_schedule

        vit = self._vit_of(pl_module)
        self._previous = pruning_config(vit)
        remove_pruning(vit)  # profile, and prune, the model as built
        try:
            r = self.r
            if r is None:
                if search or self.selection is None:
                    self._search_all_ranks(trainer, pl_module, vit, stage)
                r = self.selection.r
            schedule = token_schedule(vit, self.method, r, self.layer)  # validates r before patching
            apply_pruning(vit, self.method, r=r, layer=self.layer)
        except BaseException:
            prev = self._previous
            if prev is not None:  # an error leaves the model as it was
                apply_pruning(vit, prev.method, r=prev.r, layer=prev.layer)
            raise
        self._applied = True
        self.applied_r = int(r)
        self.applied_tokens = list(schedule)
        rank_zero_info(self._describe())
        self._log(trainer, pl_module, stage)

    def _after_stage(self, force_restore: bool = False) -> None:
        if not self._applied or self._vit is None:
            return
        if self.restore or force_restore:
            from pomt.pruning import apply_pruning, remove_pruning

            remove_pruning(self._vit)
            if self._previous is not None:
                prev = self._previous
                apply_pruning(self._vit, prev.method, r=prev.r, layer=prev.layer)
        self._applied = False

    def _describe(self) -> str:
        where = self._found_path or "<module>"
        text = f"POMTCallback: {self.method} r={self.applied_r} on `{where}`, tokens per block {self.applied_tokens}"
        if self.selection is not None and self.r is None:
            text += f"; {self.selection.summary()}"
        return text

    def _search_all_ranks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, vit: nn.Module, stage: str
    ) -> None:
        result: dict[str, Any] | None = None
        if trainer.is_global_zero:
            try:
                result = self._search(trainer, pl_module, vit, stage)
            except Exception as err:  # tell the other ranks instead of leaving them waiting
                result = {"error": err}
        result = trainer.strategy.broadcast(result, src=0)
        if "error" in result:
            raise result["error"]
        self.selection = result["selection"]
        self.latency_profile = result["latency_profile"]
        self.accuracy_profile = result["accuracy_profile"]
        self.profile_batch_size = result["batch_size"]
        self.device_name = result["device_name"]

    def _reusable(self, device_name: str, batch_size: int, tokens_total: int) -> bool:
        return (
            self.reuse
            and self.latency_profile is not None
            and self.accuracy_profile is not None
            and self.selection is not None
            and self.device_name == device_name
            and self.profile_batch_size == batch_size
            and self.selection.tokens_total == tokens_total
        )

    def _stage_loader(self, trainer: pl.Trainer, stage: str) -> Any:
        attr = {"validate": "val_dataloaders", "test": "test_dataloaders", "predict": "predict_dataloaders"}[
            stage
        ]
        return _first_loader(getattr(trainer, attr, None))

    def _accuracy_source(self, trainer: pl.Trainer, stage: str) -> Any:
        if self.accuracy_data is not None:
            return self.accuracy_data
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and callable(getattr(datamodule, "selection_dataloader", None)):
            return datamodule.selection_dataloader()
        loader = self._stage_loader(trainer, stage)
        if loader is None:
            raise ValueError(
                f"POMTCallback has no labelled data for the accuracy estimate in {stage}: pass accuracy_data=, "
                "give the datamodule a selection_dataloader(), or fix r="
            )
        return loader

    def _search(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, vit: nn.Module, stage: str
    ) -> dict[str, Any]:
        from pomt.models import token_layout
        from pomt.timing import device_name

        device = pl_module.device
        batch_size = self.batch_size or _loader_batch_size(self._stage_loader(trainer, stage)) or 1
        name = device_name(device)
        tokens_total = token_layout(vit).tokens
        if self._reusable(name, batch_size, tokens_total):
            rank_zero_info(
                "POMTCallback: reusing the profiles measured earlier for this device and batch size"
            )
            return {
                "selection": self._select(self.latency_profile, self.accuracy_profile),
                "latency_profile": self.latency_profile,
                "accuracy_profile": self.accuracy_profile,
                "batch_size": batch_size,
                "device_name": name,
            }
        progress = trainer.progress_bar_callback is not None
        was_training = pl_module.training
        pl_module.eval()
        try:
            with (
                isolate_rng(include_cuda=True),
                torch.inference_mode(),
                trainer.precision_plugin.forward_context(),
            ):
                # accuracy first: it does not depend on the device, and it guides the latency search
                acc = self._accuracy(trainer, pl_module, vit, device, stage, progress)
                lat = self._latency(pl_module, vit, device, batch_size, acc, progress)
        finally:
            pl_module.train(was_training)
        return {
            "selection": self._select(lat, acc),
            "latency_profile": lat,
            "accuracy_profile": acc,
            "batch_size": batch_size,
            "device_name": name,
        }

    def _select(self, lat: Any, acc: Any) -> Any:
        """R from the profiles with this callback's settings (cheap: reused profiles are re-selected)."""
        from pomt.selection import select_r

        return select_r(
            lat,
            acc,
            alpha=self.alpha,
            latency_budget_ms=self.latency_budget_ms,
            accuracy_floor=self.accuracy_floor,
        )

    def _latency(
        self,
        pl_module: pl.LightningModule,
        vit: nn.Module,
        device: torch.device,
        batch_size: int,
        acc: Any,
        progress: bool,
    ) -> Any:
        from pomt.profiling import LatencyProfile, model_name, profile_latency

        dtype = next(vit.parameters()).dtype
        path = self.latency_profile_path
        if path and os.path.isfile(path):
            rank_zero_info(f"POMTCallback: reusing the latency profile {path}")
            expect = dict(
                model=model_name(vit), device=device, batch_size=batch_size, dtype=dtype, layer=self.layer
            )
            return LatencyProfile.load(path, expect=expect)
        # the search is guided by the accuracy profile only where the utility decides
        utility_mode = self.latency_budget_ms is None and self.accuracy_floor is None
        lat = profile_latency(
            pl_module,
            batch_size=batch_size,
            device=device,
            layer=self.layer,
            dtype=dtype,
            tokens=self.tokens,
            vit=vit,
            accuracy=acc if utility_mode else None,
            alpha=self.alpha,
            warmup=self.warmup,
            min_run_time=self.min_run_time,
            cuda_graphs=self.cuda_graphs,
            relative=self.relative_timing,
            coarse_points=self.coarse_points,
            max_points=self.max_points,
            progress=progress,
        )
        if path:
            lat.save(path)
        return lat

    def _accuracy(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        vit: nn.Module,
        device: torch.device,
        stage: str,
        progress: bool,
    ) -> Any:
        from pomt.models import token_layout
        from pomt.profiling import AccuracyProfile, estimate_accuracy, model_name

        path = self.accuracy_profile_path
        if path and os.path.isfile(path):
            rank_zero_info(f"POMTCallback: reusing the accuracy profile {path}")
            expect = dict(model=model_name(vit), tokens_total=token_layout(vit).tokens)
            return AccuracyProfile.load(path, expect=expect)
        acc = estimate_accuracy(
            pl_module,
            self._accuracy_source(trainer, stage),
            num_samples=self.accuracy_samples,
            tokens=self.accuracy_tokens,
            seed=self.seed,
            vit=vit,
            device=device,
            batch_size=self.accuracy_batch_size,
            progress=progress,
        )
        if path:
            acc.save(path)
        return acc

    # ------------------------------------------------------------------ logging
    def _scalars(self) -> dict[str, float]:
        out: dict[str, float] = {"pomt/r": float(self.applied_r or 0)}
        if self.applied_tokens:
            out["pomt/tokens_after_pruning"] = float(self.applied_tokens[-1])
        sel = self.selection
        if sel is not None and self.r is None:
            out.update(
                {
                    "pomt/n_star": float(sel.tokens),
                    "pomt/utility": float(sel.utility),
                    "pomt/predicted_latency_ms": float(sel.predicted_latency_ms),
                    "pomt/predicted_accuracy": float(sel.predicted_accuracy),
                }
            )
            if sel.unpruned_latency_ms is not None:
                out["pomt/unpruned_latency_ms"] = float(sel.unpruned_latency_ms)
                out["pomt/predicted_speedup"] = float(sel.speedup)
        return out

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        scalars = self._scalars()
        if stage in ("validate", "test"):
            # epoch-level values: Lightning sends them to the loggers and returns them from
            # trainer.validate/test beside the stage's metrics
            for key, value in scalars.items():
                pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)
        elif trainer.loggers:
            pomt_logging.log_scalars(trainer, scalars, step=trainer.global_step)
        if not trainer.loggers:
            return
        summary: dict[str, Any] = dict(scalars)
        summary.update({"pomt/method": self.method, "pomt/layer": self.layer, "pomt/stage": stage})
        if self.device_name:
            summary["pomt/device"] = self.device_name
        if self.profile_batch_size:
            summary["pomt/profile_batch_size"] = self.profile_batch_size
        pomt_logging.log_summary(trainer, summary)
        sel = self.selection
        if self.log_plots and sel is not None and self.r is None:
            self._log_curves(trainer, sel)
        pomt_logging.announce_wandb_runs(trainer)

    def _log_curves(self, trainer: pl.Trainer, sel: Any) -> None:
        columns = ["tokens", "r", "latency_ms", "raw_latency_ms", "accuracy", "utility", "selected"]
        rows = [
            [
                int(n),
                int(sel.tokens_total - n),
                float(lat),
                float(raw),
                float(acc),
                float(u),
                int(n == sel.tokens),
            ]
            for n, lat, raw, acc, u in zip(
                sel.curve_tokens,
                sel.curve_latency_ms,
                sel.curve_raw_latency_ms,
                sel.curve_accuracy,
                sel.curve_utility,
                strict=True,
            )
            if all(math.isfinite(v) for v in (lat, raw, acc, u))
        ]
        pomt_logging.log_table(trainer, "pomt/curves", columns, rows)
        pomt_logging.log_line_plots(
            trainer,
            "pomt/plot",
            "tokens",
            columns,
            rows,
            ["latency_ms", "accuracy", "utility"],
            mark_x=sel.tokens,
            title="POMT",
        )
        from pomt.plots import plot_profiles

        # a plain matplotlib Figure (not pyplot's): nothing to close, freed with the object
        pomt_logging.log_figure(
            trainer, "pomt/profiles", plot_profiles(self.latency_profile, self.accuracy_profile, sel)
        )
