"""What a sweep is asked to do (:class:`SweepSettings`): one frozen object, validated once when
the ``sweep:`` section is parsed, read by every step and changed by none. What changes while
the sweep runs lives in :class:`pomt.lightning.sweep.context.SweepRun`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pomt.deploy.runtimes import check_runtime
from pomt.errors import is_int
from pomt.lightning.sweep.configurations import SideBySide
from pomt.lightning.sweep.context import check_limit
from pomt.method.pruning import METHODS
from pomt.offline.finder import SearchConfig

__all__ = ["SweepSettings", "check_heal_epochs"]


def check_heal_epochs(epochs: int, batches: int | None) -> None:
    if not is_int(epochs) or epochs < 0:
        raise ValueError(f"heal_epochs must be an int >= 0 (0: training-free), got {epochs!r}")
    if batches is not None and (not is_int(batches) or batches < 1):
        raise ValueError(f"heal_batches must be a number of batches >= 1 or None (all), got {batches!r}")


def _ints(values: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(values)


@dataclass(frozen=True)
class SweepSettings:
    """The sweep's settings; see :class:`pomt.lightning.sweep.TradeoffEvaluation` for each one."""

    methods: tuple[str, ...] = ("none", "pomt", "tome", "topk")
    tome_r: tuple[int, ...] | None = None
    topk_r: tuple[int, ...] | None = None
    span: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    layer: int = 3
    search_config: SearchConfig = field(default_factory=SearchConfig)
    out_dir: str = "runs"
    run_name: str | None = None
    wandb: bool = True
    wandb_project: str = "pomt"
    wandb_group: str | None = None
    wandb_offline: bool = True
    latency_rounds: int = 30
    batch_sizes: tuple[int, ...] | None = None
    token_maps: int = 4
    resume: bool = True
    limit_test_batches: float | int | None = None
    heal_epochs: int = 0
    heal_batches: int | None = None
    runtime: str = "torch"

    def __post_init__(self) -> None:
        check_heal_epochs(self.heal_epochs, self.heal_batches)
        methods = list(self.methods)
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"methods must be a non-empty list of {', '.join(METHODS)}; got {methods}")
        if any(s <= 0 for s in self.span):
            raise ValueError(f"span values must be > 0, got {list(self.span)}")
        if self.latency_rounds < 1:
            raise ValueError(f"latency_rounds must be >= 1, got {self.latency_rounds}")
        sizes = self.batch_sizes
        if sizes is not None and (not sizes or any(b < 1 for b in sizes)):
            raise ValueError(f"batch_sizes must be a non-empty list of positive ints, got {list(sizes)}")
        set_ = object.__setattr__  # normalise once: tuples, and one form of "every test batch"
        set_(self, "methods", tuple(methods))
        set_(self, "tome_r", _ints(self.tome_r))
        set_(self, "topk_r", _ints(self.topk_r))
        set_(self, "span", tuple(self.span))
        set_(self, "batch_sizes", _ints(sizes) or None)
        set_(self, "limit_test_batches", check_limit(self.limit_test_batches))
        set_(self, "runtime", check_runtime(self.runtime))

    @property
    def side_by_side(self) -> SideBySide:
        """How the configurations are timed against each other (the search's warm-up and
        CUDA-graph setting, ``latency_rounds`` rounds, in ``runtime``)."""
        config = self.search_config
        return SideBySide(self.latency_rounds, config.warmup, config.cuda_graphs, self.runtime)
