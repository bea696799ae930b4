"""Measuring the two curves of POMT's offline step on a real model.

``profile_latency`` times the model *as it will be deployed* at each candidate n: POMT with
r = N - n at block ``layer`` (blocks before it at N tokens, scoring included), or the
unpruned model at n = N; which n are timed is decided by ``pomt.offline.grid``. ``estimate_accuracy``
measures top-1 with n random tokens kept right after the embedding on a seeded,
class-balanced sample (``pomt.data``). Both return ``pomt.offline.profiles`` records.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pomt.data import check_labels, labelled_batch, sample_loader
from pomt.deploy.placement import on_device
from pomt.deploy.targets import Call, Prepared, Target
from pomt.errors import PomtValueError
from pomt.method.pruning import check_layer, random_token_subset, remove_pruning
from pomt.models import (
    TokenLayout,
    architecture,
    device_of,
    dtype_of,
    find_vit,
    image_size,
    model_name,
    token_layout,
)
from pomt.offline.config import SearchConfig
from pomt.offline.grid import (
    adaptive_grid,
    as_grid,
    coarse_grid,
    default_max_points,
    known_period,
    pooled,
    retime,
)
from pomt.offline.profiles import AccuracyPoint, AccuracyProfile, LatencyPoint, LatencyProfile, normalise
from pomt.timing import Timing, TimingStats, device_name, time_call, time_paired
from pomt.weights import weights_fingerprint

__all__ = ["profile_latency", "latency_profile", "estimate_accuracy"]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- latency


class _Timer:
    """n -> TimingStats for a prepared model, by ``timing``: each n on its own, or (relative)
    call by call against the unpruned model, its ratios scaled by the unpruned model's pooled
    median once every point is in (:meth:`final`)."""

    def __init__(self, prepared: Prepared, timing: Timing, device: torch.device) -> None:
        self.prepared, self.timing, self.device = prepared, timing, prepared.device
        self.relative = timing.relative_on(device)
        self.reference_ms: list[float] = []  # relative: every sample of the unpruned model
        self.ratios: dict[int, list[float]] = {}
        self.reference: Call | None = None

    def __call__(self, n: int) -> TimingStats:
        call, t = self.prepared.at(n), self.timing
        if not self.relative:
            if call.setup is not None:
                call.setup()
            return time_call(
                call.run, device=self.device, warmup=t.warmup, repeats=t.repeats, min_run_time=t.min_run_time
            )
        self.reference = self.reference or self.prepared.at(self.prepared.n_total)
        ratios, reference_ms = time_paired(
            call.run, self.reference.run, device=self.device, warmup=t.warmup, min_run_time=t.min_run_time,
            min_pairs=t.repeats or 5, prepare=call.setup, prepare_reference=self.reference.setup,
        )  # fmt: skip
        self.reference_ms.extend(reference_ms)
        self.ratios.setdefault(n, []).extend(ratios)  # timed again: the samples are pooled
        return self.scaled(n)

    def scaled(self, n: int) -> TimingStats:
        if n == self.prepared.n_total:
            return TimingStats.from_samples(self.reference_ms)
        level = statistics.median(self.reference_ms)
        return TimingStats.from_samples([ratio * level for ratio in self.ratios[n]])

    def final(self, points: dict[int, TimingStats], sampling: str) -> tuple[dict[int, TimingStats], str]:
        """Relative: every point scaled by the pooled median of all reference samples."""
        if not self.relative:
            return points, sampling
        return {n: self.scaled(n) for n in points}, sampling + ", relative to N"


def _sample(
    measure: Callable[[int], TimingStats],
    layout: TokenLayout,
    search: SearchConfig,
    accuracy: AccuracyProfile | None,
    progress: bool,
) -> tuple[dict[int, TimingStats], str, int]:
    """The points ``measure`` times: the search's ``grid`` in its order, or the adaptive grid
    (guided by ``accuracy`` when given); how they were chosen; and the sawtooth period the
    search found (0: none)."""
    lo, n_total = layout.prefix + 1, layout.n_total
    grid = None if search.grid is None else as_grid(search.grid, lo, n_total)
    if grid is not None:
        total = len(grid)
    else:  # the adaptive grid takes at most this many points (it may stop earlier)
        total = min(
            n_total - lo + 1, search.max_points or default_max_points(lo, n_total, search.coarse_points)
        )
    bar = _progress(total, "latency", progress)

    def on_point(n: int, stats: TimingStats) -> None:
        if bar.n >= bar.total:
            bar.total += 1
        bar.update(1)
        bar.set_postfix(n=n, ms=f"{stats.median_ms:.3g}")

    try:
        if grid is not None:
            points = {}
            for n in grid:
                points[n] = measure(n)
                on_point(n, points[n])
            return points, "grid", known_period(points, search.period)
        points = adaptive_grid(
            measure, lo, n_total, coarse_points=search.coarse_points, max_points=search.max_points,
            period=search.period, accuracy=accuracy, alpha=search.alpha, on_point=on_point,
        )  # fmt: skip
        sampling = "fast" if accuracy is None else f"fast-guided(alpha={search.alpha:g})"
        found = known_period(points, search.period)  # what the search detected
        if accuracy is not None and search.retime_points:  # more timings where they decide n*
            again = retime(
                measure, points, accuracy, alpha=search.alpha, budget=search.retime_points,
                tolerance=search.retime_tolerance, period=found,
                on_point=on_point,
            )  # fmt: skip
            sampling += f", {len(again)} re-timed" if again else ""
        return points, sampling, found
    finally:
        bar.close()


def profile_latency(
    model: nn.Module,
    target: Target | str | None = None,
    *,
    layer: int = 3,
    search: SearchConfig | None = None,
    timing: Timing | Callable[[int], TimingStats] | None = None,
    accuracy: AccuracyProfile | None = None,
    vit: nn.Module | None = None,
    progress: bool = True,
) -> LatencyProfile:
    """Median latency of ``model(x)`` per token count n on ``target``, as deployed with POMT at
    r = N - n at block ``layer`` (the unpruned model at n = N).

    ``target`` (a :class:`pomt.Target` or a runtime's name): where and how the model runs, its
    device, dtype, precision, runtime, threads and batch size; what it leaves open comes from the
    model (its device and dtype; batch size 1). ``search``: which n are timed, the
    ``SearchConfig``'s ``grid`` (in its order) or its adaptive grid (guided by ``accuracy`` and
    ``alpha`` when an accuracy profile is given). ``timing``: how each n is timed (a
    :class:`pomt.timing.Timing`; default: the search's), or a function n -> TimingStats that
    replaces the timers (for tests). The model's pruning, train/eval flags, device and dtype are
    restored afterwards; the profile records the Target it was timed on (:meth:`Target.key`).
    """
    target = Target.coerce(target)
    vit = find_vit(model)[1] if vit is None else vit
    if callable(timing):
        return latency_profile(timing, vit, target.on(model), layer, search, accuracy, progress)
    with target.prepare(model, layer=layer, vit=vit) as prepared:
        return latency_profile(prepared, vit, target.on(model), layer, search, accuracy, progress, timing)


def latency_profile(
    measure: Prepared | Callable[[int], TimingStats],
    vit: nn.Module,
    target: Target,
    layer: int,
    search: SearchConfig | None,
    accuracy: AccuracyProfile | None,
    progress: bool,
    timing: Timing | None = None,
) -> LatencyProfile:
    """:func:`profile_latency` of a model already prepared on ``target`` (resolved), or with
    ``measure`` (n -> TimingStats) in place of the timers; ``find_r`` shares one prepared model
    (one export) between the profile and the verification."""
    search = SearchConfig.coerce(search)
    size = image_size(vit, target.img_size)
    layout = token_layout(vit, size)
    check_layer(layer, layout.depth)
    acc_total = getattr(accuracy, "n_total", None)
    if acc_total is not None and acc_total != layout.n_total:
        raise PomtValueError(
            f"the accuracy profile is for N={acc_total} tokens, this model has N={layout.n_total}"
        )
    device = target.torch_device
    if isinstance(measure, Prepared):
        timer = _Timer(measure, search.timing if timing is None else timing, device)
        fn = timer if timer.relative else pooled(timer)  # a relative timer pools its ratios itself
        points, sampling, period = _sample(fn, layout, search, accuracy, progress)
        points, sampling = timer.final(points, sampling)
        record = measure.record()
    else:
        points, sampling, period = _sample(pooled(measure), layout, search, accuracy, progress)
        threads = torch.get_num_threads() if device.type == "cpu" else None
        kernels = target.backend.kernels(device, target.torch_dtype) or f"{target.runtime} graph"
        record = dict(threads=threads, kernels=kernels)
    record = dict(precision=target.precision, cuda_graphs=False) | record
    return LatencyProfile(
        period=period,
        model=model_name(vit),
        device=device_name(device),
        device_type=device.type,
        batch_size=target.batch_size,
        dtype=normalise(target.torch_dtype),
        img_size=size,
        layer=layer,
        n_total=layout.n_total,
        prefix=layout.prefix,
        sampling=sampling,
        architecture=architecture(vit, size),
        points=sorted((LatencyPoint.from_stats(n, s) for n, s in points.items()), key=lambda p: p.n),
        runtime=target.runtime,
        **record,
    )


# --------------------------------------------------------------------------- accuracy


def estimate_accuracy(
    model: nn.Module,
    data: object,
    *,
    search: SearchConfig | None = None,
    device: torch.device | str | None = None,
    vit: nn.Module | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    dataset: str | None = None,
) -> AccuracyProfile:
    """Top-1 of ``model(images)`` with n random tokens kept after the embedding, per n.

    ``data`` is a Dataset of (image, label) or a DataLoader of (images, labels) batches
    (dict batches with ``image``/``label`` keys work too). A seeded sample of the search's
    ``accuracy_samples`` is drawn, class-balanced when the dataset exposes its labels
    (``targets``/``labels``, a Hugging Face ``label`` column, TensorDataset, Subset), read in
    batches of ``accuracy_batch_size`` by ``accuracy_workers`` workers. Images are read once;
    each n uses its own seeded generator (``seed``), so results are reproducible for a seed and
    the global RNG is left as it was. The token counts are ``accuracy_grid``, by default
    ``accuracy_points`` counts evenly spread over [p + 1, N]. Accuracy is torchmetrics'
    ``MulticlassAccuracy(average="micro")`` (ImageNet top-1, not the macro default);
    ``dataset`` names the data in the record (default: its class).
    """
    search = SearchConfig.coerce(search)
    vit = find_vit(model)[1] if vit is None else vit
    layout = token_layout(vit)
    n_total, prefix = layout.n_total, layout.prefix
    grid = (
        as_grid(search.accuracy_grid, prefix + 1, n_total)
        if search.accuracy_grid is not None
        else sorted(coarse_grid(prefix + 1, n_total, search.accuracy_points), reverse=True)
    )
    device = torch.device(device) if device is not None else device_of(model)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    seed = search.seed
    with torch.random.fork_rng(devices=cuda_devices):
        loader, balanced, total = sample_loader(
            data, search.accuracy_samples, seed, search.accuracy_batch_size, search.accuracy_workers
        )
        bar = _progress(total, "accuracy", progress)
        try:
            with on_device(model, vit, device), torch.inference_mode():
                remove_pruning(vit)
                accuracy, seen, classes = _top1_per_n(
                    model, vit, loader, grid, seed, device, num_classes, bar
                )
        finally:
            bar.close()
    if seen == 0:
        raise PomtValueError("data yielded no samples")
    return AccuracyProfile(
        model=model_name(vit),
        device=device_name(device),
        num_samples=seen,
        num_classes=classes,
        seed=int(seed),
        class_balanced=balanced,
        dataset=dataset or type(getattr(data, "dataset", data)).__name__,
        img_size=image_size(vit, None),
        n_total=n_total,
        prefix=prefix,
        weights=weights_fingerprint(model),
        points=sorted(
            (AccuracyPoint(n=n, accuracy=accuracy[n], samples=seen) for n in grid), key=lambda p: p.n
        ),
    )


def _top1_per_n(
    model: nn.Module, vit: nn.Module, batches: Any, grid: list[int], seed: int, device: torch.device,
    num_classes: int | None, bar: Any,
) -> tuple[dict[int, float], int, int | None]:  # fmt: skip
    """Top-1 at each n of ``grid`` over ``batches``, n random tokens kept right after the
    embedding (one generator per n, seeded by ``seed`` and n): (accuracy per n, images, classes)."""
    from torchmetrics.classification import MulticlassAccuracy

    in_dtype = dtype_of(model) or torch.float32
    generators = {n: torch.Generator().manual_seed(int(seed) * 1_000_003 + n) for n in grid}
    metrics: dict[int, Any] = {}
    seen, classes = 0, num_classes
    for batch in batches:
        images, labels = labelled_batch(batch)
        images = images.to(device=device, dtype=in_dtype)
        labels = labels.to(device=device).long().reshape(-1)
        for n in grid:
            with random_token_subset(vit, n, generators[n]):
                logits = model(images)
            if not metrics:
                classes = num_classes or int(logits.shape[-1])
                for m in grid:
                    metric = MulticlassAccuracy(
                        num_classes=classes, top_k=1, average="micro", sync_on_compute=False
                    )
                    metrics[m] = metric.to(device)
            if n == grid[0]:
                check_labels(labels, classes)
            metrics[n].update(logits, labels)
        seen += int(labels.numel())
        bar.update(int(labels.numel()))
    return {n: float(metric.compute()) for n, metric in metrics.items()}, seen, classes
