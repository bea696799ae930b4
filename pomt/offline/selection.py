"""Choosing R from a latency profile L(n) and an accuracy profile A(n) (docs/method.md, section 1).

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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

from pomt.errors import PomtValueError
from pomt.offline.curves import Curve, as_curve, interpolate, isotonic_increasing, step_fit, validate_curve

__all__ = ["Selection", "select_r", "check_objective", "utility", "utility_curve"]

TIE_DECIMALS = 12


@dataclass(frozen=True)
class Selection:
    """The chosen token count and the curves it was chosen from.

    ``n_star`` (n*) tokens leave the pruning block when the model is pruned with ``r``
    (``n_star == n_total - r``). ``curve_*`` hold, per candidate n (ascending), the
    denoised latency used for the choice, the raw measured median, the accuracy used
    (made non-decreasing and interpolated) and the utility. ``n_total`` is N, the tokens
    entering the blocks (R = 0 keeps them all); ``unpruned_latency_ms`` is the latency at N.

    Two kinds of "measured": ``measured_latency_ms`` is the latency profile's raw median at
    n* (before denoising; ``level_latency_ms`` is the denoised latency the choice used, a level
    or a ramp's line, less the ramp's offset at multiples of 16 where it has one; the predicted
    speed-up, ``speedup``, and the logged ``pomt/predicted_latency_ms`` use the median),
    while ``measured_speedup`` comes from the verification after the choice (``pomt.offline.verify``:
    the pruned model timed side by side with the unpruned one). ``measured_speedup`` and
    its interval are those of the chosen R (None before verification and when R = 0 was
    kept), ``measurements`` holds ``(r, speed-up, low, high)`` of every candidate verified,
    kept or not. ``precision`` is what the latency profile was timed at.
    """

    r: int
    n_star: int
    n_total: int
    mode: str
    alpha: float
    utility: float
    level_latency_ms: float
    predicted_accuracy: float
    measured_latency_ms: float
    layer: int | None
    latency_budget_ms: float | None
    accuracy_floor: float | None
    curve_n: tuple[int, ...]
    curve_latency_ms: tuple[float, ...]
    curve_raw_latency_ms: tuple[float, ...]
    curve_accuracy: tuple[float, ...]
    curve_utility: tuple[float, ...]
    candidates: tuple[int, ...] = ()
    measured_speedup: float | None = None
    measured_speedup_interval: tuple[float, float] | None = None
    rejected: tuple[int, ...] = ()
    verification: str = ""
    measurements: tuple[tuple[int, float, float, float], ...] = ()
    precision: str | None = None
    # how often n* comes out of the profile with each point's samples resampled (pomt.offline.stability),
    # the n chosen most often otherwise, and how far its utility trails n*'s (a fraction)
    stability: float | None = None
    stability_resamples: int = 0
    runner_up: int | None = None
    runner_up_share: float | None = None
    runner_up_gap: float | None = None
    # L(n*) and L(N)/L(n*) timed afresh after the choice, before the prediction is reported
    retimed_latency_ms: float | None = None
    retimed_speedup: float | None = None

    @property
    def stability_line(self) -> str:
        """``n* = 81 (chosen in 93 % of 100 resamples; runner-up n = 96, utility within 0.2 %)``,
        or "" when the stability was not measured."""
        if self.stability is None:
            return ""
        from pomt.offline.stability import stability_text

        return stability_text(
            self.n_star,
            self.stability,
            self.stability_resamples,
            self.runner_up,
            self.runner_up_share or 0.0,
            self.runner_up_gap,
        )

    @property
    def unpruned_latency_ms(self) -> float | None:
        """Latency measured at N tokens (its median), when N was measured."""
        if self.curve_n and self.curve_n[-1] == self.n_total:
            return self.curve_raw_latency_ms[-1]
        return None

    @property
    def speedup(self) -> float | None:
        """Predicted L(N) / L(n*), when N was measured: the ratio of the two points' measured
        medians (``measured_latency_ms`` at n*).

        The denoised levels choose n*; they do not predict its speed. n* is the right end of its
        level (equal latency: the more accurate n wins), and a level that joins n* to faster
        neighbours on a gentle rise credits it with their speed: replaying the quiet curves of
        ``benchmarks/results/replay/`` (docs/profiling.md), the levels' ratio was optimistic by
        1.2-1.9 % on average, the medians' by 0.8-1.4 %."""
        base = self.unpruned_latency_ms
        return None if base is None or self.measured_latency_ms <= 0 else base / self.measured_latency_ms

    @property
    def verified(self) -> bool:
        """Whether the speed-up was measured against the unpruned model (see ``pomt.offline.verify``)."""
        return self.measured_speedup is not None

    @property
    def prediction_check(self) -> str | None:
        """One line when the profile's predicted speed-up lies outside the 95 % interval that the
        verification measured (for the kept R; when R = 0 was kept, for the first candidate
        measured), else None: the measured speed-up is then the one to believe."""
        if not self.measurements:
            return None
        kept = [m for m in self.measurements if m[0] == self.r] if self.verified else []
        r, speedup, low, high = (kept or list(self.measurements))[0]
        n = self.n_total - r
        predicted = self.at(n).speedup if n in self.curve_n else None
        if predicted is None or low <= predicted <= high:
            return None
        return (
            f"prediction off at R={r}: the latency profile predicted x{predicted:.3f}, verification measured "
            f"x{speedup:.3f} [{low:.3f}, {high:.3f}] ({predicted / speedup - 1:+.1%}); trust the measured one"
        )

    def at(self, n: int) -> Selection:
        """The same curves with ``n`` chosen instead of n* (``n`` must be on the curve)."""
        if n not in self.curve_n:
            raise PomtValueError(f"n={n} is not on the curve: {list(self.curve_n)}")
        i = self.curve_n.index(n)
        return replace(
            self,
            r=self.n_total - n,
            n_star=n,
            utility=self.curve_utility[i],
            level_latency_ms=self.curve_latency_ms[i],
            predicted_accuracy=self.curve_accuracy[i],
            measured_latency_ms=self.curve_raw_latency_ms[i],
            retimed_latency_ms=None if n != self.n_star else self.retimed_latency_ms,
            retimed_speedup=None if n != self.n_star else self.retimed_speedup,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["speedup"] = self.speedup
        out["prediction_check"] = self.prediction_check
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selection:
        """Inverse of ``to_dict`` (JSON lists become tuples; derived keys are ignored; a dict saved
        before ``level_latency_ms`` was named so holds it as ``predicted_latency_ms``)."""
        if "level_latency_ms" not in data and "predicted_latency_ms" in data:
            data = {**data, "level_latency_ms": data["predicted_latency_ms"]}
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise PomtValueError(f"not a Selection: missing {', '.join(missing)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        kwargs["measurements"] = tuple(tuple(m) for m in kwargs.get("measurements", ()))
        return cls(**kwargs)

    def summary(self) -> str:
        """One line a person can read: the prediction, and the measured speed-up when verified."""
        speed = f", speed-up x{self.speedup:.3f} predicted" if self.speedup is not None else ""
        if self.measured_speedup is not None and self.measured_speedup_interval is not None:
            low, high = self.measured_speedup_interval
            speed += f", x{self.measured_speedup:.3f} measured [{low:.3f}, {high:.3f}]"
        return (
            f"R={self.r} (keep {self.n_star} of {self.n_total} tokens) mode={self.mode} "
            f"alpha={self.alpha:g} utility={self.utility:.4f} latency={self.measured_latency_ms:.3f} ms "
            f"selection estimate A({self.n_star})={self.predicted_accuracy:.4f} ({self.n_star} random tokens, "
            f"not the pruned model's accuracy){speed}"
            + (f" (timed at {self.precision})" if self.precision else "")
            + (f"; {self.prediction_check}" if self.prediction_check else "")
            + (f"; x{self.retimed_speedup:.3f} re-timed at n*" if self.retimed_speedup is not None else "")
            + (f"; {self.stability_line}" if self.stability_line else "")
        )


# --------------------------------------------------------------------------- utility


def utility(latency: float, accuracy: float, alpha: float, max_latency: float, max_accuracy: float) -> float:
    """U = alpha (1 - L/max L) + (1 - alpha) (A/max A); the accuracy term is 0 when max A is 0.

    The one formula of the utility: the selection, the search's bound and the verification
    (with L/max L the measured 1 / speed-up) all evaluate it here."""
    accuracy_term = accuracy / max_accuracy if max_accuracy > 0 else 0.0
    return alpha * (1.0 - latency / max_latency) + (1.0 - alpha) * accuracy_term


def utility_curve(latency: Sequence[float], accuracy: Sequence[float], alpha: float) -> list[float]:
    """U(n) = alpha (1 - L/max L) + (1 - alpha) (A/max A), point by point."""
    max_l = max(latency)
    max_a = max(accuracy)
    if max_l <= 0:
        raise PomtValueError("latency values must be positive")
    return [utility(lat, acc, alpha, max_l, max_a) for lat, acc in zip(latency, accuracy, strict=True)]


# --------------------------------------------------------------------------- selection


def check_objective(alpha: object, latency_budget_ms: object, accuracy_floor: object) -> None:
    """A ValueError naming the bad value unless ``alpha`` is in [0, 1], the budget positive, the
    floor a fraction, and at most one of the two given (``select_r`` and ``SearchConfig``)."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise PomtValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if latency_budget_ms is not None and accuracy_floor is not None:
        raise PomtValueError("give either latency_budget_ms or accuracy_floor, not both")
    if latency_budget_ms is not None and not latency_budget_ms > 0:
        raise PomtValueError(f"latency_budget_ms must be positive, got {latency_budget_ms!r}")
    if accuracy_floor is not None and not 0.0 <= accuracy_floor <= 1.0:
        raise PomtValueError(
            f"accuracy_floor is a fraction in [0, 1] (0.75 for 75 %), got {accuracy_floor!r}"
        )


def _dominated(i: int, latency: list[float], accuracy: list[float]) -> bool:
    """Whether a count with more tokens than count ``i`` (counts in increasing order, values
    rounded) is no slower and no less accurate."""
    return any(latency[j] <= latency[i] and accuracy[j] >= accuracy[i] for j in range(i + 1, len(latency)))


def select_r(
    lat: object,
    acc: object,
    *,
    alpha: float = 0.5,
    latency_budget_ms: float | None = None,
    accuracy_floor: float | None = None,
    n_total: int | None = None,
    denoise: bool = True,
    latency_tolerance_ms: float | None = None,
) -> Selection:
    """Pick R from a latency and an accuracy profile (or ``{n: value}`` dicts).

    Candidates are the latency profile's token counts that the accuracy profile covers
    (accuracy between its grid points is interpolated linearly). N is the profiles'
    ``n_total``; for plain dicts pass ``n_total`` or N is the largest token count
    of the latency dict. With ``denoise``, latency differences within
    ``latency_tolerance_ms`` (default: each point's measured IQR; 0 for plain numbers) are
    ties (see ``step_fit``) and accuracy is made non-decreasing in n. ``latency_budget_ms``
    and ``accuracy_floor`` (a fraction) switch to the constrained modes; giving both is an
    error. Ties are broken as the module docstring says (larger n last). A latency profile's
    ``period`` (the sawtooth period its search detected) keeps each step out of every level
    (see ``step_fit``); plain dicts have none.
    """
    check_objective(alpha, latency_budget_ms, accuracy_floor)
    lcurve, acurve, n_total = _checked_curves(lat, acc, n_total)
    acc_ns = sorted(acurve.values)
    acc_vals = [acurve.values[n] for n in acc_ns]
    if denoise:
        acc_vals = isotonic_increasing(acc_vals)
    ns = [n for n in sorted(lcurve.values) if acc_ns[0] <= n <= acc_ns[-1]]
    if not ns:
        raise PomtValueError(
            f"no overlap: latency measured for n in [{min(lcurve.values)}, {max(lcurve.values)}], "
            f"accuracy for n in [{acc_ns[0]}, {acc_ns[-1]}]"
        )
    raw = [lcurve.values[n] for n in ns]
    if denoise:
        if latency_tolerance_ms is not None:
            noise = [float(latency_tolerance_ms)] * len(ns)
        else:
            noise = [lcurve.noise[n] for n in ns]
        lat_used = step_fit(raw, noise, ns, period=lcurve.period)
    else:
        lat_used = list(raw)
    acc_used = [interpolate(acc_ns, acc_vals, n) for n in ns]
    util = utility_curve(lat_used, acc_used, float(alpha))

    ranked = _ranked(ns, lat_used, acc_used, util, latency_budget_ms, accuracy_floor)
    mode = (
        "latency_budget"
        if latency_budget_ms is not None
        else "accuracy_floor"
        if accuracy_floor is not None
        else "utility"
    )
    best = ranked[0]
    n_star = ns[best]
    return Selection(
        r=n_total - n_star,
        n_star=n_star,
        n_total=n_total,
        mode=mode,
        alpha=float(alpha),
        utility=util[best],
        level_latency_ms=lat_used[best],
        predicted_accuracy=acc_used[best],
        measured_latency_ms=raw[best],
        layer=lcurve.layer,
        latency_budget_ms=latency_budget_ms,
        accuracy_floor=accuracy_floor,
        curve_n=tuple(ns),
        curve_latency_ms=tuple(lat_used),
        curve_raw_latency_ms=tuple(raw),
        curve_accuracy=tuple(acc_used),
        curve_utility=tuple(util),
        candidates=tuple(ns[i] for i in ranked),
        precision=lcurve.precision,
    )


def _checked_curves(lat: object, acc: object, n_total: int | None) -> tuple[Curve, Curve, int]:
    """Both profiles as curves, checked against each other (same model, same N, no n above N)."""
    lcurve = as_curve(lat, "latency profile")
    acurve = as_curve(acc, "accuracy profile")
    validate_curve(lcurve, "latency profile", unit_interval=False)
    validate_curve(acurve, "accuracy profile", unit_interval=True)
    if lcurve.model and acurve.model and lcurve.model != acurve.model:
        raise PomtValueError(
            f"the profiles are for different models: latency for {lcurve.model!r}, accuracy for {acurve.model!r}"
        )
    totals = {t for t in (lcurve.n_total, acurve.n_total, n_total) if t is not None}
    if len(totals) > 1:
        raise PomtValueError(
            f"the profiles disagree on N (tokens entering the blocks): latency N={lcurve.n_total}, "
            f"accuracy N={acurve.n_total}, n_total={n_total}"
        )
    n_total = totals.pop() if totals else max(lcurve.values)
    for curve, what in ((lcurve, "latency profile"), (acurve, "accuracy profile")):
        beyond = [n for n in curve.values if n > n_total]
        if beyond:
            raise PomtValueError(f"{what} has token counts above N={n_total}: {sorted(beyond)[:5]}")
    return lcurve, acurve, n_total


def _ranked(
    ns: list[int], lat: list[float], acc: list[float], util: list[float],
    latency_budget_ms: float | None, accuracy_floor: float | None,
) -> list[int]:  # fmt: skip
    """The feasible indices of ``ns``, best first for the objective (the first is n*, the rest
    fallbacks), without dominated fallbacks."""

    def rnd(v: float) -> float:
        return round(v, TIE_DECIMALS)

    idx = range(len(ns))
    if latency_budget_ms is not None:
        feasible = [i for i in idx if lat[i] <= latency_budget_ms]
        if not feasible:
            fastest = min(idx, key=lambda i: lat[i])
            raise PomtValueError(
                f"no token count meets the latency budget of {latency_budget_ms} ms: the fastest is "
                f"{lat[fastest]:.4g} ms (n={ns[fastest]})"
            )
        key = lambda i: (rnd(acc[i]), -rnd(lat[i]), ns[i])  # noqa: E731
    elif accuracy_floor is not None:
        feasible = [i for i in idx if acc[i] >= accuracy_floor]
        if not feasible:
            top = max(idx, key=lambda i: acc[i])
            raise PomtValueError(
                f"no token count reaches the accuracy floor {accuracy_floor}: the best is "
                f"{acc[top]:.4f} (n={ns[top]})"
            )
        key = lambda i: (-rnd(lat[i]), rnd(acc[i]), ns[i])  # noqa: E731
    else:
        feasible, key = list(idx), lambda i: (rnd(util[i]), ns[i])  # noqa: E731
    ranked = sorted(feasible, key=key, reverse=True)
    # no dominated fallback (a count with more tokens is no slower and no less accurate: with the
    # denoised, non-decreasing accuracy, any count with more tokens that is no slower): the
    # objective never prefers one, so n* is never one, and the verification does not time them
    rounded = [rnd(v) for v in lat], [rnd(v) for v in acc]
    return [ranked[0]] + [i for i in ranked[1:] if not _dominated(i, *rounded)]
