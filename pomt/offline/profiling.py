"""Measuring the two curves of POMT's offline step on a real model.

``profile_latency`` times the model *as it will be deployed* at each candidate n: POMT with
r = N - n at block ``layer`` (blocks before it at N tokens, scoring included), or the
unpruned model at n = N; which n are timed is decided by ``pomt.offline.grid``. ``estimate_accuracy``
measures top-1 with n random tokens kept right after the embedding on a seeded,
class-balanced sample (``pomt.data``). Both return ``pomt.offline.profiles`` records.
"""

from __future__ import annotations

import contextlib
import statistics
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pomt.data import check_labels, labelled_batch, sample_loader
from pomt.deploy.runtimes import RuntimeModel, check_runtime
from pomt.errors import is_int
from pomt.method.ops import kernel_backend
from pomt.method.pruning import apply_pruning, pruning_restored, random_token_subset, remove_pruning
from pomt.models import (
    architecture,
    device_of,
    dtype_of,
    find_vit,
    image_size,
    token_layout,
)
from pomt.offline.grid import adaptive_search, as_grid, coarse_grid, default_max_points
from pomt.offline.profiles import (
    AccuracyPoint,
    AccuracyProfile,
    LatencyPoint,
    LatencyProfile,
    normalise,
)
from pomt.timing import MIN_RUN_TIME, TimingStats, cuda_graph_or_eager, device_name, time_call, time_paired
from pomt.weights import weights_fingerprint

__all__ = [
    "profile_latency",
    "estimate_accuracy",
    "model_name",
    "resolve_dtype",
    "on_device",
    "random_batch",
    "precision_name",
]


def model_name(model: nn.Module) -> str:
    """timm architecture name of ``model`` (or of the ViT inside it), else its class name."""
    for module in (model, *model.modules()):
        cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
        if isinstance(cfg, Mapping) and cfg.get("architecture"):
            return str(cfg["architecture"])
    return type(model).__name__


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype such as float32, float16, bfloat16; got {dtype!r}"
        )
    return value


_BITS = {torch.float32: "32", torch.float16: "16", torch.bfloat16: "bf16", torch.float64: "64"}


def precision_name(device: torch.device | str, dtype: torch.dtype | str) -> str:
    """The precision a model runs at, in Lightning's names: ``16-mixed``/``bf16-mixed`` when
    autocast is on for ``device`` right now (its dtype), else ``<dtype>-true`` (``32-true``,
    ``16-true``, ``bf16-true``) from the dtype of the parameters and inputs."""
    kind = torch.device(device).type
    dtype = resolve_dtype(dtype)
    if torch.is_autocast_enabled(kind):
        return f"{_BITS.get(torch.get_autocast_dtype(kind), 'autocast')}-mixed"
    return f"{_BITS.get(dtype, str(dtype).removeprefix('torch.'))}-true"


def _in_chans(vit: nn.Module) -> int:
    proj = getattr(vit.patch_embed, "proj", None)
    return int(getattr(proj, "in_channels", 3))


@contextlib.contextmanager
def on_device(
    model: nn.Module, vit: nn.Module, device: torch.device, dtype: torch.dtype | None = None
) -> Iterator[None]:
    """While active, ``model`` is in eval mode on ``device`` (and in ``dtype`` when given);
    afterwards its pruning, train/eval flags, device, dtype and weights (bit for bit, also
    after a cast to a narrower dtype) are what they were."""
    training = {m: m.training for m in model.modules()}
    old_device, old_dtype = device_of(model), dtype_of(model)
    cast = dtype is not None and old_dtype is not None and dtype != old_dtype
    # casting to a narrower dtype and back rounds the weights: keep the originals to put back
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()} if cast else None
    try:
        with pruning_restored(vit):
            model.eval()
            model.to(device=device, dtype=dtype) if cast else model.to(device=device)
            yield
    finally:
        model.to(device=old_device, dtype=old_dtype) if cast else model.to(device=old_device)
        if saved is not None:
            model.load_state_dict(saved)
        for module, flag in training.items():
            module.training = flag


def random_batch(
    vit: nn.Module, batch_size: int, size: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A seeded random input batch for timing (latency does not depend on the pixels)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, _in_chans(vit), *size, generator=gen).to(device=device, dtype=dtype)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- latency


def profile_latency(
    model: nn.Module,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    layer: int = 3,
    dtype: torch.dtype | str = torch.float32,
    img_size: int | Sequence[int] | None = None,
    grid: Iterable[int] | None = None,
    vit: nn.Module | None = None,
    accuracy: object | None = None,
    alpha: float = 0.5,
    warmup: int = 3,
    min_run_time: float = MIN_RUN_TIME,
    repeats: int | None = None,
    cuda_graphs: bool = False,
    relative: bool | None = None,
    coarse_points: int = 9,
    max_points: int | None = None,
    period: int | str | None = "auto",
    progress: bool = True,
    name: str | None = None,
    measure: Callable[[int], TimingStats] | None = None,
    precision: str | None = None,
    runtime: str = "torch",
    runtime_model: object | None = None,
) -> LatencyProfile:
    """Median latency of ``model(x)`` per token count n, as deployed with POMT at r = N - n.

    ``grid`` gives the token counts to time (in the order given); by default the fast search of
    ``pomt.offline.grid.adaptive_search`` picks the points (guided by ``accuracy`` and ``alpha``
    when an accuracy profile is given; ``period``: a sawtooth's period, detected by default).
    Every point is timed by ``pomt.timing.time_call``
    with ``warmup``, ``min_run_time``/``repeats``; on CUDA ``cuda_graphs`` replays a captured
    graph (falls back to eager with a warning if capture fails; ignored elsewhere). The
    model's pruning, train/eval flags, device and dtype are restored afterwards.
    ``measure`` replaces the timing with a function n -> TimingStats (for tests).
    ``precision`` is recorded as what the profile was timed at (default: from autocast and
    ``dtype``, see :func:`precision_name`); a Trainer's is its ``trainer.precision``.

    ``relative=True`` times every n call by call against the unpruned model
    (``pomt.timing.time_paired``) and scales the ratios by the unpruned model's pooled median:
    the same total timing, but a machine whose speed drifts between points (shared servers,
    thermal throttling) no longer draws fake steps into the curve. Eager calls only. The
    default (None) is relative on the CPU and not on CUDA.

    ``runtime`` (``pomt.deploy.runtimes``): ``torch`` times the module; ``onnxruntime``/``openvino`` time
    its exported graph compiled by that runtime at each n (``runtime_model``: a
    :class:`pomt.deploy.runtimes.RuntimeModel` already exported, else one is made), and the profile
    records the runtime, its version, threads, options and the precision it really ran in.
    """
    if vit is None:
        vit = find_vit(model)[1]
    size = image_size(vit, img_size)
    layout = token_layout(vit, size)
    n_total, prefix = layout.n_total, layout.prefix
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not is_int(layer) or not 0 <= layer < layout.depth:
        raise ValueError(
            f"layer must be an int in 0..{layout.depth - 1} for this {layout.depth}-block model, got {layer!r}"
        )
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    precision = str(precision) if precision else precision_name(device, dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use device='cpu'")
    runtime = check_runtime(runtime, device)
    deployed = None
    if runtime != "torch" and measure is None:
        if dtype != torch.float32:
            raise ValueError(
                f"runtime {runtime!r} times the fp32 export in the precision the runtime chooses; got dtype "
                f"{dtype}: use dtype=float32"
            )
        deployed = runtime_model or RuntimeModel(
            model, runtime, layer=layer, batch_size=batch_size, vit=vit, img_size=size, device=device
        )
        precision = deployed.info.label
    grid = None if grid is None else as_grid(grid, prefix + 1, n_total)
    acc_total = getattr(accuracy, "n_total", None)
    if acc_total is not None and acc_total != n_total:
        raise ValueError(f"the accuracy profile is for N={acc_total} tokens, this model has N={n_total}")
    relative = device.type != "cuda" if relative is None else bool(relative)
    use_graphs = bool(cuda_graphs) and device.type == "cuda" and measure is None and not relative
    if cuda_graphs and relative:
        warnings.warn("cuda_graphs=True ignored: relative timing alternates eager calls", stacklevel=2)
    if cuda_graphs and device.type != "cuda":
        warnings.warn("cuda_graphs=True ignored: CUDA graphs need a CUDA device", stacklevel=2)
    graphs_ok = use_graphs

    reference_ms: list[float] = []  # relative mode: every sample of the unpruned model
    ratios: dict[int, list[float]] = {}

    def prune_to(n: int) -> None:
        if n == n_total:
            remove_pruning(vit)
        else:
            apply_pruning(vit, "pomt", r=n_total - n, layer=layer)

    def scaled(n: int) -> TimingStats:
        if n == n_total:
            return TimingStats.from_samples(reference_ms)
        level = statistics.median(reference_ms)
        return TimingStats.from_samples([ratio * level for ratio in ratios[n]])

    def timed_relative(n: int) -> TimingStats:
        calls = (deployed.call(n), deployed.call(n_total)) if deployed else (lambda: model(x),) * 2
        pair_ratios, ref = time_paired(
            *calls,
            device=device,
            warmup=warmup,
            min_run_time=min_run_time,
            min_pairs=repeats or 5,
            prepare=None if deployed else lambda: prune_to(n),
            prepare_reference=None if deployed else lambda: prune_to(n_total),
        )
        reference_ms.extend(ref)
        ratios[n] = pair_ratios
        return scaled(n)

    def timed(n: int) -> TimingStats:
        nonlocal graphs_ok
        if deployed is not None:
            return time_call(deployed.call(n), warmup=warmup, repeats=repeats, min_run_time=min_run_time)
        prune_to(n)
        call: Callable[[], object] = lambda: model(x)  # noqa: E731
        if graphs_ok:  # after a failed capture, the remaining points are timed eagerly
            call, mode = cuda_graph_or_eager(call, device)
            graphs_ok = mode == "cuda_graphs"
        return time_call(call, device=device, warmup=warmup, repeats=repeats, min_run_time=min_run_time)

    lo = prefix + 1
    if grid is not None:
        total = len(grid)
    else:  # the search takes at most this many points (it may stop earlier)
        total = min(n_total - lo + 1, max_points or default_max_points(lo, n_total, coarse_points))
    bar = _progress(total, "latency", progress)

    def on_point(n: int, stats: TimingStats) -> None:
        if bar.n >= bar.total:
            bar.total += 1
        bar.update(1)
        bar.set_postfix(n=n, ms=f"{stats.median_ms:.3g}")

    placed = (
        on_device(model, vit, device, dtype) if measure is None and not deployed else contextlib.nullcontext()
    )
    try:
        with placed, torch.inference_mode():
            if measure is None and deployed is None:
                x = random_batch(vit, batch_size, size, device, dtype)
            fn = measure if measure is not None else (timed_relative if relative else timed)
            if grid is not None:
                points = {}
                for n in grid:
                    points[n] = fn(n)
                    on_point(n, points[n])
                sampling = "grid"
            else:
                points = adaptive_search(
                    fn,
                    lo,
                    n_total,
                    coarse_points=coarse_points,
                    max_points=max_points,
                    period=period,
                    accuracy=accuracy,
                    alpha=alpha,
                    on_point=on_point,
                )
                sampling = "fast" if accuracy is None else f"fast-guided(alpha={alpha:g})"
            if relative and measure is None:  # final scale: the pooled median of all reference samples
                points = {n: scaled(n) for n in points}
                sampling += ", relative to N"
    finally:
        bar.close()
    threads = torch.get_num_threads() if device.type == "cpu" else None
    described = {}
    if deployed is not None:
        threads, described = deployed.threads, dict(runtime_version=deployed.info.version)
        described["runtime_options"] = deployed.describe_json()
    return LatencyProfile(
        model=name or model_name(vit),
        device=device_name(device),
        device_type=device.type,
        batch_size=batch_size,
        dtype=normalise(dtype),
        img_size=size,
        layer=layer,
        n_total=n_total,
        prefix=prefix,
        threads=threads,
        cuda_graphs=graphs_ok,
        sampling=sampling,
        architecture=architecture(vit, size),
        precision=precision,
        kernels=kernel_backend(device, dtype) if deployed is None else f"{runtime} graph",
        points=sorted((LatencyPoint.from_stats(n, s) for n, s in points.items()), key=lambda p: p.n),
        runtime=runtime,
        **described,
    )


# --------------------------------------------------------------------------- accuracy


def estimate_accuracy(
    model: nn.Module,
    data: object,
    *,
    num_samples: int = 1024,
    grid: Iterable[int] | None = None,
    seed: int = 0,
    vit: nn.Module | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    num_classes: int | None = None,
    points: int = 16,
    num_workers: int = 0,
    progress: bool = True,
    name: str | None = None,
    dataset: str | None = None,
) -> AccuracyProfile:
    """Top-1 of ``model(images)`` with n random tokens kept after the embedding, per n.

    ``data`` is a Dataset of (image, label) or a DataLoader of (images, labels) batches
    (dict batches with ``image``/``label`` keys work too). A seeded sample of
    ``num_samples`` is drawn, class-balanced when the dataset exposes its labels
    (``targets``/``labels``, a Hugging Face ``label`` column, TensorDataset, Subset).
    Images are read once; each n uses its own seeded generator, so results are
    reproducible for a seed and the global RNG is left as it was. ``grid`` defaults to
    ``points`` token counts evenly spread over [p + 1, N]. Accuracy is torchmetrics'
    ``MulticlassAccuracy(average="micro")`` (ImageNet top-1, not the macro default).
    """
    from torchmetrics.classification import MulticlassAccuracy

    if not is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if vit is None:
        vit = find_vit(model)[1]
    layout = token_layout(vit)
    n_total, prefix = layout.n_total, layout.prefix
    grid = (
        as_grid(grid, prefix + 1, n_total)
        if grid is not None
        else sorted(coarse_grid(prefix + 1, n_total, points), reverse=True)
    )
    device = torch.device(device) if device is not None else device_of(model)
    in_dtype = dtype_of(model) or torch.float32
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    metrics: dict[int, Any] = {}
    seen = 0
    with torch.random.fork_rng(devices=cuda_devices):
        loader, balanced, total = sample_loader(data, num_samples, seed, batch_size, num_workers)
        generators = {n: torch.Generator().manual_seed(int(seed) * 1_000_003 + n) for n in grid}
        bar = _progress(total, "accuracy", progress)
        try:
            with on_device(model, vit, device), torch.inference_mode():
                remove_pruning(vit)
                for batch in loader:
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
        finally:
            bar.close()
    if seen == 0:
        raise ValueError("data yielded no samples")
    return AccuracyProfile(
        model=name or model_name(vit),
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
            (AccuracyPoint(n=n, accuracy=float(metrics[n].compute()), samples=seen) for n in grid),
            key=lambda p: p.n,
        ),
    )
