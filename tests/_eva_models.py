"""Tiny random-weight models of timm's Eva family (no downloads), one per variant pomt supports."""

from __future__ import annotations

import timm
import torch
from timm.models.eva import Eva
from torch import nn

TINY = dict(embed_dim=64, depth=4, num_heads=2, num_classes=10)


def _timm(name: str, **overrides) -> nn.Module:
    return timm.create_model(name, pretrained=False, **{**TINY, **overrides})


def _gated_qk_norm() -> nn.Module:
    model = Eva(img_size=64, patch_size=16, qk_norm=True, use_rot_pos_emb=True, init_values=0.1, **TINY)
    for block in model.blocks:  # Eva has no switch for it: EvaAttention's gate, as EvaBlock(gated_attn=True)
        block.attn.gate = nn.Linear(64, 64)
    return model


BUILDERS = {
    # CLS + 4 registers, rope_type="dinov3" (rotate-half), layer scale, dynamic image size
    "dinov3": lambda: _timm("vit_small_patch16_dinov3", img_size=80),
    # cat RoPE, SwiGLU, separate q_proj/k_proj/v_proj
    "eva02": lambda: _timm("eva02_tiny_patch14_224", img_size=70, qkv_fused=False),
    # q_proj/k_proj/v_proj, the attention's output norm (scale_attn_inner), SwiGLU with its norm
    "eva02_clip": lambda: _timm("eva02_base_patch16_clip_224", img_size=64),
    # RoPE-ViT mixed: one learned table per block (and per head), AttentionRope
    "rope_mixed": lambda: _timm("vit_small_patch16_rope_mixed_224", img_size=64),
    # Perception Encoder: AttentionRope, pre-transformer norm, attention-pool head, xy grid
    "pe": lambda: _timm("vit_pe_core_tiny_patch16_384", img_size=64),
    # EvaBlockPostNorm with RoPE
    "post_norm": lambda: Eva(img_size=64, patch_size=16, use_post_norm=True, use_rot_pos_emb=True, **TINY),
    # q/k norms and the attention gate
    "gated_qk_norm": _gated_qk_norm,
    # grouped key/value heads (AttentionRope, one kv head for two query heads)
    "gqa": lambda: Eva(
        img_size=64,
        patch_size=16,
        attn_type="rope",
        qkv_fused=False,
        num_kv_heads=1,
        use_rot_pos_emb=True,
        **TINY,
    ),
}


def make_eva(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[family]()
    with torch.no_grad():  # random layer scale / biases away from their neutral init
        for name, param in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2", "q_bias", "v_bias")):
                param.copy_(torch.randn_like(param) * 0.5)
    return model.eval()


def image_batch(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    h, w = model.patch_embed.img_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
