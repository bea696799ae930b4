"""Where ImageNet-style images come from: a local ILSVRC tree or image folder, or a Hugging
Face hub dataset (map-style or streamed). ``ImageNetDataModule`` builds its splits from these."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, IterableDataset

from pomt.datamodules._common import IMAGE_EXTENSIONS, image_files
from pomt.errors import PomtValueError, require

__all__ = [
    "DEFAULT_HUB_ID",
    "LAYOUT_HELP",
    "LocalTree",
    "find_local_tree",
    "split_samples",
    "HubImageDataset",
    "HubStreamDataset",
    "load_hub_split",
    "hub_label_names",
]

DEFAULT_HUB_ID = "ILSVRC/imagenet-1k"
GATED_HUB_IDS = {DEFAULT_HUB_ID, "imagenet-1k", "ILSVRC/imagenet-21k"}
VAL_SOLUTION_CSV = "LOC_val_solution.csv"
LAYOUT_HELP = (
    "expected an ILSVRC tree (CLS-LOC/train/<wnid>/*.JPEG and CLS-LOC/val/ either flat with "
    f"{VAL_SOLUTION_CSV} beside it or as val/<wnid>/*.JPEG) or an image folder (<root>/<class>/<image>, "
    "optionally under <root>/train and <root>/val)"
)


# ----------------------------------------------------------------------------- local trees
class LocalTree:
    """Where the splits of a local dataset lie: ``train`` / ``val`` folders (either may be None)
    and, for a flat ILSVRC val folder, the CSV that labels it."""

    def __init__(self, root: Path, train: Path | None, val: Path | None, val_csv: Path | None) -> None:
        self.root, self.train, self.val, self.val_csv = root, train, val, val_csv

    def __repr__(self) -> str:
        return f"LocalTree(root={self.root}, train={self.train}, val={self.val}, val_csv={self.val_csv})"


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_csv(base: Path, root: Path) -> Path | None:
    for folder in (base, *base.parents):
        candidate = folder / VAL_SOLUTION_CSV
        if candidate.is_file():
            return candidate
        if folder == root or folder == folder.parent:
            break
    return None


def find_local_tree(root: str | os.PathLike[str]) -> LocalTree:
    """Locate the train/val folders of an ILSVRC tree or an image folder under ``root``."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"dataset root not found: {root} ({LAYOUT_HELP})")
    if not root.is_dir():
        raise PomtValueError(f"dataset root {root} is a file, not a folder ({LAYOUT_HELP})")
    bases = [root, root / "CLS-LOC", root / "Data" / "CLS-LOC", root / "ILSVRC" / "Data" / "CLS-LOC"]
    for base in bases:
        train = base / "train" if (base / "train").is_dir() else None
        val = next((base / n for n in ("val", "validation") if (base / n).is_dir()), None)
        if train is not None or val is not None:
            return LocalTree(root, train, val, _find_csv(base, root))
    if _subdirs(root):
        return LocalTree(root, None, root, None)  # a plain image folder: one labelled split
    if image_files(root):
        raise PomtValueError(f"{root} holds images but no class folders: {LAYOUT_HELP}")
    raise PomtValueError(f"no images or class folders found in {root}: {LAYOUT_HELP}")


def _scan_class_folders(folder: Path) -> dict[str, list[str]]:
    """``{class folder name: sorted image paths}`` of ``folder/<class>/<image>``."""
    found = {}
    for sub in _subdirs(folder):
        with os.scandir(sub) as entries:
            files = sorted(
                e.path for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in _EXTS
            )
        found[sub.name] = files
    return found


def _read_val_csv(csv_path: Path) -> dict[str, str]:
    """``{image id: wnid}`` from ``LOC_val_solution.csv`` (first wnid of each PredictionString)."""
    labels = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise PomtValueError(
                f"{csv_path} is not an ILSVRC val solution file: expected the columns ImageId,PredictionString"
            )
        for row in reader:
            parts = row["PredictionString"].split()
            if parts:
                labels[row["ImageId"]] = parts[0]
    if not labels:
        raise PomtValueError(f"{csv_path} has no labelled rows")
    return labels


def _flat_val_samples(val: Path, csv_path: Path | None) -> list[tuple[str, str]]:
    files = image_files(val)
    if not files:
        raise PomtValueError(f"no images found in {val}: {LAYOUT_HELP}")
    if csv_path is None:
        raise FileNotFoundError(
            f"{val} is a flat ILSVRC val folder but no {VAL_SOLUTION_CSV} was found beside it or in a parent "
            "folder: put the CSV (from the Kaggle ImageNet release) there, or sort val into val/<wnid>/ folders"
        )
    labels = _read_val_csv(csv_path)
    unlabelled = [p.name for p in files if p.stem not in labels]
    if unlabelled:
        raise PomtValueError(
            f"{len(unlabelled)} images in {val} have no row in {csv_path} (e.g. {', '.join(unlabelled[:3])})"
        )
    return [(str(p), labels[p.stem]) for p in files]


def split_samples(folder: Path, csv_path: Path | None) -> list[tuple[str, str]]:
    """``(path, class name)`` of one split folder: class subfolders, or flat + CSV."""
    if _subdirs(folder):
        samples = [(p, name) for name, files in _scan_class_folders(folder).items() for p in files]
        if not samples:
            raise PomtValueError(f"the class folders in {folder} hold no images: {LAYOUT_HELP}")
        return samples
    return _flat_val_samples(folder, csv_path)


_EXTS = set(IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------- hub datasets
class _HubRows:
    """What both hub datasets share: the rows' image/label keys and the label mapping
    (``label_map`` turns the dataset's label ids into the module's, e.g. wnid folders
    into ImageNet order)."""

    def __init__(
        self,
        ds: Any,
        transform: Callable | None,
        image_key: str,
        label_key: str,
        label_map: list[int] | None = None,
    ) -> None:
        self.ds, self.transform, self.image_key, self.label_key = ds, transform, image_key, label_key
        self.label_map = label_map

    def _label(self, value: Any) -> int:
        return self.label_map[int(value)] if self.label_map is not None else int(value)

    def _example(self, row: Any) -> tuple[Any, int]:
        image = row[self.image_key].convert("RGB")
        return (self.transform(image) if self.transform else image), self._label(row[self.label_key])


class HubImageDataset(_HubRows, Dataset):
    """``(transform(image), label)`` rows of a map-style Hugging Face dataset."""

    @property
    def labels(self) -> list[int]:
        return [self._label(v) for v in self.ds[self.label_key]]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self._example(self.ds[int(index)])


class HubStreamDataset(_HubRows, IterableDataset):
    """``(transform(image), label)`` from a streamed Hugging Face dataset (shards split over workers)."""

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        for row in self.ds:
            yield self._example(row)


def _hub_token(hub_kwargs: dict[str, Any]) -> str | None:
    if hub_kwargs.get("token"):
        return str(hub_kwargs["token"])
    try:
        from huggingface_hub import get_token

        return get_token()
    except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
        return os.environ.get("HF_TOKEN")


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_help(hub_id: str) -> str:
    return (
        f"To use {hub_id}: accept its terms at https://huggingface.co/datasets/{hub_id}, then set HF_TOKEN=<your "
        "token> or run `huggingface-cli login`, with network access (or a warm `datasets` cache). Without "
        "network, point `root` at a local ILSVRC tree or image folder instead."
    )


def load_hub_split(hub_id: str, split: str, streaming: bool, hub_kwargs: dict[str, Any]) -> Any:
    """One split of a hub dataset, turning missing credentials and no network into clear errors."""
    datasets = require("datasets", "imagenet")

    if hub_id in GATED_HUB_IDS and not _offline() and _hub_token(hub_kwargs) is None:
        raise PomtValueError(
            f"{hub_id} is a gated dataset and no Hugging Face token was found (HF_TOKEN unset, not logged in). "
            + _hub_help(hub_id)
        )
    try:
        return datasets.load_dataset(hub_id, split=split, streaming=streaming, **hub_kwargs)
    except (ConnectionError, TimeoutError, OSError) as err:
        if isinstance(err, FileNotFoundError) and "offline" not in str(err).lower():
            raise PomtValueError(
                f"hub dataset {hub_id!r} (split {split!r}) not found: {err}. " + _hub_help(hub_id)
            ) from err
        raise PomtValueError(
            f"cannot reach the Hugging Face hub for {hub_id!r} (split {split!r}): no network, offline mode, "
            f"or nothing cached ({type(err).__name__}: {err}). " + _hub_help(hub_id)
        ) from err
    except Exception as err:
        name = type(err).__name__
        if name in ("DatasetNotFoundError", "GatedRepoError", "RepositoryNotFoundError", "HfHubHTTPError"):
            raise PomtValueError(
                f"hub dataset {hub_id!r} (split {split!r}) is not accessible ({name}: {err}). "
                + _hub_help(hub_id)
            ) from err
        if isinstance(err, ValueError) and "split" in str(err).lower():
            raise PomtValueError(f"hub dataset {hub_id!r} has no split {split!r}: {err}") from err
        raise


def hub_label_names(ds: Any, label_key: str) -> list[str] | None:
    feature = getattr(ds, "features", None) or {}
    names = getattr(feature.get(label_key), "names", None) if hasattr(feature, "get") else None
    return list(names) if names else None
