"""Choosing R from a latency profile L(n) and an accuracy profile A(n) (METHOD.md 1.3-1.5).

``select_r`` denoises L (noise-level differences become ties, so a flat noisy curve never
yields a spurious R), makes A non-decreasing and interpolates it onto the latency grid,
and then picks the token count n* to keep in one of three modes:

- ``utility`` (default): maximise U(n) = a (1 - L/max L) + (1 - a) (A/max A);
- ``latency_budget``: the most accurate n whose latency is within the budget;
- ``accuracy_floor``: the fastest n whose accuracy reaches the floor.

Ties are broken the same way in every mode: on equal primary criterion the other criterion
decides (faster on equal accuracy, more accurate on equal latency), and on a full tie the
larger n (smaller R) wins, because pruning more tokens for nothing only costs accuracy.
R = N - n*, so that exactly n* tokens leave the pruning block (not n* + 2 as in the
authors' code).

``search_tokens`` is the fast latency search: a coarse grid over [p + 1, N] (always with
N), then bisection. Given an accuracy profile (accuracy does not depend on the device, so
it can be estimated first, elsewhere) it is a branch and bound on the utility that lands
on the full grid's n* on a staircase; without one it locates the largest steps first.
Either way it stops at a point budget (9 % of the full grid by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from pomt.timing import TimingStats

__all__ = [
    "Selection",
    "select_r",
    "step_fit",
    "isotonic_increasing",
    "interpolate",
    "utility_curve",
    "coarse_grid",
    "default_max_points",
    "search_tokens",
    "full_grid",
    "as_tokens",
]

MODES = ("utility", "latency_budget", "accuracy_floor")
_TIE_DECIMALS = 12


@dataclass(frozen=True)
class Selection:
    """The chosen token count and the curves it was chosen from.

    ``tokens`` (n*) tokens leave the pruning block when the model is pruned with ``r``
    (``tokens == tokens_total - r``). ``curve_*`` hold, per candidate n (ascending), the
    denoised latency used for the choice, the raw measured median, the accuracy used
    (made non-decreasing and interpolated) and the utility.
    """

    r: int
    tokens: int
    tokens_total: int
    mode: str
    alpha: float
    utility: float
    predicted_latency_ms: float
    predicted_accuracy: float
    measured_latency_ms: float
    layer: int | None
    latency_budget_ms: float | None
    accuracy_floor: float | None
    curve_tokens: tuple[int, ...]
    curve_latency_ms: tuple[float, ...]
    curve_raw_latency_ms: tuple[float, ...]
    curve_accuracy: tuple[float, ...]
    curve_utility: tuple[float, ...]

    @property
    def unpruned_latency_ms(self) -> float | None:
        """Denoised latency at N tokens, when N was measured."""
        if self.curve_tokens and self.curve_tokens[-1] == self.tokens_total:
            return self.curve_latency_ms[-1]
        return None

    @property
    def speedup(self) -> float | None:
        """Predicted L(N) / L(n*), when N was measured."""
        base = self.unpruned_latency_ms
        return None if base is None else base / self.predicted_latency_ms

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["speedup"] = self.speedup
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selection:
        """Inverse of ``to_dict`` (JSON lists become tuples; derived keys are ignored)."""
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data))
        if missing:
            raise ValueError(f"not a Selection: missing {', '.join(missing)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})

    def summary(self) -> str:
        """One line a person can read."""
        speed = f", speed-up x{self.speedup:.3f}" if self.speedup is not None else ""
        return (
            f"R={self.r} (keep {self.tokens} of {self.tokens_total} tokens) mode={self.mode} "
            f"alpha={self.alpha:g} utility={self.utility:.4f} latency={self.predicted_latency_ms:.3f} ms "
            f"accuracy={self.predicted_accuracy:.4f}{speed}"
        )


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
        raise ValueError("step_fit: values and noise differ in length")
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
        raise ValueError(f"cannot interpolate at {x}: outside [{xs[0]}, {xs[-1]}]")
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


def utility_curve(latency: Sequence[float], accuracy: Sequence[float], alpha: float) -> list[float]:
    """U(n) = alpha (1 - L/max L) + (1 - alpha) (A/max A), point by point."""
    max_l = max(latency)
    max_a = max(accuracy)
    if max_l <= 0:
        raise ValueError("latency values must be positive")
    return [
        alpha * (1.0 - lat / max_l) + (1.0 - alpha) * (acc / max_a if max_a > 0 else 0.0)
        for lat, acc in zip(latency, accuracy, strict=True)
    ]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Curve:
    values: dict[int, float]
    noise: dict[int, float]
    tokens_total: int | None
    model: str | None
    layer: int | None


def _check_tokens(n: object, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        if isinstance(n, str) and n.strip().lstrip("-").isdigit():
            return int(n)
        raise ValueError(f"{what}: token counts must be ints, got {n!r}")
    return int(n)


def _as_curve(profile: object, what: str) -> _Curve:
    """A profile (anything with ``points``) or a plain ``{tokens: value}`` mapping."""
    if isinstance(profile, Mapping):
        values, noise = {}, {}
        for key, value in profile.items():
            n = _check_tokens(key, what)
            if isinstance(value, TimingStats):
                values[n], noise[n] = value.median_ms, value.iqr_ms
            else:
                values[n], noise[n] = float(value), 0.0
        return _Curve(values, noise, None, None, None)
    points = getattr(profile, "points", None)
    if points is None:
        raise ValueError(
            f"{what} must be a LatencyProfile/AccuracyProfile or a {{tokens: value}} dict, "
            f"got {type(profile).__name__}"
        )
    values, noise = {}, {}
    for point in points:
        n = int(point.tokens)
        if hasattr(point, "median_ms"):
            values[n], noise[n] = float(point.median_ms), float(point.p75_ms - point.p25_ms)
        else:
            values[n], noise[n] = float(point.accuracy), 0.0
    return _Curve(
        values,
        noise,
        getattr(profile, "tokens_total", None),
        getattr(profile, "model", None) or None,
        getattr(profile, "layer", None),
    )


def _validate(curve: _Curve, what: str, unit_interval: bool) -> None:
    if not curve.values:
        raise ValueError(f"{what} is empty: it needs at least one measured token count")
    for n, v in curve.values.items():
        if n < 1:
            raise ValueError(f"{what}: token count {n} is not positive")
        if not math.isfinite(v):
            raise ValueError(f"{what}: value at n={n} is not finite ({v})")
        if unit_interval and not 0.0 <= v <= 1.0:
            raise ValueError(f"{what}: accuracy at n={n} is {v}; accuracies are fractions in [0, 1]")
        if not unit_interval and v <= 0:
            raise ValueError(f"{what}: latency at n={n} is {v} ms; latencies must be positive")


# --------------------------------------------------------------------------- selection


def select_r(
    lat: object,
    acc: object,
    alpha: float = 0.5,
    latency_budget_ms: float | None = None,
    accuracy_floor: float | None = None,
    *,
    tokens_total: int | None = None,
    denoise: bool = True,
    latency_tolerance_ms: float | None = None,
) -> Selection:
    """Pick R from a latency and an accuracy profile (or ``{tokens: value}`` dicts).

    Candidates are the latency profile's token counts that the accuracy profile covers
    (accuracy between its grid points is interpolated linearly). N is the profiles'
    ``tokens_total``; for plain dicts pass ``tokens_total`` or N is the largest token count
    of the latency dict. With ``denoise``, latency differences within
    ``latency_tolerance_ms`` (default: each point's measured IQR; 0 for plain numbers) are
    ties (see ``step_fit``) and accuracy is made non-decreasing in n. ``latency_budget_ms``
    and ``accuracy_floor`` (a fraction) switch to the constrained modes; giving both is an
    error. Ties are broken as the module docstring says (larger n last).
    """
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if latency_budget_ms is not None and accuracy_floor is not None:
        raise ValueError("give either latency_budget_ms or accuracy_floor, not both")
    if latency_budget_ms is not None and not latency_budget_ms > 0:
        raise ValueError(f"latency_budget_ms must be positive, got {latency_budget_ms!r}")
    if accuracy_floor is not None and not 0.0 <= accuracy_floor <= 1.0:
        raise ValueError(f"accuracy_floor is a fraction in [0, 1] (0.75 for 75 %), got {accuracy_floor!r}")
    lcurve = _as_curve(lat, "latency profile")
    acurve = _as_curve(acc, "accuracy profile")
    _validate(lcurve, "latency profile", unit_interval=False)
    _validate(acurve, "accuracy profile", unit_interval=True)
    if lcurve.model and acurve.model and lcurve.model != acurve.model:
        raise ValueError(
            f"the profiles are for different models: latency for {lcurve.model!r}, accuracy for {acurve.model!r}"
        )
    totals = {t for t in (lcurve.tokens_total, acurve.tokens_total, tokens_total) if t is not None}
    if len(totals) > 1:
        raise ValueError(
            f"the profiles disagree on N (tokens entering the blocks): latency N={lcurve.tokens_total}, "
            f"accuracy N={acurve.tokens_total}, tokens_total={tokens_total}"
        )
    n_total = totals.pop() if totals else max(lcurve.values)
    for curve, what in ((lcurve, "latency profile"), (acurve, "accuracy profile")):
        beyond = [n for n in curve.values if n > n_total]
        if beyond:
            raise ValueError(f"{what} has token counts above N={n_total}: {sorted(beyond)[:5]}")

    acc_ns = sorted(acurve.values)
    acc_vals = [acurve.values[n] for n in acc_ns]
    if denoise:
        acc_vals = isotonic_increasing(acc_vals)
    ns = [n for n in sorted(lcurve.values) if acc_ns[0] <= n <= acc_ns[-1]]
    if not ns:
        raise ValueError(
            f"no overlap: latency measured for n in [{min(lcurve.values)}, {max(lcurve.values)}], "
            f"accuracy for n in [{acc_ns[0]}, {acc_ns[-1]}]"
        )
    raw = [lcurve.values[n] for n in ns]
    if denoise:
        if latency_tolerance_ms is not None:
            noise = [float(latency_tolerance_ms)] * len(ns)
        else:
            noise = [lcurve.noise[n] for n in ns]
        lat_used = step_fit(raw, noise)
    else:
        lat_used = list(raw)
    acc_used = [interpolate(acc_ns, acc_vals, n) for n in ns]
    util = utility_curve(lat_used, acc_used, float(alpha))

    def rnd(v: float) -> float:
        return round(v, _TIE_DECIMALS)

    idx = range(len(ns))
    if latency_budget_ms is not None:
        mode = "latency_budget"
        feasible = [i for i in idx if lat_used[i] <= latency_budget_ms]
        if not feasible:
            fastest = min(idx, key=lambda i: lat_used[i])
            raise ValueError(
                f"no token count meets the latency budget of {latency_budget_ms} ms: the fastest is "
                f"{lat_used[fastest]:.4g} ms (n={ns[fastest]})"
            )
        best = max(feasible, key=lambda i: (rnd(acc_used[i]), -rnd(lat_used[i]), ns[i]))
    elif accuracy_floor is not None:
        mode = "accuracy_floor"
        feasible = [i for i in idx if acc_used[i] >= accuracy_floor]
        if not feasible:
            top = max(idx, key=lambda i: acc_used[i])
            raise ValueError(
                f"no token count reaches the accuracy floor {accuracy_floor}: the best is "
                f"{acc_used[top]:.4f} (n={ns[top]})"
            )
        best = max(feasible, key=lambda i: (-rnd(lat_used[i]), rnd(acc_used[i]), ns[i]))
    else:
        mode = "utility"
        best = max(idx, key=lambda i: (rnd(util[i]), ns[i]))
    n_star = ns[best]
    return Selection(
        r=n_total - n_star,
        tokens=n_star,
        tokens_total=n_total,
        mode=mode,
        alpha=float(alpha),
        utility=util[best],
        predicted_latency_ms=lat_used[best],
        predicted_accuracy=acc_used[best],
        measured_latency_ms=raw[best],
        layer=lcurve.layer,
        latency_budget_ms=latency_budget_ms,
        accuracy_floor=accuracy_floor,
        curve_tokens=tuple(ns),
        curve_latency_ms=tuple(lat_used),
        curve_raw_latency_ms=tuple(raw),
        curve_accuracy=tuple(acc_used),
        curve_utility=tuple(util),
    )


# --------------------------------------------------------------------------- fast search


def coarse_grid(lo: int, hi: int, points: int) -> list[int]:
    """About ``points`` token counts evenly spread over [lo, hi], both ends included."""
    if hi < lo:
        raise ValueError(f"empty token range [{lo}, {hi}]")
    if points < 2 or hi == lo:
        return sorted({lo, hi})
    step = (hi - lo) / (points - 1)
    return sorted({lo + round(i * step) for i in range(points)} | {hi})


def default_max_points(lo: int, hi: int, coarse_points: int) -> int:
    """Point budget of the default search: 9 % of the full grid (so that it takes under a tenth
    of the full grid's time at the same per-point timer settings), at least coarse + 4."""
    return max(coarse_points + 4, math.ceil(0.09 * (hi - lo + 1)))


def search_tokens(
    measure: Callable[[int], TimingStats],
    lo: int,
    hi: int,
    *,
    coarse_points: int = 9,
    max_points: int | None = None,
    accuracy: object | None = None,
    alpha: float = 0.5,
    on_point: Callable[[int, TimingStats], None] | None = None,
) -> dict[int, TimingStats]:
    """Measure L(n) where it matters: a coarse grid over [lo, hi], then refinement.

    The measured medians are step-fitted (IQR ties, see ``step_fit``) after every point.

    - Without ``accuracy``: every interval between neighbouring measured n whose fitted
      levels differ holds a step; the one with the largest jump is bisected next (ties:
      larger n first), until ``max_points`` (default ``default_max_points``) or until all
      steps are located to one token.
    - With ``accuracy`` (an accuracy profile or ``{tokens: accuracy}``; accuracy does not
      depend on the device, so it can be estimated first, elsewhere): branch and bound on
      the utility at ``alpha``. Assuming L does not decrease between two measured points
      and A does not decrease in n, no n inside (a, b) beats
      alpha (1 - L(a)/max L) + (1 - alpha) A(b - 1)/max A; intervals whose bound beats the
      best measured utility are bisected, best bound first, until none is left or the
      budget is spent. The result is the full
      grid's n* at that alpha whenever the assumptions hold and the budget suffices.

    Ranges no larger than the budget are measured in full.
    """
    if coarse_points < 2:
        raise ValueError(f"coarse_points must be >= 2, got {coarse_points}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if max_points is None:
        max_points = default_max_points(lo, hi, coarse_points)
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
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
    for n in reversed(coarse_grid(lo, hi, min(coarse_points, max_points))):
        take(n)
    while len(measured) < max_points:
        ns = sorted(measured)
        levels = step_fit([measured[n].median_ms for n in ns], [measured[n].iqr_ms for n in ns])
        if acc_at is None:
            target = _largest_jump(ns, levels)
        else:
            target = _best_bound(ns, levels, acc_at, alpha)
        if target is None:
            break
        take(target)
    return measured


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
    max_a = max(acc_at(n) for n in range(ns[0], ns[-1] + 1)) or 1.0

    def u(lat: float, acc: float) -> float:
        return alpha * (1.0 - lat / max_l) + (1.0 - alpha) * acc / max_a

    incumbent = max(round(u(lev, acc_at(n)), _TIE_DECIMALS) for n, lev in zip(ns, levels, strict=True))
    best: tuple[float, int] | None = None
    target = None
    for i in range(len(ns) - 1):
        a, b = ns[i], ns[i + 1]
        if b - a <= 1:
            continue
        bound = round(u(min(levels[i], levels[i + 1]), acc_at(b - 1)), _TIE_DECIMALS)
        if bound > incumbent and (best is None or (bound, b) > best):
            best, target = (bound, b), (a + b) // 2
    return target


def _accuracy_function(accuracy: object, lo: int, hi: int) -> Callable[[int], float]:
    """A(n) made non-decreasing and interpolated; constant beyond the measured range."""
    curve = _as_curve(accuracy, "accuracy profile")
    _validate(curve, "accuracy profile", unit_interval=True)
    xs = sorted(curve.values)
    ys = isotonic_increasing([curve.values[n] for n in xs])
    cache: dict[int, float] = {}

    def acc_at(n: int) -> float:
        if n not in cache:
            cache[n] = interpolate(xs, ys, min(max(n, xs[0]), xs[-1]))
        return cache[n]

    return acc_at


def full_grid(lo: int, hi: int) -> list[int]:
    """Every token count from ``hi`` down to ``lo`` (the authors' grid, plus N)."""
    return list(range(hi, lo - 1, -1))


def as_tokens(values: Iterable[int], lo: int, hi: int) -> list[int]:
    """Validated, de-duplicated token counts within [lo, hi], in the order given."""
    out = list(dict.fromkeys(_check_tokens(v, "tokens") for v in values))
    if not out:
        raise ValueError("tokens is empty: give at least one token count")
    bad = [n for n in out if not lo <= n <= hi]
    if bad:
        raise ValueError(f"token counts {bad[:5]} are outside the valid range {lo}..{hi} (p + 1 .. N)")
    return out
