"""Datamodules: the embedded digits, local ILSVRC trees and image folders, the hub path (mocked
or a local ``imagefolder``), the holdout split, per-model preprocessing and the errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import pomt.datamodules.sources as sources
from pomt.data import balanced_indices
from pomt.datamodules import DigitsDataModule, ImageNetDataModule
from pomt.preprocessing import imagenet_wnids

WNIDS = imagenet_wnids()
# four classes far apart in the standard order, so a label is wrong unless mapped to it
CLASSES = [WNIDS[7], WNIDS[100], WNIDS[500], WNIDS[999]]
SMALL = {"input_size": 16}  # keep decoded tensors tiny
# most trees here are read with timm's default preprocessing on purpose
pytestmark = pytest.mark.filterwarnings("ignore:no model to take the preprocessing from")


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (12, 14, 3), dtype=np.uint8)).save(path)


def _class_tree(folder: Path, classes: list[str], per_class: int, ext: str = ".JPEG") -> None:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(folder / name / f"{name}_{i}{ext}", seed=1000 * c + i)


def _ilsvrc_kaggle(root: Path, per_class_val: int = 6) -> Path:
    """The Kaggle ILSVRC layout: ILSVRC/Data/CLS-LOC/{train/<wnid>, val (flat)} + LOC_val_solution.csv."""
    cls_loc = root / "ILSVRC" / "Data" / "CLS-LOC"
    _class_tree(cls_loc / "train", CLASSES, 5)
    rows = ["ImageId,PredictionString"]
    for i in range(per_class_val * len(CLASSES)):
        wnid = CLASSES[i % len(CLASSES)]
        image_id = f"ILSVRC2012_val_{i + 1:08d}"
        _png(cls_loc / "val" / f"{image_id}.JPEG", seed=i)
        rows.append(f"{image_id},{wnid} 1 2 30 40 {wnid} 5 6 20 30")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def _expected_label(path: str, csv_labels: dict[str, str] | None = None) -> int:
    p = Path(path)
    wnid = csv_labels[p.stem] if csv_labels is not None else p.parent.name
    return WNIDS.index(wnid)


# ----------------------------------------------------------------------------- splits
def test_balanced_indices_is_balanced_seeded_and_checked():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    sample = balanced_indices(labels, 30, seed=3)
    assert len(set(sample)) == 30
    assert sorted(Counter(labels[i] for i in sample).values()) == [10, 10, 10]
    assert balanced_indices(labels, 30, seed=3) == sample
    assert balanced_indices(labels, 30, seed=4) != sample
    # a class that runs out is made up by the others
    assert Counter(labels[i] for i in balanced_indices(labels, 70, seed=0))[2] == 20
    with pytest.raises(ValueError, match="cannot draw 101"):
        balanced_indices(labels, 101, seed=0)


# ----------------------------------------------------------------------------- digits
def test_digits_splits_are_disjoint_stratified_and_reproducible():
    dm = DigitsDataModule(img_size=32, batch_size=50, holdout_size=100, seed=1)
    dm.setup("fit")
    parts = dm.split_indices
    every = [i for part in parts.values() for i in part]
    assert len(every) == len(set(every)) == 1797  # disjoint and complete
    assert len(parts["test"]) == round(0.2 * 1797)
    assert Counter(dm.holdout_dataset.labels.tolist()) == {d: 10 for d in range(10)}
    test_counts = Counter(dm.test_dataset.labels.tolist())
    assert max(test_counts.values()) - min(test_counts.values()) <= 1
    again = DigitsDataModule(img_size=32, holdout_size=100, seed=1)
    again.setup()
    assert again.split_indices == parts
    other = DigitsDataModule(img_size=32, holdout_size=100, seed=2)
    other.setup()
    assert other.split_indices["test"] != parts["test"]
    assert dm.num_classes == 10 and dm.class_names[3] == "3"


def test_digits_batches_are_vit_ready_real_images():
    dm = DigitsDataModule(img_size=48, batch_size=16, augment=True)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (16, 3, 48, 48) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(x[:, 0], x[:, 1])  # grey digits in three channels
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.3  # real strokes, not blank
    assert dm.data_config["input_size"] == (3, 48, 48)
    # the evaluation splits are deterministic; augmentation only touches training images
    assert torch.equal(next(iter(dm.test_dataloader()))[0], x)
    train = dm.train_dataset
    assert not torch.equal(train[0][0], train[0][0]) and train[0][1] == train[0][1]
    for loader in (dm.val_dataloader(), dm.holdout_dataloader(), dm.predict_dataloader()):
        assert next(iter(loader))[0].shape[1:] == (3, 48, 48)


def test_digits_follows_or_checks_the_model_input_size():
    vit = VisionTransformer(img_size=40, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    trainer = SimpleNamespace(lightning_module=SimpleNamespace(vit=vit))
    dm = DigitsDataModule(img_size=None)
    assert dm.test_dataset is None and next(iter(dm.test_dataloader()))[0].shape[-1] == 32  # no model yet
    dm.trainer = trainer
    dm.setup()  # attached later: the splits follow the model
    assert dm.test_dataset[0][0].shape == (3, 40, 40)
    wrong = DigitsDataModule(img_size=32)
    wrong.trainer = trainer
    with pytest.raises(ValueError, match="img_size=32 but the model expects 40x40"):
        wrong.setup()


def test_digits_rejects_bad_arguments():
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataModule(test_fraction=1.5)
    with pytest.raises(ValueError, match="no training images"):
        DigitsDataModule(holdout_size=1500).setup()


# ----------------------------------------------------------------------------- local trees
def test_ilsvrc_flat_val_with_csv_uses_standard_labels_and_holds_out_selection(tmp_path):
    root = _ilsvrc_kaggle(tmp_path)
    dm = ImageNetDataModule(
        root=str(root), data_config=SMALL, holdout_size=8, batch_size=4, num_workers=0, seed=0
    )
    dm.setup("test")
    assert dm.tree.val_csv == root / "LOC_val_solution.csv"
    assert dm.num_classes == 1000 and dm.class_names[0].startswith("tench")
    csv_labels = {
        line.split(",")[0]: line.split(",")[1].split()[0]
        for line in (root / "LOC_val_solution.csv").read_text().splitlines()[1:]
    }
    selection = dm.holdout_dataset.samples
    reported = dm.test_dataset.samples
    assert len(selection) == 8 and len(reported) == 24 - 8
    assert not {p for p, _ in selection} & {p for p, _ in reported}  # never estimate on the reported split
    assert Counter(label for _, label in selection) == {WNIDS.index(w): 2 for w in CLASSES}
    for path, label in selection + reported:
        assert label == _expected_label(path, csv_labels)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 16, 16)
    assert set(y.tolist()) <= {WNIDS.index(w) for w in CLASSES}
    # the training split is the train/<wnid> tree
    train = dm.train_dataset.samples
    assert len(train) == 20 and all(label == _expected_label(p) for p, label in train)


def test_ilsvrc_val_in_wnid_folders_with_selection_from_train(tmp_path):
    _class_tree(tmp_path / "CLS-LOC" / "train", CLASSES, 6)
    _class_tree(tmp_path / "CLS-LOC" / "val", CLASSES, 3, ext=".png")
    dm = ImageNetDataModule(
        root=str(tmp_path), data_config=SMALL, holdout_from="train", holdout_size=4, num_workers=0
    )
    dm.setup()
    assert len(dm.test_dataset) == 12  # the whole val split is reported
    assert len(dm.holdout_dataset) == 4 and len(dm.train_dataset) == 20
    assert not {p for p, _ in dm.holdout_dataset.samples} & {p for p, _ in dm.train_dataset.samples}
    assert sorted(label for _, label in dm.holdout_dataset.samples) == sorted(WNIDS.index(w) for w in CLASSES)
    for path, label in dm.test_dataset.samples:
        assert label == _expected_label(path)
    x, y = next(iter(dm.holdout_dataloader()))
    assert x.shape[1:] == (3, 16, 16)


def test_plain_image_folder_with_own_class_names(tmp_path):
    _class_tree(tmp_path, ["dog", "cat", "bird"], 4, ext=".png")
    dm = ImageNetDataModule(root=str(tmp_path), data_config=SMALL, holdout_size=3, num_workers=0)
    assert dm.class_names == ["bird", "cat", "dog"] and dm.num_classes == 3
    assert dm.wnids is None
    for path, label in dm.test_dataset.samples:
        assert dm.class_names[label] == Path(path).parent.name
    assert len(dm.test_dataset) == 9
    with pytest.raises(ValueError, match="no train split"):
        dm.train_dataloader()


def test_preprocessing_comes_from_each_model(tmp_path):
    _class_tree(tmp_path / "val", CLASSES[:2], 3)
    deit = ImageNetDataModule(root=str(tmp_path), model_name="deit_small_patch16_224", holdout_size=2)
    augreg = ImageNetDataModule(
        root=str(tmp_path), model_name="vit_base_patch16_224.augreg_in21k", holdout_size=2
    )
    deit.setup()
    augreg.setup()
    assert deit.data_config["crop_pct"] == 0.9 and deit.data_config["interpolation"] == "bicubic"
    assert augreg.data_config["mean"] == (0.5, 0.5, 0.5)
    assert deit.data_config["mean"] != augreg.data_config["mean"]
    # a built model: its actual input size wins over the pretrained one (timm reports 224 here)
    tiny = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    dm = ImageNetDataModule(root=str(tmp_path), holdout_size=2, num_workers=0).use_model(tiny)
    assert next(iter(dm.test_dataloader()))[0].shape[1:] == (3, 32, 32)
    with pytest.warns(UserWarning, match="no model to take the preprocessing from"):
        ImageNetDataModule(root=str(tmp_path), holdout_size=2).setup()
    # and the model the trainer runs is used when nothing else is given
    via_trainer = ImageNetDataModule(root=str(tmp_path), holdout_size=2, num_workers=0)
    assert via_trainer.num_classes == 1000  # builds the splits before any model is known
    assert via_trainer.test_dataset[0][0].shape[1:] == (224, 224)
    via_trainer.trainer = SimpleNamespace(lightning_module=SimpleNamespace(vit=tiny))
    via_trainer.setup()
    assert via_trainer.data_config["input_size"] == (3, 32, 32)
    assert via_trainer.test_dataset[0][0].shape[1:] == (32, 32)
    assert via_trainer.holdout_dataset[0][0].shape[1:] == (32, 32)


# ----------------------------------------------------------------------------- errors
def test_missing_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*expected an ILSVRC tree"):
        ImageNetDataModule(root=str(missing)).setup()


def test_flat_val_without_csv_says_what_is_missing(tmp_path):
    for i in range(3):
        _png(tmp_path / "CLS-LOC" / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", i)
    with pytest.raises(FileNotFoundError, match="LOC_val_solution.csv"):
        ImageNetDataModule(root=str(tmp_path), data_config=SMALL).setup()


def test_csv_without_a_row_for_an_image(tmp_path):
    root = _ilsvrc_kaggle(tmp_path)
    _png(root / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "stray.JPEG", 0)
    with pytest.raises(ValueError, match="1 images .* no row .*stray.JPEG"):
        ImageNetDataModule(root=str(root), data_config=SMALL).setup()


def test_wrong_layouts_and_empty_splits(tmp_path):
    flat = tmp_path / "flat"
    _png(flat / "a.png", 0)
    with pytest.raises(ValueError, match="no class folders"):
        ImageNetDataModule(root=str(flat)).setup()
    (tmp_path / "empty" / "val" / CLASSES[0]).mkdir(parents=True)
    with pytest.raises(ValueError, match="hold no images"):
        ImageNetDataModule(root=str(tmp_path / "empty")).setup()
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no images or class folders"):
        ImageNetDataModule(root=str(tmp_path / "nothing")).setup()
    _class_tree(tmp_path / "small" / "val", CLASSES[:2], 2)
    with pytest.raises(ValueError, match="holdout_size=4 leaves nothing"):
        ImageNetDataModule(root=str(tmp_path / "small"), data_config=SMALL, holdout_size=4).setup()
    with pytest.raises(ValueError, match="holdout_from"):
        ImageNetDataModule(holdout_from="test")


# ----------------------------------------------------------------------------- hub
def test_gated_hub_dataset_without_token_says_how_to_fix(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "_hub_token", lambda kwargs: None)

    def no_network(*args, **kwargs):
        raise AssertionError("must not reach the hub without a token")

    monkeypatch.setattr("datasets.load_dataset", no_network)
    dm = ImageNetDataModule(num_workers=0)
    with pytest.raises(ValueError, match="gated.*no Hugging Face token") as err:
        dm.setup()
    assert "HF_TOKEN" in str(err.value) and "huggingface-cli login" in str(err.value)
    assert "root" in str(err.value)  # the local alternative


def test_hub_offline_or_unreachable_says_so(monkeypatch):
    monkeypatch.setattr(sources, "_hub_token", lambda kwargs: "hf_dummy")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'ILSVRC/imagenet-1k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(ValueError, match="cannot reach the Hugging Face hub.*no network") as err:
        ImageNetDataModule(num_workers=0).setup()
    assert "HF_TOKEN" in str(err.value)


def test_hub_path_with_a_local_imagefolder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    _class_tree(data / "train", CLASSES, 2)
    _class_tree(data / "val", CLASSES, 3)
    dm = ImageNetDataModule(
        hub_id="imagefolder",
        hub_kwargs={"data_dir": str(data), "cache_dir": str(tmp_path / "cache")},
        data_config=SMALL,
        holdout_size=4,
        batch_size=4,
        num_workers=0,
    )
    dm.setup()
    assert dm.num_classes == 1000  # wnid folders map onto the standard order
    assert len(dm.holdout_dataset) == 4 and len(dm.test_dataset) == 8
    assert sorted(dm.holdout_dataset.labels) == sorted(WNIDS.index(w) for w in CLASSES)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 16, 16) and set(y.tolist()) <= {WNIDS.index(w) for w in CLASSES}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 16, 16)
    assert len(dm.train_dataset) == 8


def test_trainer_runs_the_imagenet_module_with_the_models_preprocessing(tmp_path):
    import lightning.pytorch as pl

    from pomt.lightning import ViTClassifier

    _class_tree(tmp_path / "train", CLASSES[:2], 3)
    _class_tree(tmp_path / "val", CLASSES[:2], 3)
    model = ViTClassifier(
        "vit_tiny_patch16_224",
        num_classes=1000,
        img_size=32,
        model_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2),
    )
    dm = ImageNetDataModule(root=str(tmp_path), holdout_size=2, batch_size=2, num_workers=0)
    trainer = pl.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)  # would fail on 224x224 inputs
    assert dm.data_config["input_size"] == (3, 32, 32)
    assert dm.data_config["crop_pct"] == model.vit.pretrained_cfg["crop_pct"]
    assert trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc1"] >= 0.0
