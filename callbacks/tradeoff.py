"""The accuracy-latency trade-off of one model on this device: the unpruned baseline, POMT
at the R its callback selects, and ToMe and Top-K over r values that span the same latency
range. Each configuration is one ``trainer.test`` with its own logger (one W&B run each,
all in one group), and the whole comparison lands in one run directory as a report
(CSV + JSON), a plot (PNG) and a printed table.
"""

from __future__ import annotations

import contextlib
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
from callbacks.logging import wandb_logger
from callbacks.pomt_callback import POMTCallback
from pomt import METHODS
from pomt.models import find_vit
from pomt.profiling import split_batch
from pomt.report import ReportRow, format_table, plot_tradeoff, write_report
from pomt.timing import TimingStats, device_name, time_interleaved

__all__ = ["TradeoffEvaluation", "TradeoffResult", "matching_r_values"]


@dataclass
class TradeoffResult:
    rows: list[ReportRow]
    out_dir: Path
    csv_path: Path | None
    json_path: Path | None
    plot_path: Path | None
    last_batch_dir: Path | None = None
    pomt_callback: POMTCallback | None = None
    wandb_dirs: list[str] = field(default_factory=list)


@dataclass
class _Config:
    method: str
    r: int | None
    selected: bool = False
    callback: POMTCallback | None = None

    @property
    def label(self) -> str:
        if self.method == "none":
            return "unpruned"
        return "pomt-auto" if self.selected else f"{self.method}-r{self.r}"

    @property
    def r_label(self) -> str:
        return "auto" if self.r is None else str(self.r)


@dataclass
class _Context:
    model: pl.LightningModule
    datamodule: pl.LightningDataModule
    trainer_factory: Callable[..., pl.Trainer]
    run_dir: Path
    group: str
    vit: torch.nn.Module
    layer: int
    accuracy_profile_path: Path | None = None
    cache: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    wandb_dirs: list[str] = field(default_factory=list)
    trainer: pl.Trainer | None = None
    batch_size: int = 0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    stats: dict[str, TimingStats] = field(default_factory=dict)


def _latency_metrics(stats: TimingStats) -> dict[str, float]:
    return {
        "latency/median_ms": stats.median_ms,
        "latency/p90_ms": stats.p90_ms,
        "latency/iqr_ms": stats.iqr_ms,
    }


def _mean_tokens(schedule: Sequence[int]) -> float:
    return sum(schedule) / len(schedule)


def matching_r_values(
    vit: torch.nn.Module, method: str, target_mean_tokens: Sequence[float], layer: int = 3
) -> list[int]:
    """For each target, the per-block ``r`` of ``method`` whose mean tokens per block is closest.

    Mean tokens per block is the first-order compute of a ViT, so these r values put ToMe and
    Top-K in the same latency range as the POMT configurations they are compared with.
    """
    layout = pomt.token_layout(vit)
    candidates: dict[int, float] = {}
    for r in range(1, layout.patch_tokens):
        try:
            candidates[r] = _mean_tokens(pomt.token_schedule(vit, method, r, layer))
        except ValueError:
            break
    chosen: list[int] = []
    if not candidates:
        return chosen
    tolerance = 0.05 * layout.tokens
    lowest, highest = min(candidates.values()) - tolerance, max(candidates.values()) + tolerance
    for target in target_mean_tokens:
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
        pomt: arguments of the :class:`~callbacks.POMTCallback` that selects R (alpha, layer,
            search and accuracy settings, profile files).
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
        pomt: dict[str, Any] | None = None,
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
        self.methods = list(methods)
        self.tome_r = tome_r
        self.topk_r = topk_r
        self.span = list(span)
        self.pomt_kwargs = dict(pomt or {})
        for key in ("method", "r", "restore"):
            if key in self.pomt_kwargs:
                raise ValueError(
                    f"sweep.pomt sets the callback's search arguments; {key!r} is chosen by the sweep"
                )
        self.out_dir = out_dir
        self.run_name = run_name
        self.wandb = wandb
        self.wandb_project = wandb_project
        self.wandb_group = wandb_group
        self.wandb_offline = wandb_offline
        if latency_rounds < 1:
            raise ValueError(f"latency_rounds must be >= 1, got {latency_rounds}")
        self.latency_rounds = latency_rounds
        if batch_sizes is not None and (not batch_sizes or any(b < 1 for b in batch_sizes)):
            raise ValueError(f"batch_sizes must be a non-empty list of positive ints, got {batch_sizes}")
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

    @staticmethod
    def _finish(logger: Logger | bool, dirs: list[str]) -> None:
        experiment = getattr(logger, "_experiment", None)
        if experiment is not None:
            dirs.append(str(Path(experiment.dir).parent))
            experiment.finish()

    # ------------------------------------------------------------------ one configuration
    def _test(
        self, ctx: _Context, config: _Config, finish: bool = True
    ) -> tuple[dict[str, float], Logger | bool]:
        """``trainer.test`` of one configuration, with its own logger; returns the test metrics."""
        callbacks: list[pl.Callback] = []
        if config.method != "none":
            kwargs = dict(self.pomt_kwargs)
            if config.method == "pomt" and config.r is None:
                kwargs.setdefault("latency_profile_path", str(ctx.run_dir / "latency_profile.json"))
                kwargs.setdefault("accuracy_profile_path", str(ctx.accuracy_profile_path))
            config.callback = POMTCallback(method=config.method, r=config.r, restore=True, **kwargs)
            callbacks.append(config.callback)
        logger = self._logger(config.label, ctx.group, ctx.run_dir)
        trainer = ctx.trainer_factory(logger=logger, callbacks=callbacks)
        ctx.trainer = trainer
        try:
            metrics = trainer.test(ctx.model, datamodule=ctx.datamodule, verbose=False)[0]
            if logger:
                logger.log_hyperparams({"method": config.method, "r": config.r_label})
        except BaseException:
            self._finish(logger, ctx.wandb_dirs)
            raise
        if finish:
            self._finish(logger, ctx.wandb_dirs)
        if config.method == "pomt" and config.r is None:
            config.r = config.callback.selection.r  # the selection, fixed for the timing below
        return {k: float(v) for k, v in metrics.items()}, logger

    def _time_all(self, ctx: _Context, configs: list[_Config]) -> dict[str, TimingStats]:
        """Latency of every configuration on one real test batch, interleaved round by round."""
        trainer = ctx.trainer
        device = trainer.strategy.root_device
        images = split_batch(next(iter(ctx.datamodule.test_dataloader())))[0].to(device)
        model = ctx.model.to(device).eval()
        by_label = {c.label: c for c in configs}

        def prepare(label: str) -> None:
            config = by_label[label]
            pomt.apply_pruning(ctx.vit, config.method, r=config.r or 0, layer=ctx.layer)

        precision = getattr(trainer.strategy, "precision_plugin", None)
        context = precision.forward_context() if precision is not None else contextlib.nullcontext()
        try:
            with torch.inference_mode(), context:
                stats = time_interleaved(
                    {label: (lambda: model(images)) for label in by_label},
                    device=device,
                    rounds=self.latency_rounds,
                    warmup=3,
                    prepare=prepare,
                    progress=f"timing {len(by_label)} configurations",
                )
        finally:
            pomt.remove_pruning(ctx.vit)
        ctx.batch_size = int(images.shape[0])
        return stats

    def _row(
        self, ctx: _Context, config: _Config, metrics: dict[str, float], stats: TimingStats
    ) -> ReportRow:
        schedule = pomt.token_schedule(ctx.vit, config.method, config.r or 0, ctx.layer)
        param = next(ctx.model.parameters())
        selection = config.callback.selection if config.callback is not None else None
        return ReportRow(
            method=config.method,
            r=str(config.r or 0),
            tokens=schedule[-1],
            mean_tokens=_mean_tokens(schedule),
            acc1=metrics.get("test/acc1", float("nan")),
            acc5=metrics.get("test/acc5", float("nan")),
            latency_ms=stats.median_ms,
            latency_p90_ms=stats.p90_ms,
            loop_latency_ms=metrics.get("test/latency_ms"),
            batch_size=ctx.batch_size,
            device=device_name(param.device),
            dtype=str(param.dtype).replace("torch.", ""),
            model=str(getattr(getattr(ctx.model, "hparams", {}), "model_name", "") or type(ctx.vit).__name__),
            selected=config.selected,
            predicted_latency_ms=selection.predicted_latency_ms if (selection and config.selected) else None,
            samples=stats.samples,
        )

    # ------------------------------------------------------------------ the sweep
    def run(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        trainer_factory: Callable[..., pl.Trainer],
    ) -> TradeoffResult:
        """Run every configuration; ``trainer_factory(logger=..., callbacks=[...])`` makes a Trainer.

        Per batch size: POMT first (its callback selects R), then the latency of every
        configuration measured side by side on one test batch, then each configuration's
        accuracy run. Accuracy does not depend on the batch size, so a configuration already
        evaluated at another batch size is not run again.
        """
        name = self.run_name or time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(self.out_dir) / name
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("latency_profile.json", "accuracy_profile.json"):
            for path in run_dir.glob(f"**/{stale}"):  # profiles of an earlier run (other weights?)
                path.unlink()
        vit = find_vit(model, self.pomt_kwargs.get("vit_path"))[1]
        batch_sizes = self.batch_sizes or [int(getattr(datamodule, "batch_size", 0) or 0)]
        rows: list[ReportRow] = []
        cache: dict[tuple[str, int], dict[str, float]] = {}
        dirs: list[str] = []
        last: tuple[_Context, _Config | None] | None = None
        for batch_size in batch_sizes:
            if self.batch_sizes:
                if not hasattr(datamodule, "batch_size"):
                    raise ValueError(
                        f"{type(datamodule).__name__} has no batch_size: cannot sweep batch sizes"
                    )
                datamodule.batch_size = batch_size
            ctx = _Context(
                model=model,
                datamodule=datamodule,
                trainer_factory=trainer_factory,
                run_dir=run_dir / f"bs{batch_size}" if self.batch_sizes else run_dir,
                group=self.wandb_group or f"tradeoff-{name}",
                vit=vit,
                layer=int(self.pomt_kwargs.get("layer", 3)),
                accuracy_profile_path=run_dir / "accuracy_profile.json",
                cache=cache,
                wandb_dirs=dirs,
            )
            ctx.run_dir.mkdir(parents=True, exist_ok=True)
            configs, pomt_config = self._run_batch_size(ctx)
            batch_rows = [self._row(ctx, c, ctx.metrics[c.label], ctx.stats[c.label]) for c in configs]
            rows.extend(batch_rows)
            last = (ctx, pomt_config)
            if self.batch_sizes and ctx.trainer.is_global_zero:
                self._write(batch_rows, ctx.run_dir, pomt_config, title=f"batch size {batch_size}")
        ctx, pomt_config = last
        callback = pomt_config.callback if pomt_config is not None else None
        if not ctx.trainer.is_global_zero:
            return TradeoffResult(rows, run_dir, None, None, None, None, callback, dirs)
        csv_path, json_path, plot_path = self._write(
            rows, run_dir, pomt_config if not self.batch_sizes else None
        )
        print(format_table(rows))
        if self.wandb:
            self._log_summary(rows, plot_path, run_dir, ctx.group, dirs)
        print(f"report: {csv_path} and {json_path}; plot: {plot_path}")
        if dirs and self.wandb_offline:
            print(f"W&B offline runs (upload with `wandb sync DIR`): {Path(dirs[0]).parent}")
        return TradeoffResult(rows, run_dir, csv_path, json_path, plot_path, ctx.run_dir, callback, dirs)

    @staticmethod
    def _write(
        rows: list[ReportRow], out: Path, pomt_config: _Config | None, title: str = ""
    ) -> tuple[Path, Path, Path]:
        csv_path, json_path = write_report(rows, out)
        callback = pomt_config.callback if pomt_config is not None else None
        figure = plot_tradeoff(
            rows,
            callback.latency_profile if callback else None,
            callback.accuracy_profile if callback else None,
            callback.selection if callback else None,
        )
        plot_path = out / "tradeoff.png"
        figure.savefig(plot_path, dpi=110)
        return csv_path, json_path, plot_path

    def _run_batch_size(self, ctx: _Context) -> tuple[list[_Config], _Config | None]:
        """All configurations at the datamodule's current batch size."""
        vit, layout = ctx.vit, pomt.token_layout(ctx.vit)
        configs: list[_Config] = []
        pomt_config = pomt_logger = None
        if "pomt" in self.methods:
            pomt_config = _Config("pomt", None, selected=True)
            rank_zero_info("evaluating POMT: selecting R on this device")
            ctx.metrics[pomt_config.label], pomt_logger = self._test(ctx, pomt_config, finish=False)
            ctx.cache[("pomt", pomt_config.r)] = ctx.metrics[pomt_config.label]
        if "none" in self.methods:
            configs.append(_Config("none", 0))
        if pomt_config is not None:
            configs.append(pomt_config)

        # ToMe/Top-K: r values whose mean tokens per block match multiples of POMT's reduction
        reduction = 0.0
        if pomt_config is not None:
            reduction = layout.tokens - _mean_tokens(
                pomt.token_schedule(vit, "pomt", pomt_config.r, ctx.layer)
            )
        if reduction <= 0:  # POMT kept every token (or did not run): span a quarter of N instead
            reduction = 0.25 * layout.patch_tokens
        targets = [layout.tokens - s * reduction for s in self.span]
        for method, explicit in (("tome", self.tome_r), ("topk", self.topk_r)):
            if method in self.methods:
                values = (
                    explicit if explicit is not None else matching_r_values(vit, method, targets, ctx.layer)
                )
                configs.extend(_Config(method, int(r)) for r in values)

        if ctx.trainer is None:  # no POMT run yet: a trainer for the device and precision
            ctx.trainer = ctx.trainer_factory(logger=False, callbacks=[])
        rank_zero_info(f"timing {len(configs)} configurations side by side ({self.latency_rounds} rounds)")
        ctx.stats = self._time_all(ctx, configs)
        if pomt_logger:
            pomt_logger.log_metrics(_latency_metrics(ctx.stats[pomt_config.label]))
            self._finish(pomt_logger, ctx.wandb_dirs)

        for config in configs:
            if config.label in ctx.metrics:
                continue
            key = (config.method, int(config.r or 0))
            logger: Logger | bool
            if key in ctx.cache:  # evaluated at another batch size: same accuracy, new latency
                ctx.metrics[config.label] = ctx.cache[key]
                logger = self._logger(config.label, ctx.group, ctx.run_dir)
                if logger:
                    logger.log_hyperparams({"method": config.method, "r": config.r_label})
                    logger.log_metrics({k: v for k, v in ctx.cache[key].items() if "latency" not in k})
            else:
                rank_zero_info(f"evaluating {config.label}")
                ctx.metrics[config.label], logger = self._test(ctx, config, finish=False)
                ctx.cache[key] = ctx.metrics[config.label]
            if logger:
                logger.log_metrics(_latency_metrics(ctx.stats[config.label]))
            self._finish(logger, ctx.wandb_dirs)
        return configs, pomt_config

    def _log_summary(
        self, rows: list[ReportRow], plot_path: Path, run_dir: Path, group: str, dirs: list[str]
    ) -> None:
        """One more run in the group: the comparison table, a scatter plot and the PNG."""
        from dataclasses import asdict

        import wandb

        logger = self._logger("summary", group, run_dir)
        run = logger.experiment
        columns = list(asdict(rows[0]))
        table = wandb.Table(
            columns=columns + ["label"], data=[[*asdict(row).values(), row.label] for row in rows]
        )
        run.log(
            {
                "tradeoff/table": table,
                "tradeoff/accuracy_vs_latency": wandb.plot.scatter(
                    table, "latency_ms", "acc1", title="top-1 accuracy vs median latency (ms)"
                ),
                "tradeoff/plot": wandb.Image(str(plot_path)),
            }
        )
        for row in rows:
            if row.selected:
                run.summary.update(
                    {
                        "pomt/r": int(row.r),
                        "pomt/tokens": row.tokens,
                        "pomt/acc1": row.acc1,
                        "pomt/latency_ms": row.latency_ms,
                    }
                )
        base = next((row for row in rows if row.method == "none"), None)
        if base is not None:
            run.summary.update({"unpruned/acc1": base.acc1, "unpruned/latency_ms": base.latency_ms})
        self._finish(logger, dirs)
