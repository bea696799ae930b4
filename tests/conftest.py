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


def make_tiny_vit(**overrides) -> VisionTransformer:
    """A 4-block ViT on 32x32 inputs: 16 patches + 1 CLS = 17 tokens."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return VisionTransformer(**kwargs).eval()


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    return make_tiny_vit()
