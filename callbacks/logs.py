"""What ``POMTCallback`` logs: the line it prints, its scalars and summary values, its curves
as a table, line plots and a figure, and its token maps (through ``pomt.lightning.loggers``, to
whatever loggers the Trainer has)."""

from __future__ import annotations

import logging
import math
from typing import Any

from pomt.callbacks.stage_support import warn
from pomt.errors import MissingExtraError
from pomt.lightning.loggers import (
    announce_wandb_runs,
    log_config,
    log_figure,
    log_line_plots,
    log_scalars,
    log_summary,
    log_table,
)
from pomt.plots import plot_profiles

_log = logging.getLogger("pomt.callbacks")

__all__ = ["describe", "measured", "warn_pruned_monitors", "pomt_scalars", "log_pomt", "log_token_maps"]


def describe(
    method: str, r: int, schedule: list[int], *, where: str | None, r_source: str | None, selection: Any
) -> str:
    """The line the callback prints when it has pruned the model: R and where it came from, and
    for a search (``r_source="search"``) the selection's estimates and measured speed-up."""
    text = f"POMTCallback: {method} r={r} on `{where or '<module>'}`, tokens per block {schedule}"
    if r_source == "trained_r":
        text += "; R from trained_r, the R these weights were trained at (no new search)"
    elif r_source == "search" and selection is not None:
        text += f"; {selection.summary()}"
    return text


def measured(
    stage: str, metrics: Any, *, method: str, r: int | None, r_source: str | None, selection: Any
) -> str:
    """The accuracy the stage measured on the pruned model (its logged metrics whose names hold
    "acc"), beside the selection's random-token estimate where R was searched."""
    values = {
        k: float(v)
        for k, v in metrics.items()
        if "acc" in k.lower() and not k.startswith("pomt/") and getattr(v, "numel", lambda: 1)() == 1
    }
    found = ", ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())) or "no accuracy metric logged"
    origin = {"r": "fixed r", "trained_r": "R from trained_r", "search": "R from the search"}.get(
        r_source, "R"
    )
    text = f"{stage} of {method} r={r} ({origin}) measured {found}"
    if r_source == "search" and selection is not None:
        text += (
            f"; the selection's estimate A({selection.n_star})={selection.predicted_accuracy:.4f} was the "
            f"accuracy with {selection.n_star} random tokens, not this model's"
        )
    return text


def warn_pruned_monitors(trainer: Any) -> None:
    """Warn that checkpointing and early stopping watch the pruned model during ``fit``."""
    watched = sorted({m for c in trainer.callbacks if isinstance(m := getattr(c, "monitor", None), str)})
    if watched:
        warn(
            f"POMTCallback prunes the validation inside fit (stages contains 'fit'): {', '.join(watched)} "
            "will be the pruned model's, and checkpoints and early stopping follow them. Leave 'fit' out "
            "of stages to monitor the unpruned model."
        )


def pomt_scalars(r: int | None, schedule: list[int] | None, selection: Any) -> dict[str, float]:
    """The scalars of a pruned stage: R, the tokens leaving the last block and, where R was
    searched (``selection`` given; None for a fixed r or trained_r), the selection's values."""
    out: dict[str, float] = {"pomt/r": float(r or 0)}
    if schedule:
        out["pomt/n_last"] = float(schedule[-1])
    sel = selection
    if sel is not None:
        out.update(
            {
                "pomt/n_star": float(sel.n_star),
                "pomt/utility": float(sel.utility),
                "pomt/predicted_latency_ms": float(sel.measured_latency_ms),
                "pomt/selection_estimate": float(sel.predicted_accuracy),  # the console's A(n*)
                "pomt/rejected_candidates": float(len(sel.rejected)),
            }
        )
        if sel.unpruned_latency_ms is not None:
            out["pomt/unpruned_latency_ms"] = float(sel.unpruned_latency_ms)
            out["pomt/predicted_speedup"] = float(sel.speedup)
        if sel.measurements:  # the applied R's, else (R = 0 kept) the best-ranked candidate's
            chosen = [m for m in sel.measurements if m[0] == sel.r] or sel.measurements[:1]
            measured_r, speedup, low, high = chosen[0]
            out["pomt/measured_r"] = float(measured_r)
            out["pomt/measured_speedup"] = float(speedup)
            out["pomt/measured_speedup_low"] = float(low)
            out["pomt/measured_speedup_high"] = float(high)
            out["pomt/prediction_off"] = float(sel.prediction_check is not None)
    return out


def log_pomt(
    trainer: Any,
    pl_module: Any,
    stage: str,
    pruning: Any,
    *,
    result: Any,
    r_source: str | None,
    log_plots: bool,
) -> dict[str, float]:
    """Everything found for a stage pruned as ``pruning`` says (a ``PruningConfig``: method, r,
    layer, schedule), to the Trainer's loggers: scalars (through
    ``pl_module.log`` where Lightning allows it, so ``trainer.test`` returns them), run summary
    values, and, where R was searched (``r_source="search"``), the curves of ``result`` (a
    :class:`pomt.SearchResult` or None) as a table, line plots and a figure. Returns the scalars."""
    latency = None if result is None else result.latency
    sel = result.selection if result is not None and r_source == "search" else None
    method, layer = pruning.method, pruning.layer
    scalars = pomt_scalars(pruning.r, list(pruning.schedule), sel)
    if stage in ("validate", "test"):  # epoch-level values, returned by trainer.validate/test
        for key, value in scalars.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)
    elif trainer.loggers:
        log_scalars(trainer, scalars, step=trainer.global_step)
    if not trainer.loggers:
        return scalars
    summary: dict[str, Any] = dict(scalars)
    summary.update({"pomt/method": method, "pomt/layer": layer, "pomt/stage": stage})
    if latency is not None:
        summary["pomt/device"] = latency.device
        summary["pomt/profile_batch_size"] = latency.batch_size
        summary["pomt/precision"] = latency.precision
    if sel is not None and sel.verification:
        summary["pomt/verification"] = sel.verification
    if sel is not None and sel.prediction_check:
        summary["pomt/prediction_check"] = sel.prediction_check
    if sel is not None and getattr(sel, "stability_line", ""):  # how often resampled profiles choose n*
        summary["pomt/stability"] = sel.stability_line
        summary["pomt/stability_share"] = float(sel.stability)
        if sel.runner_up is not None:
            summary["pomt/runner_up_n"] = float(sel.runner_up)
    log_summary(trainer, summary)
    if latency is not None:  # how it was timed, in the W&B run's config too
        log_config(trainer, {k: summary[k] for k in ("pomt/device", "pomt/precision")})
    if log_plots and sel is not None:
        _log_curves(trainer, sel, _figure(latency, result.accuracy, sel))
    announce_wandb_runs(trainer)
    return scalars


def log_token_maps(trainer: Any, vit: Any, images: Any, label: str) -> None:
    """``images`` with the token each patch ended in under ``vit``'s pruning (``label``), as a figure."""
    from pomt.method.pruning import token_groups
    from pomt.models import token_layout
    from pomt.plots import plot_token_groups

    layout = token_layout(vit, tuple(images.shape[-2:]))
    figure = plot_token_groups(
        images, {label: token_groups(vit, images)}, prefix=layout.prefix, patch_grid=layout.patch_grid
    )
    log_figure(trainer, "pomt/token_maps", figure)


def _figure(latency: Any, accuracy: Any, sel: Any) -> Any:
    """The profiles' figure, or None (said in one line) where matplotlib is not installed: the table
    and line plots are logged all the same."""
    try:
        return plot_profiles(latency, accuracy, sel)
    except MissingExtraError as err:
        _log.info("pomt: the profiles' figure is not logged: %s", err)
        return None


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
    if figure is not None:
        log_figure(trainer, "pomt/profiles", figure)  # a plain matplotlib Figure: freed with the object
