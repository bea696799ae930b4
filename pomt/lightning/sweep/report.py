"""Accuracy-latency reports: one row per configuration (method, r), saved as CSV and JSON and
printed as a table, with the accuracy-latency Pareto front marked and, for POMT's chosen R,
how it compares with the best ToMe and Top-K settings at the same or higher accuracy
(``pomt.plots.plot_tradeoff`` draws them)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["ReportRow", "write_report", "format_table", "mark_pareto", "front", "comparisons"]

REPORT_SCHEMA = 3  # 3: healed rows (healed, heal_epochs, heal_s)


@dataclass
class ReportRow:
    """One evaluated configuration: ``method`` with per-block ``r`` (None for the unpruned row).

    ``n_last`` is the number of tokens leaving the last block (for POMT: the tokens kept
    after the pruning block); ``mean_n`` averages the tokens over all blocks, a
    first-order proxy of the compute. Accuracies are top-1/top-5 in [0, 1]. ``latency_ms``
    and ``latency_p90_ms`` come from timing every configuration side by side on one batch;
    ``loop_latency_ms`` is the median per-batch forward time inside the test loop. For POMT's
    chosen R, ``predicted_latency_ms`` is what the profile predicted and ``verified_speedup``
    what the check before use measured against the unpruned model (``pomt.offline.verify``).
    ``dtype`` is the parameters' dtype and ``precision`` the Trainer's (``32-true``,
    ``bf16-mixed``, ...), which the latency was timed under. ``timer_mode`` says how this row's
    latency was timed (``eager`` or ``cuda_graphs``, as the latency profile was, or why not);
    ``pareto`` marks the accuracy-latency front of its batch size; ``images`` is how many test
    images the accuracy is on, ``wall_s`` how long its test took (healing included). A
    ``healed`` row is the same configuration fine-tuned at its r for ``heal_epochs`` epochs
    first (``heal_s`` seconds); its latency is the training-free row's, and its ``pareto``
    marks the front of the healed rows and the unpruned model.
    """

    method: str
    r: int | None
    n_last: int
    mean_n: float
    acc1: float
    acc5: float
    latency_ms: float
    latency_p90_ms: float
    loop_latency_ms: float | None
    batch_size: int
    device: str
    dtype: str
    precision: str = ""
    model: str = ""
    selected: bool = False
    predicted_latency_ms: float | None = None
    samples: int = 0
    verified_speedup: float | None = None
    timer_mode: str = "eager"
    pareto: bool = False
    images: int = 0
    wall_s: float | None = None
    healed: bool = False
    heal_epochs: int = 0
    heal_s: float | None = None

    @property
    def label(self) -> str:
        name = "unpruned" if self.method == "none" else f"{self.method} r={self.r}"
        return f"{name} healed" if self.healed else name


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf become None: JSON has no NaN, and a reader should see "not measured"."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def write_report(
    rows: Sequence[ReportRow],
    out_dir: str | os.PathLike[str],
    stem: str = "report",
    how_timed: str | None = None,
    run: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``rows`` to ``out_dir/stem.csv`` and ``out_dir/stem.json`` (with ``how_timed``,
    how every row was timed in words, what the ``run`` was made under, and the comparison sentences)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = [f.name for f in fields(ReportRow)]
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    payload = {
        "schema": REPORT_SCHEMA,
        "timing": how_timed,
        "run": run,
        "comparisons": comparisons(rows),
        "rows": [_finite(asdict(row)) for row in rows],
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return csv_path, json_path


def _kind(rows: Sequence[ReportRow], batch_size: int, healed: bool) -> list[ReportRow]:
    """The rows one front is drawn over: a batch size's training-free rows, or its healed rows
    (with the training-free unpruned model when the unpruned one was not fine-tuned too)."""
    same = [r for r in rows if r.batch_size == batch_size]
    kind = [r for r in same if r.healed == healed]
    if healed and kind and not any(r.method == "none" for r in kind):
        kind += [r for r in same if r.method == "none" and not r.healed]
    return kind


def _dominated(row: ReportRow, rivals: Sequence[ReportRow]) -> bool:
    return any(
        o is not row
        and o.acc1 >= row.acc1
        and o.latency_ms <= row.latency_ms
        and (o.acc1 > row.acc1 or o.latency_ms < row.latency_ms)
        for o in rivals
    )


def front(rows: Sequence[ReportRow], batch_size: int, healed: bool = False) -> list[ReportRow]:
    """The accuracy-latency Pareto front of one batch size, training-free or healed (the
    unpruned model is on the healed one when nothing healed beats it and it was not itself
    fine-tuned), fastest first."""
    group = _kind(rows, batch_size, healed)
    return sorted((r for r in group if not _dominated(r, group)), key=lambda r: r.latency_ms)


def mark_pareto(rows: Sequence[ReportRow]) -> list[ReportRow]:
    """``rows`` with ``pareto`` set where no other row of the same batch size and kind
    (training-free, or healed, see :func:`front`) is at least as accurate and at least as fast,
    and better in one of the two."""
    return [replace(row, pareto=not _dominated(row, _kind(rows, row.batch_size, row.healed))) for row in rows]


_NAMES = {"tome": "ToMe", "topk": "Top-K"}


def comparisons(rows: Sequence[ReportRow]) -> list[str]:
    """For POMT's chosen R at each batch size, training-free and healed: the fastest ToMe and
    Top-K setting of the same kind at equal or higher top-1, and which of the two is faster by
    how much (one sentence each); for healed POMT, also how much of its training-free accuracy
    loss against the unpruned model healing recovered."""
    out = []
    for chosen in (row for row in rows if row.selected):
        same = [row for row in rows if row.batch_size == chosen.batch_size and row.healed == chosen.healed]
        healed = f", healed {chosen.heal_epochs} epochs" if chosen.healed else ""
        where = f"batch {chosen.batch_size}{healed}: "
        ours = f"POMT (r={chosen.r}, {100 * chosen.acc1:.2f} %, {chosen.latency_ms:.2f} ms)"
        if chosen.healed:
            out.extend(_recovery(rows, chosen, where))
        for method, name in _NAMES.items():
            group = [row for row in same if row.method == method]
            if not group:
                continue
            match = [row for row in group if row.acc1 >= chosen.acc1]
            if not match:
                best = max(group, key=lambda row: (row.acc1, -row.latency_ms))
                out.append(
                    f"{where}no {name} setting reaches the accuracy of {ours}; the most accurate, r={best.r}, "
                    f"has {100 * best.acc1:.2f} % at {best.latency_ms:.2f} ms"
                )
                continue
            best = min(match, key=lambda row: row.latency_ms)
            theirs = f"{name} (r={best.r}, {100 * best.acc1:.2f} %, {best.latency_ms:.2f} ms)"
            ratio = best.latency_ms / chosen.latency_ms
            faster, slower, by = (ours, theirs, ratio) if ratio >= 1 else (theirs, ours, 1 / ratio)
            out.append(
                f"{where}on this device {faster} is x{by:.2f} faster than {slower} at the same or higher accuracy"
            )
    return out


def _recovery(rows: Sequence[ReportRow], healed: ReportRow, where: str) -> list[str]:
    """How much of POMT's training-free accuracy loss against the unpruned model healing won back."""
    same = [row for row in rows if row.batch_size == healed.batch_size and not row.healed]
    base = next((row for row in same if row.method == "none"), None)
    free = next((row for row in same if row.selected and row.r == healed.r), None)
    if base is None or free is None:
        return []
    loss, left = base.acc1 - free.acc1, base.acc1 - healed.acc1
    numbers = (
        f"unpruned {100 * base.acc1:.2f} %, POMT r={free.r} training-free {100 * free.acc1:.2f} %, "
        f"healed {100 * healed.acc1:.2f} %"
    )
    control = next(
        (row for row in rows if row.healed and row.method == "none" and row.batch_size == healed.batch_size),
        None,
    )
    if control is not None:
        numbers += f"; the unpruned model fine-tuned the same way: {100 * control.acc1:.2f} %"
    if loss <= 0:
        return [f"{where}POMT at r={free.r} lost no accuracy without training ({numbers})"]
    return [
        f"{where}healing recovers {100 * (loss - left) / loss:.0f} % of POMT's training-free accuracy "
        f"loss against the unpruned model ({numbers})"
    ]


def format_table(rows: Sequence[ReportRow], how_timed: str | None = None) -> str:
    """A fixed-width table, one line per configuration, speed-up against the unpruned row of
    the same batch size, the Pareto front marked; then the comparisons with ToMe and Top-K."""
    base = {row.batch_size: row.latency_ms for row in rows if row.method == "none"}
    width = max([18] + [len(row.label) + (2 if row.selected else 0) for row in rows])
    header = (
        f"{'configuration':<{width}} {'batch':>5} {'n last':>6} {'mean n':>8} {'top-1 %':>8} {'top-5 %':>8} "
        f"{'median ms':>10} {'p90 ms':>8} {'speed-up':>8} {'front':>5}"
    )
    lines = [f"latency: {how_timed}"] if how_timed else []
    lines += [header, "-" * len(header)]
    for row in rows:
        unpruned = base.get(row.batch_size)
        speedup = f"{unpruned / row.latency_ms:.3f}" if unpruned and row.latency_ms > 0 else "-"
        mark = " *" if row.selected else ""
        eager = " (eager)" if row.timer_mode.startswith("eager (") else ""
        lines.append(
            f"{row.label + mark + eager:<{width}} {row.batch_size:>5} {row.n_last:>6} {row.mean_n:>8.1f} "
            f"{100 * row.acc1:>8.2f} {100 * row.acc5:>8.2f} {row.latency_ms:>10.2f} {row.latency_p90_ms:>8.2f} "
            f"{speedup:>8} {'yes' if row.pareto else '':>5}"
        )
    if any(row.selected for row in rows):
        lines.append("* R chosen by POMT for this device; front: on the accuracy-latency Pareto front")
        for row in rows:
            if row.selected and row.verified_speedup is not None and not row.healed:
                lines.append(
                    f"  (batch {row.batch_size}: verified before use, x{row.verified_speedup:.3f} against the unpruned model)"
                )
    epochs = sorted({row.heal_epochs for row in rows if row.healed})
    if epochs:
        lines.append(
            f"healed: fine-tuned {' / '.join(map(str, epochs))} epochs at its r from the same weights, "
            "then tested (same latency as its training-free row); the healed rows have their own front"
        )
    for row in rows:
        if row.timer_mode.startswith("eager ("):
            lines.append(f"{row.label} (batch {row.batch_size}) was timed {row.timer_mode}")
    lines += comparisons(rows)
    return "\n".join(lines)
