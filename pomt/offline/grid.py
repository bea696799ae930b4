"""Which token counts to time: the full grid, a coarse grid, and the adaptive grid.

``adaptive_grid`` is the fast latency sampling behind ``pomt.profile_latency``: a coarse grid
over [p + 1, N] (always with N), then bisection. Given an accuracy profile (accuracy does
not depend on the device, so it can be estimated first, elsewhere) it is a branch and bound
on the utility that lands on the full grid's n* on a staircase; without one it locates the
largest steps first. Either way it stops at a point budget (9 % of the full grid by default).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable

from pomt.errors import PomtValueError, is_fraction
from pomt.offline.curves import (
    ALIGN,
    as_curve,
    check_n,
    interpolate,
    isotonic_increasing,
    step_fit,
    validate_curve,
)
from pomt.offline.profiles import SearchedPoints
from pomt.offline.selection import TIE_DECIMALS, check_objective, select_r, utility
from pomt.timing import TimingStats, median_interval

__all__ = [
    "coarse_grid",
    "default_max_points",
    "adaptive_grid",
    "detect_period",
    "retime",
    "pooled",
    "between_timings",
    "full_grid",
    "as_grid",
]


Z95 = 1.96  # two-sided 95 % of a normal
# degrees of freedom of the between-timing spread before re-timing may call a leader decided: the
# leader and its runner-up timed again a few times (each timing costs its warm-up and its pairs)
MIN_TIMING_DF = 3


def coarse_grid(lo: int, hi: int, points: int) -> list[int]:
    """About ``points`` token counts evenly spread over [lo, hi], both ends included."""
    if hi < lo:
        raise PomtValueError(f"empty token range [{lo}, {hi}]")
    if points < 2 or hi == lo:
        return sorted({lo, hi})
    step = (hi - lo) / (points - 1)
    return sorted({lo + round(i * step) for i in range(points)} | {hi})


def default_max_points(lo: int, hi: int, coarse_points: int) -> int:
    """Point budget of the default adaptive grid: 9 % of the full grid (so that it takes under a tenth
    of the full grid's time at the same per-point timer settings), at least coarse + 4."""
    return max(coarse_points + 4, math.ceil(0.09 * (hi - lo + 1)))


def adaptive_grid(
    measure: Callable[[int], TimingStats],
    lo: int,
    hi: int,
    *,
    coarse_points: int = 9,
    max_points: int | None = None,
    accuracy: object | None = None,
    alpha: float = 0.5,
    on_point: Callable[[int, TimingStats], None] | None = None,
    period: int | str | None = None,
) -> dict[int, TimingStats]:
    """Measure L(n) where it matters: a coarse grid over [lo, hi], then refinement.

    The measured medians are step-fitted (IQR ties, see ``step_fit``) after every point.

    - Without ``accuracy``: every interval between neighbouring measured n whose fitted
      levels differ holds a step; the one with the largest jump is bisected next (ties:
      larger n first), until ``max_points`` (default ``default_max_points``) or until all
      steps are located to one token.
    - With ``accuracy`` (an accuracy profile or ``{n: accuracy}``; accuracy does not
      depend on the device, so it can be estimated first, elsewhere): branch and bound on
      the utility at ``alpha``. Assuming L does not decrease between two measured points
      and A does not decrease in n, no n inside (a, b) beats
      alpha (1 - L(a)/max L) + (1 - alpha) A(b - 1)/max A; intervals whose bound beats the
      best measured utility are bisected, best bound first, until none is left or the
      budget is spent. The result is the full
      grid's n* at that alpha whenever the assumptions hold and the budget suffices.

    ``period``: a sawtooth L(n), where counts at multiples of a period P are faster than
    their neighbours below (OpenVINO bf16 on AMX: P = 16, steps of 15-28 %), breaks the
    assumption above. With ``period=P`` every multiple of P is measured before the
    refinement (then no unmeasured n between two measured ones is faster than both ends);
    ``"auto"`` detects P in {8, 16, 32} first from drops L(m) < L(m - 1) at multiples m of 32,
    16 and 8 (:func:`detect_period`; at most 8 points). Either way those points come on top of
    ``max_points``. None (or 0): no periodic phase.

    Ranges no larger than the budget are measured in full.
    """
    if coarse_points < 2:
        raise PomtValueError(f"coarse_points must be >= 2, got {coarse_points}")
    check_objective(alpha, None, None)
    if max_points is None:
        max_points = default_max_points(lo, hi, coarse_points)
    if max_points < 2:
        raise PomtValueError(f"max_points must be >= 2, got {max_points}")
    acc_at = None if accuracy is None else _accuracy_function(accuracy, lo, hi)
    measured: dict[int, TimingStats] = {}

    def take(n: int) -> None:
        stats = measure(n)
        measured[n] = stats
        if on_point is not None:
            on_point(n, stats)

    if hi - lo + 1 <= max_points:
        for n in range(hi, lo - 1, -1):
            take(n)
        return measured
    if period == "auto":
        period = detect_period(take, measured, lo, hi)
    elif period is not None and (isinstance(period, bool) or not isinstance(period, int) or period < 0):
        raise PomtValueError(f"period must be None, 'auto' or a non-negative int, got {period!r}")
    extra = len(measured)
    if period and period > 1:
        lattice = [n for n in range(hi - hi % period, lo - 1, -period) if n not in measured]
        extra += len(lattice)
        for n in [hi, *lattice, lo]:
            if n not in measured:
                take(n)
    else:
        for n in reversed(coarse_grid(lo, hi, min(coarse_points, max_points))):
            if n not in measured:
                take(n)
    while len(measured) < max_points + extra:
        ns = sorted(measured)
        levels = step_fit(
            [measured[n].median_ms for n in ns],
            [measured[n].iqr_ms for n in ns],
            positions=ns,
            period=period or 0,
        )
        if acc_at is None:
            target = _largest_jump(ns, levels)
        else:
            target = _best_bound(ns, levels, acc_at, alpha)
        if target is None:
            break
        take(target)
    return measured


def detect_period(
    take: Callable[[int], None], measured: dict[int, TimingStats], lo: int, hi: int, drop: float = 0.03
) -> int:
    """The period P in {8, 16, 32} of a sawtooth L(n), or 0: ``take(n)`` measures n into ``measured``.

    A multiple m of P is faster than m - 1 by more than ``drop`` (and more than either IQR) on a
    sawtooth, never on a staircase or a smooth rising curve. It must hold at two multiples of
    32 (one when the range has one), then at an odd multiple of 16 (else P = 32), then at an odd
    multiple of 8 (P = 8, else 16)."""

    def faster(m: int) -> bool:
        for n in (m, m - 1):
            if n not in measured:
                take(n)
        a, b = measured[m], measured[m - 1]
        return b.median_ms - a.median_ms > max(drop * b.median_ms, a.iqr_ms, b.iqr_ms)

    tops = [m for m in range(hi - hi % 32, lo, -32) if m - 1 >= lo]
    if not tops:
        return 0
    confirm = tops[len(tops) // 2] if len(tops) > 1 else None
    if not faster(tops[0]) or (confirm is not None and not faster(confirm)):
        return 0
    if tops[0] - 16 - 1 < lo or not faster(tops[0] - 16):
        return 32
    return 8 if tops[0] - 8 - 1 >= lo and faster(tops[0] - 8) else 16


def _largest_jump(ns: list[int], levels: list[float]) -> int | None:
    best: tuple[float, int] | None = None
    target = None
    for i in range(len(ns) - 1):
        a, b = ns[i], ns[i + 1]
        jump = abs(levels[i + 1] - levels[i])
        if b - a > 1 and jump > 0 and (best is None or (jump, b) > best):
            best, target = (jump, b), (a + b) // 2
    return target


def _best_bound(
    ns: list[int], levels: list[float], acc_at: Callable[[int], float], alpha: float
) -> int | None:
    max_l = max(levels)
    max_a = max(acc_at(n) for n in range(ns[0], ns[-1] + 1))

    def u(lat: float, acc: float) -> float:
        return utility(lat, acc, alpha, max_l, max_a)

    incumbent = max(round(u(lev, acc_at(n)), TIE_DECIMALS) for n, lev in zip(ns, levels, strict=True))
    best: tuple[float, int] | None = None
    target = None
    for i in range(len(ns) - 1):
        a, b = ns[i], ns[i + 1]
        if b - a <= 1:
            continue
        bound = round(u(min(levels[i], levels[i + 1]), acc_at(b - 1)), TIE_DECIMALS)
        if bound > incumbent and (best is None or (bound, b) > best):
            best, target = (bound, b), (a + b) // 2
    return target


def _accuracy_function(accuracy: object, lo: int, hi: int) -> Callable[[int], float]:
    """A(n) made non-decreasing and interpolated; constant beyond the measured range."""
    curve = as_curve(accuracy, "accuracy profile")
    validate_curve(curve, "accuracy profile", unit_interval=True)
    xs = sorted(curve.values)
    ys = isotonic_increasing([curve.values[n] for n in xs])
    cache: dict[int, float] = {}

    def acc_at(n: int) -> float:
        if n not in cache:
            cache[n] = interpolate(xs, ys, min(max(n, xs[0]), xs[-1]))
        return cache[n]

    return acc_at


def retime(
    measure: Callable[[int], TimingStats],
    measured: dict[int, TimingStats],
    accuracy: object,
    *,
    alpha: float = 0.5,
    budget: int = 96,
    tolerance: float = 0.005,
    period: int = 0,
    on_point: Callable[[int, TimingStats], None] | None = None,
) -> list[int]:
    """Spend up to ``budget`` more timings where they decide the argmax; returns the n timed, in order.

    ``measure(n)`` times n again and returns everything measured at n so far (the samples
    pooled); ``measured`` is updated in place. The leader is :func:`pomt.select_r`'s n* on the
    points measured so far (utility at ``alpha`` with ``accuracy``). A point's utility interval
    comes from the confidence interval of its median latency (its p25-p75 without samples),
    widened to what the spread *between* timings allows (:func:`between_timings`): samples
    moments apart share the machine's state, so a point's k timings, not its samples, are its
    independent measurements. A rival is a point whose interval reaches more than ``tolerance``
    (a fraction of the leader's utility) above the low end of the leader's: it might beat the
    leader by more than that.

    - With a sawtooth ``period`` P > 1, both sides of the steps next to the leader are timed
      first: m - 1, m and m + 1 for the multiples m of P just below and above it (then the same
      for each rival as it appears), so that no fast multiple or slow neighbour is guessed.
      Without one, the multiples of ``ALIGN`` (16) just below and above each leader are timed:
      a ripple smaller than one point's noise makes them faster than the trend, which the
      latency fit can see only where they were timed (``step_fit``).
    - Then, one timing at a time, the point with the widest utility interval among the leader
      and its rivals is timed again, until no rival is left (the leader is decided to within
      ``tolerance``) or the budget is spent.
    - The leader is decided only once the spread between timings is known (``MIN_TIMING_DF``
      degrees of freedom): until then the leader or its runner-up, whichever was timed less,
      is timed again. (A ``measure`` that does not pool, as a test's may, skips this.)
    """
    if not is_budget(budget):
        raise PomtValueError(f"the re-timing budget must be a non-negative int, got {budget!r}")
    if not is_fraction(tolerance):
        raise PomtValueError(f"the re-timing tolerance must be a fraction in [0, 1), got {tolerance!r}")
    lo, hi = min(measured), max(measured)
    taken: list[int] = []
    sizes = {n: [len(s.values_ms)] for n, s in measured.items() if s.values_ms}  # samples per timing
    pooling = True

    def take(n: int) -> None:
        nonlocal pooling
        before = len(measured[n].values_ms) if n in measured else 0
        measured[n] = measure(n)
        added = len(measured[n].values_ms) - before
        if added > 0:
            sizes.setdefault(n, []).append(added)
        elif measured[n].values_ms:  # the samples were replaced, not pooled: no timing spread
            pooling, sizes[n] = False, [len(measured[n].values_ms)]
        taken.append(n)
        if on_point is not None:
            on_point(n, measured[n])

    def rivals() -> tuple[int, list[int], dict[int, tuple[float, float]], int]:
        spread, df = between_timings(measured, sizes)
        counts = {n: len(c) for n, c in sizes.items()}
        return (*_rivals(measured, accuracy, alpha, hi, tolerance, spread, counts, period), df)

    def sides(n: int) -> list[int]:  # both sides of the steps at the multiples of P next to n
        if not period or period < 2:
            return []
        base = n - n % period
        return [k for m in (base, base + period) for k in (m - 1, m, m + 1) if lo <= k <= hi]

    def aligned(n: int) -> list[int]:  # the multiples of ALIGN next to n, where no period is known
        if period and period > 1:
            return []
        base = n - n % ALIGN
        return [m for m in (base, base + ALIGN) if lo <= m <= hi]

    def fill(ns: Iterable[int]) -> None:
        for n in ns:
            if len(taken) < budget and n not in measured:
                take(n)

    first = rivals()[0]
    fill([*sides(first), *aligned(first)])
    while len(taken) < budget:
        leader, strong, _, _ = rivals()
        fill([*(k for n in (leader, *strong) for k in sides(n)), *aligned(leader)])
        leader, strong, spans, df = rivals()
        if len(taken) >= budget:
            break
        if not strong:
            if not pooling or df >= MIN_TIMING_DF or len(spans) < 2:
                break
            # decided on samples alone: time the leader or its runner-up again, to learn how far
            # timings spread
            runner = max((n for n in spans if n != leader), key=lambda n: (spans[n][1], n))
            take(min((leader, runner), key=lambda n: (len(sizes.get(n, ())), n != leader)))
            continue
        # the widest interval among the leader and its rivals: the measurement that narrows most
        take(max((leader, *strong), key=lambda n: (spans[n][1] - spans[n][0], n == leader, n)))
    return taken


def between_timings(measured: dict[int, TimingStats], sizes: dict[int, list[int]]) -> tuple[float, int]:
    """The variance of one timing's log median latency about its point's mean, pooled over the
    points timed more than once (``sizes[n]``: how many of ``measured[n]``'s samples, in order,
    each timing of n took), and its degrees of freedom (0: no point was timed twice)."""
    squares, df = 0.0, 0
    for n, counts in sizes.items():
        if len(counts) < 2:
            continue
        values, start, logs = measured[n].values_ms, 0, []
        for count in counts:
            median = statistics.median(values[start : start + count])
            start += count
            if median > 0:
                logs.append(math.log(median))
        if len(logs) >= 2:
            mean = statistics.fmean(logs)
            squares += sum((x - mean) ** 2 for x in logs)
            df += len(logs) - 1
    return (squares / df if df else 0.0), df


def known_period(points: dict[int, TimingStats], period: int | str | None) -> int:
    """The sawtooth period a search used: ``period`` when given, else (``"auto"``) what
    :func:`detect_period` finds again on the points already measured (0: none; nothing is timed)."""
    if period != "auto":
        return int(period or 0)

    def take(n: int) -> None:  # only what was measured: a missing neighbour means no sawtooth found
        raise KeyError(n)

    try:
        return detect_period(take, dict(points), min(points), max(points))
    except KeyError:
        return 0


def pooled(timer: Callable[[int], TimingStats]) -> Callable[[int], TimingStats]:
    """``timer`` whose samples at an n timed again are pooled with the earlier ones (a summary
    returned without its samples, as a test's timer may, is passed on as it is)."""
    samples: dict[int, list[float]] = {}

    def timed(n: int) -> TimingStats:
        stats = timer(n)
        if not stats.values_ms:
            return stats
        samples.setdefault(n, []).extend(stats.values_ms)
        return TimingStats.from_samples(samples[n])

    return timed


def is_budget(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def utility_interval(
    stats: TimingStats, acc: float, alpha: float, max_l: float, max_a: float, half: float = 0.0
) -> tuple[float, float]:
    """The utility of a point at the ends of the confidence interval of its median latency,
    widened to at least the median x exp(+-``half``) (a half-width in log latency)."""
    if len(stats.values_ms) >= 2:
        _, low, high = median_interval(stats.values_ms)
    else:
        low, high = stats.p25_ms, stats.p75_ms
    low, high = min(low, stats.median_ms * math.exp(-half)), max(high, stats.median_ms * math.exp(half))
    return utility(high, acc, alpha, max_l, max_a), utility(low, acc, alpha, max_l, max_a)


def _rivals(
    measured: dict[int, TimingStats],
    accuracy: object,
    alpha: float,
    n_total: int,
    tolerance: float,
    spread: float,
    timings: dict[int, int],
    period: int = 0,
) -> tuple[int, list[int], dict[int, tuple[float, float]]]:
    """The leader n*, the points whose utility intervals reach more than ``tolerance`` (a
    fraction of its utility) above the low end of its own (strongest first), and every point's
    utility interval, at least the 95 % interval of the mean of a point's ``timings[n]``
    timings whose log medians have variance ``spread``."""
    sel = select_r(SearchedPoints.of(measured, period), accuracy, alpha=alpha, n_total=n_total)
    max_l, max_a = max(sel.curve_latency_ms), max(sel.curve_accuracy)
    accs = dict(zip(sel.curve_n, sel.curve_accuracy, strict=True))
    spans = {
        n: utility_interval(
            measured[n], accs[n], alpha, max_l, max_a, Z95 * math.sqrt(spread / timings.get(n, 1))
        )
        for n in sel.curve_n
    }
    low = spans[sel.n_star][0] + tolerance * abs(sel.utility)
    rivals = [n for n in sel.curve_n if n != sel.n_star and spans[n][1] >= low]
    rivals.sort(key=lambda n: (-spans[n][1], -n))
    return sel.n_star, rivals, spans


def full_grid(lo: int, hi: int) -> list[int]:
    """Every token count from ``hi`` down to ``lo`` (the authors' grid, plus N)."""
    return list(range(hi, lo - 1, -1))


def as_grid(values: Iterable[int], lo: int, hi: int) -> list[int]:
    """Validated, de-duplicated token counts within [lo, hi], in the order given."""
    out = list(dict.fromkeys(check_n(v, "grid") for v in values))
    if not out:
        raise PomtValueError("the grid is empty: give at least one token count")
    bad = [n for n in out if not lo <= n <= hi]
    if bad:
        raise PomtValueError(f"token counts {bad[:5]} are outside the valid range {lo}..{hi} (p + 1 .. N)")
    return out
