"""The sweep's W&B runs: one per configuration (opened by the sweep, closed here) and the
summary run of the whole evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pomt.errors import require
from pomt.lightning.sweep.report import ReportRow

__all__ = ["finish_run", "log_summary_run"]


def finish_run(logger: Any, dirs: list[str]) -> None:
    """Close a ``WandbLogger``'s run (if it started one) and note its run directory in ``dirs``."""
    experiment = getattr(logger, "_experiment", None)
    if experiment is not None:
        dirs.append(str(Path(experiment.dir).parent))
        experiment.finish()


def log_summary_run(
    logger: Any, rows: Sequence[ReportRow], images: Sequence[Path], config: dict[str, Any]
) -> None:
    """The summary run: the comparison table, an accuracy-vs-latency scatter, the figures
    (``images``: the trade-off plot, the token maps), the run's ``config`` (how it was timed,
    what it ran on), and summary values for POMT's row (``pomt/``, healed: ``pomt_healed/``) and
    the unpruned model; with several runtimes, a chart coloured by runtime and POMT's values per
    runtime (``pomt/<runtime>/``)."""
    wandb = require("wandb", "wandb")

    run = logger.experiment
    logger.log_hyperparams(config)
    columns = list(asdict(rows[0]))
    table = wandb.Table(
        columns=columns + ["label"], data=[[*asdict(row).values(), row.label] for row in rows]
    )
    by_runtime = sorted(rows, key=lambda row: (row.runtime, row.latency_ms))  # each runtime's points in order
    series = wandb.Table(
        columns=["runtime", "label", "latency_ms", "acc1"],
        data=[[row.runtime, row.label, row.latency_ms, row.acc1] for row in by_runtime],
    )
    logged: dict[str, Any] = {
        "tradeoff/table": table,
        "tradeoff/accuracy_vs_latency": wandb.plot.scatter(
            table, "latency_ms", "acc1", title="top-1 accuracy vs median latency (ms)"
        ),
        # coloured by runtime (W&B's built-in scatter has no colour field; its line chart has)
        "tradeoff/accuracy_vs_latency_by_runtime": wandb.plot.line(
            series,
            "latency_ms",
            "acc1",
            stroke="runtime",
            title="top-1 accuracy vs median latency (ms), per runtime",
        ),
    }
    logged |= {f"tradeoff/{Path(path).stem}": wandb.Image(str(path)) for path in images}
    run.log(logged)
    several = len({row.runtime for row in rows}) > 1
    for row in rows:
        if row.selected:
            prefix = "pomt_healed" if row.healed else "pomt"
            prefix += f"/{row.runtime}" if several else ""
            run.summary.update(
                {
                    f"{prefix}/r": row.r,
                    f"{prefix}/n_last": row.n_last,
                    f"{prefix}/acc1": row.acc1,
                    f"{prefix}/latency_ms": row.latency_ms,
                }
            )
            if row.healed:
                run.summary.update({"pomt_healed/heal_epochs": row.heal_epochs})
    base = next((row for row in rows if row.method == "none"), None)
    if base is not None:
        run.summary.update({"unpruned/acc1": base.acc1, "unpruned/latency_ms": base.latency_ms})
