"""The driver behind ``evaluate.py``: the accuracy-latency trade-off of one model on this device.

Per batch size, global rank 0 alone measures (no other process shares the device): it
chooses R with :func:`pomt.find_r`, fixes the configurations (unpruned, POMT at R, ToMe and
Top-K at r values that span the same token reduction), and times them side by side on one
real test batch, the way the latency profile was timed. Then every rank tests each
configuration (``trainer.test``, one logger each; exact under DDP). With ``heal_epochs`` > 0,
every pruned configuration is also fine-tuned at its r for that many epochs and tested
again, as a healed row (``pomt.lightning.sweep.healing``). Every finished piece is written to the run
directory at once and reused by a rerun where still valid (``pomt.lightning.sweep.rundir``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

import pomt
from pomt.callbacks.pomt_callback import POMTCallback
from pomt.errors import PomtValueError
from pomt.lightning.loggers import wandb_logger
from pomt.lightning.sweep.configurations import Configuration, token_maps_figure
from pomt.lightning.sweep.console import announce, healing_shown, print_where, progress
from pomt.lightning.sweep.context import RunState, SweepRun, TradeoffResult, no_trainer_limit, test_images
from pomt.lightning.sweep.healing import healed_weights
from pomt.lightning.sweep.plan import Plan, Tested, accuracy_record, make_plan
from pomt.lightning.sweep.report import ReportRow, format_table, mark_pareto, write_report
from pomt.lightning.sweep.rundir import RunDir
from pomt.lightning.sweep.runtimes import runtime_runs
from pomt.lightning.sweep.sentences import recommendation
from pomt.lightning.sweep.settings import SweepSettings
from pomt.lightning.sweep.summary import finish_run, log_summary_run
from pomt.method.ops import kernel_backend
from pomt.models import find_vit
from pomt.plots import plot_tradeoff
from pomt.timing import device_name
from pomt.weights import weights_fingerprint

__all__ = ["TradeoffEvaluation", "TradeoffResult"]


class TradeoffEvaluation:
    """Evaluate one model pruned several ways, as its :class:`SweepSettings` say (LightningCLI
    builds them from the ``sweep:`` section; see there for each setting)."""

    def __init__(self, settings: SweepSettings | None = None) -> None:
        self.settings = settings or SweepSettings()

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
        sweep = self._open(model, datamodule, trainer_factory, on_start)
        with progress(sweep.zero) as sweep.state.bar:
            try:
                for index, batch_size in enumerate(self._batch_sizes(datamodule)):
                    datamodule.batch_size = batch_size
                    plan = self._share_plan(sweep, batch_size)
                    if index == 0 and sweep.zero:
                        announce(sweep, self.settings, plan, self._batch_sizes(datamodule))
                        self._save_token_maps(sweep, plan)
                    rows = self._test_all(sweep, plan)
                    if sweep.zero and self.settings.batch_sizes:
                        self._write(sweep, mark_pareto(rows), sweep.folder(batch_size), batch_size)
            finally:  # also after Ctrl-C: every finished row is on disk
                self._write_combined(sweep)
        if sweep.zero:
            header = self._header(sweep)
            if len(header) == 1:
                header = next(iter(header.values()))
            print(format_table(sweep.result.rows, header, self.settings.max_accuracy_drop))
            self._log_summary(sweep)
            print_where(sweep)
        return sweep.result

    # ------------------------------------------------------------------ steps
    def _open(self, model, datamodule, trainer_factory, on_start) -> SweepRun:
        """The run directory, the Trainer that fixes device and precision, and what records need."""
        trainer = trainer_factory(logger=False, callbacks=[])
        no_trainer_limit(getattr(trainer, "limit_test_batches", None))
        if self.settings.heal_epochs and trainer.world_size > 1:
            raise PomtValueError(
                f"sweep.heal_epochs={self.settings.heal_epochs} runs in one process only, but the Trainer has "
                f"{trainer.world_size} (devices x nodes): run the healing sweep with --trainer.devices 1"
            )
        if self.settings.batch_sizes and not hasattr(datamodule, "batch_size"):
            raise PomtValueError(f"{type(datamodule).__name__} has no batch_size: cannot sweep batch sizes")
        name = self.settings.run_name or time.strftime("%Y%m%d-%H%M%S")
        zero = trainer.is_global_zero
        run_dir = RunDir(
            Path(self.settings.out_dir) / name,
            resume=self.settings.resume,
            rank_zero=zero,
            log=rank_zero_info,
        )
        if on_start is not None and zero:
            on_start(run_dir.root)
        datamodule.setup("test")
        conditions = self._conditions(model, datamodule, trainer)
        device, how = trainer.strategy.root_device, self.settings.side_by_side
        return SweepRun(
            model=model,
            vit=find_vit(model)[1],
            datamodule=datamodule,
            trainer_factory=trainer_factory,
            trainer=trainer,
            run_dir=run_dir,
            conditions=conditions,
            runtimes=(
                runs := runtime_runs(self.settings.targets, conditions, how, device, str(trainer.precision))
            ),
            group=self.settings.wandb_group or f"tradeoff-{name}-{'+'.join(runs)}",
            per_batch_size=bool(self.settings.batch_sizes),
            result=TradeoffResult([], run_dir.root),
            heal_batch_size=getattr(datamodule, "batch_size", None),
            state=RunState(wandb_offline=self.settings.wandb_offline),
        )

    def _batch_sizes(self, datamodule: Any) -> list[int]:
        return self.settings.batch_sizes or [int(getattr(datamodule, "batch_size", 0) or 0)]

    def _share_plan(self, sweep: SweepRun, batch_size: int) -> Plan:
        """The DDP hand-over: global rank 0 plans this batch size and marks the plan ready (or
        failed, so that nobody waits for ever); the other ranks wait for it and follow it."""
        folder = sweep.folder(batch_size)
        if not sweep.zero:
            return Plan.from_dict(sweep.run_dir.wait_ready(folder))
        try:
            plan = make_plan(sweep, self.settings, batch_size)
        except BaseException as err:
            sweep.run_dir.mark_failed(folder, err)
            raise
        sweep.run_dir.mark_ready(folder, plan.to_dict())
        return plan

    def _test_all(self, sweep: SweepRun, plan: Plan) -> list[ReportRow]:
        """Test (or reuse) every configuration of one batch size once; its rows (one per runtime
        that timed it) written as they finish, then ordered by runtime."""
        rows, reused = [], []
        for config in plan.configs:
            tested = plan.done.get(config.key)
            if tested is None:
                tested = self._test(sweep, plan, config)
            else:
                reused.append(config.label)
            if sweep.zero:
                for runtime, configs in plan.runs.items():
                    mine = next((c for c in configs if c.key == config.key), None)
                    if mine is not None:
                        rows.append(self._row(sweep, plan, runtime, mine, tested))
                        sweep.result.rows.append(rows[-1])
                self._write_report(sweep, sweep.result.rows, sweep.run_dir.root)
            if sweep.state.bar is not None:
                sweep.state.bar.update(1)
        order = list(plan.runs)
        ordered = sorted(rows, key=lambda row: order.index(row.runtime))
        sweep.result.rows[len(sweep.result.rows) - len(rows) :] = ordered
        rows = ordered
        if reused and sweep.zero:
            sweep.result.reused.extend(reused)
            where = sweep.run_dir.root / "results"
            rank_zero_info(
                f"reused the accuracy of {', '.join(dict.fromkeys(sweep.result.reused))} (see {where})"
            )
        if sweep.result.reused_healed and sweep.zero:
            where = sweep.run_dir.root / "healed"
            rank_zero_info(
                f"reused the healed checkpoints of {', '.join(dict.fromkeys(sweep.result.reused_healed))} "
                f"(see {where})"
            )
        return rows

    def _test(self, sweep: SweepRun, plan: Plan, config: Configuration) -> Tested:
        """``trainer.test`` of one configuration (pruned by a fixed-r POMTCallback), with its own
        W&B run; the accuracy record is written at once."""
        logger = self._logger(sweep, config.label, sweep.folder(plan.batch_size))
        callbacks = (
            []
            if config.method == "none"
            else [POMTCallback(config.method, r=config.r, layer=self.settings.layer)]
        )
        limit = (
            {}
            if self.settings.limit_test_batches is None
            else {"limit_test_batches": self.settings.limit_test_batches}
        )
        try:
            start = time.perf_counter()
            with healing_shown(sweep, config), healed_weights(sweep, self.settings, config) as healing:
                rank_zero_info(f"evaluating {config.label}")
                trainer = sweep.trainer_factory(logger=logger, callbacks=callbacks, **limit)
                metrics = trainer.test(sweep.model, datamodule=sweep.datamodule, verbose=False)[0]
            wall_s = time.perf_counter() - start
            tested = Tested({k: float(v) for k, v in metrics.items()}, wall_s, healing.seconds)
            if healing.reused:
                sweep.result.reused_healed.append(config.label)
            if logger:
                timed = {name: t[config.base.key] for name, t in plan.latency.items() if config.base.key in t}
                logger.log_hyperparams(
                    {
                        "method": config.method,
                        "r": config.r,
                        "runtimes": list(timed),
                        "timing": {name: sweep.how_timed[name] for name in timed},
                        "healed": bool(config.heal_epochs),
                        "heal_epochs": config.heal_epochs,
                    }
                )
                metrics = {"heal/seconds": healing.seconds} if healing.seconds is not None else {}
                for name, t in timed.items():
                    metrics |= {
                        f"latency/{name}/median_ms": t.stats.median_ms,
                        f"latency/{name}/p90_ms": t.stats.p90_ms,
                    }
                logger.log_metrics(metrics)
        finally:
            finish_run(logger, sweep.result.wandb_dirs)
        sweep.run_dir.save(*accuracy_record(sweep, self.settings, config), tested.to_dict())
        return tested

    def _row(
        self, sweep: SweepRun, plan: Plan, runtime: str, config: Configuration, tested: Tested
    ) -> ReportRow:
        """The report row of one configuration in ``runtime`` at the plan's batch size (its
        accuracy measured there where the runtime computes in another precision)."""
        schedule = pomt.token_schedule(sweep.vit, config.method, config.r, self.settings.layer)
        search = sweep.result.searches.get(runtime, {}).get(plan.batch_size)
        chosen = search.selection if (search and config.selected) else None
        timed, metrics = plan.latency[runtime][config.base.key], dict(tested.metrics)
        run = sweep.runtimes[runtime]
        if run.own_accuracy and not config.heal_epochs and timed.accuracy is not None:
            metrics |= {f"test/{k}": v for k, v in timed.accuracy.items()}
        source = run.accuracy_from(sweep.conditions["precision"])
        if run.own_accuracy and (config.heal_epochs or timed.accuracy is None):
            source = f"PyTorch's ({sweep.conditions['precision']}); not measured in {run.precision}"
        return ReportRow(
            method=config.method,
            r=None if config.method == "none" else config.r,
            n_last=schedule[-1],
            mean_n=sum(schedule) / len(schedule),
            acc1=metrics.get("test/acc1", float("nan")),
            acc5=metrics.get("test/acc5", float("nan")),
            latency_ms=timed.stats.median_ms,
            latency_p90_ms=timed.stats.p90_ms,
            loop_latency_ms=metrics.get("test/latency_ms"),
            batch_size=plan.batch_size,
            device=sweep.conditions["device"],
            dtype=str(next(sweep.model.parameters()).dtype).removeprefix("torch."),
            precision=run.precision,
            model=str(
                getattr(getattr(sweep.model, "hparams", {}), "model_name", "") or type(sweep.vit).__name__
            ),
            selected=config.selected,
            predicted_latency_ms=None if chosen is None else chosen.measured_latency_ms,
            samples=timed.stats.samples,
            verified_speedup=None if chosen is None else chosen.measured_speedup,
            timer_mode=timed.mode,
            images=int(metrics.get("test/images", 0)),
            wall_s=tested.wall_s,
            healed=bool(config.heal_epochs),
            heal_epochs=config.heal_epochs,
            heal_s=tested.heal_s,
            runtime=runtime,
            accuracy_from=source,
        )

    def _save_token_maps(self, sweep: SweepRun, plan: Plan) -> None:
        """``token_maps.png``: the first test images under each kind of configuration."""
        if self.settings.token_maps:
            images = test_images(sweep.datamodule)[: self.settings.token_maps].to(sweep.device)
            first = next(iter(plan.runs.values()))  # the first runtime's configurations
            figure = token_maps_figure(sweep.vit, images, first, self.settings.layer)
            figure.savefig(sweep.run_dir.root / "token_maps.png", dpi=100)

    def _write(
        self, sweep: SweepRun, rows: list[ReportRow], out: Path, batch_size: int | None
    ) -> tuple[Path, ...]:
        """``report.csv``, ``report.json`` and ``tradeoff.png`` of ``rows`` in ``out`` (with the
        profiles of ``batch_size``'s search in the plot, when there is one)."""
        csv_path, json_path = self._write_report(sweep, rows, out)
        first = next(iter(sweep.runtimes))  # the profiles drawn beside: the first runtime's
        search = sweep.result.searches.get(first, {}).get(batch_size) if batch_size is not None else None
        parts = (search.latency, search.accuracy, search.selection) if search else (None, None, None)
        plot_path = out / "tradeoff.png"
        plot_tradeoff(rows, *parts).savefig(plot_path, dpi=110)
        return csv_path, json_path, plot_path

    def _write_report(self, sweep: SweepRun, rows: list[ReportRow], out: Path) -> tuple[Path, Path]:
        run = self._run_info(sweep)
        return write_report(
            rows, out, how_timed=sweep.how_timed, run=run, max_drop=self.settings.max_accuracy_drop
        )

    def _write_combined(self, sweep: SweepRun) -> None:
        """Rank 0: the report of every finished row in the run directory."""
        result = sweep.result
        if sweep.zero and result.rows:
            result.rows = mark_pareto(result.rows)
            single = None if self.settings.batch_sizes else self._batch_sizes(sweep.datamodule)[0]
            result.csv_path, result.json_path, result.plot_path = self._write(
                sweep, result.rows, sweep.run_dir.root, single
            )

    def _log_summary(self, sweep: SweepRun) -> None:
        """The W&B summary run: table, scatter, figures, and how the run was made."""
        if not self.settings.wandb:
            return
        logger = self._logger(sweep, "summary", sweep.run_dir.root)
        figures = [sweep.result.plot_path, sweep.run_dir.root / "token_maps.png"]
        images = [p for p in figures if p is not None and p.is_file()]
        advice = recommendation(sweep.result.rows, self.settings.max_accuracy_drop)
        config = {"timing": sweep.how_timed, **self._run_info(sweep), "recommendation": advice}
        log_summary_run(logger, sweep.result.rows, images, config)
        finish_run(logger, sweep.result.wandb_dirs)

    # ------------------------------------------------------------------ helpers
    def _conditions(self, model: pl.LightningModule, datamodule: Any, trainer: pl.Trainer) -> dict[str, Any]:
        """What every record of this run is valid for (see ``pomt.lightning.sweep.rundir``)."""
        test = getattr(datamodule, "test_dataset", None)
        size = len(test) if hasattr(test, "__len__") else None
        return {
            "weights": weights_fingerprint(model),
            "data": f"{type(datamodule).__name__}: test split of {size} images",
            "device": device_name(trainer.strategy.root_device),
            "precision": str(trainer.precision),  # each runtime's own: pomt.lightning.sweep.runtimes
            "layer": self.settings.layer,
        }

    def _run_info(self, sweep: SweepRun) -> dict[str, Any]:
        """What the report says the run was made under: the conditions, the runtimes (name and
        version, precision), the test limit, and the implementation POMT's block ran while timed
        in PyTorch."""
        runtimes = {
            name: {k: run.conditions[k] for k in ("precision", "runtime") if k in run.conditions}
            | {"kernels": self._kernels(sweep, name)}
            for name, run in sweep.runtimes.items()
        }
        return {
            **sweep.conditions,
            "runtimes": runtimes,
            "threads": torch.get_num_threads(),
            "max_accuracy_drop": self.settings.max_accuracy_drop,
            "limit_test_batches": self.settings.limit_test_batches,
            "kernels": kernel_backend(sweep.device),  # the path PyTorch runs POMT's block with
        }

    def _kernels(self, sweep: SweepRun, runtime: str) -> str:
        """What runs POMT's block in ``runtime``: PyTorch's path (torch or the kernels), or the
        runtime's own compiled graph, as the latency profile names it."""
        target = sweep.runtimes[runtime].target
        return target.backend.kernels(sweep.device, None) or f"{target.runtime} graph"

    def _header(self, sweep: SweepRun) -> dict[str, str]:
        """How each runtime timed the table (its precision; where PyTorch runs the model, POMT's path)."""
        how = sweep.how_timed
        for name, run in sweep.runtimes.items():
            kernels = run.target.backend.kernels(sweep.device, None)
            if kernels is not None:  # where PyTorch runs the model: POMT's path
                how[name] += f"; POMT block: {kernels} path"
        return how

    def _logger(self, sweep: SweepRun, name: str, run_dir: Path) -> Any:
        if not self.settings.wandb:
            return False
        kwargs = dict(project=self.settings.wandb_project, group=sweep.group, name=name, job_type="evaluate")
        try:
            return wandb_logger(save_dir=run_dir, offline=sweep.state.wandb_offline, **kwargs)
        except ValueError as err:  # online without credentials: keep the results, log offline
            rank_zero_warn(f"{err}; logging this evaluation offline instead")
            sweep.state.wandb_offline = True  # the later runs too, without a warning each
            return wandb_logger(save_dir=run_dir, offline=True, **kwargs)
