"""Accuracy-latency reports: one row per configuration (method, r), saved as CSV and JSON and
printed as a table, with the accuracy-latency Pareto front marked and, for POMT's chosen R,
how it compares with the best ToMe and Top-K settings at the same or higher accuracy
(``pomt.plots.plot_tradeoff`` draws them)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from pomt.deploy.targets import Target
from pomt.lightning.sweep.sentences import comparisons, recommendation

__all__ = ["ReportRow", "write_report", "format_table", "mark_pareto", "front", "comparisons"]

REPORT_SCHEMA = 4  # 3: healed rows (healed, heal_epochs, heal_s); 4: runtime, accuracy_from


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
    marks the front of the healed rows and the unpruned model. ``runtime`` is what the row was
    timed in (``torch``, ``onnxruntime``, ``openvino``); ``accuracy_from`` says where its accuracy
    was measured (PyTorch's, shared by the runtimes that compute in fp32, or the runtime's own).
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
    runtime: str = "torch"
    accuracy_from: str = ""

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
    how_timed: str | Mapping[str, str] | None = None,
    run: dict[str, Any] | None = None,
    max_drop: float | None = None,
) -> tuple[Path, Path]:
    """Write ``rows`` to ``out_dir/stem.csv`` and ``out_dir/stem.json`` (with ``how_timed``,
    how every row was timed in words, what the ``run`` was made under, the comparison sentences
    and, with ``max_drop``, the recommendation)."""
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
        "timing": how_timed if how_timed is None or isinstance(how_timed, str) else dict(how_timed),
        "run": run,
        "comparisons": comparisons(rows),
        "recommendation": [] if max_drop is None else recommendation(rows, max_drop),
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


def _timing_lines(how_timed: str | Mapping[str, str] | None) -> list[str]:
    if not how_timed:
        return []
    if isinstance(how_timed, str):
        return [f"latency: {how_timed}"]
    return [f"latency ({runtime}): {how}" for runtime, how in how_timed.items()]


def format_table(
    rows: Sequence[ReportRow], how_timed: str | Mapping[str, str] | None = None, max_drop: float | None = None
) -> str:
    """A fixed-width table, one line per configuration and runtime (a runtime column when a
    runtime other than eager PyTorch is in it), speed-up against the unpruned row of the same
    batch size and runtime, the Pareto front (over runtime x method) marked; then the
    comparisons with ToMe and Top-K and, with ``max_drop``, the recommendation."""
    base = {
        (row.batch_size, row.runtime): row.latency_ms
        for row in rows
        if row.method == "none" and not row.healed
    }
    width = max([18] + [len(row.label) + (2 if row.selected else 0) for row in rows])
    show = {row.runtime for row in rows} != {Target().runtime}  # a runtime besides eager PyTorch
    rt_width = max([7] + [len(row.runtime) for row in rows])
    runtime = (lambda text: f"{text:<{rt_width}} ") if show else (lambda text: "")
    header = (
        f"{runtime('runtime')}{'configuration':<{width}} {'batch':>5} {'n last':>6} {'mean n':>8} {'top-1 %':>8} "
        f"{'top-5 %':>8} {'median ms':>10} {'p90 ms':>8} {'speed-up':>8} {'front':>5}"
    )
    lines = _timing_lines(how_timed)
    lines += [header, "-" * len(header)]
    for row in rows:
        unpruned = base.get((row.batch_size, row.runtime))
        speedup = f"{unpruned / row.latency_ms:.3f}" if unpruned and row.latency_ms > 0 else "-"
        mark = " *" if row.selected else ""
        eager = " (eager)" if row.timer_mode.startswith("eager (") else ""
        lines.append(
            f"{runtime(row.runtime)}{row.label + mark + eager:<{width}} {row.batch_size:>5} {row.n_last:>6} "
            f"{row.mean_n:>8.1f} {100 * row.acc1:>8.2f} {100 * row.acc5:>8.2f} {row.latency_ms:>10.2f} "
            f"{row.latency_p90_ms:>8.2f} {speedup:>8} {'yes' if row.pareto else '':>5}"
        )
    if any(row.selected for row in rows):
        lines.append(
            "* R chosen by POMT for this device"
            + (" and runtime" if show else "")
            + "; front: on the accuracy-latency Pareto front"
            + (" (over runtime x method)" if show else "")
        )
        for row in rows:
            if row.selected and row.verified_speedup is not None and not row.healed:
                where = f"batch {row.batch_size}, {row.runtime}" if show else f"batch {row.batch_size}"
                lines.append(
                    f"  ({where}: verified before use, x{row.verified_speedup:.3f} against the unpruned model)"
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
    for source in dict.fromkeys(row.accuracy_from for row in rows if row.accuracy_from):
        on = sorted({row.runtime for row in rows if row.accuracy_from == source})
        lines.append(f"accuracy of {', '.join(on)}: {source}")
    lines += comparisons(rows)
    if max_drop is not None:
        lines += recommendation(rows, max_drop)
    return "\n".join(lines)
