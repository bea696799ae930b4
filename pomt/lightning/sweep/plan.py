"""What global rank 0 decides for one batch size and every rank then runs: the :class:`Plan`.

Rank 0, in each runtime, chooses R (or reuses the search), fixes the configurations, times
them side by side (or reuses the timing); then it looks up which accuracy records are still valid; the plan is
written to the run directory (``ready.json``), where the other ranks read it, so that all
ranks test the same configurations in the same order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from pomt.errors import PomtValueError
from pomt.lightning.sweep.configurations import Configuration, configurations, time_configurations
from pomt.lightning.sweep.context import SweepRun, test_batches, test_images
from pomt.lightning.sweep.healing import heal_conditions
from pomt.lightning.sweep.runtimes import RuntimeRun
from pomt.lightning.sweep.settings import SweepSettings
from pomt.offline.finder import Console, Reuse, SearchResult, find_r
from pomt.timing import TimingStats

__all__ = ["Plan", "Tested", "Timed", "make_plan", "accuracy_record", "load_tested"]


@dataclass(frozen=True)
class Timed:
    """One configuration's side-by-side latency in one runtime, how it was timed (``eager``,
    ``cuda_graphs``, or why it fell back to eager calls; for an export, its check) and, in a
    runtime that computes in another precision than fp32, its accuracy measured there
    (``accuracy``: ``acc1``, ``acc5``, ``images``)."""

    stats: TimingStats
    mode: str
    accuracy: dict[str, float] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Timed:
        stats = {k: v for k, v in data.items() if k not in ("mode", "accuracy")}
        return cls(TimingStats(**stats), str(data["mode"]), data.get("accuracy"))

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.accuracy is None else {"accuracy": dict(self.accuracy)}
        return {**self.stats.to_dict(), "mode": self.mode, **extra}


@dataclass(frozen=True)
class Tested:
    """One configuration's accuracy record: the test metrics, how long the test took (healing
    included) and, for a healed configuration, how long its fine-tuning took (``heal_s``)."""

    metrics: dict[str, float]
    wall_s: float
    heal_s: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tested:
        heal_s = data.get("heal_s")
        return cls(
            {k: float(v) for k, v in data["metrics"].items()},
            float(data["wall_s"]),
            None if heal_s is None else float(heal_s),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "wall_s": self.wall_s, "heal_s": self.heal_s}


@dataclass(frozen=True)
class Plan:
    """One batch size of the sweep: per runtime, its configurations in order (POMT at the R
    chosen in it, ToMe and Top-K matched to it) and their latency there (by
    ``Configuration.key``), and the accuracy records a rerun reuses (``done``, by key)."""

    batch_size: int
    runs: dict[str, list[Configuration]]
    latency: dict[str, dict[str, Timed]]
    done: dict[str, Tested]

    @property
    def configs(self) -> list[Configuration]:
        """Every configuration of every runtime, once (its accuracy is tested once)."""
        unique: dict[str, Configuration] = {}
        for configs in self.runs.values():
            for config in configs:
                unique.setdefault(config.key, config)
        return list(unique.values())

    @property
    def to_test(self) -> list[Configuration]:
        """The configurations whose accuracy is still to be measured."""
        return [c for c in self.configs if c.key not in self.done]

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "runs": {
                name: [[c.method, c.r, c.selected, c.heal_epochs] for c in configs]
                for name, configs in self.runs.items()
            },
            "latency": {
                name: {key: timed.to_dict() for key, timed in latency.items()}
                for name, latency in self.latency.items()
            },
            "done": {key: tested.to_dict() for key, tested in self.done.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return cls(
            batch_size=int(data["batch_size"]),
            runs={
                name: [Configuration(m, int(r), bool(s), int(h)) for m, r, s, h in configs]
                for name, configs in data["runs"].items()
            },
            latency={
                name: {key: Timed.from_dict(value) for key, value in latency.items()}
                for name, latency in data["latency"].items()
            },
            done={key: Tested.from_dict(value) for key, value in data["done"].items()},
        )


# --------------------------------------------------------------------------- rank 0 plans


def make_plan(sweep: SweepRun, settings: SweepSettings, batch_size: int) -> Plan:
    """Rank 0: in each runtime, this batch size's search, configurations and timing (reused or
    measured, each runtime on its own); then the accuracy records still valid."""
    runs, latency = {}, {}
    for runtime in sweep.runtimes.values():
        folder = runtime.folder(sweep.folder(batch_size))
        search = _search(sweep, settings, runtime, batch_size, folder) if "pomt" in settings.methods else None
        if search is not None:
            sweep.result.searches.setdefault(runtime.name, {})[batch_size] = search
        r = None if search is None else search.selection.r
        explicit = {"tome": settings.tome_r, "topk": settings.topk_r}
        configs = configurations(
            sweep.vit, settings.methods, r, settings.layer, settings.span, explicit, settings.heal_epochs
        )
        timed = _time(sweep, settings, runtime, batch_size, [c for c in configs if not c.heal_epochs])
        runs[runtime.name] = [c for c in configs if c.base.key in timed]  # (one it cannot compile: left out)
        latency[runtime.name] = timed
    plan = Plan(batch_size, runs, latency, {})
    done = {c.key: tested for c in plan.configs if (tested := load_tested(sweep, settings, c)) is not None}
    return replace(plan, done=done)


def _search(
    sweep: SweepRun, settings: SweepSettings, runtime: RuntimeRun, batch_size: int, folder: Path
) -> SearchResult:
    """POMT's R at this batch size in ``runtime``: the stored search when still valid, else
    :func:`find_r`."""
    valid_for = runtime.conditions | {"batch_size": batch_size, "search": settings.search.to_dict()}
    stored = sweep.run_dir.load(folder / "search.json", valid_for, f"the {runtime.name} search")
    if stored is not None:
        return SearchResult.from_dict(stored)
    rank_zero_info(f"selecting R in {runtime.name} on this device at batch size {batch_size}")
    search = _find_r(sweep, settings, runtime, batch_size, folder)
    sweep.run_dir.save(folder / "search.json", valid_for, search.to_dict())
    return search


def _find_r(
    sweep: SweepRun, settings: SweepSettings, runtime: RuntimeRun, batch_size: int, folder: Path
) -> SearchResult:
    """:func:`pomt.find_r` on the datamodule's holdout split, on ``runtime``'s Target (the
    Trainer's device and precision where it leaves them open), with the profiles kept in the
    run directory (the accuracy profile, PyTorch's, shared by the runtimes)."""
    holdout_loader = getattr(sweep.datamodule, "holdout_dataloader", None)
    if not callable(holdout_loader):
        raise PomtValueError(
            f"{type(sweep.datamodule).__name__} has no holdout_dataloader() to estimate A(n) on"
        )
    sweep.model.to(sweep.device).eval()
    reuse = Reuse(
        latency_path=folder / "latency_profile.json",
        accuracy_path=sweep.run_dir.root / "accuracy_profile.json",
    )
    console = Console(log=rank_zero_info, progress=sweep.trainer.progress_bar_callback is not None)
    target = dataclasses.replace(runtime.target, batch_size=batch_size)
    with sweep.trainer.precision_plugin.forward_context():
        return find_r(
            sweep.model, holdout_loader(), target, layer=settings.layer, search=settings.search,
            vit=sweep.vit, reuse=reuse, console=console,
        )  # fmt: skip


def _time(
    sweep: SweepRun,
    settings: SweepSettings,
    runtime: RuntimeRun,
    batch_size: int,
    configs: list[Configuration],
) -> dict[str, Timed]:
    """The side-by-side latency of ``configs`` in ``runtime`` on one test batch (stored, or
    timed now); in a runtime that computes in another precision, with their accuracy there."""
    path = runtime.folder(sweep.folder(batch_size)) / "timing.json"
    valid_for = runtime.conditions | {
        "batch_size": batch_size,
        "timing": runtime.how_timed,
        "configs": [c.key for c in configs],
    }
    if runtime.own_accuracy:  # its accuracy is measured with the timing
        valid_for |= {"limit_test_batches": settings.limit_test_batches}
    stored = sweep.run_dir.load(path, valid_for, f"the {runtime.name} timing")
    if stored is None:
        how = settings.side_by_side
        rank_zero_info(
            f"timing {len(configs)} configurations side by side in {runtime.name} ({how.rounds} rounds)"
        )
        batches = (
            test_batches(sweep.datamodule, settings.limit_test_batches) if runtime.own_accuracy else None
        )
        with sweep.trainer.precision_plugin.forward_context():
            images = test_images(sweep.datamodule)
            stored = time_configurations(
                sweep.model,
                sweep.vit,
                images,
                configs,
                layer=settings.layer,
                target=runtime.target,
                how=how,
                accuracy_on=batches,
            )
        sweep.run_dir.save(path, valid_for, stored)
    return {key: Timed.from_dict(value) for key, value in stored.items()}


def accuracy_record(
    sweep: SweepRun, settings: SweepSettings, config: Configuration
) -> tuple[Path, dict[str, Any]]:
    """Where one configuration's accuracy record lives, and what it is valid for: the run's
    conditions, the test limit, the method and r (accuracy does not depend on the batch size),
    and for a healed configuration how it was fine-tuned (``pomt.lightning.sweep.healing``)."""
    valid_for = sweep.conditions | {
        "limit_test_batches": settings.limit_test_batches,
        "method": config.method,
        "r": config.r,
    }
    if config.heal_epochs:
        valid_for |= heal_conditions(sweep, settings, config)
    return sweep.run_dir.root / "results" / f"{config.key}.json", valid_for


def load_tested(sweep: SweepRun, settings: SweepSettings, config: Configuration) -> Tested | None:
    """The accuracy record of ``config`` when it is still valid (else None, with the reason said)."""
    stored = sweep.run_dir.load(*accuracy_record(sweep, settings, config), config.label)
    return None if stored is None else Tested.from_dict(stored)
