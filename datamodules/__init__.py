"""LightningDataModules: ImageNet-1k (hub, local ILSVRC tree or image folder) and the embedded digits."""

from pomt.datamodules._common import ClassificationDataModule, model_data_config
from pomt.datamodules.digits import DigitsDataModule
from pomt.datamodules.imagenet import ImageNetDataModule, imagenet_class_names, imagenet_wnids

__all__ = [
    "ClassificationDataModule",
    "DigitsDataModule",
    "ImageNetDataModule",
    "imagenet_class_names",
    "imagenet_wnids",
    "model_data_config",
]
