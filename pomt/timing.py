"""One timer for the whole project: the latency profiler, the benchmarks and the
LightningModule's per-batch latency all measure through this module.

On CUDA every measurement is bracketed by ``torch.cuda.synchronize`` (or CUDA events),
so the asynchronous launch queue is never mistaken for the work itself; on the CPU it is
``time.perf_counter`` and the thread count is recorded beside the numbers.
"""

from __future__ import annotations

import functools
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from pomt.errors import PomtValueError, is_int

__all__ = [
    "MIN_RUN_TIME",
    "Timing",
    "TimingStats",
    "synchronize",
    "time_call",
    "interleaved_samples",
    "time_interleaved",
    "paired_ratio",
    "median_interval",
    "time_paired",
    "cuda_graph",
    "Stopwatch",
    "device_name",
]

# Seconds of timed calls per measurement (per token count in a latency profile): the one
# default of SearchConfig, profile_latency, pomt-profile-latency and the timers here.
MIN_RUN_TIME = 0.2


@dataclass(frozen=True)
class Timing:
    """How a latency is timed (what runs is a Target's): ``warmup`` untimed calls, then timed
    calls for ``min_run_time`` seconds (or exactly ``repeats`` calls; with ``relative``, that
    many pairs at least). ``relative`` times every call paired with the unpruned model's and
    scales the ratios by its pooled median: a machine whose speed drifts between points draws
    no fake steps. None: relative on the CPU, not on CUDA."""

    warmup: int = 3
    min_run_time: float = MIN_RUN_TIME
    repeats: int | None = None
    relative: bool | None = None

    def __post_init__(self) -> None:
        if not is_int(self.warmup) or self.warmup < 0:
            raise PomtValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if not self.min_run_time >= 0:
            raise PomtValueError(f"min_run_time must be >= 0, got {self.min_run_time!r}")
        if self.repeats is not None and (not is_int(self.repeats) or self.repeats < 1):
            raise PomtValueError(f"repeats must be a positive int or None, got {self.repeats!r}")

    def relative_on(self, device: torch.device | str) -> bool:
        """Whether latency is timed relative to the unpruned model on ``device``."""
        return torch.device(device).type != "cuda" if self.relative is None else bool(self.relative)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of already sorted values."""
    if not sorted_values:
        raise PomtValueError("no samples to summarise")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac)


@dataclass(frozen=True)
class TimingStats:
    """Summary of repeated latency samples, in milliseconds."""

    median_ms: float
    p10_ms: float
    p25_ms: float
    p75_ms: float
    p90_ms: float
    mean_ms: float
    samples: int
    # the samples themselves, in the order taken (empty when only the summary is known); kept
    # so that a profile can be resampled (``pomt.offline.stability``) and re-timed points pooled
    values_ms: tuple[float, ...] = field(default=(), compare=False, repr=False)

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> TimingStats:
        values = sorted(float(v) for v in samples_ms)
        if not values:
            raise PomtValueError("TimingStats needs at least one sample")
        return cls(
            median_ms=_percentile(values, 50),
            p10_ms=_percentile(values, 10),
            p25_ms=_percentile(values, 25),
            p75_ms=_percentile(values, 75),
            p90_ms=_percentile(values, 90),
            mean_ms=statistics.fmean(values),
            samples=len(values),
            values_ms=tuple(float(v) for v in samples_ms),
        )

    def to_dict(self) -> dict[str, float]:
        """The summary (without ``values_ms``)."""
        out = asdict(self)
        out.pop("values_ms")
        return out


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if device is None:
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def device_name(device: torch.device | str) -> str:
    """A human-readable name of the hardware behind ``device`` (GPU name or CPU model)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        import platform

        return platform.processor() or platform.machine() or "cpu"
    return device.type


class Stopwatch:
    """Times one region, synchronising ``device`` before reading the clock at both ends.

    >>> with Stopwatch("cpu") as sw:
    ...     _ = sum(range(10))
    >>> sw.elapsed_ms >= 0
    True
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.elapsed_ms = float("nan")
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.elapsed_ms = (time.perf_counter() - self._start) * 1e3


def time_call(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeats: int | None = None,
    min_run_time: float = MIN_RUN_TIME,
    max_repeats: int = 10_000,
) -> TimingStats:
    """Median-oriented latency of ``fn()`` on ``device``.

    Runs ``warmup`` untimed calls, then times single calls until ``repeats`` samples are
    taken or, when ``repeats`` is None, until ``min_run_time`` seconds have passed (at least
    5 samples, at most ``max_repeats``). Each call is timed on its own so the spread is real
    (IQR, p10/p90), not an average over a block of calls.
    """
    device = torch.device(device)
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    samples: list[float] = []
    use_events = device.type == "cuda"
    deadline = time.perf_counter() + min_run_time
    while True:
        if use_events:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        n = len(samples)
        if repeats is not None:
            if n >= repeats:
                break
        elif (n >= 5 and time.perf_counter() >= deadline) or n >= max_repeats:
            break
    return TimingStats.from_samples(samples)


def interleaved_samples(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    rounds: int = 30,
    warmup: int = 3,
    prepare: Callable[[str], object] | None = None,
    progress: str | None = None,
) -> dict[str, list[float]]:
    """Time several callables side by side: A B C A B C ... for ``rounds`` rounds.

    Returns every sample (ms) per name, in round order, so that ratios can be taken round
    by round. Interleaving spreads slow drifts of the machine (clocks, other load) over every
    candidate alike, so ratios between them are far steadier than back-to-back runs. The
    order within a round is shuffled (seeded), so cache effects of a fixed order do not
    favour one candidate. ``prepare(name)``, when given, runs untimed before each call of
    candidate ``name`` (e.g. to switch one model between pruning configurations).
    ``progress``, when given, is the description of a progress bar over the rounds.
    """
    device = torch.device(device)
    for name, fn in fns.items():
        if prepare is not None:
            prepare(name)
        for _ in range(max(0, warmup)):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    shuffle = random.Random(0).shuffle
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=rounds, desc=progress, unit="round", leave=False)
    for _ in range(rounds):
        if bar is not None:
            bar.update(1)
        shuffle(order)  # no candidate always runs right after the same one
        for name, fn in order:
            if prepare is not None:
                prepare(name)
            with Stopwatch(device) as sw:
                fn()
            samples[name].append(sw.elapsed_ms)
    if bar is not None:
        bar.close()
    return samples


def time_interleaved(fns: dict[str, Callable[[], object]], **kwargs: object) -> dict[str, TimingStats]:
    """:func:`interleaved_samples` summarised per candidate (same arguments)."""
    return {name: TimingStats.from_samples(v) for name, v in interleaved_samples(fns, **kwargs).items()}


def paired_ratio(samples: Sequence[float], reference: Sequence[float]) -> float:
    """Median of the round-by-round ratios ``samples[i] / reference[i]`` (interleaved samples):
    each pair was measured moments apart, so a drift of the machine cancels in its ratio."""
    return statistics.median(a / max(b, 1e-12) for a, b in zip(samples, reference, strict=True))


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The median of ``values`` and a distribution-free confidence interval for it.

    The interval runs between two order statistics, x(k) and x(m - k + 1), with the largest
    k such that a Binomial(m, 1/2) falls below k with probability at most (1 - confidence)/2;
    with fewer than 6 values it is the whole range (a lower confidence, said by its width).
    """
    xs = sorted(float(v) for v in values)
    if not xs:
        raise PomtValueError("median_interval needs at least one value")
    k = _order_index(len(xs), confidence)
    return statistics.median(xs), xs[k - 1], xs[len(xs) - k]


@functools.lru_cache(maxsize=4096)
def _order_index(m: int, confidence: float) -> int:
    """The k of :func:`median_interval` for m values (exact binomial tail, in log space: no
    overflow for the thousands of samples of a profile's unpruned point)."""
    tail, k, below = (1.0 - confidence) / 2.0, 1, 0.0
    log_half = m * math.log(0.5)
    for j in range(m):
        below += math.exp(math.lgamma(m + 1) - math.lgamma(j + 1) - math.lgamma(m - j + 1) + log_half)
        if below > tail:
            break
        k = j + 1
    return max(1, min(k, (m + 1) // 2))


def cuda_graph(fn: Callable[[], object], device: torch.device | str) -> Callable[[], object]:
    """Capture ``fn`` (static inputs) in a CUDA graph and return its replay."""
    device = torch.device(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_paired(
    fn: Callable[[], object],
    reference: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    min_run_time: float = MIN_RUN_TIME,
    min_pairs: int = 5,
    prepare: Callable[[], object] | None = None,
    prepare_reference: Callable[[], object] | None = None,
) -> tuple[list[float], list[float]]:
    """Alternate ``fn`` and ``reference`` call by call for ``min_run_time`` seconds in all.

    Returns the per-pair ratios ``t_fn / t_reference`` and the reference's samples (ms). A
    slow drift of the machine (clocks, thermal throttling, other tenants) scales both calls
    of a pair alike, so the ratio cancels it where absolute times would wander between
    points measured minutes apart. ``prepare``/``prepare_reference`` run untimed before
    each call of the respective function.
    """
    device = torch.device(device)
    for _ in range(max(0, warmup)):
        for setup, call in ((prepare, fn), (prepare_reference, reference)):
            if setup is not None:
                setup()
            call()
    ratios: list[float] = []
    ref_samples: list[float] = []
    deadline = time.perf_counter() + min_run_time
    while len(ratios) < min_pairs or time.perf_counter() < deadline:
        times = []
        for setup, call in ((prepare, fn), (prepare_reference, reference)):
            if setup is not None:
                setup()
            with Stopwatch(device) as sw:
                call()
            times.append(sw.elapsed_ms)
        ratios.append(times[0] / max(times[1], 1e-9))
        ref_samples.append(times[1])
    return ratios, ref_samples
