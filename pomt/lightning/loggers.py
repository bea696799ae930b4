"""Log scalars, curve tables, line plots and figures to whatever loggers a Trainer has.

Weights & Biases gets native objects (``wandb.Table``, ``wandb.plot.line``, images, run
summary values); TensorBoard gets scalars and figures; any other logger gets the scalars
through ``log_metrics``/``log_hyperparams`` and the tables/figures as CSV/PNG files in its
log directory. A Trainer without loggers makes every function a no-op. All functions act
on global rank 0 only (the loggers do too).

Curves measured in ``validate``/``test`` are logged as tables, not as scalars against
``global_step``, which does not move there.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from pomt.errors import PomtValueError, require

__all__ = [
    "logger_dir",
    "log_scalars",
    "log_summary",
    "log_table",
    "log_line_plots",
    "log_figure",
    "log_config",
    "OfflineWandbLogger",
    "wandb_logger",
    "announce_wandb_runs",
    "wandb_run_dir",
]


def logger_dir(logger: Logger) -> Path | None:
    """The folder a non-W&B logger writes into (created), or None when it has none."""
    for attr in ("log_dir", "save_dir"):
        try:
            value = getattr(logger, attr, None)
        except Exception:  # some loggers compute these lazily and may fail offline
            value = None
        if value:
            path = Path(value)
            path.mkdir(parents=True, exist_ok=True)
            return path
    return None


def wandb_run_dir(logger: WandbLogger) -> Path | None:
    """The W&B run directory (``.../wandb/offline-run-*``), the folder ``wandb sync`` takes."""
    files = getattr(logger.experiment, "dir", None)
    return Path(files).parent if files else None


def _loggers(trainer: Any) -> list[Logger]:
    return list(getattr(trainer, "loggers", None) or [])


@rank_zero_only
def log_scalars(trainer: Any, metrics: dict[str, float], step: int | None = None) -> None:
    """``log_metrics`` on every logger (use ``pl_module.log`` instead where Lightning allows it)."""
    for logger in _loggers(trainer):
        logger.log_metrics(dict(metrics), step=step)


@rank_zero_only
def log_summary(trainer: Any, values: dict[str, Any]) -> None:
    """Run-level values: the W&B run summary, or ``log_hyperparams`` for other loggers."""
    for logger in _loggers(trainer):
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(values)
        else:
            logger.log_hyperparams(values)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def _file_stem(key: str) -> str:
    return key.replace("/", "_").replace(os.sep, "_")


@rank_zero_only
def log_table(trainer: Any, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table: ``wandb.Table`` under ``key`` for W&B, ``<log_dir>/<key>.csv`` for other loggers."""
    for logger in _loggers(trainer):
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows])
        else:
            folder = logger_dir(logger)
            if folder is not None:
                _write_csv(folder / f"{_file_stem(key)}.csv", columns, rows)


@rank_zero_only
def log_line_plots(
    trainer: Any,
    key: str,
    x: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    ys: Sequence[str],
    mark_x: float | None = None,
    title: str = "",
) -> None:
    """One W&B line plot per column in ``ys`` against ``x``, with a vertical marker at ``mark_x``.

    Each plot is ``wandb.plot.line`` over a table with a ``series`` column: the curve, and two
    points at ``mark_x`` spanning the curve's range (the marker line). Logged under
    ``{key}/{y}``. Loggers other than W&B are skipped (use :func:`log_figure` for them).
    """
    wandb_loggers = [lg for lg in _loggers(trainer) if isinstance(lg, WandbLogger)]
    if not wandb_loggers:
        return
    wandb = require("wandb", "wandb")

    xi = list(columns).index(x)
    charts = {}
    for y in ys:
        yi = list(columns).index(y)
        points = [(r[xi], r[yi]) for r in rows if r[yi] is not None]
        data = [[y, px, py] for px, py in points]
        if mark_x is not None and points:
            values = [py for _, py in points]
            label = f"{x}={mark_x:g}"
            data += [[label, mark_x, min(values)], [label, mark_x, max(values)]]
        table = wandb.Table(columns=["series", x, y], data=data)
        name = f"{title} {y}".strip() if title else y
        charts[f"{key}/{y}"] = wandb.plot.line(table, x, y, stroke="series", title=name)
    for logger in wandb_loggers:
        logger.experiment.log(charts)


@rank_zero_only
def log_figure(trainer: Any, key: str, figure: Any) -> None:
    """A matplotlib figure: a W&B image, a TensorBoard figure, or ``<log_dir>/<key>.png``."""
    for logger in _loggers(trainer):
        if isinstance(logger, WandbLogger):
            wandb = require("wandb", "wandb")

            logger.experiment.log({key: wandb.Image(figure)})
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(key, figure, close=False)
        else:
            folder = logger_dir(logger)
            if folder is not None:
                figure.savefig(folder / f"{_file_stem(key)}.png", dpi=120, bbox_inches="tight")


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text(encoding="utf-8")
    except OSError:
        return False


class OfflineWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger``, offline unless told otherwise (no account or network needed;
    ``wandb sync`` uploads later), and without wandb's deprecated ``anonymous`` setting, which
    Lightning passes on every run and wandb warns about."""

    def __init__(self, *args: Any, offline: bool = True, **kwargs: Any) -> None:
        require("wandb", "wandb")
        super().__init__(*args, offline=offline, **kwargs)
        self._wandb_init.pop("anonymous", None)


def wandb_logger(
    project: str = "pomt",
    save_dir: str | os.PathLike[str] = ".",
    offline: bool | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """A ``WandbLogger`` that works with no account and no network and never prompts.

    ``offline=None`` means offline unless ``WANDB_MODE=online`` is set; asking for online
    mode without credentials (``WANDB_API_KEY`` or ``wandb login``) is a clear error rather
    than an interactive login prompt. :func:`announce_wandb_runs` prints the run directory
    so the run can be uploaded later with ``wandb sync``.
    """
    if offline is None:
        offline = os.environ.get("WANDB_MODE", "offline") not in ("online", "run")
    if not offline and not _has_wandb_credentials():
        raise PomtValueError(
            "W&B online mode needs credentials: set WANDB_API_KEY or run `wandb login`, "
            "or use offline=True (the run can be uploaded later with `wandb sync`)"
        )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return OfflineWandbLogger(project=project, save_dir=str(save_dir), offline=offline, **kwargs)


@rank_zero_only
def announce_wandb_runs(trainer: Any) -> None:
    """Print each W&B run directory, so an offline run can be uploaded with ``wandb sync``."""
    for logger in _loggers(trainer):
        if isinstance(logger, WandbLogger):
            run_dir = wandb_run_dir(logger)
            rank_zero_info(f"W&B run directory: {run_dir} (upload with `wandb sync {run_dir}`)")


@rank_zero_only
def log_config(trainer: Any, values: dict[str, Any]) -> None:
    """Add ``values`` to the config of every W&B run the Trainer logs to."""
    for logger in _loggers(trainer):
        if isinstance(logger, WandbLogger):
            logger.experiment.config.update(values, allow_val_change=True)
