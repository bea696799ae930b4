"""Check a selection before deploying it: time the pruned model against the unpruned one.

A latency profile times each n once, minutes apart from its neighbours; on a busy machine a
single fast measurement can make an n look like a step that is not there. So before R is
used, the model pruned at R and the unpruned model are timed side by side, call by call,
in ``groups`` separate groups spread over the verification's time (each group re-times both
models, and the order within a pair alternates from group to group). The budget is sized by
the answer needed, not by a fixed second: after a short warm-up measures the pair's time, a
first round of groups (at least ``verify_pairs`` pairs, one per group at least) is timed, and
groups are added until the interval is decided (its bounds both on one side of the bar the
rule below needs) or the cap is reached (``SearchConfig.verify_max_time`` seconds,
``verify_max_pairs`` pairs); an interval still undecided at the cap keeps the rule's answer,
and the log says it was undecided. R is kept only when

- the speed-up is significantly above 1: the lower end of a 95 % confidence interval of the
  median over the *groups'* speed-ups is above 1. Calls moments apart share the machine's
  state, so they are not independent samples; groups are the unit, and a burst of noise
  that covers some groups widens the interval instead of confirming a speed-up. (With six
  groups the interval spans all of them: one group without a gain rejects R; more groups
  narrow it.)
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

from pomt import timing
from pomt.deploy.targets import Call, Prepared, Target
from pomt.errors import PomtValueError, is_int
from pomt.offline.config import SearchConfig
from pomt.offline.selection import Selection, utility
from pomt.timing import Stopwatch, median_interval, time_paired

__all__ = ["verify", "check_candidates", "speedups", "paired_speedups", "Decided", "ROUND_TIME"]

Decided = Callable[[Sequence[float], float], bool]
"""Whether the groups' speed-ups so far (and the unpruned median, ms) decide the candidate."""

ROUND_TIME = 1.0  # seconds the first round of groups fills at the warm-up's pace


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
        measure = lambda r, decided: speedups(prepared, r, search, decided)  # noqa: E731
        return check_candidates(selection, measure, candidates=search.verify_candidates, log=log)


def speedups(
    prepared: Prepared, r: int, search: SearchConfig, decided: Decided | None = None
) -> tuple[list[float], float]:
    """Per-group speed-ups ``t_unpruned / t_pruned`` of POMT at ``r`` and the unpruned median (ms),
    for a model prepared by a Target's runtime, timed until ``decided`` or the search's cap
    (``verify_max_time``, ``verify_max_pairs``; at least ``verify_pairs`` pairs in
    ``verify_groups`` groups; see :func:`paired_speedups`). Both sides run the same way: where
    one CUDA graph cannot be captured, both are eager calls."""
    n_total = prepared.n_total
    pruned, unpruned = prepared.at(n_total - r), prepared.at(n_total)
    if pruned.mode != unpruned.mode:  # the runtime fell back to eager calls after the first
        pruned, unpruned = prepared.at(n_total - r), prepared.at(n_total)
    budget = search.verify_budget()
    return paired_speedups(
        pruned, unpruned, device=prepared.device, warmup=search.warmup, decided=decided, **budget
    )


def paired_speedups(
    pruned: Call,
    unpruned: Call,
    *,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    min_pairs: int = 6,
    groups: int = 6,
    max_time: float = 30.0,
    max_pairs: int | None = None,
    decided: Decided | None = None,
) -> tuple[list[float], float]:
    """Per-group speed-ups of ``pruned`` over ``unpruned`` (each a :class:`Call`: a run and an
    untimed setup) and the unpruned median (ms), for any calls (eager modules, graph replays, a
    runtime's compiled graphs).

    The warm-up pairs (up to ``warmup``, cut short past a quarter of ``max_time``, at least one)
    are timed; each group gets the pairs that fill a sixth of a second (``ROUND_TIME / 6``, the
    first round of ``groups`` groups about ``ROUND_TIME``) at that pace, at least
    ``ceil(min_pairs / groups)``. After the first ``groups`` groups, and after every group from
    then on, ``decided(speed-ups, unpruned median)`` is asked (default: the 95 % interval of the
    median is all above 1 or all at or below 1); groups are added until it says yes or the cap
    is reached: ``max_time`` seconds since the warm-up began, ``max_pairs`` timed pairs (None: no
    pair cap). A group is cut to the pairs that fit the cap at the pace measured so far (the
    slower of the mean pair and the slowest pair), so the cap holds unless a pair is slower than
    every one before it; the cap never cuts the first ``groups`` groups of the stated minimum.
    """
    if not is_int(groups) or groups < 1:
        raise PomtValueError(f"groups must be a positive int, got {groups!r}")
    if not max_time >= 0:
        raise PomtValueError(f"max_time must be >= 0 seconds, got {max_time!r}")
    if max_pairs is not None and (not is_int(max_pairs) or max_pairs < 1):
        raise PomtValueError(f"max_pairs must be a positive int or None, got {max_pairs!r}")
    decided = decided or _decided_against_one
    sides = [(pruned.run, pruned.setup), (unpruned.run, unpruned.setup)]
    device = torch.device(device)
    start = timing.time.perf_counter()
    pace = _warm_pace(sides, device, warmup, 0.25 * max_time)
    first_round = min(ROUND_TIME, max_time - (timing.time.perf_counter() - start))
    minimum = max(1, -(-min_pairs // groups))
    per_group = max(minimum, int(first_round / groups / pace + 1e-9))
    speedups: list[float] = []
    reference: list[float] = []
    timed_pairs, timed_s, slowest = 0, 0.0, pace
    while True:
        group = len(speedups)
        pairs = per_group
        if group >= groups:  # past the first round: the cap decides what fits
            pace = max(timed_s / timed_pairs, slowest)  # a pair starts only where the slowest still fits
            left = max_time - (timing.time.perf_counter() - start)
            pairs = min(pairs, int(left / pace + 1e-9))
            if max_pairs is not None:
                pairs = min(pairs, max_pairs - timed_pairs)
            if pairs < 1:
                break
        elif max_pairs is not None:  # the first round: the cap, but never below the minimum
            pairs = max(minimum, min(pairs, (max_pairs - timed_pairs) // (groups - group)))
        first, second = sides if group % 2 == 0 else sides[::-1]
        began = timing.time.perf_counter()
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
        timed_s += timing.time.perf_counter() - began
        timed_pairs += len(ratios)
        slowest = max(slowest, *((a + 1.0) * b / 1e3 for a, b in zip(ratios, other, strict=True)))
        if group % 2 == 0:  # ratios are t_pruned / t_unpruned
            speedups.append(1.0 / max(statistics.median(ratios), 1e-12))
            reference.extend(other)
        else:  # ratios are t_unpruned / t_pruned
            speedups.append(statistics.median(ratios))
            reference.extend(a * b for a, b in zip(ratios, other, strict=True))
        if len(speedups) >= groups and decided(speedups, median_interval(reference)[0]):
            break
    return speedups, median_interval(reference)[0]


def _decided_against_one(samples: Sequence[float], unpruned_ms: float) -> bool:
    """Whether the 95 % interval of the median is all above 1, or all at or below it."""
    _, low, high = median_interval(samples)
    return low > 1.0 or high <= 1.0


def _warm_pace(sides: list, device: torch.device, warmup: int, budget: float) -> float:
    """Warm both sides up (timed, stopping past ``budget`` seconds), and the warmest pair's seconds."""
    spent: list[float] = []
    while not spent or (len(spent) < warmup and sum(spent) < budget):
        with Stopwatch(device) as watch:
            for fn, prepare in sides:
                if prepare is not None:
                    prepare()
                fn()
        spent.append(watch.elapsed_ms / 1e3)
    return max(spent[-1], 1e-9)


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
    measure: Callable[[int, Decided], tuple[Sequence[float], float]],
    *,
    candidates: int = 3,
    log: Callable[[str], object] = print,
) -> Selection:
    """The first of the selection's candidates (at most ``candidates`` of them) whose measured
    speed-up passes (see the module docstring), with the measurement recorded; else R = 0.

    ``measure(r, decided)`` returns the per-group speed-ups of POMT at ``r`` and the unpruned
    model's median latency (:func:`speedups`, or a fake in tests), timing until
    ``decided(speed-ups, unpruned ms)``: the interval's bounds are both on one side of the
    bar, the lower bound already passes or the upper bound already fails (utility and budget
    included), or until its cap.
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

        def decided(samples: Sequence[float], unpruned_ms: float, n: int = n) -> bool:
            _, low, high = median_interval(samples)
            return (
                _passes(selection, n, low, low, unpruned_ms) is None
                or _passes(selection, n, high, high, unpruned_ms) is not None
            )

        samples, unpruned_ms = measure(r, decided)
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
        if not decided(samples, unpruned_ms):
            why += " (undecided when the verification's cap was reached: verify_max_time, verify_max_pairs)"
        log(f"{line}: {why}; trying the next candidate")
        rejected.append(n)
        reasons.append(f"R={r} {why}")
    note = "keeping the unpruned model (R=0): no candidate was measurably worth pruning"
    if reasons:
        note += f" ({'; '.join(reasons)})"
    log(note)
    fallback = selection.at(selection.n_total) if selection.n_total in selection.curve_n else selection
    return replace(fallback, rejected=tuple(rejected), verification=note, measurements=tuple(measured))
