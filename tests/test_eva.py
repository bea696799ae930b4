"""POMT, Top-K and ToMe on timm's Eva family (rotary positions): bit-exact at r = 0, equal to an
independent reference at r > 0 (timm's own unmodified blocks run image by image on the kept
tokens with their gathered rotary rows), exact token counts, and the usual API."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from _eva_models import BUILDERS, image_batch, make_eva
from conftest import reference_merge
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import EvaBlockPostNorm
from torch import nn

import pomt
from pomt.errors import PruningError
from pomt.method.rope import rope_rows
from pomt.models import unsupported_reason

FAMILIES = list(BUILDERS)
CASES = [("pomt", 6, 1), ("topk", 2, 0), ("tome", 3, 0)]


@pytest.fixture(scope="module", params=FAMILIES)
def eva(request):
    return request.param, make_eva(request.param)


def outputs_per_block(model: nn.Module, x: torch.Tensor) -> list[int]:
    counts: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return counts


# ----------------------------------------------------------------------------- the reference


@contextlib.contextmanager
def spied_attention():
    """Record the q, k, v timm's attention hands to the fused attention kernel."""
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q, k, v))
        return real(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention = real


def gathered_rows(table: torch.Tensor, positions: list[int | None]) -> torch.Tensor:
    """One image's rotary rows, (1, 1 or heads, n, dim): row j of ``table`` for a token from
    patch j, the identity rotation (sin 0, cos 1) for a token with no position (None)."""
    dim = table.shape[-1]
    identity = torch.cat([torch.zeros(dim // 2), torch.ones(dim // 2)])
    heads = table if table.ndim == 3 else table[None]
    rows = [heads[:, j] if j is not None else identity.expand(heads.shape[0], dim) for j in positions]
    return torch.stack(rows, dim=1)[None]


def attention_branch(block: nn.Module, t: torch.Tensor, rows, bias=None, rotate_scores=True):
    """timm's own attention on ``t``; returns the residual output and the q, k, v it used."""
    post = isinstance(block, EvaBlockPostNorm)
    h = t if post else block.norm1(t)
    with spied_attention() as seen:
        out = block.attn(h, rope=rows, attn_mask=bias)
        if not rotate_scores:
            block.attn(h, rope=None, attn_mask=bias)
    q, k, v = seen[-1]
    if post:
        return t + block.norm1(out), q, k, v
    return t + (out if block.gamma_1 is None else block.gamma_1 * out), q, k, v


def mlp_branch(block: nn.Module, t: torch.Tensor) -> torch.Tensor:
    if isinstance(block, EvaBlockPostNorm):
        return t + block.norm2(block.mlp(t))
    out = block.mlp(block.norm2(t))
    return t + (out if block.gamma_2 is None else block.gamma_2 * out)


def reference(model, x, method: str, r: int, layer: int, rotate_scores: bool = True) -> torch.Tensor:
    """docs/method.md (sections 2, 3 and 6) written out image by image on timm's modules."""
    p = model.num_prefix_tokens
    outputs = []
    for img in x:
        t = model.patch_embed(img[None])
        t, rope = model._pos_embed(t)
        t = model.norm_pre(t)
        positions: list[int | None] = list(range(t.shape[1] - p))
        size = torch.ones(t.shape[1])
        for i, block in enumerate(model.blocks):
            table = rope[i] if model.rope_mixed else rope
            rows = gathered_rows(table, positions)
            if not (method in ("topk", "tome") or i == layer):
                t = block(t, rope=rows)
                continue
            bias = size.log()[None, None, None, :] if method == "tome" else None
            t, q, k, v = attention_branch(block, t, rows, bias, rotate_scores)
            y, n = t[0], t.shape[1]
            probs = (q[0] @ k[0].transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (H, N, N)
            if method == "pomt":
                a = probs[:, p:, p:].amax(dim=0).sum(dim=0)
                score = a / a.max() + v[0].amax(dim=0).sum(dim=-1).softmax(dim=0)[p:]
                ranked = sorted(range(n - p), key=lambda j: -float(score[j]))
                keep = n - p - r - 1
                fused = y[p:][ranked[keep:]].mean(dim=0, keepdim=True)
                y = torch.cat([y[:p], y[p:][ranked[:keep]], fused])
                positions = [positions[j] for j in ranked[:keep]] + [None]  # fused: no rotation
            elif method == "topk":
                importance = probs[:, 0, p:].mean(dim=0)
                kept = sorted(sorted(range(n - p), key=lambda j: -float(importance[j]))[: n - p - r])
                y = torch.cat([y[:p], y[p:][kept]])
                positions = [positions[j] for j in kept]
            else:
                y, size, order = reference_merge(y, size, k[0].mean(dim=0), p, min(r, (n - p) // 2))
                positions = [positions[i - p] for i in order[p:]]  # merged: the destination's row
            t = mlp_branch(block, y[None])
        outputs.append(model.forward_head(model.norm(t))[0])
    return torch.stack(outputs)


# ----------------------------------------------------------------------------- exactness


def test_layout_and_support(eva):
    family, model = eva
    assert unsupported_reason(model) is None
    layout = pomt.token_layout(model)
    assert layout.prefix == (5 if family == "dinov3" else 1)
    assert layout.n_total == layout.prefix + model.patch_embed.grid_size[0] * model.patch_embed.grid_size[1]


@pytest.mark.parametrize("method", ["pomt", "topk", "tome"])
def test_r0_equals_unpruned_bit_for_bit(eva, method):
    _, model = eva
    x = image_batch(model)
    with torch.no_grad():
        expected = model(x)
        with pomt.pruned(model, method, r=0, layer=1):
            assert torch.equal(model(x), expected)


@pytest.mark.parametrize("method,r,layer", CASES)
def test_equals_timm_blocks_on_the_kept_tokens(eva, method, r, layer):
    _, model = eva
    x = image_batch(model, seed=r)
    with torch.no_grad(), pomt.pruned(model, method, r=r, layer=layer):
        ours = model(x)
    with torch.no_grad():
        theirs = reference(model, x, method, r, layer)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method,r,layer", CASES)
def test_token_counts_are_exact(eva, method, r, layer):
    _, model = eva
    x = image_batch(model)
    with pomt.pruned(model, method, r=r, layer=layer):
        assert outputs_per_block(model, x) == list(pomt.pruning_config(model).schedule)
        assert pomt.token_groups(model, x).shape == (2, pomt.token_layout(model).n_patches)


def test_pomt_scores_from_rotated_queries_and_keys():
    """The score is the block's own attention: after q/k norms and rotation; scoring with
    unrotated q and k picks other tokens (and another output) on this model."""
    model = make_eva("dinov3")
    with torch.no_grad():
        model.head.weight.normal_()  # logits of the features' scale, not timm's tiny init
        model.blocks[1].attn.qkv.weight.normal_(std=0.3)  # peaked attention: its term matters
    x = image_batch(model, seed=3)
    with torch.no_grad(), pomt.pruned(model, "pomt", r=10, layer=1):
        ours = model(x)
    with torch.no_grad():
        rotated = reference(model, x, "pomt", 10, 1)
        unrotated = reference(model, x, "pomt", 10, 1, rotate_scores=False)
    torch.testing.assert_close(ours, rotated, atol=2e-5, rtol=1e-5)
    assert (ours - unrotated).abs().max() > 1e-2


def test_an_unrotated_row_leaves_q_unchanged_and_real_rows_are_gathered_per_image():
    torch.manual_seed(0)
    table = torch.randn(6, 8)
    positions = torch.tensor([[0, 3, 1], [6, 0, 2]])  # row + 1; 0: no rotation
    rows = rope_rows(table, positions)
    assert rows.shape == (2, 1, 3, 8)
    assert torch.equal(rows[0, 0, 1], table[2]) and torch.equal(rows[1, 0, 0], table[5])
    q = torch.randn(2, 1, 3, 4)  # a table row holds sin and cos: twice the head dim
    rotated = apply_rot_embed_cat(q, rows)
    assert torch.equal(rotated[0, :, 0], q[0, :, 0]) and torch.equal(rotated[1, :, 1], q[1, :, 1])
    per_head = rope_rows(torch.randn(2, 6, 8), positions)  # mixed: a table per head
    assert per_head.shape == (2, 2, 3, 8)


def test_an_image_is_pruned_alike_alone_and_in_a_batch():
    model = make_eva("eva02")
    x = image_batch(model, batch=3)
    for method, r, layer in CASES:
        with torch.no_grad(), pomt.pruned(model, method, r=r, layer=layer):
            torch.testing.assert_close(model(x)[1:2], model(x[1:2]), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the API


@pytest.mark.parametrize("method,r,layer", CASES)
def test_pickle_deepcopy_and_remove(method, r, layer):
    model = make_eva("dinov3")
    x = image_batch(model)
    with torch.no_grad():
        unpruned = model(x)
        pomt.apply_pruning(model, method, r=r, layer=layer)
        pruned = model(x)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
            assert pomt.pruning_config(other) == pomt.pruning_config(model)
            assert torch.equal(other(x), pruned)
        state = model.state_dict()
        pomt.remove_pruning(model)
        assert type(model.blocks[0]).__name__ == "EvaBlock" and pomt.pruning_config(model) is None
        assert torch.equal(model(x), unpruned)
        assert state.keys() == model.state_dict().keys()


def test_token_groups_follow_pomt_and_tome():
    model = make_eva("dinov3")
    x = image_batch(model)
    layout = pomt.token_layout(model)
    with pomt.pruned(model, "pomt", r=6, layer=1):
        groups = pomt.token_groups(model, x)
    fused = layout.n_total - 6 - 1
    assert ((groups == fused).sum(dim=1) == 7).all()  # r + 1 patches in the fused token
    with pomt.pruned(model, "tome", r=3):
        groups = pomt.token_groups(model, x)
    assert (groups >= layout.prefix).all() and groups.unique().numel() < layout.n_patches


def test_random_token_subset_keeps_each_tokens_rotation():
    """The accuracy proxy cuts tokens after the embedding: each kept token keeps its own row,
    so the result equals timm's blocks on the kept tokens with their rows."""
    model = make_eva("eva02")
    x = image_batch(model, batch=1)
    p = model.num_prefix_tokens
    with torch.no_grad():
        with pomt.method.pruning.random_token_subset(model, 12, torch.Generator().manual_seed(0)):
            ours = model(x)
        index = torch.rand(1, pomt.token_layout(model).n_patches, generator=torch.Generator().manual_seed(0))
        kept = index.argsort(dim=1)[0, : 12 - p].sort().values.tolist()
        t, rope = model._pos_embed(model.patch_embed(x))
        t = torch.cat([t[:, :p], t[:, p:][:, kept]], dim=1)
        for block in model.blocks:
            t = block(t, rope=gathered_rows(rope, kept))
        theirs = model.forward_head(model.norm(t))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert type(model.blocks[0]).__name__ == "EvaBlock"  # the followers were removed


def test_bad_r_is_named_and_leaves_the_model():
    model = make_eva("dinov3")
    n, p = pomt.token_layout(model).n_total, 5
    with pytest.raises(PruningError, match=f"0..{n - p - 1}"):
        pomt.apply_pruning(model, "pomt", r=n - p, layer=1)
    assert pomt.pruning_config(model) is None and type(model.blocks[1]).__name__ == "EvaBlock"


def test_naflexvit_is_named_as_unsupported():
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "naflexvit_base_patch16_gap", pretrained=False, embed_dim=64, depth=2, num_heads=2
    )
    reason = unsupported_reason(model)
    assert reason is not None and "padding mask (`patch_valid`)" in reason
    with pytest.raises(ValueError, match="NaFlexVit .variable resolution"):
        pomt.apply_pruning(model, "pomt", r=4, layer=0)
