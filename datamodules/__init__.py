"""LightningDataModules: ImageNet-1k (hub, local ILSVRC tree or image folder) and the embedded digits."""

from datamodules._common import ClassificationDataModule, balanced_indices, model_data_config
from datamodules.digits import DigitsDataModule
from datamodules.imagenet import ImageNetDataModule, imagenet_class_names, imagenet_wnids

__all__ = [
    "ClassificationDataModule",
    "DigitsDataModule",
    "ImageNetDataModule",
    "balanced_indices",
    "imagenet_class_names",
    "imagenet_wnids",
    "model_data_config",
]
