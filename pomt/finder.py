"""POMT's whole offline step in one call: ``find_r(model, data, ...)`` -> the selection and both profiles.

Accuracy first (it does not depend on the device, and it guides the latency search), then
latency on the device, then the choice of R. Profiles saved by an earlier call are reused
where they are valid for this model and setup. Lightning's callback, the evaluation sweep
and the command-line tools all go through here, with their settings in one
:class:`SearchConfig`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pomt.measure import estimate_accuracy, model_name, profile_latency
from pomt.models import find_vit, token_layout
from pomt.profiles import AccuracyProfile, LatencyProfile
from pomt.selection import Selection, select_r

__all__ = ["SearchConfig", "Search", "find_r", "LATENCY_SETTINGS"]

# The SearchConfig fields that pomt.profile_latency takes under the same names.
LATENCY_SETTINGS = (
    "grid",
    "alpha",
    "warmup",
    "min_run_time",
    "cuda_graphs",
    "relative",
    "coarse_points",
    "max_points",
)


def _positive(name: str, value: object, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


@dataclass(frozen=True)
class SearchConfig:
    """How R is chosen: the objective, and how L(n) and A(n) are measured.

    Objective: maximise U(n) = alpha (1 - L/max L) + (1 - alpha) A/max A, or, with
    ``latency_budget_ms``, the most accurate n within the budget, or, with
    ``accuracy_floor`` (a fraction), the fastest n that reaches it.

    Latency: ``grid`` (token counts to time) or the adaptive search (``coarse_points``,
    ``max_points``); ``min_run_time`` seconds and ``warmup`` untimed calls per point;
    ``cuda_graphs`` times graph replays on CUDA; ``relative`` pairs every call with the
    unpruned model (robust to a drifting machine).

    Accuracy: ``accuracy_samples`` images (seeded by ``seed``, class-balanced), at
    ``accuracy_grid`` (default: 16 token counts), in batches of ``accuracy_batch_size``.
    """

    alpha: float = 0.5
    latency_budget_ms: float | None = None
    accuracy_floor: float | None = None
    grid: tuple[int, ...] | None = None
    coarse_points: int = 9
    max_points: int | None = None
    min_run_time: float = 0.2
    warmup: int = 3
    cuda_graphs: bool = False
    relative: bool = False
    accuracy_samples: int = 1024
    accuracy_grid: tuple[int, ...] | None = None
    accuracy_batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not 0 <= self.alpha <= 1
        ):
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.latency_budget_ms is not None and self.accuracy_floor is not None:
            raise ValueError("give either latency_budget_ms or accuracy_floor, not both")
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise ValueError(f"latency_budget_ms must be positive, got {self.latency_budget_ms!r}")
        if self.accuracy_floor is not None and not 0 <= self.accuracy_floor <= 1:
            raise ValueError(
                f"accuracy_floor is a fraction in [0, 1] (0.75 for 75 %), got {self.accuracy_floor!r}"
            )
        if not self.min_run_time >= 0:
            raise ValueError(f"min_run_time must be >= 0, got {self.min_run_time!r}")
        if self.coarse_points < 2:
            raise ValueError(f"coarse_points must be >= 2, got {self.coarse_points!r}")
        _positive("max_points", self.max_points)
        _positive("accuracy_samples", self.accuracy_samples, allow_none=False)
        _positive("accuracy_batch_size", self.accuracy_batch_size)
        for name in ("grid", "accuracy_grid"):  # lists from YAML or JSON become tuples
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    @property
    def utility_mode(self) -> bool:
        return self.latency_budget_ms is None and self.accuracy_floor is None

    def latency_kwargs(self, accuracy: AccuracyProfile | None = None) -> dict[str, Any]:
        """Keyword arguments of :func:`pomt.profile_latency` (guided by ``accuracy`` in utility mode)."""
        kwargs = {name: getattr(self, name) for name in LATENCY_SETTINGS}
        kwargs["accuracy"] = accuracy if self.utility_mode else None
        return kwargs

    def accuracy_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`pomt.estimate_accuracy`."""
        return dict(
            num_samples=self.accuracy_samples,
            grid=self.accuracy_grid,
            seed=self.seed,
            batch_size=self.accuracy_batch_size,
        )

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown search settings {unknown}; valid: {', '.join(sorted(names))}")
        return cls(**data)


@dataclass(frozen=True)
class Search:
    """What :func:`find_r` found: the selection, the two profiles it was made from, and one
    line per profile saying whether it was measured or reused (and why)."""

    selection: Selection
    latency: LatencyProfile
    accuracy: AccuracyProfile
    notes: tuple[str, ...] = field(default=())


def _dtype_of(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _load(kind: type, path: Path, expect: dict[str, Any]) -> tuple[Any, str]:
    """The profile at ``path`` when it matches ``expect``; else None and the reason."""
    try:
        return kind.load(path, expect=expect), f"reusing the {kind.kind} profile {path}"
    except ValueError as err:
        return None, f"not reusing {path}: {err}"


def find_r(
    model: nn.Module,
    data: object | None = None,
    *,
    layer: int = 3,
    batch_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    config: SearchConfig | None = None,
    vit: nn.Module | None = None,
    latency_path: str | os.PathLike[str] | None = None,
    accuracy_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[str], object] = print,
) -> Search:
    """Choose R for ``model`` (or the ViT inside it) on ``device`` at ``batch_size``.

    ``data``: labelled images for the accuracy estimate (a Dataset or DataLoader of
    ``(image, label)``); it may be None when ``accuracy_path`` holds a valid profile.
    ``dtype``: the latency profile's dtype (default: the model's). ``latency_path`` and
    ``accuracy_path``: JSON files reused when they hold a profile valid for this setup
    (latency: same model, device, batch size, dtype and layer; accuracy: same model and
    token count), written otherwise; ``log`` receives one line for each decision.
    """
    config = config or SearchConfig()
    if vit is None:
        vit = find_vit(model)[1]
    device = torch.device(device) if device is not None else _device_of(model)
    dtype = dtype if dtype is not None else _dtype_of(vit)
    name = model_name(vit)
    notes: list[str] = []

    accuracy = None
    if accuracy_path is not None and Path(accuracy_path).is_file():
        expect = dict(model=name, n_total=token_layout(vit).n_total)
        accuracy, note = _load(AccuracyProfile, Path(accuracy_path), expect)
        notes.append(note)
    if accuracy is None:
        if data is None:
            raise ValueError(
                "find_r needs labelled data for the accuracy estimate (a Dataset or DataLoader of "
                "(image, label)), or accuracy_path pointing to a saved accuracy profile"
            )
        accuracy = estimate_accuracy(
            model, data, vit=vit, device=device, progress=progress, **config.accuracy_kwargs()
        )
        notes.append(
            f"estimated accuracy at {len(accuracy.points)} token counts on {accuracy.num_samples} images"
        )
        if accuracy_path is not None:
            accuracy.save(accuracy_path)

    latency = None
    if latency_path is not None and Path(latency_path).is_file():
        expect = dict(model=name, device=device, batch_size=batch_size, dtype=dtype, layer=layer)
        latency, note = _load(LatencyProfile, Path(latency_path), expect)
        notes.append(note)
    if latency is None:
        latency = profile_latency(
            model,
            batch_size=batch_size,
            device=device,
            layer=layer,
            dtype=dtype,
            vit=vit,
            progress=progress,
            **config.latency_kwargs(accuracy),
        )
        notes.append(f"measured latency at {len(latency.points)} token counts ({latency.search})")
        if latency_path is not None:
            latency.save(latency_path)
    for note in notes:
        log(note)
    return Search(config.select(latency, accuracy), latency, accuracy, tuple(notes))
