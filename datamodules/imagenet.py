"""ImageNet-1k (or any labelled image folder) as a LightningDataModule.

Three sources, one interface:

* a Hugging Face hub dataset through ``datasets`` (default ``ILSVRC/imagenet-1k``, gated:
  accept its terms on the hub, then ``HF_TOKEN`` or ``huggingface-cli login``), optionally
  streamed;
* a local ILSVRC tree: ``CLS-LOC/train/<wnid>/*.JPEG`` and ``CLS-LOC/val/`` either flat,
  labelled by ``LOC_val_solution.csv``, or as ``val/<wnid>/*.JPEG``;
* any local image folder: ``<root>/<class>/<image>`` (optionally with ``train/`` and
  ``val/`` above the class folders).

Labels follow the standard 1000-class wnid order whenever the class folders are ImageNet
wnids, so pretrained heads read them directly. Preprocessing comes from the model's own timm
data config (interpolation, crop, mean/std), not one recipe for every model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from pomt.data import balanced_indices
from pomt.datamodules._common import (
    ClassificationDataModule,
    ImageFileDataset,
    LabelledItems,
    default_num_workers,
    take_balanced,
    trainer_vit,
)
from pomt.datamodules.sources import (
    DEFAULT_HUB_ID,
    LAYOUT_HELP,
    HubImageDataset,
    HubStreamDataset,
    LocalTree,
    find_local_tree,
    hub_label_names,
    load_hub_split,
    split_samples,
)
from pomt.errors import PomtValueError, require
from pomt.preprocessing import (
    class_labels,
    create_transforms,
    imagenet_class_names,
    imagenet_labels,
    imagenet_wnids,
    model_data_config,
)

__all__ = [
    "DEFAULT_HUB_ID",
    "ImageNetDataModule",
    "LocalTree",
    "find_local_tree",
]


# ----------------------------------------------------------------------------- datamodule
class ImageNetDataModule(ClassificationDataModule):
    """ImageNet-1k (hub or local) or any labelled image folder, with a held-out holdout split.

    Source: ``root`` (a local ILSVRC tree or image folder) if given, else ``hub_id`` through
    ``datasets.load_dataset`` (``hub_kwargs`` are passed on, e.g. ``cache_dir``, ``revision``;
    ``streaming=True`` reads it without a full download).

    Splits: the reported split is the validation split (``val_dataloader`` and
    ``test_dataloader``). The holdout split (``holdout_size`` images, seeded and
    class-balanced) for the accuracy estimate during R selection comes from ``holdout_from``:
    ``"val"`` holds it out of the validation split, which is then reported without it (only
    the validation split is read); ``"train"`` draws it from the training split. Streaming
    always draws it from the (seeded, shuffled) training stream.

    Preprocessing: the timm data config of ``model_name`` if given, else of the model the
    trainer runs, else timm's defaults; ``data_config`` entries override any of it.
    """

    def __init__(
        self,
        root: str | None = None,
        hub_id: str = DEFAULT_HUB_ID,
        *,
        hub_kwargs: dict[str, Any] | None = None,
        streaming: bool = False,
        train_split: str = "train",
        val_split: str = "validation",
        image_key: str = "image",
        label_key: str = "label",
        model_name: str | None = None,
        data_config: dict[str, Any] | None = None,
        holdout_from: Literal["val", "train"] = "val",
        holdout_size: int = 1024,
        batch_size: int = 64,
        num_workers: int | None = None,
        seed: int = 0,
        pin_memory: bool | None = None,
        stream_scan_limit: int = 100_000,
    ) -> None:
        workers = default_num_workers() if num_workers is None else num_workers
        super().__init__(batch_size, workers, holdout_size=holdout_size, seed=seed, pin_memory=pin_memory)
        if holdout_from not in ("val", "train"):
            raise PomtValueError(f"holdout_from must be 'val' or 'train', got {holdout_from!r}")
        self.root = root
        self.hub_id = hub_id
        self.hub_kwargs = dict(hub_kwargs or {})
        self.streaming = streaming
        self.train_split = train_split
        self.val_split = val_split
        self.image_key = image_key
        self.label_key = label_key
        self.model_name = model_name
        self.data_config_overrides = dict(data_config or {})
        self.holdout_from = holdout_from
        self.stream_scan_limit = stream_scan_limit
        self._model: nn.Module | None = None
        self._class_names: list[str] | None = None
        self.wnids: list[str] | None = None
        self.tree: LocalTree | None = None
        self._label_map: list[int] | None = None
        self._train_source: Any = None
        self._train_tf: Callable | None = None
        self._config_source: nn.Module | None = None

    # ------------------------------------------------------------------ interface
    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self.setup()
        assert self._class_names is not None
        return self._class_names

    def use_model(self, model: nn.Module) -> ImageNetDataModule:
        """Take the preprocessing from ``model`` (for use without a trainer)."""
        self._model = model
        if self._built:
            self.setup()
        return self

    def _describe_source(self) -> str:
        return f"root {self.root}" if self.root else f"hub dataset {self.hub_id}"

    def _config_model(self) -> nn.Module | None:
        if self.model_name:
            return None
        return self._model if self._model is not None else trainer_vit(self)

    def _transforms(self) -> tuple[Callable, Callable]:
        model = self._config_model()
        self._config_source = model
        self.data_config = model_data_config(model, self.model_name, self.data_config_overrides)
        return create_transforms(self.data_config)

    def setup(self, stage: str | None = None) -> None:
        """Build the splits once; re-derive the preprocessing when a (new) model is attached,
        e.g. the splits were first built without a trainer (``class_names`` or a dataloader)."""
        super().setup(stage)
        if self._config_model() is not self._config_source:
            train_tf, eval_tf = self._transforms()
            self._train_tf = train_tf
            for dataset in {
                id(d): d for d in (self.val_dataset, self.test_dataset, self.holdout_dataset)
            }.values():
                if dataset is not None:
                    dataset.transform = eval_tf
            if self.train_dataset is not None:
                self.train_dataset.transform = train_tf

    def _build(self) -> None:
        train_tf, eval_tf = self._transforms()
        if self.root is not None:
            self._build_local(train_tf, eval_tf)
        elif self.streaming:
            self._build_stream(train_tf, eval_tf)
        else:
            self._build_hub(train_tf, eval_tf)

    # ------------------------------------------------------------------ splits
    def _hold_out(self, labels: list[int], where: str) -> tuple[list[int], list[int]]:
        """(selection, rest) positions: a class-balanced selection sample and what remains."""
        if self.holdout_size >= len(labels):
            raise PomtValueError(
                f"holdout_size={self.holdout_size} leaves nothing of the {len(labels)} images in {where}: "
                "lower holdout_size or use holdout_from='train'"
            )
        chosen = balanced_indices(labels, self.holdout_size, self.seed)
        taken = set(chosen)
        return chosen, [i for i in range(len(labels)) if i not in taken]

    def _class_index(self, names: set[str]) -> dict[str, int]:
        index, is_imagenet = class_labels(names)
        self.wnids = imagenet_wnids() if is_imagenet else None
        self._class_names = imagenet_class_names() if is_imagenet else sorted(index)
        return index

    def _build_local(self, train_tf: Callable, eval_tf: Callable) -> None:
        tree = self.tree = find_local_tree(self.root)
        train = split_samples(tree.train, None) if tree.train is not None else []
        if tree.val is None:
            raise PomtValueError(f"no validation split under {tree.root}: {LAYOUT_HELP}")
        val = split_samples(tree.val, tree.val_csv)
        index = self._class_index({name for _, name in train} | {name for _, name in val})
        val_samples = [(p, index[n]) for p, n in val]
        train_samples = [(p, index[n]) for p, n in train]
        if self.holdout_from == "val":
            chosen, rest = self._hold_out([label for _, label in val_samples], str(tree.val))
            self.holdout_dataset = ImageFileDataset([val_samples[i] for i in chosen], eval_tf)
            val_samples = [val_samples[i] for i in rest]
        else:
            if not train_samples:
                raise PomtValueError(
                    f"holdout_from='train' but {tree.root} has no train split: add train/<class>/ folders "
                    "or use holdout_from='val'"
                )
            chosen, rest = self._hold_out([label for _, label in train_samples], str(tree.train))
            self.holdout_dataset = ImageFileDataset([train_samples[i] for i in chosen], eval_tf)
            train_samples = [train_samples[i] for i in rest]
        self.train_dataset = ImageFileDataset(train_samples, train_tf) if train_samples else None
        self.val_dataset = self.test_dataset = ImageFileDataset(val_samples, eval_tf)

    def _build_hub(self, train_tf: Callable, eval_tf: Callable) -> None:
        val = load_hub_split(self.hub_id, self.val_split, False, self.hub_kwargs)
        self._hub_classes(val)
        if len(val) == 0:
            raise PomtValueError(f"split {self.val_split!r} of {self.hub_id} is empty")
        self._train_tf = train_tf
        self._train_source = None
        if self.holdout_from == "train":
            train = load_hub_split(self.hub_id, self.train_split, False, self.hub_kwargs)
            labels = self._hub_dataset(train, None).labels
            chosen, rest = self._hold_out(labels, f"{self.hub_id}:{self.train_split}")
            self.holdout_dataset = self._hub_dataset(train.select(chosen), eval_tf)
            self._train_source = train.select(rest)
        else:
            labels = self._hub_dataset(val, None).labels
            chosen, rest = self._hold_out(labels, f"{self.hub_id}:{self.val_split}")
            self.holdout_dataset = self._hub_dataset(val.select(chosen), eval_tf)
            val = val.select(rest)
        self.val_dataset = self.test_dataset = self._hub_dataset(val, eval_tf)

    def _hub_dataset(self, ds: Any, transform: Callable | None) -> HubImageDataset:
        missing = [k for k in (self.image_key, self.label_key) if k not in ds.column_names]
        if missing:
            raise PomtValueError(
                f"{self.hub_id} has no column(s) {missing}; its columns are {ds.column_names}: "
                "set image_key/label_key"
            )
        return HubImageDataset(ds, transform, self.image_key, self.label_key, self._label_map)

    def _hub_classes(self, ds: Any) -> None:
        """Class names and the map from the dataset's label ids to ours (wnid names: ImageNet order)."""
        names = hub_label_names(ds, self.label_key)
        if names is None:
            raise PomtValueError(
                f"{self.hub_id}: the {self.label_key!r} column is not a ClassLabel: cannot name classes"
            )
        index = imagenet_labels(names)
        self._label_map = None
        if len(names) == 1000 or index is not None:
            self.wnids, self._class_names = imagenet_wnids(), imagenet_class_names()
            if len(names) != 1000:  # e.g. an imagefolder of wnid folders
                self._label_map = [index[n] for n in names]
        else:
            self.wnids, self._class_names = None, names

    def _node(self, ds: Any) -> Any:
        trainer = getattr(self, "trainer", None)
        world = getattr(trainer, "world_size", 1) if trainer is not None else 1
        if world > 1:
            split_dataset_by_node = require("datasets.distributed", "imagenet").split_dataset_by_node
            return split_dataset_by_node(ds, rank=trainer.global_rank, world_size=world)
        return ds

    def _build_stream(self, train_tf: Callable, eval_tf: Callable) -> None:
        val = load_hub_split(self.hub_id, self.val_split, True, self.hub_kwargs)
        train = load_hub_split(self.hub_id, self.train_split, True, self.hub_kwargs)
        self._hub_classes(train)
        shuffled = HubStreamDataset(
            train.shuffle(seed=self.seed, buffer_size=10_000),
            None,
            self.image_key,
            self.label_key,
            self._label_map,
        )
        items = take_balanced(
            iter(shuffled), self.holdout_size, len(self.class_names), self.stream_scan_limit
        )
        if len(items) < self.holdout_size:
            raise PomtValueError(
                f"scanned {self.stream_scan_limit} streamed images of {self.hub_id}:{self.train_split} and found "
                f"only {len(items)} for a balanced selection of {self.holdout_size}: raise stream_scan_limit"
            )
        self.holdout_dataset = LabelledItems(items, eval_tf)
        self.val_dataset = self.test_dataset = HubStreamDataset(
            self._node(val), eval_tf, self.image_key, self.label_key, self._label_map
        )
        self.train_dataset = HubStreamDataset(
            self._node(train.shuffle(seed=self.seed + 1, buffer_size=10_000)),
            train_tf,
            self.image_key,
            self.label_key,
            self._label_map,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        """Training images; a map-style hub train split is loaded on first use only."""
        self.setup()
        if self.train_dataset is None and self.root is None and not self.streaming:
            if self._train_source is None:
                self._train_source = load_hub_split(self.hub_id, self.train_split, False, self.hub_kwargs)
            self.train_dataset = self._hub_dataset(self._train_source, self._train_tf)
        if self.train_dataset is None:
            raise PomtValueError(f"no train split in {self._describe_source()}: {LAYOUT_HELP}")
        return self._loader(self.train_dataset, shuffle=True)
