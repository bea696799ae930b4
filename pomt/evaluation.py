"""The driver behind ``evaluate.py``: the accuracy-latency trade-off of one model on this device.

Per batch size, global rank 0 alone measures (no other process shares the device): it
chooses R with :func:`pomt.find_r`, fixes the configurations (unpruned, POMT at R, ToMe and
Top-K at r values that span the same token reduction), and times them side by side on one
real test batch, the way the latency profile was timed. Then every rank tests each
configuration (``trainer.test``, one logger each; exact under DDP with unrepeated
sampling). Every finished piece is written to the run directory at once and reused by a
rerun where still valid (``pomt.rundir``); the report, plot and token maps land there too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

import pomt
from pomt import METHODS
from pomt.callbacks.logging import finish_wandb, log_tradeoff_summary, wandb_logger
from pomt.callbacks.pomt_callback import POMTCallback
from pomt.configurations import Configuration, configurations, save_token_maps, time_configurations
from pomt.data import split_batch
from pomt.finder import Search, SearchConfig, find_r
from pomt.models import find_vit, weights_fingerprint
from pomt.plots import plot_tradeoff
from pomt.report import ReportRow, format_table, mark_pareto, write_report
from pomt.rundir import RunDir
from pomt.timing import TimingStats, device_name

__all__ = ["TradeoffEvaluation", "TradeoffResult"]


@dataclass
class TradeoffResult:
    rows: list[ReportRow]
    out_dir: Path
    csv_path: Path | None = None
    json_path: Path | None = None
    plot_path: Path | None = None
    searches: dict[int, Search] = field(default_factory=dict)  # per batch size, when measured here
    wandb_dirs: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)  # configurations whose accuracy was reused


def _test_images(datamodule: Any) -> Any:
    """The images of the first test batch (timed side by side, and shown in the token maps)."""
    return split_batch(next(iter(datamodule.test_dataloader())))[0]


class TradeoffEvaluation:
    """Evaluate one model pruned several ways; LightningCLI builds it from the ``sweep:`` section.

    Args:
        methods: which of ``none``, ``pomt``, ``tome``, ``topk`` to evaluate.
        tome_r, topk_r: explicit per-block r values; default: r values whose mean tokens per
            block span from half to twice POMT's token reduction (``span``).
        span: multiples of POMT's token reduction that ToMe/Top-K are matched to.
        layer: block where POMT prunes.
        search: how POMT's R is chosen (:class:`pomt.SearchConfig`); ``search.cuda_graphs`` and
            ``search.warmup`` also time the side-by-side comparison.
        out_dir: where the run directory is created; ``run_name`` names it (default: a time stamp).
        wandb: log every configuration as its own W&B run in one group, plus a summary run.
        wandb_project, wandb_group, wandb_offline: where the runs go (offline by default: no
            account or network needed; ``wandb sync DIR`` uploads later).
        latency_rounds: interleaved timing rounds per configuration (one real test batch each).
        batch_sizes: evaluate at each of these batch sizes (latency, and R, depend on it; accuracy
            does not, so ToMe/Top-K/unpruned are tested once). Results per batch size go to
            ``bs<B>/`` and one combined report to the run directory. Default: the data's batch size.
        token_maps: how many test images ``token_maps.png`` shows (0: none).
        resume: reuse what an earlier run of the same command finished, where still valid.
        limit_test_batches: test on a fraction (float) or a number (int) of the test batches, for
            a quick estimate; the report states it.
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
        token_maps: int = 4,
        resume: bool = True,
        limit_test_batches: float | int | None = None,
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
        if limit_test_batches is not None and not limit_test_batches > 0:
            raise ValueError(
                f"limit_test_batches must be > 0 (a fraction or a count), got {limit_test_batches}"
            )
        self.methods = list(methods)
        self.tome_r, self.topk_r, self.span = tome_r, topk_r, list(span)
        self.layer, self.search = layer, search or SearchConfig()
        self.out_dir, self.run_name = out_dir, run_name
        self.wandb, self.wandb_project, self.wandb_group = wandb, wandb_project, wandb_group
        self.wandb_offline = wandb_offline
        self.latency_rounds = latency_rounds
        self.batch_sizes = list(batch_sizes) if batch_sizes else None
        self.token_maps, self.resume, self.limit_test_batches = token_maps, resume, limit_test_batches

    # ------------------------------------------------------------------ helpers
    def _logger(self, name: str, group: str, run_dir: Path) -> Any:
        if not self.wandb:
            return False
        kwargs = dict(project=self.wandb_project, group=group, name=name, job_type="evaluate")
        try:
            return wandb_logger(save_dir=run_dir, offline=self.wandb_offline, **kwargs)
        except ValueError as err:  # online without credentials: keep the results, log offline
            rank_zero_warn(f"{err}; logging this evaluation offline instead")
            self.wandb_offline = True
            return wandb_logger(save_dir=run_dir, offline=True, **kwargs)

    def timing(self, trainer: pl.Trainer) -> str:
        """How every configuration is timed, in words (table header, report and W&B config)."""
        graphs = self.search.cuda_graphs and trainer.strategy.root_device.type == "cuda"
        return (
            f"{'CUDA-graph replays' if graphs else 'eager calls'}, precision {trainer.precision}, "
            f"warm-up {self.search.warmup}, {self.latency_rounds} interleaved rounds on one test batch"
        )

    def _conditions(self, model: pl.LightningModule, datamodule: Any, trainer: pl.Trainer) -> dict[str, Any]:
        """What every record of this run is valid for (see ``pomt.rundir``)."""
        test = getattr(datamodule, "test_dataset", None)
        size = len(test) if hasattr(test, "__len__") else None
        return {
            "weights": weights_fingerprint(model),
            "data": f"{type(datamodule).__name__}: test split of {size} images",
            "limit_test_batches": self.limit_test_batches,
            "device": device_name(trainer.strategy.root_device),
            "precision": str(trainer.precision),
            "layer": self.layer,
        }

    # ------------------------------------------------------------------ measuring (rank 0)
    def _find_r(self, model: Any, datamodule: Any, trainer: pl.Trainer, folder: Path, run: RunDir) -> Search:
        selection_loader = getattr(datamodule, "selection_dataloader", None)
        if not callable(selection_loader):
            raise ValueError(f"{type(datamodule).__name__} has no selection_dataloader() to estimate A(n) on")
        device = trainer.strategy.root_device
        model.to(device).eval()
        with trainer.precision_plugin.forward_context():
            return find_r(
                model,
                selection_loader(),
                layer=self.layer,
                batch_size=int(datamodule.batch_size),
                device=device,
                config=self.search,
                latency_path=folder / "latency_profile.json",
                accuracy_path=run.root / "accuracy_profile.json",
                progress=trainer.progress_bar_callback is not None,
                log=rank_zero_info,
            )

    def _plan(
        self, model, vit, datamodule, trainer, run, folder, conditions
    ) -> tuple[dict[str, Any], Search | None]:
        """Rank 0: this batch size's search, configurations and timing (reused or measured),
        and which configurations still need their accuracy; marked ready for the other ranks."""
        batch_size = int(datamodule.batch_size)
        here = conditions | {"batch_size": batch_size}
        search = None
        if "pomt" in self.methods:
            search_at = here | {"search": self.search.to_dict()}
            stored = run.load(folder / "search.json", search_at, "the search")
            search = Search.from_dict(stored) if stored else None
            if search is None:
                rank_zero_info(f"selecting R on this device at batch size {batch_size}")
                search = self._find_r(model, datamodule, trainer, folder, run)
                run.save(folder / "search.json", search_at, search.to_dict())
        r = None if search is None else search.selection.r
        configs = configurations(
            vit, self.methods, r, self.layer, self.span, {"tome": self.tome_r, "topk": self.topk_r}
        )
        labels = [c.label for c in configs]
        timing_at = here | {"timing": self.timing(trainer), "configs": labels}
        timing = run.load(folder / "timing.json", timing_at, "the timing")
        if timing is None:
            images = _test_images(datamodule)
            rank_zero_info(
                f"timing {len(configs)} configurations side by side ({self.latency_rounds} rounds)"
            )
            device = trainer.strategy.root_device
            with trainer.precision_plugin.forward_context():
                timing = time_configurations(
                    model, vit, images, configs, layer=self.layer, device=device, rounds=self.latency_rounds,
                    warmup=self.search.warmup, cuda_graphs=self.search.cuda_graphs,
                )  # fmt: skip
            run.save(folder / "timing.json", timing_at, timing)
        done = {c.label: self._result(run, c, conditions) for c in configs}  # accuracy records still valid
        plan = {
            "configs": [[c.method, c.r, c.selected] for c in configs],
            "timing": timing,
            "test": [label for label, record in done.items() if record is None],
            "done": {label: record for label, record in done.items() if record is not None},
        }
        run.mark_ready(folder, plan)
        return plan, search

    @staticmethod
    def _result_at(
        run: RunDir, config: Configuration, conditions: dict[str, Any]
    ) -> tuple[Path, dict[str, Any]]:
        """Where one configuration's accuracy record lives, and what it is valid for."""
        path = run.root / "results" / f"{config.label}.json"
        return path, conditions | {"method": config.method, "r": config.r}

    def _result(
        self, run: RunDir, config: Configuration, conditions: dict[str, Any]
    ) -> dict[str, Any] | None:
        return run.load(*self._result_at(run, config, conditions), config.label)

    # ------------------------------------------------------------------ testing (every rank)
    def _test(
        self, model, datamodule, trainer_factory, config: Configuration, logger: Any
    ) -> dict[str, float]:
        """``trainer.test`` of one configuration (pruned by a fixed-r POMTCallback)."""
        callbacks = (
            [] if config.method == "none" else [POMTCallback(config.method, r=config.r, layer=self.layer)]
        )
        limit = {} if self.limit_test_batches is None else {"limit_test_batches": self.limit_test_batches}
        trainer = trainer_factory(logger=logger, callbacks=callbacks, **limit)
        metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
        return {k: float(v) for k, v in metrics.items()}

    def _row(self, vit, model, config, metrics, stats, batch, wall_s, search, device) -> ReportRow:
        """The report row of one configuration; ``batch`` is (batch size, timing mode)."""
        schedule = pomt.token_schedule(vit, config.method, config.r, self.layer)
        chosen = search.selection if (search and config.selected) else None
        return ReportRow(
            method=config.method,
            r=str(config.r),
            n_last=schedule[-1],
            mean_n=sum(schedule) / len(schedule),
            acc1=metrics.get("test/acc1", float("nan")),
            acc5=metrics.get("test/acc5", float("nan")),
            latency_ms=stats.median_ms,
            latency_p90_ms=stats.p90_ms,
            loop_latency_ms=metrics.get("test/latency_ms"),
            batch_size=batch[0],
            device=device,
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            model=str(getattr(getattr(model, "hparams", {}), "model_name", "") or type(vit).__name__),
            selected=config.selected,
            predicted_latency_ms=None if chosen is None else chosen.predicted_latency_ms,
            samples=stats.samples,
            verified_speedup=None if chosen is None else chosen.measured_speedup,
            timing=batch[1],
            images=int(metrics.get("test/images", 0)),
            wall_s=wall_s,
        )

    # ------------------------------------------------------------------ the sweep
    def run(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        trainer_factory: Callable[..., pl.Trainer],
        on_start: Callable[[Path], object] | None = None,
    ) -> TradeoffResult:
        """Run every configuration; ``trainer_factory(logger=..., callbacks=[...], **trainer_kwargs)``
        makes a Trainer; ``on_start(run_dir)`` runs on rank 0 once the run directory exists."""
        name = self.run_name or time.strftime("%Y%m%d-%H%M%S")
        measure = trainer_factory(logger=False, callbacks=[])  # the device and precision of every run
        zero = measure.is_global_zero
        run = RunDir(Path(self.out_dir) / name, resume=self.resume, rank_zero=zero, log=rank_zero_info)
        if on_start is not None and zero:
            on_start(run.root)
        vit = find_vit(model)[1]
        batch_sizes = self.batch_sizes or [int(getattr(datamodule, "batch_size", 0) or 0)]
        if self.batch_sizes and not hasattr(datamodule, "batch_size"):
            raise ValueError(f"{type(datamodule).__name__} has no batch_size: cannot sweep batch sizes")
        datamodule.setup("test")
        conditions = self._conditions(model, datamodule, measure)
        group, timing = self.wandb_group or f"tradeoff-{name}", self.timing(measure)
        result = TradeoffResult([], run.root)
        with self._progress(zero) as bar:
            try:
                for index, batch_size in enumerate(batch_sizes):
                    datamodule.batch_size = batch_size
                    folder = run.folder(batch_size, bool(self.batch_sizes))
                    if zero:
                        try:
                            plan, search = self._plan(
                                model, vit, datamodule, measure, run, folder, conditions
                            )
                        except BaseException as err:  # the other ranks wait for this plan: tell them
                            run.mark_failed(folder, err)
                            raise
                    else:
                        plan, search = run.wait_ready(folder), None
                    if search is not None:
                        result.searches[batch_size] = search
                    configs = [Configuration(m, r, s) for m, r, s in plan["configs"]]
                    if index == 0 and zero:
                        self._announce(configs, plan, batch_sizes, datamodule, bar)
                        if self.token_maps:
                            images = _test_images(datamodule)[: self.token_maps].to(
                                measure.strategy.root_device
                            )
                            save_token_maps(vit, images, configs, self.layer, run.root / "token_maps.png")
                    rows = self._batch(model, vit, datamodule, trainer_factory, run, configs, plan, search,
                                       conditions, group, folder, timing, result, bar)  # fmt: skip
                    if zero and self.batch_sizes:
                        self._write(mark_pareto(rows), folder, timing, search, conditions)
            finally:
                if zero and result.rows:  # also after Ctrl-C: every finished row is on disk
                    result.rows = mark_pareto(result.rows)
                    paths = self._write(
                        result.rows, run.root, timing, None if self.batch_sizes else search, conditions
                    )
                    result.csv_path, result.json_path, result.plot_path = paths
        if not zero:
            return result
        print(format_table(result.rows, timing))
        if self.wandb:
            logger = self._logger("summary", group, run.root)
            images = [
                p for p in (result.plot_path, run.root / "token_maps.png") if p is not None and p.is_file()
            ]
            log_tradeoff_summary(logger, result.rows, images, {"timing": timing, **conditions})
            finish_wandb(logger, result.wandb_dirs)
        print(f"report: {result.csv_path} and {result.json_path}; plot: {result.plot_path}")
        if result.wandb_dirs and self.wandb_offline:
            print(f"W&B offline runs (upload with `wandb sync DIR`): {Path(result.wandb_dirs[0]).parent}")
        return result

    def _batch(self, model, vit, datamodule, trainer_factory, run, configs, plan, search, conditions, group,
               folder, timing, result, bar) -> list[ReportRow]:  # fmt: skip
        """Test (or reuse) every configuration of one batch size; rows written as they finish."""
        rows = []
        device = conditions["device"]
        for config in configs:
            record = plan["timing"][config.label]
            stats = TimingStats(**{k: v for k, v in record.items() if k != "mode"})
            if config.label in plan["test"]:
                logger = self._logger(config.label, group, folder)
                try:
                    rank_zero_info(f"evaluating {config.label}")
                    start = time.perf_counter()
                    metrics = self._test(model, datamodule, trainer_factory, config, logger)
                    wall_s = time.perf_counter() - start
                    if logger:
                        logger.log_hyperparams({"method": config.method, "r": config.r, "timing": timing})
                        logger.log_metrics(
                            {"latency/median_ms": stats.median_ms, "latency/p90_ms": stats.p90_ms}
                        )
                finally:
                    finish_wandb(logger, result.wandb_dirs)
                run.save(*self._result_at(run, config, conditions), {"metrics": metrics, "wall_s": wall_s})
            elif run.rank_zero:
                metrics, wall_s = plan["done"][config.label]["metrics"], plan["done"][config.label]["wall_s"]
                result.reused.append(config.label)
            if run.rank_zero:
                batch = (int(datamodule.batch_size), record["mode"])
                row = self._row(vit, model, config, metrics, stats, batch, wall_s, search, device)
                rows.append(row)
                result.rows.append(row)
                write_report(result.rows, run.root, timing=timing, run=conditions)
            if bar is not None:
                bar.update(1)
        if result.reused and run.rank_zero:
            rank_zero_info(
                f"reused the accuracy of {', '.join(dict.fromkeys(result.reused))} (see {run.root / 'results'})"
            )
        return rows

    # ------------------------------------------------------------------ outputs (rank 0)
    @contextlib.contextmanager
    def _progress(self, enabled: bool) -> Iterator[Any]:
        if not enabled:
            yield None
            return
        from tqdm.auto import tqdm

        bar = tqdm(desc="sweep", unit="config", position=0, leave=True, dynamic_ncols=True)
        try:
            yield bar
        finally:
            bar.close()

    def _announce(self, configs, plan, batch_sizes, datamodule, bar) -> None:
        test = getattr(datamodule, "test_dataset", None)
        images = f"{len(test)} test images" if hasattr(test, "__len__") else "the test split"
        limit = "" if self.limit_test_batches is None else f" (limit_test_batches={self.limit_test_batches})"
        reused = len(configs) - len(plan["test"])
        print(
            f"sweep: {len(configs)} configurations x batch sizes {list(batch_sizes)}: "
            f"{', '.join(c.label for c in configs)}; accuracy on {images}{limit}; "
            f"{len(plan['test'])} to test, {reused} reused"
        )
        if bar is not None:
            bar.total = len(configs) * len(batch_sizes)
            bar.refresh()

    def _write(
        self, rows: list[ReportRow], out: Path, timing: str, search: Search | None, conditions: dict[str, Any]
    ) -> tuple[Path, Path, Path]:
        csv_path, json_path = write_report(rows, out, timing=timing, run=conditions)
        parts = (search.latency, search.accuracy, search.selection) if search else (None, None, None)
        plot_path = out / "tradeoff.png"
        plot_tradeoff(rows, *parts).savefig(plot_path, dpi=110)
        return csv_path, json_path, plot_path
