"""LightningDataModules: ImageNet-1k (hub, local ILSVRC tree or image folder) and the embedded digits."""

from pomt.datamodules._common import ClassificationDataModule
from pomt.datamodules.digits import DigitsDataModule
from pomt.datamodules.imagenet import ImageNetDataModule

__all__ = [
    "ClassificationDataModule",
    "DigitsDataModule",
    "ImageNetDataModule",
]
