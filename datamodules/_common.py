"""Shared parts of the datamodules: the common interface, seeded class-balanced splits,
and evaluation transforms taken from a model's own timm data config."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pomt.data import balanced_indices
from pomt.errors import PomtValueError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassificationDataModule",
    "ImageFileDataset",
    "LabelledItems",
    "default_num_workers",
    "stratified_split",
    "trainer_vit",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def default_num_workers() -> int:
    """Loader processes: the CPU count, at most 8 (decoding JPEGs is the usual bottleneck)."""
    return min(8, os.cpu_count() or 1)


def stratified_split(labels: Sequence[int], sizes: Sequence[int], seed: int) -> list[list[int]]:
    """Disjoint, class-balanced parts of the given ``sizes`` and a last part with the rest.

    Each part is a :func:`balanced_indices` sample of what the previous parts left over.
    """
    remaining = list(range(len(labels)))
    parts = []
    for k, size in enumerate(sizes):
        if size > len(remaining):
            raise PomtValueError(f"split sizes {list(sizes)} exceed the {len(labels)} images available")
        picked = balanced_indices([labels[i] for i in remaining], size, seed + k)
        picked_set = set(picked)
        parts.append([remaining[i] for i in picked])
        remaining = [r for i, r in enumerate(remaining) if i not in picked_set]
    parts.append(remaining)
    return parts


def trainer_vit(datamodule: pl.LightningDataModule) -> nn.Module | None:
    """The ViT of the LightningModule the datamodule's trainer runs, or None without one."""
    trainer = getattr(datamodule, "trainer", None)
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    if module is None:
        return None
    vit = getattr(module, "vit", None)
    if isinstance(vit, nn.Module):
        return vit
    from pomt.models import find_vit

    try:
        return find_vit(module)[1]
    except ValueError:
        return None


class LabelledItems(Dataset):
    """``(transform(image), label)`` for a list of ``(item, label)``: decoded images, or image
    files (see :class:`ImageFileDataset`); ``labels`` without reading any image."""

    def __init__(self, samples: Sequence[tuple[Any, int]], transform: Callable | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, item: Any) -> Any:
        return item

    def __getitem__(self, index: int) -> tuple[Any, int]:
        item, label = self.samples[index]
        image = self._image(item)
        return (self.transform(image) if self.transform is not None else image), label


class ImageFileDataset(LabelledItems):
    """``(transform(image), label)`` for a list of ``(path, label)`` image files."""

    def _image(self, item: Any) -> Any:
        with Image.open(item) as img:
            return img.convert("RGB")


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ClassificationDataModule(pl.LightningDataModule):
    """What every datamodule of the project offers.

    ``train``/``val``/``test``/``predict``/``holdout`` datasets and dataloaders, where
    ``holdout`` is a seeded, class-balanced held-out split for the accuracy estimate during
    R selection, disjoint from the reported split (``val``/``test``). Also ``num_classes``,
    ``class_names`` and ``data_config`` (the preprocessing used). Subclasses fill the datasets
    in :meth:`_build` (``pin_memory=None``: pin when CUDA is available); the dataloader methods build them on first use, so a library user can
    call ``holdout_dataloader()`` without a trainer.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        *,
        holdout_size: int = 1024,
        seed: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise PomtValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise PomtValueError(f"num_workers must be >= 0, got {num_workers}")
        if holdout_size < 1:
            raise PomtValueError(f"holdout_size must be >= 1, got {holdout_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.holdout_size = holdout_size
        self.seed = seed
        self.pin_memory = pin_memory
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.holdout_dataset: Dataset | None = None
        self.data_config: dict[str, Any] = {}
        self._built = False

    # subclasses -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    def _build(self) -> None:
        raise NotImplementedError

    # Lightning --------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if not self._built:
            self._build()
            self._built = True

    def _require(self, attribute: str, split: str) -> Dataset:
        self.setup()
        dataset = getattr(self, attribute)
        if dataset is None:
            raise PomtValueError(f"{type(self).__name__} has no {split} split ({self._describe_source()})")
        return dataset

    def _describe_source(self) -> str:
        return "no source"

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        sampler = None
        trainer = self.trainer
        if not shuffle and not iterable and trainer is not None and trainer.world_size > 1:
            # evaluation under DDP: every image exactly once over all processes (Lightning's
            # default sampler pads the split, repeating images); the metrics sync their counts
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=shuffle and not iterable,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available() if self.pin_memory is None else self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._require("train_dataset", "train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require("val_dataset", "validation"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The reported split."""
        return self._loader(self._require("test_dataset", "test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def holdout_dataloader(self) -> DataLoader:
        """The held-out, class-balanced split for accuracy estimation (never the reported split)."""
        return self._loader(self._require("holdout_dataset", "holdout"), shuffle=False)


def take_balanced(
    examples: Iterable[tuple[Any, int]], size: int, num_classes: int, max_scan: int
) -> list[tuple[Any, int]]:
    """The first class-balanced ``size`` examples of a (shuffled) stream: at most
    ``ceil(size / num_classes)`` per class, scanning at most ``max_scan`` examples."""
    quota = -(-size // num_classes)
    counts: dict[int, int] = defaultdict(int)
    kept: list[tuple[Any, int]] = []
    for scanned, (item, label) in enumerate(examples):
        if scanned >= max_scan:
            break
        if counts[label] < quota:
            counts[label] += 1
            kept.append((item, label))
            if len(kept) == size:
                break
    return kept
