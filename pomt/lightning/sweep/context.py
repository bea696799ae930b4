"""What one run of the sweep carries from step to step (:class:`SweepRun`), what it returns
(:class:`TradeoffResult`), and the sweep's one test limit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

from pomt.data import split_batch
from pomt.errors import PomtValueError, is_int
from pomt.lightning.sweep.report import ReportRow
from pomt.lightning.sweep.rundir import RunDir
from pomt.lightning.sweep.runtimes import RuntimeRun
from pomt.offline.finder import SearchResult

__all__ = [
    "RunState",
    "SweepRun",
    "TradeoffResult",
    "check_limit",
    "no_trainer_limit",
    "test_batches",
    "test_images",
]


@dataclass
class TradeoffResult:
    """What a sweep returns: the report rows (global rank 0; empty on the other ranks) and where
    the report, plot and W&B runs are."""

    rows: list[ReportRow]
    out_dir: Path
    csv_path: Path | None = None
    json_path: Path | None = None
    plot_path: Path | None = None
    searches: dict[str, dict[int, SearchResult]] = field(
        default_factory=dict
    )  # per runtime and batch size (rank 0)
    wandb_dirs: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)  # configurations whose accuracy was reused
    reused_healed: list[str] = field(default_factory=list)  # healed weights loaded, not trained again


@dataclass
class RunState:
    """What changes while one sweep runs (besides its :class:`TradeoffResult`): the progress
    bar, the seconds spent healing, and whether W&B logs offline (it falls back to offline
    when online logging has no credentials)."""

    wandb_offline: bool
    bar: Any = None
    heal_s: float = 0.0  # seconds spent healing (and testing healed rows) in this run


@dataclass(frozen=True)
class SweepRun:
    """What every step of one run of the sweep works with, fixed when the run starts; what
    changes is in ``result`` (what the sweep returns) and ``state``.

    ``trainer`` is the Trainer built once for the device and precision (rank 0 measures
    with it); ``conditions`` what every accuracy record of this run is valid for (see
    ``pomt.lightning.sweep.rundir``); ``runtimes`` each runtime's own conditions and how it times
    (``pomt.lightning.sweep.runtimes``), in the order given;
    ``per_batch_size``: each batch size has its own folder ``bs<B>/``; ``heal_batch_size``: the
    batch size the run started with, at which every configuration heals.
    """

    model: pl.LightningModule
    vit: nn.Module
    datamodule: Any
    trainer_factory: Callable[..., pl.Trainer]
    trainer: pl.Trainer
    run_dir: RunDir
    conditions: dict[str, Any]
    runtimes: dict[str, RuntimeRun]
    group: str
    per_batch_size: bool
    result: TradeoffResult
    state: RunState
    heal_batch_size: int | None = None  # the batch size every configuration heals at

    @property
    def how_timed(self) -> dict[str, str]:
        """How each runtime times every configuration, in words."""
        return {name: runtime.how_timed for name, runtime in self.runtimes.items()}

    @property
    def zero(self) -> bool:
        return self.run_dir.rank_zero

    @property
    def device(self) -> Any:
        return self.trainer.strategy.root_device

    def folder(self, batch_size: int) -> Path:
        return self.run_dir.folder(batch_size, self.per_batch_size)


def test_images(datamodule: Any) -> Any:
    """The images of the first test batch (timed side by side, and shown in the token maps)."""
    return split_batch(next(iter(datamodule.test_dataloader())))[0]


def test_batches(datamodule: Any, limit: float | int | None) -> list[tuple[Any, Any]]:
    """The (images, labels) test batches that ``limit`` (the sweep's test limit) tests on, as
    Lightning counts them (a fraction: at least one batch)."""
    import math

    loader = datamodule.test_dataloader()
    total = len(loader)
    count = total if limit is None else (limit if is_int(limit) else max(1, math.floor(limit * total)))
    out = []
    for index, batch in enumerate(loader):
        if index >= count:
            break
        images, labels = split_batch(batch)[:2]
        out.append((images, labels))
    return out


def check_limit(limit: float | int | None) -> float | int | None:
    """The sweep's test limit, or None for every test batch (a fraction of 1.0 included, so
    that "all" has one form in what a rerun compares)."""
    if limit is None:
        return None
    if isinstance(limit, float) and limit > 1 and limit.is_integer():
        limit = int(limit)  # "2" read as 2.0 by a parser that tries float first: two batches
    fraction = isinstance(limit, float) and 0 < limit <= 1
    count = is_int(limit) and limit >= 1
    if not (fraction or count):
        raise PomtValueError(
            f"limit_test_batches must be a fraction in (0, 1] or a number of batches >= 1, got {limit!r}"
        )
    return None if fraction and limit == 1.0 else limit


def no_trainer_limit(limit: float | int | None) -> None:
    """The sweep has one test limit, keyed in what a rerun reuses: a Trainer's own
    ``limit_test_batches`` (``limit``) must not set another."""
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return
    raise PomtValueError(
        f"trainer.limit_test_batches={limit!r} (or fast_dev_run) would limit the sweep's test batches "
        "where a rerun cannot see it: leave it unset and use sweep.limit_test_batches "
        f"(--sweep.limit_test_batches {limit}), which the report states and a rerun checks"
    )
