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
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from pomt.plots import plot_profiles

__all__ = [
    "describe",
    "warn_pruned_monitors",
    "log_token_maps",
    "log_pomt",
    "logger_dir",
    "log_scalars",
    "log_summary",
    "log_table",
    "log_line_plots",
    "log_figure",
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
    import wandb

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
            import wandb

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
        raise ValueError(
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


# --------------------------------------------------------------------------- POMTCallback


def describe(callback: Any, where: str | None) -> str:
    """The line the callback prints when it has pruned the model: R, and for a search the
    predicted and the measured (verified) speed-up."""
    text = (
        f"POMTCallback: {callback.method} r={callback.applied_r} on `{where or '<module>'}`, "
        f"tokens per block {callback.applied_schedule}"
    )
    if callback.selection is not None and callback.r is None:
        text += f"; {callback.selection.summary()}"
    return text


def warn_pruned_monitors(trainer: Any) -> None:
    """Warn that checkpointing and early stopping watch the pruned model during ``fit``."""
    watched = sorted({m for c in trainer.callbacks if isinstance(m := getattr(c, "monitor", None), str)})
    if watched:
        rank_zero_warn(
            f"POMTCallback prunes the validation inside fit (stages contains 'fit'): {', '.join(watched)} "
            "will be the pruned model's, and checkpoints and early stopping follow them. Leave 'fit' out "
            "of stages to monitor the unpruned model."
        )


def _pomt_scalars(callback: Any) -> dict[str, float]:
    out: dict[str, float] = {"pomt/r": float(callback.applied_r or 0)}
    if callback.applied_schedule:
        out["pomt/n_last"] = float(callback.applied_schedule[-1])
    sel = callback.selection
    if sel is not None and callback.r is None:
        out.update(
            {
                "pomt/n_star": float(sel.n_star),
                "pomt/utility": float(sel.utility),
                "pomt/predicted_latency_ms": float(sel.predicted_latency_ms),
                "pomt/predicted_accuracy": float(sel.predicted_accuracy),
                "pomt/rejected_candidates": float(len(sel.rejected)),
            }
        )
        if sel.unpruned_latency_ms is not None:
            out["pomt/unpruned_latency_ms"] = float(sel.unpruned_latency_ms)
            out["pomt/predicted_speedup"] = float(sel.speedup)
        if sel.measurements:  # the applied R's, else (R = 0 kept) the best-ranked candidate's
            chosen = [m for m in sel.measurements if m[0] == sel.r] or sel.measurements[:1]
            r, speedup, low, high = chosen[0]
            out["pomt/measured_r"] = float(r)
            out["pomt/measured_speedup"] = float(speedup)
            out["pomt/measured_speedup_low"] = float(low)
            out["pomt/measured_speedup_high"] = float(high)
    return out


def log_pomt(trainer: Any, pl_module: Any, callback: Any, stage: str) -> None:
    """Everything the callback found, to the Trainer's loggers: scalars (through
    ``pl_module.log`` where Lightning allows it, so ``trainer.test`` returns them), run
    summary values, and, when it searched, the curves as a table, line plots and a figure."""
    scalars = _pomt_scalars(callback)
    if stage in ("validate", "test"):  # epoch-level values, returned by trainer.validate/test
        for key, value in scalars.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)
    elif trainer.loggers:
        log_scalars(trainer, scalars, step=trainer.global_step)
    if not trainer.loggers:
        return
    summary: dict[str, Any] = dict(scalars)
    summary.update({"pomt/method": callback.method, "pomt/layer": callback.layer, "pomt/stage": stage})
    if callback.latency_profile is not None:
        summary["pomt/device"] = callback.latency_profile.device
        summary["pomt/profile_batch_size"] = callback.latency_profile.batch_size
        summary["pomt/precision"] = callback.latency_profile.precision
    if callback.selection is not None and callback.r is None and callback.selection.verification:
        summary["pomt/verification"] = callback.selection.verification
    log_summary(trainer, summary)
    if callback.latency_profile is not None:  # how it was timed, in the W&B run's config too
        _log_wandb_config(trainer, {k: summary[k] for k in ("pomt/device", "pomt/precision")})
    sel = callback.selection
    if callback.log_plots and sel is not None and callback.r is None:
        _log_curves(trainer, sel, plot_profiles(callback.latency_profile, callback.accuracy_profile, sel))
    announce_wandb_runs(trainer)


@rank_zero_only
def _log_wandb_config(trainer: Any, values: dict[str, Any]) -> None:
    for logger in _loggers(trainer):
        if isinstance(logger, WandbLogger):
            logger.experiment.config.update(values, allow_val_change=True)


def log_token_maps(trainer: Any, callback: Any, images: Any) -> None:
    """The images with the token each patch ended in under the applied pruning, as a figure."""
    from pomt.models import token_layout
    from pomt.plots import plot_token_groups
    from pomt.pruning import token_groups

    vit = callback._vit
    layout = token_layout(vit, tuple(images.shape[-2:]))
    label = f"{callback.method} r={callback.applied_r}"
    figure = plot_token_groups(
        images, {label: token_groups(vit, images)}, prefix=layout.prefix, patch_grid=layout.patch_grid
    )
    log_figure(trainer, "pomt/token_maps", figure)


def _log_curves(trainer: Any, sel: Any, figure: Any) -> None:
    columns = ["n", "r", "latency_ms", "raw_latency_ms", "accuracy", "utility", "selected"]
    rows = [
        [int(n), int(sel.n_total - n), float(lat), float(raw), float(acc), float(u), int(n == sel.n_star)]
        for n, lat, raw, acc, u in zip(
            sel.curve_n,
            sel.curve_latency_ms,
            sel.curve_raw_latency_ms,
            sel.curve_accuracy,
            sel.curve_utility,
            strict=True,
        )
        if all(math.isfinite(v) for v in (lat, raw, acc, u))
    ]
    log_table(trainer, "pomt/curves", columns, rows)
    ys = ["latency_ms", "accuracy", "utility"]
    log_line_plots(trainer, "pomt/plot", "n", columns, rows, ys, mark_x=sel.n_star, title="POMT")
    log_figure(trainer, "pomt/profiles", figure)  # a plain matplotlib Figure: freed with the object
