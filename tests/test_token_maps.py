"""Where the patches went: pomt.token_groups for POMT, Top-K and ToMe (the counts exactly),
against the blocks' own token sizes and values, at no cost to the model; the figure, the
sweep's figure of its configurations, and the callback logging it."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import cpu_trainer, image_loader, make_tiny_vit, tiny_classifier
from lightning.pytorch.loggers import CSVLogger

import pomt
from pomt.callbacks import POMTCallback
from pomt.lightning.sweep.configurations import Configuration, token_maps_figure
from pomt.method.functional import tome_merge


@pytest.fixture(scope="module")
def deit_small():
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


IMAGES = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("r", [1, 28, 100])
def test_pomt_groups_keep_each_patch_and_fuse_exactly_r_plus_one(deit_small, r):
    pomt.apply_pruning(deit_small, "pomt", r=r, layer=3)
    try:
        groups = pomt.token_groups(deit_small, IMAGES)
    finally:
        pomt.remove_pruning(deit_small)
    assert groups.shape == (2, 196) and groups.dtype == torch.long and (groups >= 0).all()
    for image in groups:
        tokens, sizes = image.unique(return_counts=True)
        assert len(tokens) == 197 - r - 1  # N - r - p distinct groups among the patches
        assert sorted(sizes.tolist())[-1] == r + 1 and (sizes == 1).sum() == len(tokens) - 1
        assert tokens.max() == 197 - r - 1  # the fused token is the last one


def test_topk_drops_r_per_block_and_tome_leaves_as_many_groups_as_tokens(deit_small):
    for method in ("topk", "tome"):
        pomt.apply_pruning(deit_small, method, r=8)
        try:
            groups = pomt.token_groups(deit_small, IMAGES)
        finally:
            pomt.remove_pruning(deit_small)
        for image in groups:
            left = image[image >= 0]
            if method == "topk":
                assert (image < 0).sum() == 8 * 12 and len(left.unique()) == len(left) == 196 - 96
            else:
                assert (image >= 0).all() and len(left.unique()) == 196 - 8 * 12  # ordinary tokens left


def test_tome_groups_are_its_sizes_and_its_weighted_means():
    torch.manual_seed(0)
    x, keys, r, prefix = torch.randn(2, 21, 8), torch.randn(2, 2, 21, 4), 6, 5
    trace = pomt.method.functional.Trace()
    trace.where = torch.arange(prefix, 21).expand(2, -1).clone()
    merged, size = tome_merge(x, keys, torch.ones(2, 21, 1), r, prefix, trace)
    for b in range(2):
        counts = torch.bincount(trace.where[b], minlength=merged.shape[1])
        assert torch.equal(counts[prefix:].float(), size[b, prefix:, 0])  # a group per token, of its size
        for token in range(prefix, merged.shape[1]):
            members = prefix + torch.nonzero(trace.where[b] == token).flatten()  # their input tokens
            torch.testing.assert_close(merged[b, token], x[b, members].mean(0))


def test_tracking_leaves_outputs_and_the_idle_model_as_they_were(deit_small):
    pomt.apply_pruning(deit_small, "tome", r=8)
    try:
        with torch.no_grad():
            before = deit_small(IMAGES)
            pomt.token_groups(deit_small, IMAGES)
            after = deit_small(IMAGES)
        assert torch.equal(before, after)
        assert deit_small._pomt_trace.where is None  # idle again: the blocks only check that
    finally:
        pomt.remove_pruning(deit_small)
    unpruned = pomt.token_groups(deit_small, IMAGES)
    assert torch.equal(unpruned, torch.arange(1, 197).expand(2, -1))  # every patch its own token


def test_the_figure_shows_each_configuration_with_its_tokens_left():
    model = make_tiny_vit(patch_size=4)
    images = torch.randn(3, 3, 32, 32)
    columns = {}
    for label, method, r in (("unpruned", "none", 0), ("pomt r=20", "pomt", 20), ("tome r=5", "tome", 5)):
        pomt.apply_pruning(model, method, r=r, layer=1)
        columns[label] = pomt.token_groups(model, images)
    fig = pomt.plots.plot_token_groups(images, columns, prefix=1, patch_grid=(8, 8))
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 3 * 4
    assert {"unpruned: 65 tokens", "pomt r=20: 45 tokens", "tome r=5: 45 tokens"} <= set(titles)
    hatched = [p for p in fig.axes[2].patches if p.get_hatch()]
    assert len(hatched) == 21  # the fused patches of the first image, greyed with a hatch


def _hatched(ax) -> int:
    return len([p for p in ax.patches if p.get_hatch()])


def test_the_sweeps_figure_shows_each_kind_of_configuration_closest_to_pomt():
    vit = make_tiny_vit(patch_size=4)  # 64 patches + CLS = 65 tokens, 4 blocks
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    configs = [
        Configuration("none", 0),
        Configuration("pomt", 20, selected=True),
        Configuration("tome", 1),
        Configuration("tome", 5),  # mean tokens per block closest to POMT at r=20
        Configuration("topk", 5),
        Configuration("topk", 12),
    ]
    fig = token_maps_figure(vit, images, configs, layer=1)
    assert len(fig.axes) == 2 * 5  # two images, each: the image and four configurations
    for row in range(2):
        image, unpruned, pomt_ax, tome, topk = fig.axes[5 * row : 5 * row + 5]
        assert image.get_title() == ("image" if row == 0 else "")
        assert unpruned.get_title() == "unpruned: 65 tokens" and _hatched(unpruned) == 0
        assert pomt_ax.get_title() == "pomt r=20: 45 tokens"
        assert _hatched(pomt_ax) == 21  # the r + 1 patches fused into the mean token
        assert tome.get_title() == "tome r=5: 45 tokens" and _hatched(tome) == 0  # merged, none dropped
        assert topk.get_title() == "topk r=5: 45 tokens" and _hatched(topk) == 5 * 4  # dropped, 5 a block
    unpruned = pomt.token_groups(vit, images)  # the model is left unpruned
    assert torch.equal(unpruned, torch.arange(1, 65).expand(2, -1))


def test_the_callback_logs_token_maps_to_its_loggers(tmp_path, monkeypatch):
    figures = []
    draw = pomt.plots.plot_token_groups

    def recorded(images, groups, **kwargs):
        figures.append((dict(groups), draw(images, groups, **kwargs)))
        return figures[-1][1]

    monkeypatch.setattr(pomt.plots, "plot_token_groups", recorded)
    logger = CSVLogger(tmp_path, name="run")
    callback = POMTCallback(r=6, layer=1, log_token_maps=2)
    cpu_trainer(callbacks=[callback], logger=logger).test(tiny_classifier(), image_loader())
    assert (tmp_path / "run" / "version_0" / "pomt_token_maps.png").stat().st_size > 1000
    [(groups, fig)] = figures
    assert list(groups) == ["pomt r=6"] and groups["pomt r=6"].shape == (2, 16)  # two images, 16 patches
    for image in groups["pomt r=6"]:
        assert sorted(image.unique(return_counts=True)[1].tolist())[-1] == 7  # r + 1 fused
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["image", "pomt r=6: 11 tokens", "", "pomt r=6: 11 tokens"]  # 17 - 6 left
    assert _hatched(fig.axes[1]) == _hatched(fig.axes[3]) == 7
