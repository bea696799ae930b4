"""LightningDataModules: ImageNet-1k (hub, local ILSVRC tree or image folder) and the embedded digits."""

if __name__ != "pomt.datamodules":  # one name, so one module object, for each file of this folder
    raise ImportError(
        f"this folder is pomt.datamodules (it installs under that name): import pomt.datamodules, not {__name__}"
    )


from pomt.datamodules._common import ClassificationDataModule
from pomt.datamodules.digits import DigitsDataModule
from pomt.datamodules.imagenet import ImageNetDataModule

__all__ = [
    "ClassificationDataModule",
    "DigitsDataModule",
    "ImageNetDataModule",
]
