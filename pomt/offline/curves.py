"""Curves against the token count n: reading them from profiles or ``{n: value}`` mappings,
validating them, and fitting them (the denoising ``select_r`` and the search use).

``step_fit`` turns latency differences within the measured noise into ties, so a flat noisy
curve has no spurious steps; ``isotonic_increasing`` makes accuracy non-decreasing in n;
``interpolate`` reads a curve between its measured points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pomt.errors import PomtValueError, is_int
from pomt.timing import TimingStats

__all__ = [
    "Curve",
    "as_curve",
    "tie_tolerances",
    "check_n",
    "validate_curve",
    "step_fit",
    "isotonic_increasing",
    "interpolate",
]


# --------------------------------------------------------------------------- curve fitting


def isotonic_increasing(values: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators)."""
    if weights is None:
        weights = [1.0] * len(values)
    blocks: list[list[float]] = []  # [level, weight, count]
    for v, w in zip(values, weights, strict=True):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            b = blocks.pop()
            a = blocks[-1]
            total = a[1] + b[1]
            a[0] = (a[0] * a[1] + b[0] * b[1]) / total if total > 0 else (a[0] + b[0]) / 2
            a[1] = total
            a[2] += b[2]
    out: list[float] = []
    for level, _, count in blocks:
        out.extend([level] * int(count))
    return out


ALIGN = 16  # sequence lengths that vector units and kernel tiles handle without a remainder


def step_fit(
    values: Sequence[float],
    noise: Sequence[float],
    positions: Sequence[float] | None = None,
    align: int = ALIGN,
    period: int = 0,
) -> list[float]:
    """Piecewise fit that only makes a level where the points are level, and a line where they rise
    steadily.

    ``values`` are medians in order of n, ``noise[i]`` the tie tolerance of point i (e.g. its
    IQR), ``positions`` the token counts (default 0, 1, 2, ...). Adjacent groups are merged,
    closest levels first, while the merged group passes two tests:

    - every member's value lies within its own tolerance of the group's level (the mean of
      the members weighted by 1 / noise^2), so a precise point pins its level and a point
      disturbed during its measurement (large IQR) can join any level without moving it;
    - the group has no trend: the weighted least-squares line through its members rises
      (or falls) across the group by no more than the lower median of its members'
      tolerances (one noisy point cannot widen it).

    The second test is what keeps a steady rise a rise: each step of a smooth ramp may be
    within the noise, but a level spanning more than one tolerance of the ramp is refused.
    Wiggles within the noise on a flat curve still become one level (they have no trend), real
    steps and real dips larger than the noise survive.

    Then the levels of a steady rise become one line. Levels alone would cut a gentle rise into
    short flat pieces, each lending its right end its left end's speed: the utility's argmax
    would land on whichever piece's end the noise favours (run to run, n* moved by up to 13
    tokens on a smooth OpenVINO curve). A run of adjacent groups, three points or more, becomes a
    ramp when each group follows the last within the tolerance of the two points that meet
    there (no step) and one rising weighted least-squares line fits every member within its
    own tolerance. On a ramp, every point's latency comes from all the ramp's samples.

    A line alone would also smooth away a ripple: token counts that are multiples of ``align``
    (16: what vector units and kernel tiles take without a remainder) run faster than the trend
    on every stored CPU profile (eager fp32 by 1.5-3.0 %, OpenVINO by 1.4-6.6 %), less
    than the noise of one point but not of many. A ramp holding such a count and three others is
    fitted as a line less one offset there, kept only where the ramp's own scatter puts it more
    than two standard errors above zero, so the argmax can land on the fast count the ripple
    offers rather than where the slopes balance. ``align=0`` (and plain indices, no
    ``positions``) fit lines only.

    ``period``: a sawtooth's period P that the search detected. A multiple of P is faster than
    the count after it, a step the search times on purpose (both sides of it); a level never
    joins the two, however close they were measured, so the slow side never takes the fast
    side's speed. (Without a detected period, every multiple of 16 ending its level would cut a
    flat noisy curve into pieces, one of which the noise makes fastest.)
    """
    if len(values) != len(noise):
        raise PomtValueError("step_fit: values and noise differ in length")
    xs = [float(i) for i in range(len(values))] if positions is None else [float(x) for x in positions]
    if len(xs) != len(values):
        raise PomtValueError("step_fit: values and positions differ in length")
    ys = [float(v) for v in values]
    aligned = [align > 1 and positions is not None and x % align == 0 for x in xs]
    steps = [period > 1 and positions is not None and x % period == 0 for x in xs]  # a step after each
    tols = [max(0.0, float(t)) for t in noise]
    ws = [1.0 / (t * t + (1e-3 * v) ** 2 + 1e-12) for v, t in zip(ys, tols, strict=True)]
    groups = [[i, i + 1] for i in range(len(ys))]  # [start, stop) of each group

    def level(lo: int, hi: int) -> float:
        w = ws[lo:hi]
        return sum(wi * yi for wi, yi in zip(w, ys[lo:hi], strict=True)) / sum(w)

    def admissible(lo: int, hi: int) -> bool:
        if any(steps[lo : hi - 1]):  # a multiple of the period ends its level
            return False
        m = level(lo, hi)
        if any(abs(ys[k] - m) > tols[k] for k in range(lo, hi)):
            return False
        w, x, y = ws[lo:hi], xs[lo:hi], ys[lo:hi]
        sw = sum(w)
        mx = sum(wi * xi for wi, xi in zip(w, x, strict=True)) / sw
        sxx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x, strict=True))
        if sxx <= 0:
            return True
        slope = sum(wi * (xi - mx) * (yi - m) for wi, xi, yi in zip(w, x, y, strict=True)) / sxx
        members = sorted(tols[lo:hi])  # the lower median: one noisy point cannot widen it
        return abs(slope) * (x[-1] - x[0]) <= members[(len(members) - 1) // 2]

    levels = list(ys)
    while len(groups) > 1:
        order = sorted(range(len(groups) - 1), key=lambda i: abs(levels[i] - levels[i + 1]))
        for i in order:
            lo, hi = groups[i][0], groups[i + 1][1]
            if admissible(lo, hi):
                groups[i : i + 2] = [[lo, hi]]
                levels[i : i + 2] = [level(lo, hi)]
                break
        else:
            break
    out: list[float] = []
    for (lo, hi), lv in zip(groups, levels, strict=True):
        out.extend([lv] * (hi - lo))
    for lo, hi in _ramps(xs, ys, tols, ws, aligned, groups):
        out[lo:hi] = _ramp_fit(xs, ys, ws, aligned, lo, hi)[1]
    return out


def _line(xs: list[float], ys: list[float], ws: list[float], lo: int, hi: int) -> list[float]:
    """The weighted least-squares line through points lo..hi - 1, at their positions."""
    w, x, y = ws[lo:hi], xs[lo:hi], ys[lo:hi]
    sw = sum(w)
    mx = sum(wi * xi for wi, xi in zip(w, x, strict=True)) / sw
    my = sum(wi * yi for wi, yi in zip(w, y, strict=True)) / sw
    sxx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x, strict=True))
    slope = (
        sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y, strict=True)) / sxx if sxx > 0 else 0.0
    )
    return [my + slope * (xi - mx) for xi in x]


def _ramp_fit(
    xs: list[float], ys: list[float], ws: list[float], aligned: list[bool], lo: int, hi: int
) -> tuple[list[float], list[float]]:
    """The ramp through points lo..hi - 1: its weighted least-squares line, and the fit it gets,
    which is that line less one offset at the aligned counts where the ramp holds at least one of
    them and three others and its own scatter puts the offset more than two standard errors above
    0 (else the line itself).

    The offset is the weighted regression of the line's residuals on the aligned marks' own
    residuals from a line (the marks with the line projected out): the same estimate and
    standard error as a least-squares fit of the line and the offset together."""
    line = _line(xs, ys, ws, lo, hi)
    marks = [float(a) for a in aligned[lo:hi]]
    if sum(marks) < 1 or len(marks) - sum(marks) < 3:
        return line, line
    w = ws[lo:hi]
    spread = [m - f for m, f in zip(marks, _line(xs[lo:hi], marks, w, 0, len(w)), strict=True)]
    residual = [y - f for y, f in zip(ys[lo:hi], line, strict=True)]
    den = sum(wi * u * u for wi, u in zip(w, spread, strict=True))
    if den <= 1e-12:
        return line, line
    offset = -sum(wi * u * r for wi, u, r in zip(w, spread, residual, strict=True)) / den
    scatter = sum(wi * (r + offset * u) ** 2 for wi, u, r in zip(w, spread, residual, strict=True)) / (
        len(w) - 3
    )
    level = sum(wi * yi for wi, yi in zip(w, ys[lo:hi], strict=True)) / sum(w)
    if offset <= max(2.0 * math.sqrt(max(0.0, scatter / den)), 1e-3 * abs(level)):
        return line, line
    return line, [f - offset * u for f, u in zip(line, spread, strict=True)]


def _ramps(
    xs: list[float],
    ys: list[float],
    tols: list[float],
    ws: list[float],
    aligned: list[bool],
    groups: list[list[int]],
) -> list[tuple[int, int]]:
    """The [start, stop) of each ramp: a run of adjacent groups (at least three points) whose
    neighbouring points, where two groups meet, differ by no more than the larger of their
    tolerances (no step), and that one rising line fits, every member within its own tolerance.
    Runs grow from the left, as long as both hold."""

    def joins(k: int) -> bool:  # groups k and k + 1 are neighbours on a rise within the noise
        i, j = groups[k][1] - 1, groups[k + 1][0]
        return abs(ys[j] - ys[i]) <= max(tols[i], tols[j])

    def fits(lo: int, hi: int) -> bool:
        line, fit = _ramp_fit(xs, ys, ws, aligned, lo, hi)
        return line[-1] > line[0] and all(
            abs(ys[k] - f) <= tols[k] for k, f in zip(range(lo, hi), fit, strict=True)
        )

    found, k = [], 0
    while k < len(groups):
        end = k
        while end + 1 < len(groups) and joins(end) and fits(groups[k][0], groups[end + 1][1]):
            end += 1
        lo, hi = groups[k][0], groups[end][1]
        if end > k and hi - lo >= 3:
            found.append((lo, hi))
        k = end + 1
    return found


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear interpolation at ``x`` inside [xs[0], xs[-1]] (xs ascending)."""
    if not xs[0] <= x <= xs[-1]:
        raise PomtValueError(f"cannot interpolate at {x}: outside [{xs[0]}, {xs[-1]}]")
    lo, hi = 0, len(xs) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if xs[mid] <= x:
            lo = mid
        else:
            hi = mid
    if xs[lo] == x or hi == lo:
        return float(ys[lo])
    t = (x - xs[lo]) / (xs[hi] - xs[lo])
    return float(ys[lo] + t * (ys[hi] - ys[lo]))


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Curve:
    """One curve against n, from a profile or a plain mapping: the values (median latency or
    accuracy), the tie tolerance of each (a latency's IQR, narrowed where the point was timed
    longer than most: see :func:`tie_tolerances`), its spread for plotting (IQR, or accuracy
    +- one standard error; empty when unknown) and what the profile says of N."""

    values: dict[int, float]
    noise: dict[int, float]
    spread: dict[int, tuple[float, float]]
    n_total: int | None
    model: str | None
    layer: int | None
    precision: str | None = None
    period: int = 0  # a sawtooth's period, as the profile's search found it (0: none)

    @property
    def grid(self) -> list[int]:
        return sorted(self.values)


def tie_tolerances(points: Mapping[int, TimingStats]) -> dict[int, float]:
    """Each timed point's tie tolerance for ``step_fit``: its IQR, divided by sqrt(m / m0) where
    the point holds m samples, more than the m0 that most points hold (the lower median of the
    counts).

    The IQR is the spread of single samples; it calls two points level when the profile's
    usual timing cannot tell them apart. A point timed k times as long as most (the re-timing
    pass) has a median sqrt(k) times as precise, but the same IQR: without the division,
    timing it again could never break the tie it was timed for (a gentle rise, fitted as one
    level, lends the right end the left end's speed). Points timed as long as most keep their
    IQR, so a flat noisy curve still fits as one level."""
    if not points:
        return {}
    counts = sorted(max(1, int(s.samples)) for s in points.values())
    usual = counts[(len(counts) - 1) // 2]
    return {
        n: max(0.0, s.iqr_ms) * min(1.0, math.sqrt(usual / max(1, int(s.samples)))) for n, s in points.items()
    }


def check_n(n: object, what: str) -> int:
    if not is_int(n):
        if isinstance(n, str) and n.strip().lstrip("-").isdigit():
            return int(n)
        raise PomtValueError(f"{what}: token counts must be ints, got {n!r}")
    return int(n)


def as_curve(profile: object, what: str) -> Curve:
    """A profile (anything with ``points``) or a plain ``{n: value}`` mapping."""
    values: dict[int, float] = {}
    noise: dict[int, float] = {}
    spread: dict[int, tuple[float, float]] = {}
    if isinstance(profile, Mapping):
        stats: dict[int, TimingStats] = {}
        for key, value in profile.items():
            n = check_n(key, what)
            if isinstance(value, TimingStats):
                values[n], stats[n] = value.median_ms, value
                spread[n] = (value.p25_ms, value.p75_ms)
            else:
                values[n], noise[n] = float(value), 0.0
        return Curve(values, noise | tie_tolerances(stats), spread, None, None, None)
    points = getattr(profile, "points", None)
    if points is None:
        raise PomtValueError(
            f"{what} must be a LatencyProfile/AccuracyProfile or a {{n: value}} dict, "
            f"got {type(profile).__name__}"
        )
    timed: dict[int, TimingStats] = {}
    for point in points:
        n = int(point.n)
        if hasattr(point, "median_ms"):
            values[n], timed[n] = float(point.median_ms), point
            spread[n] = (float(point.p25_ms), float(point.p75_ms))
        else:
            values[n], noise[n] = float(point.accuracy), 0.0
            spread[n] = (max(0.0, point.accuracy - point.stderr), min(1.0, point.accuracy + point.stderr))
    return Curve(
        values,
        noise | tie_tolerances(timed),
        spread,
        getattr(profile, "n_total", None),
        getattr(profile, "model", None) or None,
        getattr(profile, "layer", None),
        getattr(profile, "precision", None) or None,
        int(getattr(profile, "period", 0) or 0),
    )


def validate_curve(curve: Curve, what: str, unit_interval: bool) -> None:
    if not curve.values:
        raise PomtValueError(f"{what} is empty: it needs at least one measured token count")
    for n, v in curve.values.items():
        if n < 1:
            raise PomtValueError(f"{what}: token count {n} is not positive")
        if not math.isfinite(v):
            raise PomtValueError(f"{what}: value at n={n} is not finite ({v})")
        if unit_interval and not 0.0 <= v <= 1.0:
            raise PomtValueError(f"{what}: accuracy at n={n} is {v}; accuracies are fractions in [0, 1]")
        if not unit_interval and v <= 0:
            raise PomtValueError(f"{what}: latency at n={n} is {v} ms; latencies must be positive")
