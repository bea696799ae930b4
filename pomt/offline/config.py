"""How R is chosen (:class:`SearchConfig`): the objective, which token counts are timed, how
A(n) is estimated and how the choice is verified; one frozen object that the command-line
tools, ``find_r``, the callback and the sweep all read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from pomt.errors import PomtTypeError, PomtValueError, is_fraction, is_int
from pomt.offline.profiles import AccuracyProfile, LatencyProfile
from pomt.offline.selection import Selection, check_objective, select_r
from pomt.timing import MIN_RUN_TIME, Timing

__all__ = ["SearchConfig"]


def _plain(value: Any) -> Any:
    """A config value with OmegaConf's list containers as plain lists."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, tuple, list)):
        return [_plain(v) for v in value]
    return value


def _positive(name: str, value: object, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not is_int(value) or value < 1:
        raise PomtValueError(
            f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}"
        )


@dataclass(frozen=True)
class SearchConfig:
    """How R is chosen: the objective, and how L(n) and A(n) are measured.

    Objective: maximise U(n) = alpha (1 - L/max L) + (1 - alpha) A/max A, or, with
    ``latency_budget_ms``, the most accurate n within the budget, or, with
    ``accuracy_floor`` (a fraction), the fastest n that reaches it.

    Latency: ``grid`` (token counts to time) or the adaptive grid (``coarse_points``,
    ``max_points``; ``period``: a sawtooth's period in n, ``"auto"`` to detect one, None for
    none, see ``pomt.offline.grid.adaptive_grid``); how each point is timed is :attr:`timing`
    (``min_run_time`` seconds and ``warmup`` untimed calls per point; ``relative`` pairs every
    call with the unpruned model, which cancels a drifting machine; default: on the CPU, not on
    CUDA). Where and how the model runs (CUDA graphs, a runtime) is a ``pomt.Target``'s.

    Accuracy: ``accuracy_samples`` images (seeded by ``seed``, class-balanced), at
    ``accuracy_grid`` (default: ``accuracy_points`` token counts), in batches of
    ``accuracy_batch_size`` read by ``accuracy_workers`` DataLoader workers.

    Verification (``verify``, on by default; see ``pomt.offline.verify``): the chosen R is timed
    against the unpruned model, call by call, in groups of pairs: a first round of
    ``verify_groups`` groups (never fewer than ``verify_pairs`` pairs, at least one per group),
    then more groups until the interval is decided or a cap is reached (``verify_max_time``
    seconds, ``verify_max_pairs`` pairs, None for no pair cap, per candidate); R is kept only if it is
    significantly faster over the groups (and, in utility mode, its measured utility beats
    R = 0), else the next of up to ``verify_candidates`` candidates is tried, down to R = 0.

    :meth:`coerce` makes one from a mapping (a dict, or a Hydra/OmegaConf ``DictConfig``),
    rejecting unknown keys.
    """

    alpha: float = 0.5
    latency_budget_ms: float | None = None
    accuracy_floor: float | None = None
    grid: tuple[int, ...] | None = None
    coarse_points: int = 9
    max_points: int | None = None
    period: int | str | None = "auto"
    min_run_time: float = MIN_RUN_TIME
    warmup: int = 3
    relative: bool | None = None
    accuracy_samples: int = 1024
    accuracy_grid: tuple[int, ...] | None = None
    accuracy_batch_size: int | None = None
    accuracy_points: int = 16
    accuracy_workers: int = 0
    seed: int = 0
    verify: bool = True
    verify_pairs: int = 6
    verify_max_time: float = 30.0
    verify_max_pairs: int | None = None
    verify_candidates: int = 3
    verify_groups: int = 6
    retime_points: int = 96  # most timings spent after the adaptive grid where they decide n* (0: none)
    retime_tolerance: float = 0.005  # re-timing stops once no rival can beat n* by more (of its utility)
    stability_resamples: int = 100  # bootstrap resamples of the profile for the stability figure (0: none)

    @classmethod
    def coerce(cls, value: SearchConfig | Mapping[str, Any] | None) -> SearchConfig:
        """``value`` as a SearchConfig: itself, the defaults for None, or one built from a mapping
        (a dict, or a Hydra/OmegaConf ``DictConfig``; a ``_target_`` naming SearchConfig is
        dropped). Unknown keys are a ValueError listing the valid ones."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise PomtTypeError(
                f"search must be a SearchConfig or a mapping of its fields, got {type(value).__name__}"
            )
        data = {str(k): _plain(v) for k, v in value.items()}
        target = data.pop("_target_", None)
        if target is not None and str(target).rsplit(".", 1)[-1] != cls.__name__:
            raise PomtValueError(f"search: _target_ {target!r} is not pomt.SearchConfig")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise PomtValueError(
                f"search: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}"
            )
        return cls(**data)

    def __post_init__(self) -> None:
        check_objective(self.alpha, self.latency_budget_ms, self.accuracy_floor)
        if not self.min_run_time >= 0:
            raise PomtValueError(f"min_run_time must be >= 0, got {self.min_run_time!r}")
        if self.coarse_points < 2:
            raise PomtValueError(f"coarse_points must be >= 2, got {self.coarse_points!r}")
        _positive("max_points", self.max_points)
        if self.period not in ("auto", None) and (
            isinstance(self.period, bool) or not isinstance(self.period, int)
        ):
            raise PomtValueError(f"period must be 'auto', None or an int (16), got {self.period!r}")
        _positive("accuracy_samples", self.accuracy_samples, allow_none=False)
        _positive("accuracy_batch_size", self.accuracy_batch_size)
        _positive("accuracy_points", self.accuracy_points, allow_none=False)
        if not is_int(self.accuracy_workers) or self.accuracy_workers < 0:
            raise PomtValueError(f"accuracy_workers must be an int >= 0, got {self.accuracy_workers!r}")
        _positive("verify_pairs", self.verify_pairs, allow_none=False)
        _positive("verify_candidates", self.verify_candidates, allow_none=False)
        _positive("verify_groups", self.verify_groups, allow_none=False)
        if not is_fraction(self.retime_tolerance):
            raise PomtValueError(
                f"retime_tolerance must be a fraction in [0, 1), got {self.retime_tolerance!r}"
            )
        for name in ("retime_points", "stability_resamples"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise PomtValueError(f"{name} must be a non-negative int, got {getattr(self, name)!r}")
        _positive("verify_max_pairs", self.verify_max_pairs)
        if not self.verify_max_time >= 0:
            raise PomtValueError(f"verify_max_time must be >= 0 seconds, got {self.verify_max_time!r}")
        for name in ("grid", "accuracy_grid"):  # lists from YAML or JSON become tuples
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    @property
    def utility_mode(self) -> bool:
        return self.latency_budget_ms is None and self.accuracy_floor is None

    @property
    def timing(self) -> Timing:
        """How each latency point is timed (``warmup``, ``min_run_time``, ``relative``)."""
        return Timing(warmup=self.warmup, min_run_time=self.min_run_time, relative=self.relative)

    def verify_budget(self) -> dict[str, Any]:
        """Keyword arguments of :func:`pomt.offline.verify.paired_speedups`: the minimum and the cap."""
        return dict(
            min_pairs=self.verify_pairs, groups=self.verify_groups, max_time=self.verify_max_time,
            max_pairs=self.verify_max_pairs,
        )  # fmt: skip

    def select(self, latency: LatencyProfile, accuracy: AccuracyProfile) -> Selection:
        """R from the two profiles with this objective (cheap: reused profiles are re-selected)."""
        return select_r(
            latency,
            accuracy,
            alpha=self.alpha,
            latency_budget_ms=self.latency_budget_ms,
            accuracy_floor=self.accuracy_floor,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
