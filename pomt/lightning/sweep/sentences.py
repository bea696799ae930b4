"""What the report says in words, true of its numbers by construction: how POMT's chosen R
compares with each other method in each runtime (both ways: the other method's fastest
setting at least as accurate, and its most accurate setting at most as slow), and which
runtime, method and r to ship. Accuracy differences smaller than the binomial standard error
of the test set are said to be ties.

The rows are any objects with the fields of ``pomt.lightning.sweep.report.ReportRow`` (this module
does not import it: ``report`` writes these sentences).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["accuracy_se", "comparisons", "recommendation", "recovery", "NAMES"]

NAMES = {"none": "unpruned", "pomt": "POMT", "tome": "ToMe", "topk": "Top-K"}


def accuracy_se(acc1: float, images: int) -> float:
    """The binomial standard error of a top-1 accuracy ``acc1`` measured on ``images`` test
    images, in points (0 when the number of images is not known)."""
    if images <= 0 or not math.isfinite(acc1):
        return 0.0
    return 100 * math.sqrt(max(acc1 * (1 - acc1), 0.0) / images)


def _numbers(row: Any) -> str:
    return f"r={row.r} ({100 * row.acc1:.2f} %, {row.latency_ms:.2f} ms)"


def _speed(theirs: Any, ours: Any, ours_text: str) -> str:
    """How fast ``theirs`` is against ``ours``: ``x1.50 faster than POMT (...)``."""
    ratio = theirs.latency_ms / ours.latency_ms
    factor = max(ratio, 1 / ratio)
    if f"{factor:.2f}" == "1.00":
        return f"as fast as {ours_text}"
    return f"x{factor:.2f} {'faster' if ratio < 1 else 'slower'} than {ours_text}"


def _accuracy(theirs: Any, ours: Any) -> str:
    """How accurate ``theirs`` is against ``ours``, a tie when the difference is smaller than
    the standard error of ``ours`` on its test images."""
    diff = 100 * (theirs.acc1 - ours.acc1)
    se = accuracy_se(ours.acc1, ours.images)
    if diff == 0:
        return "equally accurate"
    if abs(diff) < se:
        return (
            f"tied in accuracy ({abs(diff):.2f} points apart, less than the s.e. of {se:.2f} points "
            f"on {ours.images} test images)"
        )
    return f"{abs(diff):.2f} points {'more' if diff > 0 else 'less'} accurate"


def _where(row: Any) -> str:
    healed = f", healed {row.heal_epochs} epochs" if row.healed else ""
    return f"batch {row.batch_size}, {getattr(row, 'runtime', 'torch')}{healed}: "


def comparisons(rows: Sequence[Any]) -> list[str]:
    """For POMT's chosen R at each batch size, in each runtime, training-free and healed: two
    sentences per other method (ToMe, Top-K) of the same batch size, runtime and kind: its
    fastest setting at least as accurate as POMT (or, when none is, its most accurate), and
    its most accurate setting at most as slow as POMT (or, when none is, its fastest); each
    says how much faster or slower and how much more or less accurate than POMT (a tie below
    the standard error). For healed POMT, also how much of its training-free accuracy loss
    healing recovered."""
    out = []
    for chosen in (row for row in rows if row.selected):
        runtime = getattr(chosen, "runtime", "torch")
        same = [
            row
            for row in rows
            if row.batch_size == chosen.batch_size
            and row.healed == chosen.healed
            and getattr(row, "runtime", "torch") == runtime
        ]
        where = _where(chosen)
        ours = f"POMT {_numbers(chosen)}"
        if chosen.healed:
            out.extend(recovery(rows, chosen, where))
        for method in ("tome", "topk"):
            group = [row for row in same if row.method == method]
            if not group:
                continue
            name = NAMES[method]
            accurate = [row for row in group if row.acc1 >= chosen.acc1]
            if accurate:
                best = min(accurate, key=lambda row: (row.latency_ms, -row.acc1))
                lead = f"{name}'s fastest setting at least as accurate as POMT, {_numbers(best)},"
            else:
                best = max(group, key=lambda row: (row.acc1, -row.latency_ms))
                lead = (
                    f"no {name} setting is at least as accurate as POMT; its most accurate, {_numbers(best)},"
                )
            out.append(f"{where}{lead} is {_speed(best, chosen, ours)}, and {_accuracy(best, chosen)}")
            fast = [row for row in group if row.latency_ms <= chosen.latency_ms]
            if fast:
                best = max(fast, key=lambda row: (row.acc1, -row.latency_ms))
                lead = f"{name}'s most accurate setting at most as slow as POMT, {_numbers(best)},"
            else:
                best = min(group, key=lambda row: (row.latency_ms, -row.acc1))
                lead = f"no {name} setting is at most as slow as POMT; its fastest, {_numbers(best)},"
            out.append(f"{where}{lead} is {_speed(best, chosen, ours)}, and {_accuracy(best, chosen)}")
    return out


def recovery(rows: Sequence[Any], healed: Any, where: str) -> list[str]:
    """How much of POMT's training-free accuracy loss against the unpruned model healing won back."""
    runtime = getattr(healed, "runtime", "torch")
    same = [
        row
        for row in rows
        if row.batch_size == healed.batch_size
        and not row.healed
        and getattr(row, "runtime", "torch") == runtime
    ]
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
        (
            row
            for row in rows
            if row.healed
            and row.method == "none"
            and row.batch_size == healed.batch_size
            and getattr(row, "runtime", "torch") == runtime
        ),
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


def _label(row: Any) -> str:
    return "unpruned" if row.method == "none" else f"{NAMES[row.method]} r={row.r}"


def recommendation(rows: Sequence[Any], max_drop: float) -> list[str]:
    """Per batch size: in each runtime, POMT's R and the fastest training-free setting within
    ``max_drop`` points of the unpruned model's top-1 (one sentence per runtime); then which
    runtime, method and r is fastest of all within that loss (the recommendation). The
    reference is the most accurate unpruned row of the batch size (the most accurate row when
    none is unpruned)."""
    out = []
    for batch_size in dict.fromkeys(row.batch_size for row in rows):
        free = [row for row in rows if row.batch_size == batch_size and not row.healed]
        if not free:
            continue
        unpruned = [row for row in free if row.method == "none"]
        reference = max(unpruned or free, key=lambda row: row.acc1)
        what = "the unpruned model's" if unpruned else "the most accurate setting's"
        floor = 100 * reference.acc1 - max_drop

        def within(group: Sequence[Any], floor: float = floor) -> list[Any]:
            return [row for row in group if 100 * row.acc1 >= floor - 1e-9]

        runtimes = list(dict.fromkeys(getattr(row, "runtime", "torch") for row in free))
        for runtime in runtimes:
            group = [row for row in free if getattr(row, "runtime", "torch") == runtime]
            chosen = next((row for row in group if row.selected), None)
            base = next((row for row in group if row.method == "none"), None)
            best = min(within(group), key=lambda row: row.latency_ms, default=None)
            pomt = (
                ""
                if chosen is None
                else f"POMT chose r={chosen.r}"
                + (f" (verified x{chosen.verified_speedup:.3f})" if chosen.verified_speedup else "")
            )
            if best is None:
                out.append(f"batch {batch_size}, {runtime}: {pomt}; nothing here is within {max_drop} points")
                continue
            against = (
                f", x{base.latency_ms / best.latency_ms:.2f} against unpruned here"
                if base is not None and best is not base
                else ""
            )
            out.append(
                f"batch {batch_size}, {runtime}: {pomt + '; ' if pomt else ''}the fastest within {max_drop} "
                f"points of {what} top-1 is {_label(best)} ({100 * best.acc1:.2f} %, "
                f"{best.latency_ms:.2f} ms{against})"
            )
        best = min(within(free), key=lambda row: row.latency_ms)  # the reference itself qualifies
        runtime = getattr(best, "runtime", "torch")
        slowest_base = [row for row in unpruned if row is not best]
        against = ""
        if slowest_base:
            base = max(slowest_base, key=lambda row: row.latency_ms)
            against = (
                f", x{base.latency_ms / best.latency_ms:.2f} against the slowest unpruned "
                f"({getattr(base, 'runtime', 'torch')}, {base.latency_ms:.2f} ms)"
            )
        drop = 100 * reference.acc1 - 100 * best.acc1
        loss = f"{drop:.2f} points below" if drop > 0 else "no loss against"
        measured = getattr(best, "accuracy_from", "")
        out.append(
            f"batch {batch_size}: recommended: {runtime}, {_label(best)}: {best.latency_ms:.2f} ms{against}; "
            f"top-1 {100 * best.acc1:.2f} %, {loss} {what} {100 * reference.acc1:.2f} % "
            f"(allowed: {max_drop}){f'; accuracy {measured}' if measured else ''}"
        )
    return out
