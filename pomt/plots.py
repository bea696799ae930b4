"""Every figure of the project: the offline step's L(n), A(n) and U(n) with n* marked
(:func:`plot_profiles`, :func:`plot_latency`) and the accuracy-latency trade-off of an
evaluation (:func:`plot_tradeoff`).

Matplotlib is imported lazily and figures are built without pyplot, so plotting works
headless and never touches global figure state. ``fig.savefig("profile.png")`` saves one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pomt.selection import Selection, as_curve, select_r

__all__ = ["plot_profiles", "plot_latency", "plot_tradeoff", "save_figure"]

_STYLES = {
    "none": ("black", "s", "unpruned"),
    "pomt": ("tab:red", "*", "POMT"),
    "tome": ("tab:blue", "o", "ToMe"),
    "topk": ("tab:green", "^", "Top-K"),
}


def _points(profile: Any, what: str) -> tuple[list[int], list[float], list[float] | None, list[float] | None]:
    """n, values and (when known) the lower/upper spread of a profile or ``{n: value}`` dict."""
    curve = as_curve(profile, what)
    grid = curve.grid
    values = [curve.values[n] for n in grid]
    if len(curve.spread) != len(grid):
        return grid, values, None, None
    return grid, values, [curve.spread[n][0] for n in grid], [curve.spread[n][1] for n in grid]


def _title(lat: Any, sel: Selection) -> str:
    parts = []
    for key in ("model", "device"):
        value = getattr(lat, key, None)
        if value:
            parts.append(str(value))
    batch = getattr(lat, "batch_size", None)
    if batch is not None:
        parts.append(f"batch {batch}, {getattr(lat, 'dtype', '')}".rstrip(", "))
    head = " | ".join(parts)
    speed = f", x{sel.speedup:.2f} faster" if sel.speedup else ""
    choice = f"R = {sel.r}: keep n* = {sel.n_star} of N = {sel.n_total} tokens ({sel.mode}, alpha={sel.alpha:g}{speed})"
    return f"{head}\n{choice}" if head else choice


def plot_profiles(
    lat: Any, acc: Any, sel: Selection | None = None, *, fig: Any = None, **select_kwargs: Any
) -> Any:
    """A three-panel matplotlib Figure: latency, accuracy and utility against n.

    ``lat``/``acc`` are profiles or ``{n: value}`` dicts; ``sel`` defaults to
    ``select_r(lat, acc, **select_kwargs)``. Measured medians are dots with their IQR,
    the denoised staircase used for the choice is a step line, and n* is marked in all
    panels (budget or floor as a dashed line in their panel). ``fig`` draws into an
    existing Figure or SubFigure (returned) instead of a new one.
    """
    from matplotlib.figure import Figure

    if sel is None:
        sel = select_r(lat, acc, **select_kwargs)
    if fig is None:
        fig = Figure(figsize=(9, 9), layout="constrained")
    ax_l, ax_a, ax_u = fig.subplots(3, 1, sharex=True)
    color = "#1f77b4"

    grid, values, low, high = _points(lat, "latency profile")
    if low is not None and high is not None:
        err = [
            [v - lo for v, lo in zip(values, low, strict=True)],
            [hi - v for v, hi in zip(values, high, strict=True)],
        ]
        ax_l.errorbar(
            grid, values, yerr=err, fmt="o", ms=3, color=color, ecolor="#9ecae1", label="median (IQR)"
        )
    else:
        ax_l.plot(grid, values, "o", ms=3, color=color, label="median")
    ax_l.step(sel.curve_n, sel.curve_latency_ms, where="mid", color="#ff7f0e", lw=1.5, label="denoised")
    if sel.latency_budget_ms is not None:
        ax_l.axhline(sel.latency_budget_ms, color="gray", ls="--", lw=1, label="budget")
    ax_l.set_ylabel("latency L(n) [ms]")
    ax_l.legend(loc="upper left", fontsize=8)

    grid, values, low, high = _points(acc, "accuracy profile")
    if low is not None and high is not None:
        ax_a.fill_between(grid, low, high, color="#c7e9c0", label="± 1 s.e.")
    ax_a.plot(grid, values, "o", ms=3, color="#2ca02c", label="measured")
    ax_a.plot(
        sel.curve_n,
        sel.curve_accuracy,
        "-",
        color="#2ca02c",
        lw=1,
        alpha=0.7,
        label="used (interpolated)",
    )
    if sel.accuracy_floor is not None:
        ax_a.axhline(sel.accuracy_floor, color="gray", ls="--", lw=1, label="floor")
    ax_a.set_ylabel("top-1 A(n)")
    ax_a.legend(loc="upper left", fontsize=8)

    ax_u.plot(sel.curve_n, sel.curve_utility, "-o", ms=2, color="#9467bd", lw=1)
    ax_u.set_ylabel(f"utility U(n), alpha={sel.alpha:g}")
    ax_u.set_xlabel("tokens kept after the pruning block (n)")
    for ax in (ax_l, ax_a, ax_u):
        ax.axvline(sel.n_star, color="#d62728", lw=1.2, alpha=0.8)
        ax.grid(alpha=0.3)
    ax_u.plot(
        [sel.n_star], [sel.utility], "*", ms=14, color="#d62728", label=f"n* = {sel.n_star} (R = {sel.r})"
    )
    ax_u.legend(loc="lower right", fontsize=8)
    fig.suptitle(_title(lat, sel), fontsize=10)
    return fig


def plot_latency(lat: Any) -> Any:
    """L(n) alone (medians with their IQR), for a latency profile without an accuracy profile."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    grid, values, low, high = _points(lat, "latency profile")
    err = None
    if low is not None and high is not None:
        err = [
            [v - lo for v, lo in zip(values, low, strict=True)],
            [hi - v for v, hi in zip(values, high, strict=True)],
        ]
    ax.errorbar(grid, values, yerr=err, fmt="o-", ms=3, lw=0.8, ecolor="#9ecae1")
    ax.set_xlabel("tokens kept after the pruning block (n)")
    ax.set_ylabel("latency [ms] (median, IQR)")
    ax.set_title(f"{lat.model} | {lat.device} | batch {lat.batch_size}, {lat.dtype}", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def _draw_tradeoff(ax: Any, rows: Sequence[Any]) -> None:
    for method in dict.fromkeys(row.method for row in rows):
        group = sorted((row for row in rows if row.method == method), key=lambda row: row.latency_ms)
        color, marker, label = _STYLES.get(method, ("tab:gray", "x", method))
        xs = [row.latency_ms for row in group]
        ys = [100 * row.acc1 for row in group]
        ax.scatter(
            xs,
            ys,
            s=260 if method == "pomt" else 60,
            c=color,
            marker=marker,
            label=label,
            zorder=3,
            edgecolors="black",
            linewidths=0.6,
        )
        if len(group) > 1:
            ax.plot(xs, ys, c=color, alpha=0.4, zorder=2)
        for row in group:
            if row.method != "none":
                ax.annotate(
                    f"r={row.r}",
                    (row.latency_ms, 100 * row.acc1),
                    textcoords="offset points",
                    xytext=(5, 4),
                    fontsize=8,
                    color=color,
                )
    first = rows[0] if rows else None
    where = f"\n{first.model}, batch {first.batch_size}, {first.dtype}, {first.device}" if first else ""
    ax.set_title(f"Top-1 accuracy vs latency{where}", fontsize=10)
    ax.set_xlabel("median latency per batch (ms)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")


def plot_tradeoff(
    rows: Sequence[Any], latency: Any = None, accuracy: Any = None, selection: Any = None
) -> Any:
    """Accuracy against latency, one marker per ``pomt.report.ReportRow``, POMT highlighted.

    With the latency/accuracy profiles given, a second panel shows the profile's curves
    (``pomt.plots.plot_profiles`` on its own axes) beside the trade-off.
    """
    from matplotlib.figure import Figure

    with_profile = latency is not None and accuracy is not None
    batch_sizes = list(dict.fromkeys(row.batch_size for row in rows)) or [0]
    panels = len(batch_sizes)
    width = 7 * panels + (8 if with_profile else 0)
    fig = Figure(figsize=(width, 7 if with_profile else 6), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.2, 1]) if with_profile else (fig, None)
    axes = left.subplots(1, panels, squeeze=False)[0]
    for ax, batch_size in zip(axes, batch_sizes, strict=True):
        _draw_tradeoff(ax, [row for row in rows if row.batch_size == batch_size])
    if right is not None:
        plot_profiles(latency, accuracy, selection, fig=right)
    return fig


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Save ``fig`` (PNG by default from the suffix), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
