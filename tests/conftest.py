"""Shared fixtures: tiny random-weight ViTs, so every test runs offline on a CPU in seconds."""

from __future__ import annotations

import os

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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
