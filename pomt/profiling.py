"""Latency profile L(n) on a device and accuracy estimate A(n) on data (METHOD.md 1.1-1.2, 1.6-1.7).

``profile_latency`` times the model *as it will be deployed* at each candidate n: POMT
with r = N - n at block ``layer`` (blocks before it at N tokens, scoring included), or the
unpruned model at n = N. ``estimate_accuracy`` measures top-1 with n random tokens kept
right after the embedding on a seeded, class-balanced sample. Both return profiles that
save to and load from JSON, so latency measured on an edge device and accuracy measured on
a server can be combined later by ``pomt.select_r``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import random
import statistics
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pomt.models import find_vit, token_layout
from pomt.pruning import apply_pruning, pruning_config, random_token_subset, remove_pruning
from pomt.selection import as_tokens, coarse_grid, default_max_points, search_tokens
from pomt.timing import TimingStats, cuda_graph, device_name, time_call, time_paired

__all__ = [
    "SCHEMA_VERSION",
    "LatencyPoint",
    "AccuracyPoint",
    "LatencyProfile",
    "AccuracyProfile",
    "profile_latency",
    "estimate_accuracy",
    "model_name",
    "balanced_indices",
    "split_batch",
]

SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class LatencyPoint(TimingStats):
    """Latency of the deployed model with ``tokens`` tokens after the pruning block."""

    tokens: int = 0

    @classmethod
    def from_stats(cls, tokens: int, stats: TimingStats) -> LatencyPoint:
        return cls(tokens=int(tokens), **stats.to_dict())

    def stats(self) -> TimingStats:
        values = self.to_dict()
        del values["tokens"]
        return TimingStats(**values)


@dataclass(frozen=True)
class AccuracyPoint:
    """Top-1 accuracy (a fraction) with ``tokens`` random tokens kept, over ``samples`` images."""

    tokens: int
    accuracy: float
    samples: int

    @property
    def stderr(self) -> float:
        """Binomial standard error of ``accuracy``."""
        return math.sqrt(max(self.accuracy * (1 - self.accuracy), 0.0) / max(self.samples, 1))


def _normalise(value: Any) -> Any:
    """A comparable, JSON-like form (tuples become lists, torch dtypes their short name)."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


class _ProfileIO:
    """JSON save/load shared by the two profiles (never pickle)."""

    kind: ClassVar[str]
    _point_type: ClassVar[type]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": f"pomt.{self.kind}_profile", "schema_version": SCHEMA_VERSION}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = [asdict(p) for p in value] if f.name == "points" else _normalise(value)
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON (parent folders are created). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "profile") -> Any:
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object, found {type(data).__name__}")
        schema = data.get("schema")
        expected_schema = f"pomt.{cls.kind}_profile"
        if schema != expected_schema:
            raise ValueError(
                f"{source}: not a {cls.kind} profile (schema {schema!r}, expected {expected_schema!r})"
            )
        version = data.get("schema_version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{source}: missing or invalid schema_version {version!r}")
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"{source}: schema_version {version} was written by a newer pomt (this one reads <= {SCHEMA_VERSION})"
            )
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        required = [
            f.name
            for f in fields(cls)  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)} (truncated or edited?)")
        kwargs = {n: data[n] for n in names if n in data}
        raw_points = kwargs.get("points")
        if not isinstance(raw_points, list) or not raw_points:
            raise ValueError(f"{source}: `points` must be a non-empty list")
        point_fields = [f.name for f in fields(cls._point_type)]
        points = []
        for i, raw in enumerate(raw_points):
            if not isinstance(raw, Mapping) or any(k not in raw for k in point_fields):
                raise ValueError(f"{source}: point {i} must be an object with {', '.join(point_fields)}")
            try:
                points.append(
                    cls._point_type(
                        **{k: (int if k in ("tokens", "samples") else float)(raw[k]) for k in point_fields}
                    )
                )
            except (TypeError, ValueError) as err:
                raise ValueError(f"{source}: point {i} has a bad value ({err})") from err
        kwargs["points"] = sorted(points, key=lambda p: p.tokens)
        if isinstance(kwargs.get("img_size"), list):
            kwargs["img_size"] = tuple(kwargs["img_size"])
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def load(cls, path: str | os.PathLike[str], expect: Mapping[str, Any] | None = None) -> Any:
        """Read a profile; with ``expect``, reject one whose fields differ (naming the field).

        ``expect`` maps field names (e.g. ``model``, ``device``, ``batch_size``, ``dtype``,
        ``img_size``, ``layer``) to the values of the current setup; dtypes may be given as
        ``torch.float16`` or ``"float16"``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{cls.kind} profile not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not a text JSON profile ({err})") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON (corrupt or truncated?): {err}") from err
        profile = cls.from_dict(data, source=str(path))
        if expect:
            profile.check(expect, source=str(path))
        return profile

    def check(self, expect: Mapping[str, Any], source: str = "profile") -> None:
        """Raise ValueError naming the first field whose value differs from ``expect``."""
        names = {f.name for f in fields(self)}  # type: ignore[arg-type]
        for key, wanted in expect.items():
            if key not in names or key == "points":
                raise ValueError(
                    f"cannot check {key!r}: {self.kind} profiles have {', '.join(sorted(names))}"
                )
            have = _normalise(getattr(self, key))
            if key == "device" and (
                isinstance(wanted, torch.device) or str(wanted).split(":")[0] in ("cpu", "cuda")
            ):
                wanted = device_name(wanted)  # compare hardware names, not "cuda:0"
            if have != _normalise(wanted):
                raise ValueError(
                    f"{source} does not match: it was measured with {key}={have!r}, the current {key} is "
                    f"{_normalise(wanted)!r}. Measure a new profile for this setup."
                )


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _timm_version() -> str:
    try:
        import timm

        return str(timm.__version__)
    except ImportError:  # pragma: no cover - timm is a dependency
        return ""


@dataclass(frozen=True)
class LatencyProfile(_ProfileIO):
    """L(n) of one model on one device, batch size, dtype and input size.

    ``points`` are sorted by ``tokens`` (n: tokens leaving the pruning block ``layer``;
    n == ``tokens_total`` is the unpruned model) and keep the spread of the samples.
    """

    kind: ClassVar[str] = "latency"
    _point_type: ClassVar[type] = LatencyPoint

    model: str
    device: str
    device_type: str
    batch_size: int
    dtype: str
    img_size: tuple[int, int]
    layer: int
    tokens_total: int
    prefix_tokens: int
    threads: int | None
    cuda_graphs: bool
    search: str
    torch_version: str
    timm_version: str
    points: list[LatencyPoint]
    created: str = field(default_factory=_now)

    @property
    def tokens(self) -> list[int]:
        return [p.tokens for p in self.points]

    @property
    def latency_ms(self) -> dict[int, float]:
        """Median latency per token count."""
        return {p.tokens: p.median_ms for p in self.points}

    def stats(self) -> dict[int, TimingStats]:
        return {p.tokens: p.stats() for p in self.points}


@dataclass(frozen=True)
class AccuracyProfile(_ProfileIO):
    """A(n): top-1 with n random tokens kept after the embedding, on a seeded sample."""

    kind: ClassVar[str] = "accuracy"
    _point_type: ClassVar[type] = AccuracyPoint

    model: str
    device: str
    num_samples: int
    num_classes: int
    seed: int
    class_balanced: bool
    dataset: str
    img_size: tuple[int, int]
    tokens_total: int
    prefix_tokens: int
    torch_version: str
    timm_version: str
    points: list[AccuracyPoint]
    created: str = field(default_factory=_now)

    @property
    def tokens(self) -> list[int]:
        return [p.tokens for p in self.points]

    @property
    def accuracy(self) -> dict[int, float]:
        return {p.tokens: p.accuracy for p in self.points}


# --------------------------------------------------------------------------- helpers


def model_name(model: nn.Module) -> str:
    """timm architecture name of ``model`` (or of the ViT inside it), else its class name."""
    for module in (model, *model.modules()):
        cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
        if isinstance(cfg, Mapping) and cfg.get("architecture"):
            return str(cfg["architecture"])
    return type(model).__name__


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype such as float32, float16, bfloat16; got {dtype!r}"
        )
    return value


def _image_size(vit: nn.Module, img_size: int | Sequence[int] | None) -> tuple[int, int]:
    if img_size is not None:
        if isinstance(img_size, int):
            return (img_size, img_size)
        return (int(img_size[0]), int(img_size[1]))
    size = getattr(vit.patch_embed, "img_size", None)
    if size is not None:
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    layout = token_layout(vit)
    patch = getattr(vit.patch_embed, "patch_size", 16)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return (layout.grid_size[0] * ph, layout.grid_size[1] * pw)


def _in_chans(vit: nn.Module) -> int:
    proj = getattr(vit.patch_embed, "proj", None)
    return int(getattr(proj, "in_channels", 3))


def _first_param(model: nn.Module) -> torch.Tensor | None:
    for t in model.parameters():
        return t
    for t in model.buffers():
        return t
    return None


class _Restore:
    """Remembers pruning, train/eval flags, device and dtype, and puts them back."""

    def __init__(self, model: nn.Module, vit: nn.Module) -> None:
        self.model, self.vit = model, vit
        self.config = pruning_config(vit)
        self.training = {m: m.training for m in model.modules()}
        first = _first_param(model)
        self.device = first.device if first is not None else torch.device("cpu")
        self.dtype = first.dtype if first is not None and first.is_floating_point() else None
        self.cast = False  # set when the caller changes the dtype

    def restore(self) -> None:
        if self.config is None:
            remove_pruning(self.vit)
        else:
            apply_pruning(self.vit, self.config.method, self.config.r, self.config.layer)
        if self.cast and self.dtype is not None:
            self.model.to(device=self.device, dtype=self.dtype)
        else:
            self.model.to(device=self.device)
        for module, flag in self.training.items():
            module.training = flag


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- latency


def profile_latency(
    model: nn.Module,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    layer: int = 3,
    dtype: torch.dtype | str = torch.float32,
    img_size: int | Sequence[int] | None = None,
    tokens: Iterable[int] | None = None,
    vit: nn.Module | None = None,
    *,
    accuracy: object | None = None,
    alpha: float = 0.5,
    warmup: int = 3,
    min_run_time: float = 0.5,
    repeats: int | None = None,
    cuda_graphs: bool = False,
    relative: bool = False,
    coarse_points: int = 9,
    max_points: int | None = None,
    progress: bool = True,
    name: str | None = None,
    measure: Callable[[int], TimingStats] | None = None,
) -> LatencyProfile:
    """Median latency of ``model(x)`` per token count n, as deployed with POMT at r = N - n.

    ``tokens`` gives an explicit grid (measured in the order given); by default the fast search of
    ``pomt.selection.search_tokens`` picks the points (guided by ``accuracy`` and ``alpha``
    when an accuracy profile is given). Every point is timed by ``pomt.timing.time_call``
    with ``warmup``, ``min_run_time``/``repeats``; on CUDA ``cuda_graphs`` replays a captured
    graph (falls back to eager with a warning if capture fails; ignored elsewhere). The
    model's pruning, train/eval flags, device and dtype are restored afterwards.
    ``measure`` replaces the timing with a function n -> TimingStats (for tests).

    ``relative=True`` times every n call by call against the unpruned model
    (``pomt.timing.time_paired``) and scales the ratios by the unpruned model's pooled median:
    the same total timing, but a machine whose speed drifts between points (shared servers,
    thermal throttling) no longer draws fake steps into the curve. Eager calls only.
    """
    if vit is None:
        vit = find_vit(model)[1]
    size = _image_size(vit, img_size)
    layout = token_layout(vit, size)
    n_total, prefix = layout.tokens, layout.prefix_tokens
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layout.depth:
        raise ValueError(
            f"layer must be an int in 0..{layout.depth - 1} for this {layout.depth}-block model, got {layer!r}"
        )
    dtype = _resolve_dtype(dtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use device='cpu'")
    grid = None if tokens is None else as_tokens(tokens, prefix + 1, n_total)
    acc_total = getattr(accuracy, "tokens_total", None)
    if acc_total is not None and acc_total != n_total:
        raise ValueError(f"the accuracy profile is for N={acc_total} tokens, this model has N={n_total}")
    use_graphs = bool(cuda_graphs) and device.type == "cuda" and measure is None and not relative
    if cuda_graphs and relative:
        warnings.warn("cuda_graphs=True ignored: relative timing alternates eager calls", stacklevel=2)
    if cuda_graphs and device.type != "cuda":
        warnings.warn("cuda_graphs=True ignored: CUDA graphs need a CUDA device", stacklevel=2)
    state = _Restore(model, vit)
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
        pair_ratios, ref = time_paired(
            lambda: model(x),
            lambda: model(x),
            device=device,
            warmup=warmup,
            min_run_time=min_run_time,
            min_pairs=repeats or 5,
            prepare=lambda: prune_to(n),
            prepare_reference=lambda: prune_to(n_total),
        )
        reference_ms.extend(ref)
        ratios[n] = pair_ratios
        return scaled(n)

    def timed(n: int) -> TimingStats:
        nonlocal graphs_ok
        if n == n_total:
            remove_pruning(vit)
        else:
            apply_pruning(vit, "pomt", r=n_total - n, layer=layer)
        call: Callable[[], object] = lambda: model(x)  # noqa: E731
        if graphs_ok:
            try:
                call = cuda_graph(call, device)
            except Exception as err:  # capture is not possible for every model/driver
                warnings.warn(f"CUDA graph capture failed ({err}); timing eager calls", stacklevel=3)
                graphs_ok = False
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

    try:
        if measure is None:
            model.eval()
            if state.dtype != dtype:
                state.cast = True
                model.to(device=device, dtype=dtype)
            else:
                model.to(device=device)
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(batch_size, _in_chans(vit), *size, generator=gen).to(device=device, dtype=dtype)
        fn = measure if measure is not None else (timed_relative if relative else timed)
        with torch.inference_mode():
            if grid is not None:
                points = {}
                for n in grid:
                    points[n] = fn(n)
                    on_point(n, points[n])
                search = "grid"
            else:
                points = search_tokens(
                    fn,
                    lo,
                    n_total,
                    coarse_points=coarse_points,
                    max_points=max_points,
                    accuracy=accuracy,
                    alpha=alpha,
                    on_point=on_point,
                )
                search = "fast" if accuracy is None else f"fast-guided(alpha={alpha:g})"
            if relative and measure is None:  # final scale: the pooled median of all reference samples
                points = {n: scaled(n) for n in points}
                search += ", relative to N"
    finally:
        bar.close()
        state.restore()
    return LatencyProfile(
        model=name or model_name(vit),
        device=device_name(device),
        device_type=device.type,
        batch_size=batch_size,
        dtype=_normalise(dtype),
        img_size=size,
        layer=layer,
        tokens_total=n_total,
        prefix_tokens=prefix,
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        cuda_graphs=graphs_ok,
        search=search,
        torch_version=str(torch.__version__),
        timm_version=_timm_version(),
        points=sorted((LatencyPoint.from_stats(n, s) for n, s in points.items()), key=lambda p: p.tokens),
    )


# --------------------------------------------------------------------------- accuracy


def _dataset_labels(ds: object) -> list[int] | None:
    """Labels of a map-style dataset without loading its images, when it exposes them."""
    from torch.utils.data import Subset, TensorDataset

    if isinstance(ds, Subset):
        inner = _dataset_labels(ds.dataset)
        return None if inner is None else [inner[i] for i in ds.indices]
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return [int(v) for v in ds.tensors[1].reshape(-1).tolist()]
    for attr in ("targets", "labels"):
        values = getattr(ds, attr, None)
        if values is not None and not callable(values):
            try:
                values = values.tolist() if hasattr(values, "tolist") else list(values)
                return [int(v) for v in values]
            except (TypeError, ValueError):
                pass
    columns = getattr(ds, "column_names", None)
    if isinstance(columns, list) and "label" in columns:  # a Hugging Face dataset
        try:  # without its format/transform, which may expect the image column too
            plain = ds.with_format(None) if hasattr(ds, "with_format") else ds
            return [int(v) for v in plain["label"]]  # type: ignore[index]
        except Exception:  # noqa: BLE001 - labels are optional: fall back to a uniform sample
            return None
    return None


def balanced_indices(labels: Sequence[int], size: int, seed: int) -> list[int]:
    """``size`` positions of ``labels``, drawn so that every class gets the same share (±1).

    Classes are visited round-robin in a seeded random order, each contributing its next
    seeded-random member, so the sample is balanced and reproducible. A class with too few
    members simply runs out; the rest is filled from the others.
    """
    if size < 0:
        raise ValueError(f"sample size must be >= 0, got {size}")
    if size > len(labels):
        raise ValueError(f"cannot draw {size} samples from a split of {len(labels)} images")
    rng = random.Random(seed)
    members: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        members[int(label)].append(i)
    pools = []
    for label in sorted(members):
        pool = members[label]
        rng.shuffle(pool)
        pools.append(pool)
    rng.shuffle(pools)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < size:
        for pool in pools:
            if depth < len(pool):
                chosen.append(pool[depth])
                if len(chosen) == size:
                    break
        depth += 1
    return sorted(chosen)


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels or None)`` from a tuple/list, a dict or a bare tensor batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in ("image", "images", "pixel_values", "x") if k in batch), None)
        y = next((batch[k] for k in ("label", "labels", "target", "y") if k in batch), None)
        if x is None:
            raise ValueError(f"batch dict has no image key (image/images/pixel_values/x): {sorted(batch)}")
        return x, y
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise ValueError(
        f"unsupported batch type {type(batch).__name__}: expected (images, labels), dict or tensor"
    )


def _labelled_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a batch that must carry both, images already tensors."""
    try:
        image, label = split_batch(batch)
    except ValueError:
        image = label = None
    if image is None or label is None:
        raise ValueError(
            "data must yield (images, labels) pairs or dicts with 'image'/'pixel_values' and 'label'/'labels'; "
            f"got a {type(batch).__name__}"
        )
    if not isinstance(image, torch.Tensor):
        raise ValueError(
            f"images must be tensors, got {type(image).__name__}: give the dataset a transform "
            "(e.g. timm.data.create_transform(**timm.data.resolve_model_data_config(model)))"
        )
    return image, torch.as_tensor(label)


def _check_labels(labels: torch.Tensor, classes: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(
            f"labels must be in 0..{classes - 1} for a model with {classes} outputs; "
            f"got labels in {int(labels.min())}..{int(labels.max())}"
        )


def _sample_loader(
    data: object, num_samples: int, seed: int, batch_size: int | None, num_workers: int
) -> tuple[Iterable[Any], bool, int]:
    """Batches of a seeded sample of ``data``; whether it is class balanced; its size."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

    collate, workers = None, num_workers
    if isinstance(data, DataLoader):
        ds = data.dataset
        collate, workers = data.collate_fn, data.num_workers
        batch_size = batch_size or data.batch_size or 32
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        ds = data
        batch_size = batch_size or 32
    else:
        raise ValueError(f"data must be a torch Dataset or DataLoader, got {type(data).__name__}")
    if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
        warnings.warn(
            "data is an iterable dataset: using its first num_samples samples (no class balancing); "
            "make sure it is shuffled",
            stacklevel=3,
        )

        def first(loader: Iterable[Any]) -> Iterable[Any]:
            seen = 0
            for batch in loader:
                images, labels = _labelled_batch(batch)
                take = min(len(labels), num_samples - seen)
                yield images[:take], labels[:take]
                seen += take
                if seen >= num_samples:
                    return

        source = data if isinstance(data, DataLoader) else DataLoader(ds, batch_size=batch_size)
        return first(source), False, num_samples
    size = len(ds)  # type: ignore[arg-type]
    if size == 0:
        raise ValueError("data is empty")
    count = min(num_samples, size)
    labels = _dataset_labels(ds)
    if labels is not None and len(labels) == size:
        indices, balanced = balanced_indices(labels, count, seed), True
    else:
        gen = torch.Generator().manual_seed(int(seed))
        indices, balanced = torch.randperm(size, generator=gen)[:count].tolist(), False
    kwargs: dict[str, Any] = dict(batch_size=batch_size, shuffle=False, num_workers=workers)
    if collate is not None:
        kwargs["collate_fn"] = collate
    return DataLoader(Subset(ds, indices), **kwargs), balanced, len(indices)


def estimate_accuracy(
    model: nn.Module,
    data: object,
    num_samples: int = 1024,
    tokens: Iterable[int] | None = None,
    seed: int = 0,
    vit: nn.Module | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    *,
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
    reproducible for a seed and the global RNG is left as it was. ``tokens`` defaults to
    ``points`` token counts evenly spread over [p + 1, N]. Accuracy is torchmetrics'
    ``MulticlassAccuracy(average="micro")`` (ImageNet top-1, not the macro default).
    """
    from torchmetrics.classification import MulticlassAccuracy

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if vit is None:
        vit = find_vit(model)[1]
    layout = token_layout(vit)
    n_total, prefix = layout.tokens, layout.prefix_tokens
    grid = (
        as_tokens(tokens, prefix + 1, n_total)
        if tokens is not None
        else sorted(coarse_grid(prefix + 1, n_total, points), reverse=True)
    )
    first = _first_param(model)
    device = (
        torch.device(device)
        if device is not None
        else (first.device if first is not None else torch.device("cpu"))
    )
    in_dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    state = _Restore(model, vit)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    metrics: dict[int, Any] = {}
    seen = 0
    with torch.random.fork_rng(devices=cuda_devices):
        loader, balanced, total = _sample_loader(data, num_samples, seed, batch_size, num_workers)
        generators = {n: torch.Generator().manual_seed(int(seed) * 1_000_003 + n) for n in grid}
        bar = _progress(total, "accuracy", progress)
        try:
            remove_pruning(vit)
            model.eval()
            model.to(device=device)
            with torch.inference_mode():
                for batch in loader:
                    images, labels = _labelled_batch(batch)
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
                            _check_labels(labels, classes)
                        metrics[n].update(logits, labels)
                    seen += int(labels.numel())
                    bar.update(int(labels.numel()))
        finally:
            bar.close()
            state.restore()
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
        img_size=_image_size(vit, None),
        tokens_total=n_total,
        prefix_tokens=prefix,
        torch_version=str(torch.__version__),
        timm_version=_timm_version(),
        points=sorted(
            (AccuracyPoint(tokens=n, accuracy=float(metrics[n].compute()), samples=seen) for n in grid),
            key=lambda p: p.tokens,
        ),
    )
