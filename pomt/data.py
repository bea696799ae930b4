"""Labelled data for the accuracy estimate: seeded class-balanced samples and batch parsing.

The accuracy estimate A(n) and the datamodules draw their samples the same way
(:func:`balanced_indices`), and every place that takes a batch apart uses :func:`split_batch`.
"""

from __future__ import annotations

import random
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pomt.errors import PomtValueError
from pomt.preprocessing import class_labels, create_transforms, model_data_config

__all__ = [
    "balanced_indices",
    "split_batch",
    "labelled_batch",
    "dataset_labels",
    "sample_loader",
    "check_labels",
    "image_folder",
]


def dataset_labels(ds: object) -> list[int] | None:
    """Labels of a map-style dataset without loading its images, when it exposes them."""
    from torch.utils.data import Subset, TensorDataset

    if isinstance(ds, Subset):
        inner = dataset_labels(ds.dataset)
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
        raise PomtValueError(f"sample size must be >= 0, got {size}")
    if size > len(labels):
        raise PomtValueError(f"cannot draw {size} samples from a split of {len(labels)} images")
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
            raise PomtValueError(
                f"batch dict has no image key (image/images/pixel_values/x): {sorted(batch)}"
            )
        return x, y
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise PomtValueError(
        f"unsupported batch type {type(batch).__name__}: expected (images, labels), dict or tensor"
    )


class UnlabelledDataError(PomtValueError):
    """The accuracy estimate was given data without labels."""


def labelled_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a batch that must carry both, images already tensors."""
    try:
        image, label = split_batch(batch)
    except ValueError:
        image = label = None
    if image is None or label is None:
        raise UnlabelledDataError(
            "data must yield (images, labels) pairs or dicts with 'image'/'pixel_values' and 'label'/'labels'; "
            f"got a {type(batch).__name__}"
        )
    if not isinstance(image, torch.Tensor):
        raise PomtValueError(
            f"images must be tensors, got {type(image).__name__}: give the dataset a transform "
            "(e.g. timm.data.create_transform(**timm.data.resolve_model_data_config(model)))"
        )
    return image, torch.as_tensor(label)


def first_example(data: object) -> Any:
    """The first example of a map-style dataset (or a DataLoader's), or None where it cannot be
    looked at without iterating (iterable datasets)."""
    dataset = getattr(data, "dataset", data)
    try:
        return dataset[0] if len(dataset) else None  # type: ignore[index, arg-type]
    except (TypeError, KeyError, IndexError, NotImplementedError):
        return None


def check_accuracy_data(data: object, size: tuple[int, int] | None) -> None:
    """Fail early, judged from the first example, when ``data`` has no labels or images of
    another size than ``size`` (None: any size)."""
    example = first_example(data)
    if example is None:
        return
    images, labels = split_batch(example)
    if labels is None:
        raise UnlabelledDataError("the accuracy data yields images only, without labels")
    shape = tuple(getattr(images, "shape", ())[-2:])
    if size is not None and len(shape) == 2 and shape != tuple(size):
        raise PomtValueError(
            f"the accuracy data has {shape[0]}x{shape[1]} images, the ViT takes {size[0]}x{size[1]}: "
            "resize the data or build the model for this size"
        )


def check_labels(labels: torch.Tensor, classes: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise PomtValueError(
            f"labels must be in 0..{classes - 1} for a model with {classes} outputs; "
            f"got labels in {int(labels.min())}..{int(labels.max())}"
        )


def sample_loader(
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
        raise PomtValueError(f"data must be a torch Dataset or DataLoader, got {type(data).__name__}")
    if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
        warnings.warn(
            "data is an iterable dataset: using its first num_samples samples (no class balancing); "
            "make sure it is shuffled",
            stacklevel=3,
        )

        def first(loader: Iterable[Any]) -> Iterable[Any]:
            seen = 0
            for batch in loader:
                images, labels = labelled_batch(batch)
                take = min(len(labels), num_samples - seen)
                yield images[:take], labels[:take]
                seen += take
                if seen >= num_samples:
                    return

        source = data if isinstance(data, DataLoader) else DataLoader(ds, batch_size=batch_size)
        return first(source), False, num_samples
    size = len(ds)  # type: ignore[arg-type]
    if size == 0:
        raise PomtValueError("data is empty")
    count = min(num_samples, size)
    labels = dataset_labels(ds)
    if labels is not None and len(labels) == size:
        indices, balanced = balanced_indices(labels, count, seed), True
    else:
        gen = torch.Generator().manual_seed(int(seed))
        indices, balanced = torch.randperm(size, generator=gen)[:count].tolist(), False
    kwargs: dict[str, Any] = dict(batch_size=batch_size, shuffle=False, num_workers=workers)
    if collate is not None:
        kwargs["collate_fn"] = collate
    return DataLoader(Subset(ds, indices), **kwargs), balanced, len(indices)


def image_folder(root: str | Path, model, class_map: str = "auto"):
    """``torchvision.datasets.ImageFolder`` with the model's own eval preprocessing (timm
    data config), labelled per ``class_map`` (see ``pomt-estimate-accuracy --help``)."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    transform = create_transforms(model_data_config(model))[1]  # at the model's size, if overridden
    try:
        dataset = ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise PomtValueError(f"{root} is not an image folder with one subfolder per class: {err}") from err
    outputs = getattr(model, "num_classes", None)
    imagenet = {"folder": False, "imagenet": True, "auto": None if outputs == 1000 else False}[class_map]
    index, is_imagenet = class_labels(dataset.classes, imagenet=imagenet)  # ValueError names the fix
    if is_imagenet:  # ImageFolder labels by sorted position already
        label = [index[c] for c in dataset.classes]
        dataset.targets = [label[t] for t in dataset.targets]
        dataset.samples = [(path, label[t]) for path, t in dataset.samples]
        dataset.imgs = dataset.samples
    return dataset
