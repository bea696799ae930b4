"""Figures of the offline step: L(n), A(n) and U(n) with the chosen n* marked.

Matplotlib is imported lazily and figures are built without pyplot, so plotting works
headless and never touches global figure state. ``fig.savefig("profile.png")`` saves one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pomt.selection import Selection, select_r

__all__ = ["plot_profiles", "save_figure"]


def _points(profile: Any) -> tuple[list[int], list[float], list[float] | None, list[float] | None]:
    """tokens, values and (optionally) lower/upper spread of a profile or dict."""
    points = getattr(profile, "points", None)
    if points is None:
        items = sorted((int(k), v) for k, v in dict(profile).items())
        values = [float(getattr(v, "median_ms", v)) for _, v in items]
        lows = [float(v.p25_ms) for _, v in items] if items and hasattr(items[0][1], "p25_ms") else None
        highs = [float(v.p75_ms) for _, v in items] if lows is not None else None
        return [k for k, _ in items], values, lows, highs
    tokens = [p.tokens for p in points]
    if hasattr(points[0], "median_ms"):
        return tokens, [p.median_ms for p in points], [p.p25_ms for p in points], [p.p75_ms for p in points]
    low = [max(0.0, p.accuracy - p.stderr) for p in points]
    high = [min(1.0, p.accuracy + p.stderr) for p in points]
    return tokens, [p.accuracy for p in points], low, high


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
    choice = f"R = {sel.r}: keep n* = {sel.tokens} of N = {sel.tokens_total} tokens ({sel.mode}, alpha={sel.alpha:g}{speed})"
    return f"{head}\n{choice}" if head else choice


def plot_profiles(
    lat: Any, acc: Any, sel: Selection | None = None, *, fig: Any = None, **select_kwargs: Any
) -> Any:
    """A three-panel matplotlib Figure: latency, accuracy and utility against n.

    ``lat``/``acc`` are profiles or ``{tokens: value}`` dicts; ``sel`` defaults to
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

    tokens, values, low, high = _points(lat)
    if low is not None and high is not None:
        err = [
            [v - lo for v, lo in zip(values, low, strict=True)],
            [hi - v for v, hi in zip(values, high, strict=True)],
        ]
        ax_l.errorbar(
            tokens, values, yerr=err, fmt="o", ms=3, color=color, ecolor="#9ecae1", label="median (IQR)"
        )
    else:
        ax_l.plot(tokens, values, "o", ms=3, color=color, label="median")
    ax_l.step(sel.curve_tokens, sel.curve_latency_ms, where="mid", color="#ff7f0e", lw=1.5, label="denoised")
    if sel.latency_budget_ms is not None:
        ax_l.axhline(sel.latency_budget_ms, color="gray", ls="--", lw=1, label="budget")
    ax_l.set_ylabel("latency L(n) [ms]")
    ax_l.legend(loc="upper left", fontsize=8)

    tokens, values, low, high = _points(acc)
    if low is not None and high is not None:
        ax_a.fill_between(tokens, low, high, color="#c7e9c0", label="± 1 s.e.")
    ax_a.plot(tokens, values, "o", ms=3, color="#2ca02c", label="measured")
    ax_a.plot(
        sel.curve_tokens,
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

    ax_u.plot(sel.curve_tokens, sel.curve_utility, "-o", ms=2, color="#9467bd", lw=1)
    ax_u.set_ylabel(f"utility U(n), alpha={sel.alpha:g}")
    ax_u.set_xlabel("tokens kept after the pruning block (n)")
    for ax in (ax_l, ax_a, ax_u):
        ax.axvline(sel.tokens, color="#d62728", lw=1.2, alpha=0.8)
        ax.grid(alpha=0.3)
    ax_u.plot(
        [sel.tokens], [sel.utility], "*", ms=14, color="#d62728", label=f"n* = {sel.tokens} (R = {sel.r})"
    )
    ax_u.legend(loc="lower right", fontsize=8)
    fig.suptitle(_title(lat, sel), fontsize=10)
    return fig


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Save ``fig`` (PNG by default from the suffix), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
