"""Every figure of the project: the offline step's L(n), A(n) and U(n) with n* marked
(:func:`plot_profiles`, :func:`plot_latency`), the accuracy-latency trade-off of an
evaluation (:func:`plot_tradeoff`), and where the patches of images went (:func:`plot_token_groups`).

Matplotlib is imported lazily and figures are built without pyplot, so plotting works
headless and never touches global figure state. ``fig.savefig("profile.png")`` saves one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pomt.errors import require
from pomt.offline.curves import as_curve
from pomt.offline.selection import Selection, select_r

__all__ = [
    "plot_profiles",
    "plot_latency",
    "plot_tradeoff",
    "plot_token_groups",
    "save_figure",
    "precision_label",
]

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


def precision_label(record: Any) -> str:
    """What a profile or result row was timed at: its ``precision`` (``32-true``, ``bf16-mixed``,
    ...) where it records one, else its parameters' ``dtype``."""
    return str(getattr(record, "precision", None) or getattr(record, "dtype", None) or "")


def _title(lat: Any, sel: Selection) -> str:
    parts = []
    for key in ("model", "device"):
        value = getattr(lat, key, None)
        if value:
            parts.append(str(value))
    batch = getattr(lat, "batch_size", None)
    if batch is not None:
        parts.append(f"batch {batch}, {precision_label(lat)}".rstrip(", "))
    head = " | ".join(parts)
    speed = f", x{sel.speedup:.2f} faster" if sel.speedup else ""
    choice = f"R = {sel.r}: keep n* = {sel.n_star} of N = {sel.n_total} tokens ({sel.mode}, alpha={sel.alpha:g}{speed})"
    if sel.prediction_check:  # the prediction did not hold: said on the figure too
        choice += f"\n{sel.prediction_check}"
    return f"{head}\n{choice}" if head else choice


def plot_profiles(
    lat: Any, acc: Any, sel: Selection | None = None, *, fig: Any = None, **select_kwargs: Any
) -> Any:
    """A three-panel matplotlib Figure: latency, accuracy and utility against n.

    ``lat``/``acc`` are profiles or ``{n: value}`` dicts; ``sel`` defaults to
    ``select_r(lat, acc, **select_kwargs)``. Measured medians are dots with their IQR; the
    denoised latency used for the choice is drawn only between measured token counts, by
    straight segments (flat only where measured values tie within their noise: no riser is
    drawn across a gap nobody measured), and n* is marked in all panels (budget or floor as
    a dashed line in their panel). ``fig`` draws into an
    existing Figure or SubFigure (returned) instead of a new one.
    """
    Figure = require("matplotlib.figure", "plots").Figure

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
    ax_l.plot(
        sel.curve_n,
        sel.curve_latency_ms,
        "-",
        color="#ff7f0e",
        lw=1.5,
        label="denoised: ties within the noise merged, straight between measured n",
    )
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
    if sel.runner_up is not None and sel.runner_up in sel.curve_n:  # the n that wins otherwise
        u_runner = sel.curve_utility[sel.curve_n.index(sel.runner_up)]
        ax_u.plot([sel.runner_up], [u_runner], "D", ms=6, mfc="none", color="#d62728", label="runner-up")
    if sel.stability_line:  # how often n* comes out of the profile resampled
        ax_u.set_title(sel.stability_line, fontsize=9)
    ax_u.legend(loc="lower right", fontsize=8)
    fig.suptitle(_title(lat, sel), fontsize=10)
    return fig


def plot_latency(lat: Any) -> Any:
    """L(n) alone (medians with their IQR), for a latency profile without an accuracy profile."""
    Figure = require("matplotlib.figure", "plots").Figure

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
    ax.set_title(f"{lat.model} | {lat.device} | batch {lat.batch_size}, {precision_label(lat)}", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def _healed_front(rows: Sequence[Any]) -> list[Any]:
    """The healed rows on their front, and the unpruned row when it was not fine-tuned too and
    no healed row beats it."""
    healed = [row for row in rows if getattr(row, "healed", False)]
    out = [row for row in healed if getattr(row, "pareto", False)]
    control = any(row.method == "none" for row in healed)
    for row in rows:
        if (
            row.method == "none"
            and not control
            and row not in healed
            and not any(
                o.acc1 >= row.acc1
                and o.latency_ms <= row.latency_ms
                and (o.acc1 > row.acc1 or o.latency_ms < row.latency_ms)
                for o in healed
            )
        ):
            out.append(row)
    return sorted(out, key=lambda row: row.latency_ms) if healed else []


def _runtime_marker(label: str) -> str:
    """The marker of a runtime's rows (its label: a runtime's name, with its options)."""
    from pomt.deploy.targets import RUNTIMES

    return getattr(RUNTIMES.get(label.split("[")[0]), "marker", "x")


def _draw_tradeoff(ax: Any, rows: Sequence[Any]) -> None:
    runtimes = list(dict.fromkeys(getattr(row, "runtime", "torch") for row in rows))
    several = len(runtimes) > 1  # then one marker style per runtime, the colour per method
    kinds = dict.fromkeys(
        (row.method, bool(getattr(row, "healed", False)), getattr(row, "runtime", "torch")) for row in rows
    )
    for method, healed, runtime in kinds:
        group = sorted(
            (
                row
                for row in rows
                if row.method == method
                and bool(getattr(row, "healed", False)) == healed
                and getattr(row, "runtime", "torch") == runtime
            ),
            key=lambda row: row.latency_ms,
        )
        color, marker, label = _STYLES.get(method, ("tab:gray", "x", method))
        if several:
            marker = _runtime_marker(runtime)
            label = f"{label}, {runtime}"
        xs = [row.latency_ms for row in group]
        ys = [100 * row.acc1 for row in group]
        ax.scatter(  # healed rows: hollow markers in the method's colour
            xs,
            ys,
            s=(260 if not several else 150) if method == "pomt" else 60,
            c="none" if healed else color,
            marker=marker,
            label=f"{label}, healed" if healed else label,
            zorder=3,
            edgecolors=color if healed else "black",
            linewidths=1.6 if healed else 0.6,
        )
        if len(group) > 1:
            ax.plot(xs, ys, c=color, alpha=0.4, zorder=2, ls=":" if healed else "-")
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
    front = sorted(
        (row for row in rows if getattr(row, "pareto", False) and not getattr(row, "healed", False)),
        key=lambda row: row.latency_ms,
    )
    healed_front = _healed_front(rows)
    for line, label, style in ((front, "Pareto front", "--"), (healed_front, "Pareto front, healed", "-.")):
        if len(line) > 1:
            xs, ys = [row.latency_ms for row in line], [100 * row.acc1 for row in line]
            ax.step(xs, ys, where="post", color="0.35", ls=style, lw=1, zorder=1, label=label)
    first = rows[0] if rows else None
    precisions = ", ".join(dict.fromkeys(precision_label(row) for row in rows))
    where = f"\n{first.model}, batch {first.batch_size}, {precisions}, {first.device}" if first else ""
    ax.set_title(f"Top-1 accuracy vs latency{where}", fontsize=10)
    ax.set_xlabel("median latency per batch (ms)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8 if several else None)


def plot_tradeoff(
    rows: Sequence[Any], latency: Any = None, accuracy: Any = None, selection: Any = None
) -> Any:
    """Accuracy against latency, one marker per ``pomt.lightning.sweep.report.ReportRow``, POMT highlighted, and
    the accuracy-latency Pareto front (the rows marked ``pareto``) as a dashed staircase; healed
    rows (``healed``) as hollow markers, with their own front (dash-dotted). Rows of several
    runtimes (``runtime``): one marker style per runtime, the method's colour; the front is
    over runtime x method.

    With the latency/accuracy profiles given, a second panel shows the profile's curves
    (``pomt.plots.plot_profiles`` on its own axes) beside the trade-off.
    """
    Figure = require("matplotlib.figure", "plots").Figure

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


def _display(image: Any) -> Any:
    """An image tensor (C, H, W), normalised or not, as an (H, W, 3) array in [0, 1]."""
    import numpy as np

    array = image.detach().float().cpu().numpy()
    array = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array[:3]
    low, high = float(array.min()), float(array.max())
    return np.transpose((array - low) / max(high - low, 1e-8), (1, 2, 0))


def plot_token_groups(
    images: Any,
    groups: Any,
    *,
    prefix: int = 0,
    fused: Sequence[str] | None = None,
    patch_grid: tuple[int, int] | None = None,
) -> Any:
    """The images and, beside each, its patches coloured by the token they ended in.

    ``images``: (B, C, H, W); ``groups``: a (B, patches) tensor from :func:`pomt.token_groups`,
    or ``{label: tensor}`` for one column per configuration. Patches that share a token get
    one colour over the image; dropped patches (-1), and the patches fused into POMT's mean
    token (the columns whose labels are in ``fused``, by default those starting with
    ``pomt``), are greyed with a hatch. Each column's title gives the tokens left (distinct
    tokens among the patches, plus ``prefix``). ``patch_grid`` defaults to a square grid.
    """
    import numpy as np

    Figure = require("matplotlib.figure", "plots").Figure
    Rectangle = require("matplotlib.patches", "plots").Rectangle

    columns = dict(groups) if isinstance(groups, Mapping) else {"pruned": groups}
    fused = [label for label in columns if label.startswith("pomt")] if fused is None else list(fused)
    count = int(images.shape[0])
    fig = Figure(figsize=(2.4 * (len(columns) + 1), 2.6 * count), layout="constrained")
    axes = fig.subplots(count, len(columns) + 1, squeeze=False)
    palette = [np.array(c[:3]) for c in __import__("matplotlib").colormaps["tab20"].colors]
    for row in range(count):
        picture = _display(images[row])
        height, width = picture.shape[:2]
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title("image" if row == 0 else "", fontsize=9)
        for col, (label, tensor) in enumerate(columns.items(), start=1):
            where = tensor[row].detach().cpu().numpy()
            gh, gw = patch_grid or (int(round(len(where) ** 0.5)),) * 2
            ph, pw = height // gh, width // gw
            tokens, sizes = np.unique(where[where >= 0], return_counts=True)
            size = dict(zip(tokens.tolist(), sizes.tolist(), strict=True))
            shown, ax = picture.copy(), axes[row, col]
            grey = []
            for index, token in enumerate(where.tolist()):
                y, x = divmod(index, gw)
                cell = (slice(y * ph, (y + 1) * ph), slice(x * pw, (x + 1) * pw))
                if token < 0 or (label in fused and size.get(token, 1) > 1):
                    shown[cell] = 0.55 + 0.2 * shown[cell].mean(axis=-1, keepdims=True)
                    grey.append((x * pw - 0.5, y * ph - 0.5))
                elif size.get(token, 1) > 1:
                    shown[cell] = 0.45 * shown[cell] + 0.55 * palette[token % len(palette)]
            ax.imshow(shown)
            for corner in grey:
                ax.add_patch(Rectangle(corner, pw, ph, fill=False, hatch="///", edgecolor="0.35", lw=0))
            ax.set_title(f"{label}: {len(tokens) + prefix} tokens", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Save ``fig`` (PNG by default from the suffix), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
