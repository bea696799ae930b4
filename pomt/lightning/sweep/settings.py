"""What a sweep is asked to do (:class:`SweepSettings`): one frozen object, validated once when
the ``sweep:`` section is parsed, read by every step and changed by none. What changes while
the sweep runs lives in :class:`pomt.lightning.sweep.context.SweepRun`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pomt.deploy.targets import Target
from pomt.errors import PomtValueError, is_int
from pomt.lightning.sweep.configurations import SideBySide
from pomt.lightning.sweep.context import check_limit
from pomt.lightning.sweep.runtimes import check_targets
from pomt.method.pruning import METHODS
from pomt.offline.config import SearchConfig

__all__ = ["SweepSettings", "check_heal_epochs"]


def check_heal_epochs(epochs: int, batches: int | None) -> None:
    if not is_int(epochs) or epochs < 0:
        raise PomtValueError(f"heal_epochs must be an int >= 0 (0: training-free), got {epochs!r}")
    if batches is not None and (not is_int(batches) or batches < 1):
        raise PomtValueError(f"heal_batches must be a number of batches >= 1 or None (all), got {batches!r}")


def _ints(values: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(values)


@dataclass(frozen=True)
class SweepSettings:
    """The sweep's settings (:class:`pomt.lightning.sweep.TradeoffEvaluation` runs them).

    Args:
        methods: which of ``none``, ``pomt``, ``tome``, ``topk`` to evaluate.
        tome_r, topk_r: explicit per-block r values; default: r values whose mean tokens per
            block span from half to twice POMT's token reduction (``span``).
        span: multiples of POMT's token reduction that ToMe/Top-K are matched to.
        layer: block where POMT prunes.
        search: how POMT's R is chosen (:class:`pomt.SearchConfig`); ``search.warmup`` also times
            the side-by-side comparison.
        out_dir: where the run directory is created; ``run_name`` names it (default: a time stamp).
        wandb: log every configuration as its own W&B run in one group, plus a summary run.
        wandb_project, wandb_group, wandb_offline: where the runs go (offline by default: no
            account or network needed; ``wandb sync DIR`` uploads later).
        latency_rounds: interleaved timing rounds per configuration (one real test batch each).
        batch_sizes: evaluate at each of these batch sizes (latency, and R, depend on it; accuracy
            does not, so ToMe/Top-K/unpruned are tested once). Results per batch size go to
            ``bs<B>/`` and one combined report to the run directory. Default: the data's batch size.
        token_maps: how many test images ``token_maps.png`` shows (0: none).
        resume: reuse what an earlier run of the same command finished, where still valid.
        limit_test_batches: test on a fraction (float) or a number (int) of the test batches, for
            a quick estimate; the report states it, and a rerun reuses an accuracy only when it
            was measured under the same limit. The sweep's one test limit: a Trainer that
            sets ``limit_test_batches`` itself is rejected.
        heal_epochs: 0 (default): training-free. K > 0: every pruned configuration (POMT at its R,
            each ToMe and Top-K r) is also fine-tuned at its r for K epochs from the same
            weights, with the model's own optimiser settings and the same seed, then tested:
            the report adds these as healed rows (single process only).
        heal_batches: at most this many training batches per healing epoch (default: all).
        targets: where and how R is chosen and every configuration timed, one or several
            (:class:`pomt.Target`\ s, runtimes' names or mappings of their fields; default
            ``[torch]``; e.g. ``[torch, onnxruntime, openvino]``); what each leaves open is the
            Trainer's (device, precision). In each, R is chosen and verified and every
            configuration (in an exported runtime: exported and checked against PyTorch) is timed
            side by side; one table with a runtime column, one front over runtime x method.
            Accuracy is PyTorch's where the runtime computes in fp32, measured in the runtime
            where it does not (OpenVINO bf16); see ``pomt.lightning.sweep.runtimes``.
        max_accuracy_drop: the recommendation is the fastest runtime, method and r within this
            many points of the unpruned model's top-1.
    """

    methods: tuple[str, ...] = ("none", "pomt", "tome", "topk")
    tome_r: tuple[int, ...] | None = None
    topk_r: tuple[int, ...] | None = None
    span: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    layer: int = 3
    search: SearchConfig = field(default_factory=SearchConfig)
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
    limit_test_batches: int | float | None = None  # int first: "2" is two batches, not 2.0
    heal_epochs: int = 0
    heal_batches: int | None = None
    targets: tuple[Target | str, ...] = ("torch",)
    max_accuracy_drop: float = 0.5

    def __post_init__(self) -> None:
        check_heal_epochs(self.heal_epochs, self.heal_batches)
        methods = list(self.methods)
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise PomtValueError(f"methods must be a non-empty list of {', '.join(METHODS)}; got {methods}")
        if any(s <= 0 for s in self.span):
            raise PomtValueError(f"span values must be > 0, got {list(self.span)}")
        if self.latency_rounds < 1:
            raise PomtValueError(f"latency_rounds must be >= 1, got {self.latency_rounds}")
        sizes = self.batch_sizes
        if sizes is not None and (not sizes or any(b < 1 for b in sizes)):
            raise PomtValueError(f"batch_sizes must be a non-empty list of positive ints, got {list(sizes)}")
        set_ = object.__setattr__  # normalise once: tuples, and one form of "every test batch"
        set_(self, "methods", tuple(methods))
        set_(self, "tome_r", _ints(self.tome_r))
        set_(self, "topk_r", _ints(self.topk_r))
        set_(self, "span", tuple(self.span))
        set_(self, "batch_sizes", _ints(sizes) or None)
        set_(self, "limit_test_batches", check_limit(self.limit_test_batches))
        set_(self, "search", SearchConfig.coerce(self.search))
        set_(self, "targets", check_targets(self.targets))
        drop = self.max_accuracy_drop
        if isinstance(drop, bool) or not isinstance(drop, int | float) or not 0 <= drop < 100:
            raise PomtValueError(f"max_accuracy_drop must be points of top-1 in [0, 100), got {drop!r}")

    @property
    def side_by_side(self) -> SideBySide:
        """How the configurations are timed against each other (``latency_rounds`` rounds after
        the search's warm-up, on the Target)."""
        return SideBySide(self.latency_rounds, self.search.warmup)
