"""Shared fixtures: tiny random-weight ViTs, so every test runs offline on a CPU in seconds."""

from __future__ import annotations

import os

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from pomt import SearchConfig, Target

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def reference_merge(
    tokens: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, prefix: int, merges: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """ToMe's bipartite soft matching, token by token: the tests' reference for one block.

    ``tokens`` (n, c), their ``size`` (n,) and ``keys`` (n, d, the keys' mean over heads).
    Tokens at even positions after the ``prefix`` form set A, odd ones set B; each A token's
    most similar B token by cosine similarity; the ``merges`` most similar edges merge their A
    token into the B token by size-weighted average. The prefix leaves first, then the unmerged
    A tokens, then the B tokens, each in position order. Returns the tokens, their sizes and
    the index each came from (a merged token: its B token's)."""
    n = tokens.shape[0]
    keys = keys / keys.norm(dim=-1, keepdim=True)
    set_a = [i for i in range(prefix, n) if i % 2 == 0]
    set_b = [i for i in range(prefix, n) if i % 2 == 1]
    best, where = (keys[set_a] @ keys[set_b].T).max(dim=1)
    edges = sorted(range(len(set_a)), key=lambda e: -float(best[e]))[:merges]
    mass = {i: tokens[i] * size[i] for i in range(n)}
    weight = {i: size[i] for i in range(n)}
    for e in edges:
        a, b = set_a[e], set_b[int(where[e])]
        mass[b], weight[b] = mass[b] + mass.pop(a), weight[b] + weight.pop(a)
    order = list(range(prefix)) + [i for i in set_a if i in mass] + set_b
    return torch.stack([mass[i] / weight[i] for i in order]), torch.stack([weight[i] for i in order]), order


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run on one thread: deterministic, and two busy-waiting threads on a shared
    2-core machine are far slower than one. Benchmarks, not tests, measure speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_vit(**overrides) -> VisionTransformer:
    """A 4-block ViT on 32x32 inputs: 16 patches + 1 CLS = 17 tokens."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return VisionTransformer(**kwargs).eval()


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    return make_tiny_vit()


TINY_KWARGS = dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)


def tiny_classifier(**overrides):
    """A ``ViTClassifier`` around the same 4-block ViT (17 tokens on 32x32, 10 classes)."""
    from pomt.lightning import ViTClassifier

    torch.manual_seed(0)
    kwargs = dict(model_name="vit_tiny_patch16_224", num_classes=10, img_size=32, model_kwargs=TINY_KWARGS)
    kwargs.update(overrides)
    return ViTClassifier(**kwargs)


def image_loader(n: int = 32, batch_size: int = 8, seed: int = 0, labels: bool = True, size: int = 32):
    """A DataLoader of random ``(images, labels)`` (or images only) batches for 10 classes."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    tensors = (images, torch.randint(0, 10, (n,), generator=g)) if labels else (images,)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


def cpu_trainer(**overrides):
    """A quiet single-process CPU Trainer (no logger, checkpoints, progress bar or summary)."""
    import lightning.pytorch as pl

    kwargs = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def staircase_profile(module, path, batch_size: int = 8, layer: int = 1):
    """A saved latency profile of ``module`` (17 tokens) on this CPU, as if measured: 10 ms for
    n >= 12 tokens, 5 ms below (a staircase with one step)."""
    from pomt.offline.profiling import profile_latency
    from pomt.timing import TimingStats

    def fake(n: int) -> TimingStats:
        return TimingStats.from_samples([10.0 if n >= 12 else 5.0] * 5)

    lat = profile_latency(
        module,
        target=Target(batch_size=batch_size),
        layer=layer,
        timing=fake,
        progress=False,
        search=SearchConfig(grid=range(2, 18)),
    )
    lat.save(path)
    return path
