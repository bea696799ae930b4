"""The preprocessing a model expects, and ImageNet-1k's labels (timm's data configs and
class info, imported when used).

The datamodules and ``pomt-estimate-accuracy`` build their transforms and label ImageNet
wnid folders here, so an image is prepared and labelled the same way by both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from pomt.errors import PomtValueError
from pomt.models import find_vit, image_size

__all__ = [
    "model_data_config",
    "create_transforms",
    "imagenet_wnids",
    "imagenet_class_names",
    "imagenet_labels",
    "class_labels",
]


def _built_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size the ViT in ``model`` was built for, or None when it holds no ViT."""
    try:
        return image_size(find_vit(model)[1])
    except ValueError:
        return None


def model_data_config(
    model: nn.Module | None = None,
    model_name: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The preprocessing a model expects (timm data config: input size, interpolation, crop, mean/std).

    From a built ``model`` (its ``pretrained_cfg``, with the input size it was actually built
    for: timm reports the pretrained size, e.g. 518 for DINOv2 built at 224), else from a timm
    ``model_name`` (no weights loaded), else timm's defaults with a warning. ``overrides`` win.
    """
    import timm
    import timm.data

    if model is not None:
        cfg = dict(timm.data.resolve_model_data_config(model))
        size = _built_size(model)
        if size is not None:
            cfg["input_size"] = (cfg["input_size"][0], *size)
    elif model_name is not None:
        if not timm.is_model(model_name):
            raise PomtValueError(f"unknown timm model name {model_name!r} for the data config")
        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
        if pretrained_cfg is None:
            built = timm.create_model(model_name, pretrained=False)
            cfg = dict(timm.data.resolve_model_data_config(built))
        else:
            cfg = dict(timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict()))
    else:
        warnings.warn(
            "no model to take the preprocessing from: using timm's ImageNet defaults. Pass model_name "
            "or attach the datamodule to a trainer with the model.",
            stacklevel=2,
        )
        cfg = {
            "input_size": (3, 224, 224),
            "interpolation": "bicubic",
            "mean": timm.data.IMAGENET_DEFAULT_MEAN,
            "std": timm.data.IMAGENET_DEFAULT_STD,
            "crop_pct": timm.data.DEFAULT_CROP_PCT,
            "crop_mode": "center",
        }
    for key, value in (overrides or {}).items():
        if key == "input_size" and isinstance(value, int):
            value = (3, value, value)
        cfg[key] = tuple(value) if isinstance(value, list) else value
    return cfg


def create_transforms(cfg: dict[str, Any]) -> tuple[Callable, Callable]:
    """(train, eval) transforms of a timm data config; eval is resize, centre crop, normalise."""
    import timm.data

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    args = {k: cfg[k] for k in keys if k in cfg}
    return timm.data.create_transform(**args, is_training=True), timm.data.create_transform(
        **args, is_training=False
    )


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in the standard label order."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def imagenet_class_names() -> list[str]:
    """Human-readable names of the 1000 ImageNet-1k classes, in label order."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def imagenet_labels(names: Iterable[str]) -> dict[str, int] | None:
    """Each class name's ImageNet-1k label when every name is a wnid (e.g. ``n01440764`` -> 0),
    else None: wnid folders are labelled in the standard order that pretrained heads read."""
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    names = list(names)
    return {name: index[name] for name in names} if all(name in index for name in names) else None


def class_labels(names: Iterable[str], *, imagenet: bool | None = None) -> tuple[dict[str, int], bool]:
    """Each class name's label, and whether the labels are ImageNet-1k's.

    The one labelling rule of the datamodules and ``pomt-estimate-accuracy``: wnid names get their
    standard ImageNet-1k index (the order pretrained heads read), other names their sorted
    position. ``imagenet``: None uses ImageNet's labels when every name is a wnid, True requires
    it (ValueError naming the names that are not wnids), False never uses them.
    """
    names = sorted(set(names))
    index = imagenet_labels(names) if imagenet is not False else None
    if imagenet and index is None:
        wnids = set(imagenet_wnids())
        bad = [name for name in names if name not in wnids][:5]
        raise PomtValueError(
            f"ImageNet labels need wnid class names (e.g. n01440764); not wnids: {bad}: "
            "rename the folders or label them by their sorted position"
        )
    if index is not None:
        return index, True
    return {name: i for i, name in enumerate(names)}, False
