"""The driver behind ``evaluate.py``: the accuracy-latency trade-off of one model on this device.

Per batch size: :func:`pomt.find_r` chooses R; the configurations (unpruned, POMT at R,
ToMe and Top-K at r values that span the same token reduction) are fixed up front; all of
them are timed side by side on one real test batch; then each is tested (``trainer.test``,
one logger each: one W&B run per configuration, all in one group). The comparison lands in
one run directory as a report (CSV + JSON), a plot (PNG) and a printed table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

import pomt
from pomt import METHODS
from pomt.callbacks.logging import finish_wandb, log_tradeoff_summary, wandb_logger
from pomt.callbacks.pomt_callback import POMTCallback
from pomt.data import split_batch
from pomt.finder import Search, SearchConfig, find_r
from pomt.models import find_vit
from pomt.plots import plot_tradeoff
from pomt.report import ReportRow, format_table, write_report
from pomt.timing import TimingStats, cuda_graph, device_name, time_interleaved

__all__ = ["TradeoffEvaluation", "TradeoffResult", "Configuration", "matching_r_values"]


@dataclass(frozen=True)
class Configuration:
    """One evaluated way of running the model: ``method`` with ``r`` (``selected``: POMT at the
    R chosen for this device)."""

    method: str
    r: int
    selected: bool = False

    @property
    def label(self) -> str:
        return "unpruned" if self.method == "none" else f"{self.method}-r{self.r}"


@dataclass
class TradeoffResult:
    rows: list[ReportRow]
    out_dir: Path
    csv_path: Path | None
    json_path: Path | None
    plot_path: Path | None
    searches: dict[int, Search] = field(default_factory=dict)  # per batch size
    wandb_dirs: list[str] = field(default_factory=list)


def _mean_n(schedule: Sequence[int]) -> float:
    return sum(schedule) / len(schedule)


def matching_r_values(
    vit: torch.nn.Module, method: str, target_mean_n: Sequence[float], layer: int = 3
) -> list[int]:
    """For each target, the per-block ``r`` of ``method`` whose mean tokens per block is closest.

    Mean tokens per block is the first-order compute of a ViT, so these r values put ToMe and
    Top-K in the same latency range as the POMT configurations they are compared with.
    """
    layout = pomt.token_layout(vit)
    candidates: dict[int, float] = {}
    for r in range(1, layout.n_patches):
        try:
            candidates[r] = _mean_n(pomt.token_schedule(vit, method, r, layer))
        except ValueError:
            break
    chosen: list[int] = []
    if not candidates:
        return chosen
    tolerance = 0.05 * layout.n_total
    lowest, highest = min(candidates.values()) - tolerance, max(candidates.values()) + tolerance
    for target in target_mean_n:
        if not lowest <= target <= highest:
            continue  # out of this method's reach (e.g. more than ToMe can merge)
        best = min(candidates, key=lambda r: (abs(candidates[r] - target), r))
        if best not in chosen:
            chosen.append(best)
    return sorted(chosen)


class TradeoffEvaluation:
    """Evaluate one model pruned several ways; LightningCLI builds it from the ``sweep:`` section.

    Args:
        methods: which of ``none``, ``pomt``, ``tome``, ``topk`` to evaluate.
        tome_r, topk_r: explicit per-block r values; default: r values whose mean tokens per
            block span from half to twice POMT's token reduction (``span``).
        span: multiples of POMT's token reduction that ToMe/Top-K are matched to.
        layer: block where POMT prunes.
        search: how POMT's R is chosen (:class:`pomt.SearchConfig`).
        out_dir: where the run directory is created; ``run_name`` names it (default: a time stamp).
        wandb: log every configuration as its own W&B run in one group, plus a summary run.
        wandb_project, wandb_group, wandb_offline: where the runs go (offline by default: no
            account or network needed; ``wandb sync DIR`` uploads later).
        latency_rounds: interleaved timing rounds per configuration (one real test batch each).
        batch_sizes: evaluate at each of these batch sizes (latency, and R, depend on it; accuracy
            does not, so ToMe/Top-K/unpruned are tested once). Results per batch size go to
            ``bs<B>/`` and one combined report to the run directory. Default: the data's batch size.
    """

    def __init__(
        self,
        methods: Sequence[str] = ("none", "pomt", "tome", "topk"),
        tome_r: list[int] | None = None,
        topk_r: list[int] | None = None,
        span: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
        layer: int = 3,
        search: SearchConfig | None = None,
        out_dir: str = "runs",
        run_name: str | None = None,
        wandb: bool = True,
        wandb_project: str = "pomt",
        wandb_group: str | None = None,
        wandb_offline: bool = True,
        latency_rounds: int = 30,
        batch_sizes: list[int] | None = None,
    ) -> None:
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"methods must be a non-empty list of {', '.join(METHODS)}; got {list(methods)}")
        if any(s <= 0 for s in span):
            raise ValueError(f"span values must be > 0, got {list(span)}")
        if latency_rounds < 1:
            raise ValueError(f"latency_rounds must be >= 1, got {latency_rounds}")
        if batch_sizes is not None and (not batch_sizes or any(b < 1 for b in batch_sizes)):
            raise ValueError(f"batch_sizes must be a non-empty list of positive ints, got {batch_sizes}")
        self.methods = list(methods)
        self.tome_r, self.topk_r, self.span = tome_r, topk_r, list(span)
        self.layer = layer
        self.search = search or SearchConfig()
        self.out_dir, self.run_name = out_dir, run_name
        self.wandb, self.wandb_project, self.wandb_group = wandb, wandb_project, wandb_group
        self.wandb_offline = wandb_offline
        self.latency_rounds = latency_rounds
        self.batch_sizes = list(batch_sizes) if batch_sizes else None

    # ------------------------------------------------------------------ loggers
    def _logger(self, name: str, group: str, run_dir: Path) -> Logger | bool:
        if not self.wandb:
            return False
        kwargs = dict(project=self.wandb_project, group=group, name=name, job_type="evaluate")
        try:
            return wandb_logger(save_dir=run_dir, offline=self.wandb_offline, **kwargs)
        except ValueError as err:  # online without credentials: keep the results, log offline
            rank_zero_warn(f"{err}; logging this evaluation offline instead")
            self.wandb_offline = True
            return wandb_logger(save_dir=run_dir, offline=True, **kwargs)

    # ------------------------------------------------------------------ the steps
    def _find_r(
        self, model: pl.LightningModule, datamodule: Any, trainer: pl.Trainer, folder: Path, run_dir: Path
    ) -> Search:
        """POMT's search on the Trainer's device and precision, its profiles kept in the run folders."""
        vit = find_vit(model)[1]
        model.to(trainer.strategy.root_device).eval()
        with trainer.precision_plugin.forward_context():
            return find_r(
                model,
                datamodule.selection_dataloader(),
                layer=self.layer,
                batch_size=int(datamodule.batch_size),
                device=trainer.strategy.root_device,
                config=self.search,
                vit=vit,
                latency_path=folder / "latency_profile.json",
                accuracy_path=run_dir / "accuracy_profile.json",
                progress=trainer.progress_bar_callback is not None,
                log=rank_zero_info,
            )

    def _configurations(self, vit: torch.nn.Module, r: int | None) -> list[Configuration]:
        """Unpruned, POMT at ``r``, and ToMe/Top-K at r values spanning POMT's reduction."""
        layout = pomt.token_layout(vit)
        configs = [Configuration("none", 0)] if "none" in self.methods else []
        reduction = 0.0
        if r is not None:
            configs.append(Configuration("pomt", r, selected=True))
            reduction = layout.n_total - _mean_n(pomt.token_schedule(vit, "pomt", r, self.layer))
        if reduction <= 0:  # POMT kept every token (or did not run): span a quarter of N instead
            reduction = 0.25 * layout.n_patches
        targets = [layout.n_total - s * reduction for s in self.span]
        for method, explicit in (("tome", self.tome_r), ("topk", self.topk_r)):
            if method in self.methods:
                values = (
                    explicit if explicit is not None else matching_r_values(vit, method, targets, self.layer)
                )
                configs.extend(Configuration(method, int(v)) for v in values)
        return configs

    def _time_all(
        self,
        model: pl.LightningModule,
        vit: torch.nn.Module,
        images: torch.Tensor,
        trainer: pl.Trainer,
        configs: list[Configuration],
    ) -> dict[Configuration, tuple[TimingStats, str]]:
        """Latency of every configuration on one real test batch, interleaved round by round,
        timed as the latency profile was: under the Trainer's precision, with its warm-up, and
        as CUDA-graph replays when ``search.cuda_graphs`` is on (eager, with a warning and a
        note in the row, for a configuration whose graph cannot be captured)."""
        device = trainer.strategy.root_device
        model.to(device).eval()
        images = images.to(device)
        by_label = {c.label: c for c in configs}
        calls, modes = {}, {}

        def prepare(label: str) -> None:
            config = by_label[label]
            pomt.apply_pruning(vit, config.method, r=config.r, layer=self.layer)

        try:
            with torch.inference_mode(), trainer.precision_plugin.forward_context():
                for label in by_label:
                    prepare(label)
                    calls[label], modes[label] = (lambda: model(images)), "eager"
                    if self.search.cuda_graphs and device.type == "cuda":
                        try:
                            calls[label], modes[label] = cuda_graph(calls[label], device), "cuda_graphs"
                        except Exception as err:  # e.g. data-dependent shapes or host syncs
                            rank_zero_warn(f"{label}: CUDA graph capture failed ({err}); timing eager calls")
                            modes[label] = f"eager (graph capture failed: {type(err).__name__})"
                stats = time_interleaved(
                    calls,
                    device=device,
                    rounds=self.latency_rounds,
                    warmup=self.search.warmup,
                    prepare=prepare,
                    progress=f"timing {len(by_label)} configurations",
                )
        finally:
            pomt.remove_pruning(vit)
        return {by_label[label]: (s, modes[label]) for label, s in stats.items()}

    def timing(self, trainer: pl.Trainer, batch_sizes: Sequence[int]) -> str:
        """How every configuration is timed, in words (table header, report and W&B config)."""
        graphs = self.search.cuda_graphs and trainer.strategy.root_device.type == "cuda"
        return (
            f"{'CUDA-graph replays' if graphs else 'eager calls'}, precision {trainer.precision}, "
            f"warm-up {self.search.warmup}, {self.latency_rounds} interleaved rounds on one test batch "
            f"(batch size {', '.join(map(str, batch_sizes))})"
        )

    def _test(
        self,
        model: pl.LightningModule,
        datamodule: Any,
        trainer_factory: Callable[..., pl.Trainer],
        config: Configuration,
        logger: Logger | bool,
    ) -> dict[str, float]:
        """``trainer.test`` of one configuration (pruned by a fixed-r POMTCallback)."""
        callbacks = (
            [] if config.method == "none" else [POMTCallback(config.method, r=config.r, layer=self.layer)]
        )
        trainer = trainer_factory(logger=logger, callbacks=callbacks)
        metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
        if logger:
            logger.log_hyperparams({"method": config.method, "r": config.r, "selected": config.selected})
        return {k: float(v) for k, v in metrics.items()}

    def _row(
        self,
        model: pl.LightningModule,
        vit: torch.nn.Module,
        config: Configuration,
        metrics: dict[str, float],
        stats: TimingStats,
        batch_size: int,
        search: Search | None,
    ) -> ReportRow:
        schedule = pomt.token_schedule(vit, config.method, config.r, self.layer)
        param = next(model.parameters())
        return ReportRow(
            method=config.method,
            r=str(config.r),
            n_last=schedule[-1],
            mean_n=_mean_n(schedule),
            acc1=metrics.get("test/acc1", float("nan")),
            acc5=metrics.get("test/acc5", float("nan")),
            latency_ms=stats.median_ms,
            latency_p90_ms=stats.p90_ms,
            loop_latency_ms=metrics.get("test/latency_ms"),
            batch_size=batch_size,
            device=device_name(param.device),
            dtype=str(param.dtype).replace("torch.", ""),
            model=str(getattr(getattr(model, "hparams", {}), "model_name", "") or type(vit).__name__),
            selected=config.selected,
            verified_speedup=search.selection.measured_speedup if (search and config.selected) else None,
            predicted_latency_ms=search.selection.predicted_latency_ms
            if (search and config.selected)
            else None,
            samples=stats.samples,
        )

    # ------------------------------------------------------------------ the sweep
    def run(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        trainer_factory: Callable[..., pl.Trainer],
    ) -> TradeoffResult:
        """Run every configuration; ``trainer_factory(logger=..., callbacks=[...])`` makes a Trainer."""
        name = self.run_name or time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(self.out_dir) / name
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("latency_profile.json", "accuracy_profile.json"):
            for path in run_dir.glob(f"**/{stale}"):  # profiles of an earlier run (other weights?)
                path.unlink()
        group = self.wandb_group or f"tradeoff-{name}"
        vit = find_vit(model)[1]
        batch_sizes = self.batch_sizes or [int(getattr(datamodule, "batch_size", 0) or 0)]
        if self.batch_sizes and not hasattr(datamodule, "batch_size"):
            raise ValueError(f"{type(datamodule).__name__} has no batch_size: cannot sweep batch sizes")
        result = TradeoffResult([], run_dir, None, None, None)
        tested: dict[tuple[str, int], dict[str, float]] = {}  # accuracy does not depend on the batch size
        measure = trainer_factory(logger=False, callbacks=[])  # the device and precision of every run
        for batch_size in batch_sizes:
            datamodule.batch_size = batch_size
            folder = run_dir / f"bs{batch_size}" if self.batch_sizes else run_dir
            folder.mkdir(parents=True, exist_ok=True)
            search = None
            if "pomt" in self.methods:
                rank_zero_info(f"evaluating POMT: selecting R on this device at batch size {batch_size}")
                search = self._find_r(model, datamodule, measure, folder, run_dir)
                result.searches[batch_size] = search
            configs = self._configurations(vit, None if search is None else search.selection.r)
            images = split_batch(next(iter(datamodule.test_dataloader())))[0]
            rank_zero_info(
                f"timing {len(configs)} configurations side by side ({self.latency_rounds} rounds)"
            )
            stats = self._time_all(model, vit, images, measure, configs)
            rows = []
            for config in configs:
                key = (config.method, config.r)
                logger = self._logger(config.label, group, folder)
                try:
                    if key not in tested:
                        rank_zero_info(f"evaluating {config.label}")
                        tested[key] = self._test(model, datamodule, trainer_factory, config, logger)
                    elif logger:  # tested at another batch size: same accuracy, new latency
                        logger.log_hyperparams(
                            {"method": config.method, "r": config.r, "selected": config.selected}
                        )
                        logger.log_metrics({k: v for k, v in tested[key].items() if "latency" not in k})
                    if logger:
                        s = stats[config]
                        logger.log_metrics(
                            {
                                "latency/median_ms": s.median_ms,
                                "latency/p90_ms": s.p90_ms,
                                "latency/iqr_ms": s.iqr_ms,
                            }
                        )
                finally:
                    finish_wandb(logger, result.wandb_dirs)
                rows.append(
                    self._row(model, vit, config, tested[key], stats[config], int(images.shape[0]), search)
                )
            result.rows.extend(rows)
            if self.batch_sizes and measure.is_global_zero:
                self._write(rows, folder, search)
        if not measure.is_global_zero:
            return result
        result.csv_path, result.json_path, result.plot_path = self._write(
            result.rows, run_dir, None if self.batch_sizes else result.searches.get(batch_sizes[-1])
        )
        print(format_table(result.rows))
        if self.wandb:
            logger = self._logger("summary", group, run_dir)
            log_tradeoff_summary(logger, result.rows, result.plot_path)
            finish_wandb(logger, result.wandb_dirs)
        print(f"report: {result.csv_path} and {result.json_path}; plot: {result.plot_path}")
        if result.wandb_dirs and self.wandb_offline:
            print(f"W&B offline runs (upload with `wandb sync DIR`): {Path(result.wandb_dirs[0]).parent}")
        return result

    @staticmethod
    def _write(rows: list[ReportRow], out: Path, search: Search | None) -> tuple[Path, Path, Path]:
        csv_path, json_path = write_report(rows, out)
        figure = plot_tradeoff(
            rows,
            search.latency if search else None,
            search.accuracy if search else None,
            search.selection if search else None,
        )
        plot_path = out / "tradeoff.png"
        figure.savefig(plot_path, dpi=110)
        return csv_path, json_path, plot_path
