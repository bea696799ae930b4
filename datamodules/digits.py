"""The embedded default dataset: scikit-learn's handwritten digits, resized for a ViT.

1,797 real 8x8 grey-scale scans of the digits 0-9 (the UCI optical digits test set) ship
inside scikit-learn, so training and evaluation need no download. Every image is scaled
to ``img_size`` once, kept in memory as a tensor, and given three channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from pomt.datamodules._common import ClassificationDataModule, stratified_split, trainer_vit
from pomt.errors import PomtValueError, require
from pomt.models import image_size

__all__ = ["DigitsDataModule", "DigitsDataset", "load_digit_images"]

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def load_digit_images(img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as ``(images [N, 1, img_size, img_size] in [-1, 1], labels [N])``."""
    digits = require("sklearn.datasets", "digits").load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0.0, 1.0) - MEAN[0]) / STD[0]
    return images, torch.as_tensor(digits.target, dtype=torch.long)


class DigitsDataset(Dataset):
    """``(image [3, H, W], label)`` pairs from in-memory tensors; ``augment`` adds a small
    random rotation, scale and shift to each image (training only)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False) -> None:
        self.images = images
        self.labels = labels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def _jitter(self, image: torch.Tensor) -> torch.Tensor:
        angle = math.radians(float(torch.empty(()).uniform_(-12.0, 12.0)))
        scale = float(torch.empty(()).uniform_(0.9, 1.1))
        shift = torch.empty(2).uniform_(-0.12, 0.12)
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[cos, -sin, float(shift[0])], [sin, cos, float(shift[1])]], dtype=image.dtype)
        theta = theta.unsqueeze(0)
        grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
        background = -MEAN[0] / STD[0]  # the value of a blank (0) pixel after normalisation
        out = F.grid_sample(image[None] - background, grid, align_corners=False, padding_mode="zeros")
        return out[0] + background

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            image = self._jitter(image)
        return image.expand(3, -1, -1), int(self.labels[index])


class DigitsDataModule(ClassificationDataModule):
    """Handwritten digits (10 classes, 1,797 images) in four disjoint, seeded, stratified splits.

    ``test`` (``test_fraction`` of the images) is the reported split, ``holdout``
    (``holdout_size`` images, class-balanced) is for the accuracy estimate of R selection,
    ``val`` (``val_fraction``) monitors training, and ``train`` is the rest. ``img_size=None``
    takes the input size of the model the trainer runs (32 without one).
    """

    def __init__(
        self,
        img_size: int | None = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        *,
        holdout_size: int = 200,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        augment: bool = True,
        seed: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, holdout_size=holdout_size, seed=seed, pin_memory=pin_memory)
        if img_size is not None and img_size < 8:
            raise PomtValueError(f"img_size must be >= 8 (the digits are 8x8), got {img_size}")
        for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
            if not 0.0 < value < 1.0:
                raise PomtValueError(f"{name} must be in (0, 1), got {value}")
        self.img_size = img_size
        self.test_fraction = test_fraction
        self.val_fraction = val_fraction
        self.augment = augment
        self.split_indices: dict[str, list[int]] = {}

    @property
    def class_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    def _describe_source(self) -> str:
        return "scikit-learn handwritten digits"

    def _resolve_img_size(self) -> int:
        vit = trainer_vit(self)
        model_size = None if vit is None else image_size(vit)[0]
        if self.img_size is None:
            return model_size or 32
        if model_size is not None and model_size != self.img_size:
            raise PomtValueError(
                f"DigitsDataModule img_size={self.img_size} but the model expects {model_size}x{model_size} "
                "inputs: set data img_size to the model's, or to null to follow the model"
            )
        return self.img_size

    def setup(self, stage: str | None = None) -> None:
        """Build the splits; rebuild them at the model's input size if they were built before
        a trainer with a model of another size was attached (``img_size=None``)."""
        super().setup(stage)
        if self.data_config["input_size"][-1] != self._resolve_img_size():
            self._build()

    def _build(self) -> None:
        size = self._resolve_img_size()
        images, labels = load_digit_images(size)
        total = len(labels)
        n_test = round(self.test_fraction * total)
        n_val = round(self.val_fraction * total)
        if n_test + n_val + self.holdout_size >= total:
            raise PomtValueError(
                f"test ({n_test}) + val ({n_val}) + selection ({self.holdout_size}) images leave no "
                f"training images out of {total}: lower test_fraction, val_fraction or holdout_size"
            )
        test, selection, val, train = stratified_split(
            labels.tolist(), [n_test, self.holdout_size, n_val], self.seed
        )
        self.split_indices = {"train": train, "val": val, "test": test, "holdout": selection}

        def subset(idx: list[int], augment: bool = False) -> DigitsDataset:
            index = torch.as_tensor(idx, dtype=torch.long)
            return DigitsDataset(images[index], labels[index], augment=augment)

        self.train_dataset = subset(train, augment=self.augment)
        self.val_dataset = subset(val)
        self.test_dataset = subset(test)
        self.holdout_dataset = subset(selection)
        self.data_config = {
            "input_size": (3, size, size),
            "interpolation": "bilinear",
            "mean": MEAN,
            "std": STD,
            "crop_pct": 1.0,
            "crop_mode": "center",
        }
