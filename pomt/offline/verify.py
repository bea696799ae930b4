"""Check a selection before deploying it: time the pruned model against the unpruned one.

A latency profile times each n once, minutes apart from its neighbours; on a busy machine a
single fast measurement can make an n look like a step that is not there. So before R is
used, the model pruned at R and the unpruned model are timed side by side, call by call,
in ``groups`` separate groups spread over the verification's time (each group re-times both
models, and the order within a pair alternates from group to group). The number of pairs
adapts to the model's latency so that one candidate takes about its time budget
(``SearchConfig.verify_time``) after a short warm-up, with a stated minimum of
``verify_pairs`` pairs (one per group at least). R is kept only when

- the speed-up is significantly above 1: the lower end of a 95 % confidence interval of the
  median over the *groups'* speed-ups is above 1. Calls moments apart share the machine's
  state, so they are not independent samples; groups are the unit, and a burst of noise
  that covers some groups widens the interval instead of confirming a speed-up. (With six
  groups the interval spans all of them: one group without a gain rejects R.)
- in utility mode, the utility with the *measured* speed-up beats R = 0; with a latency
  budget, the measured latency meets the budget.

Otherwise the next candidate of the selection (in the order the objective ranks them) is
tried, and if none passes, the unpruned model (R = 0) is kept. Every measurement is kept on
the selection (``Selection.measurements``), also when R = 0 is.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from pomt.deploy.targets import Call, Prepared, Target
from pomt.errors import PomtValueError, is_int
from pomt.offline.config import SearchConfig
from pomt.offline.selection import Selection, utility
from pomt.timing import Stopwatch, median_interval, time_paired

__all__ = ["verify", "check_candidates", "speedups", "paired_speedups"]


def verify(
    model: nn.Module,
    selection: Selection,
    target: Target | str | None = None,
    *,
    layer: int = 3,
    search: SearchConfig | None = None,
    vit: nn.Module | None = None,
    log: Callable[[str], object] = print,
) -> Selection:
    """``selection`` checked on ``target``: its candidates timed against the unpruned model
    (:func:`speedups`, the ``search``'s budget), the first that passes kept, else R = 0
    (:func:`check_candidates`). The model is put back as it was."""
    search = SearchConfig.coerce(search)
    with Target.coerce(target).prepare(model, layer=layer, vit=vit) as prepared:
        measure = lambda r: speedups(prepared, r, search)  # noqa: E731
        return check_candidates(selection, measure, candidates=search.verify_candidates, log=log)


def speedups(prepared: Prepared, r: int, search: SearchConfig) -> tuple[list[float], float]:
    """Per-group speed-ups ``t_unpruned / t_pruned`` of POMT at ``r`` and the unpruned median (ms),
    for a model prepared by a Target's runtime, within the search's verification budget
    (``verify_time``, ``verify_pairs``, ``verify_groups``; see :func:`paired_speedups`). Both
    sides run the same way: where one CUDA graph cannot be captured, both are eager calls."""
    n_total = prepared.n_total
    pruned, unpruned = prepared.at(n_total - r), prepared.at(n_total)
    if pruned.mode != unpruned.mode:  # the runtime fell back to eager calls after the first
        pruned, unpruned = prepared.at(n_total - r), prepared.at(n_total)
    return paired_speedups(
        pruned, unpruned, device=prepared.device, warmup=search.warmup, min_run_time=search.verify_time,
        min_pairs=search.verify_pairs, groups=search.verify_groups,
    )  # fmt: skip


def paired_speedups(
    pruned: Call,
    unpruned: Call,
    *,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    min_run_time: float = 1.0,
    min_pairs: int = 6,
    groups: int = 6,
) -> tuple[list[float], float]:
    """Per-group speed-ups of ``pruned`` over ``unpruned`` (each a :class:`Call`: a run and an
    untimed setup) and the unpruned median (ms), for any calls (eager modules, graph replays, a
    runtime's compiled graphs).

    The time budget: the pairs take about ``min_run_time`` seconds. The warm-up pairs
    (``warmup``, cut short once they pass a quarter of the budget; at least one) are timed, and
    each of the ``groups`` groups gets as many pairs as fit in its share of the budget at that
    pace, never fewer than ``ceil(min_pairs / groups)`` (at least one): the stated minimum, so a
    model slower than ``min_run_time / min_pairs`` per pair takes ``min_pairs`` pairs whatever
    the budget. Each group times both call by call, the pruned one first in even groups and
    second in odd ones, and its speed-up is the median of its pairs.
    """
    if not is_int(groups) or groups < 1:
        raise PomtValueError(f"groups must be a positive int, got {groups!r}")
    sides = [(pruned.run, pruned.setup), (unpruned.run, unpruned.setup)]
    device = torch.device(device)
    pairs = _pairs_per_group(sides, device, warmup, min_run_time, min_pairs, groups)
    found: list[float] = []
    reference: list[float] = []
    for group in range(groups):
        first, second = sides if group % 2 == 0 else sides[::-1]
        ratios, other = time_paired(
            first[0],
            second[0],
            device=device,
            warmup=0,
            min_run_time=0.0,
            min_pairs=pairs,
            prepare=first[1],
            prepare_reference=second[1],
        )
        if group % 2 == 0:  # ratios are t_pruned / t_unpruned
            found.append(1.0 / max(statistics.median(ratios), 1e-12))
            reference.extend(other)
        else:  # ratios are t_unpruned / t_pruned
            found.append(statistics.median(ratios))
            reference.extend(a * b for a, b in zip(ratios, other, strict=True))
    return found, median_interval(reference)[0]


def _pairs_per_group(
    sides: list, device: torch.device, warmup: int, budget: float, min_pairs: int, groups: int
) -> int:
    """Warm both sides up (timed), and the pairs per group that fill ``budget`` seconds at that pace."""
    spent: list[float] = []
    while not spent or (len(spent) < warmup and sum(spent) < 0.25 * budget):
        with Stopwatch(device) as watch:
            for fn, prepare in sides:
                if prepare is not None:
                    prepare()
                fn()
        spent.append(watch.elapsed_ms / 1e3)
    pace = max(spent[-1], 1e-9)  # the warmest pair
    return max(1, -(-min_pairs // groups), round(budget / groups / pace))


def _passes(selection: Selection, n: int, speedup: float, low: float, unpruned_ms: float) -> str | None:
    """None when n passes, else why not."""
    if low <= 1.0:
        return "not significantly faster than the unpruned model"
    if selection.mode == "utility":
        top = max(selection.curve_accuracy)
        accuracy = dict(zip(selection.curve_n, selection.curve_accuracy, strict=True))
        # latency relative to the unpruned model's: 1 / speed-up, and 1 for R = 0
        measured = utility(1.0 / speedup, accuracy[n], selection.alpha, 1.0, top)
        unpruned = utility(1.0, accuracy.get(selection.n_total, top), selection.alpha, 1.0, top)
        if measured <= unpruned:
            return f"its measured utility {measured:.4f} does not beat R = 0 ({unpruned:.4f})"
    if selection.mode == "latency_budget" and unpruned_ms / speedup > selection.latency_budget_ms:
        return f"measured {unpruned_ms / speedup:.3f} ms, over the budget of {selection.latency_budget_ms} ms"
    return None


def check_candidates(
    selection: Selection,
    measure: Callable[[int], tuple[Sequence[float], float]],
    *,
    candidates: int = 3,
    log: Callable[[str], object] = print,
) -> Selection:
    """The first of the selection's candidates (at most ``candidates`` of them) whose measured
    speed-up passes (see the module docstring), with the measurement recorded; else R = 0.

    ``measure(r)`` returns the per-group speed-ups of POMT at ``r`` and the unpruned model's
    median latency (:func:`speedups`, or a fake in tests).
    """
    if selection.n_star == selection.n_total:
        return replace(selection, verification="R=0 (the unpruned model): nothing to verify")
    rejected: list[int] = []
    reasons: list[str] = []
    measured: list[tuple[int, float, float, float]] = []
    for n in selection.candidates[:candidates]:
        if n == selection.n_total:
            break  # the objective prefers R = 0 to every candidate left
        r = selection.n_total - n
        samples, unpruned_ms = measure(r)
        speedup, low, high = median_interval(samples)
        measured.append((r, speedup, low, high))
        predicted = selection.at(n).speedup
        line = f"R={r}: " + (f"predicted x{predicted:.3f}, " if predicted else "")
        line += f"measured x{speedup:.3f} [{low:.3f}, {high:.3f}] (95% CI over {len(samples)} groups)"
        why = _passes(selection, n, speedup, low, unpruned_ms)
        if why is None:
            note = f"{line}: verified" + (f" (rejected before: {'; '.join(reasons)})" if reasons else "")
            log(note)
            return replace(
                selection.at(n),
                measured_speedup=speedup,
                measured_speedup_interval=(low, high),
                rejected=tuple(rejected),
                verification=note,
                measurements=tuple(measured),
            )
        log(f"{line}: {why}; trying the next candidate")
        rejected.append(n)
        reasons.append(f"R={r} {why}")
    note = "keeping the unpruned model (R=0): no candidate was measurably worth pruning"
    if reasons:
        note += f" ({'; '.join(reasons)})"
    log(note)
    fallback = selection.at(selection.n_total) if selection.n_total in selection.curve_n else selection
    return replace(fallback, rejected=tuple(rejected), verification=note, measurements=tuple(measured))
