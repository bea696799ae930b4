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

__all__ = ["Curve", "as_curve", "check_n", "validate_curve", "step_fit", "isotonic_increasing", "interpolate"]


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


def step_fit(values: Sequence[float], noise: Sequence[float]) -> list[float]:
    """Piecewise-constant fit: neighbouring levels closer than their noise are merged.

    ``values`` are medians in order of n, ``noise[i]`` the tie tolerance of point i (e.g. its
    IQR). Adjacent groups are merged, closest first, while their levels differ by no more
    than the larger of their tolerances (a group's tolerance is the lower median of its
    members'). A group's level is the mean of its members weighted by 1 / noise^2, so a
    point disturbed during its measurement (large IQR) hardly moves its step. Real steps
    and real dips larger than the noise survive; wiggles within the noise become flat, so
    they cannot make one n look faster than its neighbour.
    """
    if len(values) != len(noise):
        raise PomtValueError("step_fit: values and noise differ in length")
    groups = []  # [level, weight, count, tolerances]
    for v, t in zip(values, noise, strict=True):
        v, t = float(v), max(0.0, float(t))
        weight = 1.0 / (t * t + (1e-3 * v) ** 2 + 1e-12)
        groups.append([v, weight, 1, [t]])

    def tol(group: list) -> float:
        members = sorted(group[3])
        return members[(len(members) - 1) // 2]  # the lower median: one noisy point cannot widen it

    while len(groups) > 1:
        best_i, best_gap = -1, math.inf
        for i in range(len(groups) - 1):
            gap = abs(groups[i][0] - groups[i + 1][0])
            if gap <= max(tol(groups[i]), tol(groups[i + 1])) and gap < best_gap:
                best_i, best_gap = i, gap
        if best_i < 0:
            break
        a, b = groups[best_i], groups.pop(best_i + 1)
        a[0] = (a[0] * a[1] + b[0] * b[1]) / (a[1] + b[1])
        a[1] += b[1]
        a[2] += b[2]
        a[3] = a[3] + b[3]
    out: list[float] = []
    for level, _, count, _ in groups:
        out.extend([level] * count)
    return out


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
    accuracy), the tie tolerance of each (a latency's IQR), its spread for plotting (IQR, or
    accuracy +- one standard error; empty when unknown) and what the profile says of N."""

    values: dict[int, float]
    noise: dict[int, float]
    spread: dict[int, tuple[float, float]]
    n_total: int | None
    model: str | None
    layer: int | None
    precision: str | None = None

    @property
    def grid(self) -> list[int]:
        return sorted(self.values)


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
        for key, value in profile.items():
            n = check_n(key, what)
            if isinstance(value, TimingStats):
                values[n], noise[n] = value.median_ms, value.iqr_ms
                spread[n] = (value.p25_ms, value.p75_ms)
            else:
                values[n], noise[n] = float(value), 0.0
        return Curve(values, noise, spread, None, None, None)
    points = getattr(profile, "points", None)
    if points is None:
        raise PomtValueError(
            f"{what} must be a LatencyProfile/AccuracyProfile or a {{n: value}} dict, "
            f"got {type(profile).__name__}"
        )
    for point in points:
        n = int(point.n)
        if hasattr(point, "median_ms"):
            values[n], noise[n] = float(point.median_ms), float(point.p75_ms - point.p25_ms)
            spread[n] = (float(point.p25_ms), float(point.p75_ms))
        else:
            values[n], noise[n] = float(point.accuracy), 0.0
            spread[n] = (max(0.0, point.accuracy - point.stderr), min(1.0, point.accuracy + point.stderr))
    return Curve(
        values,
        noise,
        spread,
        getattr(profile, "n_total", None),
        getattr(profile, "model", None) or None,
        getattr(profile, "layer", None),
        getattr(profile, "precision", None) or None,
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
