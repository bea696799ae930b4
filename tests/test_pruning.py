"""Behaviour of the pruning core: exact token counts, equality at r=0, the POMT block against a
reference written straight from docs/method.md section 2, reversibility, export, and every error."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import make_tiny_vit, reference_merge
from torch import nn

import pomt
from pomt.method.functional import tome_merge
from pomt.method.pruning import random_token_subset
from pomt.models import vit_blocks

MODELS_224 = {
    "deit_small_patch16_224": {},
    "deit_small_distilled_patch16_224": {},
    "vit_small_patch14_reg4_dinov2": {"img_size": 224},
}


@pytest.fixture(scope="module", params=list(MODELS_224))
def model_224(request):
    torch.manual_seed(0)
    model = timm.create_model(request.param, pretrained=False, **MODELS_224[request.param]).eval()
    return request.param, model


def tokens_after_each_block(model: nn.Module, x: torch.Tensor) -> list[int]:
    counts: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for b in vit_blocks(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return counts


# ----------------------------------------------------------------------------- real model sizes


def test_layouts_of_supported_models(model_224):
    name, model = model_224
    layout = pomt.token_layout(model)
    expected = {
        "deit_small_patch16_224": (197, 1),
        "deit_small_distilled_patch16_224": (198, 2),
        "vit_small_patch14_reg4_dinov2": (261, 5),
    }[name]
    assert (layout.n_total, layout.prefix, layout.depth) == (*expected, 12)


@pytest.mark.parametrize("method", pomt.METHODS)
def test_r0_equals_unpruned(model_224, method):
    _, model = model_224
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
        pomt.apply_pruning(model, method, r=0, layer=3)
        try:
            out = model(x)
        finally:
            pomt.remove_pruning(model)
    assert (out - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("r,layer", [(28, 3), (56, 3), (100, 0), (150, 11)])
def test_pomt_leaves_exactly_n_minus_r_tokens(model_224, r, layer):
    _, model = model_224
    layout = pomt.token_layout(model)
    pomt.apply_pruning(model, "pomt", r=r, layer=layer)
    try:
        counts = tokens_after_each_block(model, torch.randn(2, 3, 224, 224))
    finally:
        pomt.remove_pruning(model)
    assert counts[layer] == layout.n_total - r
    assert counts == [layout.n_total] * layer + [layout.n_total - r] * (layout.depth - layer)
    assert counts == pomt.token_schedule(model, "pomt", r, layer)


def test_per_block_methods_follow_their_schedule(model_224):
    _, model = model_224
    for method in ("topk", "tome"):
        pomt.apply_pruning(model, method, r=8)
        try:
            counts = tokens_after_each_block(model, torch.randn(1, 3, 224, 224))
            assert counts == list(pomt.pruning_config(model).schedule)
            assert counts[-1] == pomt.token_layout(model).n_total - 8 * 12
        finally:
            pomt.remove_pruning(model)


def test_onnx_export_of_pruned_deit_small_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    pomt.apply_pruning(model, "pomt", r=56, layer=3)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x).numpy()
    path = tmp_path / "deit_s_pomt.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - expected).max() <= 1e-4


# ----------------------------------------------------------------------------- reference POMT block


def reference_pomt_block(block: nn.Module, x: torch.Tensor, r: int, p: int) -> torch.Tensor:
    """docs/method.md section 2 written out image by image, with no shared code."""
    outputs = []
    attn = block.attn
    for img in x:  # (N, C)
        n, c = img.shape
        h = attn.num_heads
        qkv = attn.qkv(block.norm1(img)).reshape(n, 3, h, c // h).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (H, N, D)
        probs = torch.softmax(q @ k.transpose(-1, -2) * (c // h) ** -0.5, dim=-1)
        heads = (probs @ v).transpose(0, 1).reshape(n, c)
        y = img + block.ls1(attn.proj(heads))
        # attention term: non-prefix rows/cols, max over heads, sum over rows, / image max
        a = probs[:, p:, p:].max(dim=0).values.sum(dim=0)
        a = a / a.max()
        # value term: max over heads, sum over features, softmax over all tokens, drop prefix
        vt = torch.softmax(v.max(dim=0).values.sum(dim=-1), dim=0)[p:]
        score = a + vt
        ordinary = y[p:]
        keep = ordinary.shape[0] - r - 1
        ranked = sorted(range(ordinary.shape[0]), key=lambda j: -float(score[j]))
        kept = ordinary[ranked[:keep]]
        fused = ordinary[ranked[keep:]].mean(dim=0, keepdim=True)
        y = torch.cat([y[:p], kept, fused], dim=0)
        y = y + block.ls2(block.mlp(block.norm2(y)))
        outputs.append(y)
    return torch.stack(outputs)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # CLS only
        {"reg_tokens": 4, "no_embed_class": True, "init_values": 0.5},  # CLS + registers, LayerScale
        {"class_token": False, "global_pool": "avg"},  # no prefix token at all
    ],
)
@pytest.mark.parametrize("r", [1, 3, 15])
def test_pomt_block_matches_reference(overrides, r):
    model = make_tiny_vit(**overrides)
    layout = pomt.token_layout(model)
    if r > layout.n_patches - 1:
        pytest.skip("r too large for this layout")
    layer = 1
    captured = {}
    block = vit_blocks(model)[layer]
    block.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    x = torch.randn(3, 3, 32, 32)
    pomt.apply_pruning(model, "pomt", r=r, layer=layer)
    with torch.no_grad():
        model(x)
        ours = block(captured["x"])
        pomt.remove_pruning(model)
        theirs = reference_pomt_block(block, captured["x"], r, layout.prefix)
    assert ours.shape == theirs.shape == (3, layout.n_total - r, 64)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,r", [("pomt", 6), ("topk", 2), ("tome", 2)])
def test_an_image_gives_the_same_logits_alone_and_in_a_batch(method, r):
    model = make_tiny_vit(reg_tokens=2)
    pomt.apply_pruning(model, method, r=r, layer=1)
    batch = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    batch[1:] *= 4.0  # batch-mates on another scale: a batch-wide normalisation would show
    with torch.no_grad():
        alone = model(batch[:1])
        together = model(batch)[:1]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,r", [("pomt", 5), ("topk", 2), ("tome", 2)])
def test_prefix_tokens_are_never_pruned(method, r):
    model = make_tiny_vit(reg_tokens=4, no_embed_class=True, init_values=0.5)
    p = pomt.token_layout(model).prefix
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.forward_features(x)
        pomt.apply_pruning(model, method, r=r, layer=0)
        after = vit_blocks(model)[0](model.norm_pre(model._pos_embed(model.patch_embed(x))))
        unpruned_block0 = copy.deepcopy(model)
        pomt.remove_pruning(unpruned_block0)
        expected = vit_blocks(unpruned_block0)[0](model.norm_pre(model._pos_embed(model.patch_embed(x))))
    torch.testing.assert_close(after[:, :p], expected[:, :p], atol=1e-5, rtol=1e-5)
    assert before.shape[1] == 17 + 4


# ----------------------------------------------------------------------------- reference ToMe


def reference_tome_logits(model: nn.Module, x: torch.Tensor, r: int, p: int) -> torch.Tensor:
    """Token Merging (Bolya et al., ICLR 2023) on a timm ViT, written out image by image.

    Per block: attention with ``log(size)`` added to every key's logit (proportional
    attention); then bipartite soft matching: tokens at even positions form set A, odd
    positions set B; each A token's most similar B token by cosine similarity of the keys
    (mean over heads); the r most similar edges merge their A token into the B token by
    size-weighted average. The p prefix tokens are protected where they stand (no edge
    from them, none into them) and leave the block first, then the unmerged A tokens, then
    the B tokens, each in position order.
    """
    outputs = []
    for img in model.norm_pre(model._pos_embed(model.patch_embed(x))):
        size = torch.ones(img.shape[0])
        for block in vit_blocks(model):
            n, c = img.shape
            h = block.attn.num_heads
            qkv = block.attn.qkv(block.norm1(img)).reshape(n, 3, h, c // h).permute(1, 2, 0, 3)
            q, k, v = qkv[0], qkv[1], qkv[2]
            logits = q @ k.transpose(-1, -2) * (c // h) ** -0.5 + size.log()[None, None, :]
            img = img + block.ls1(block.attn.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(n, c)))
            merges = min(r, (n - p) // 2)
            img, size, _ = reference_merge(img, size, k.mean(dim=0), p, merges)
            img = img + block.ls2(block.mlp(block.norm2(img)))
        outputs.append(model.forward_head(model.norm(img[None]))[0])
    return torch.stack(outputs)


@pytest.mark.parametrize("r", [8, 13, 16])
def test_tome_equals_the_papers_algorithm(model_224, r):
    name, model = model_224
    if name.startswith("vit") and r != 8:
        pytest.skip("one r is enough for the slower registers model")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(r))
    pomt.apply_pruning(model, "tome", r=r)
    try:
        with torch.no_grad():
            ours = model(x)
            theirs = reference_tome_logits(model, x, r, pomt.token_layout(model).prefix)
    finally:
        pomt.remove_pruning(model)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- ToMe and Top-K specifics


def test_tome_merge_conserves_mass_and_size():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 8)
    keys = torch.randn(2, 3, 11, 4)
    size = torch.rand(2, 11, 1) + 0.5
    merged, new_size = tome_merge(x, keys, size, r=3, prefix=1)
    assert merged.shape == (2, 8, 8) and new_size.shape == (2, 8, 1)
    torch.testing.assert_close(merged[:, :1], x[:, :1])  # prefix token untouched
    torch.testing.assert_close((merged * new_size).sum(1), (x * size).sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))


def test_tome_merges_identical_tokens_first():
    x = torch.randn(1, 7, 4)
    keys = torch.randn(1, 1, 7, 4)
    keys[0, 0, 3] = keys[0, 0, 4]  # ordinary tokens 2 (set A) and 3 (set B) have identical keys
    merged, size = tome_merge(x, keys, torch.ones(1, 7, 1), r=1, prefix=1)
    assert sorted(size.flatten().tolist()) == [1.0] * 5 + [2.0]
    mean = (x[0, 3] + x[0, 4]) / 2
    assert any(torch.allclose(tok, mean) for tok in merged[0])


def test_tome_clamps_r_to_what_matching_can_merge(tiny_vit):
    # 16 ordinary tokens: at most 8 merges in block 0, then 4, 2, 1
    assert pomt.token_schedule(tiny_vit, "tome", 8) == [9, 5, 3, 2]
    pomt.apply_pruning(tiny_vit, "tome", r=8)
    assert tokens_after_each_block(tiny_vit, torch.randn(1, 3, 32, 32)) == [9, 5, 3, 2]


def test_topk_keeps_tokens_with_most_cls_attention():
    model = make_tiny_vit(depth=1)
    block = vit_blocks(model)[0]
    x = torch.randn(1, 17, 64)
    with torch.no_grad():
        h = block.norm1(x)
        qkv = block.attn.qkv(h).reshape(1, 17, 3, 2, 32).permute(2, 0, 3, 1, 4)
        probs = (qkv[0] @ qkv[1].transpose(-1, -2) * 32**-0.5).softmax(-1)
        cls_attention = probs[0, :, 0, 1:].mean(0)
        expected_kept = set(cls_attention.topk(12).indices.tolist())
        full = block(x)
        pomt.apply_pruning(model, "topk", r=4, layer=0)
        pruned = block(x)
    kept = {j for j in range(16) for t in pruned[0, 1:] if torch.allclose(t, full[0, 1 + j], atol=1e-6)}
    assert kept == expected_kept


def test_r0_deploys_the_unpruned_model(tiny_vit):
    for method in pomt.METHODS:
        pomt.apply_pruning(tiny_vit, method, r=0, layer=1)
        if method != "tome":  # ToMe's proportional attention runs in every block
            assert all(type(b).__name__ == "Block" for b in vit_blocks(tiny_vit))
        config = pomt.pruning_config(tiny_vit)
        assert config is None if method == "none" else config.schedule == (17,) * 4


def test_the_benchmarks_ideal_cuts_each_methods_schedule_unscored(tiny_vit):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from pruning_latency import apply_ideal

    x = torch.randn(1, 3, 32, 32)
    for method, r in (("pomt", 5), ("topk", [0, 3, 0, 2]), ("tome", 3)):
        apply_ideal(tiny_vit, method, r, layer=1)
        assert tokens_after_each_block(tiny_vit, x) == pomt.token_schedule(tiny_vit, method, r, layer=1)
        assert pomt.pruning_config(tiny_vit) is None  # a measuring device, not a pruning method
        pomt.remove_pruning(tiny_vit)
        assert all(type(b).__name__ == "Block" for b in vit_blocks(tiny_vit))
    with pytest.raises(ValueError, match="unknown pruning method 'cut'"):
        pomt.apply_pruning(tiny_vit, "cut", r=5)


def test_per_block_list(tiny_vit):
    pomt.apply_pruning(tiny_vit, "topk", r=[0, 3, 0, 2])
    assert tokens_after_each_block(tiny_vit, torch.randn(1, 3, 32, 32)) == [17, 14, 14, 12]
    assert pomt.pruning_config(tiny_vit).r == (0, 3, 0, 2)


# ----------------------------------------------------------------------------- reversibility


def test_round_trip_keeps_state_dict_and_outputs(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    state = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    with torch.no_grad():
        before = tiny_vit(x)
    for method in ("pomt", "topk", "tome"):
        pomt.apply_pruning(tiny_vit, method, r=2, layer=1)
        after_state = tiny_vit.state_dict()
        assert list(after_state) == list(state)
        assert all(torch.equal(after_state[k], v) for k, v in state.items())
        pomt.remove_pruning(tiny_vit)
        with torch.no_grad():
            assert torch.equal(tiny_vit(x), before)
        assert all(type(b).__name__ == "Block" for b in vit_blocks(tiny_vit))
    assert pomt.pruning_config(tiny_vit) is None


def test_applying_twice_replaces(tiny_vit):
    pomt.apply_pruning(tiny_vit, "topk", r=2)
    pomt.apply_pruning(tiny_vit, "pomt", r=5, layer=2)
    assert tokens_after_each_block(tiny_vit, torch.randn(1, 3, 32, 32)) == [17, 17, 12, 12]
    assert pomt.pruning_config(tiny_vit).method == "pomt"
    pomt.apply_pruning(tiny_vit, "none")
    assert tokens_after_each_block(tiny_vit, torch.randn(1, 3, 32, 32)) == [17] * 4


def test_torch_compile_runs():
    model = make_tiny_vit(depth=2)
    pomt.apply_pruning(model, "pomt", r=6, layer=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model)(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- random subset


def test_random_token_subset_is_exact_seeded_and_leaves_global_rng(tiny_vit):
    x = torch.randn(3, 3, 32, 32)
    rng_state = torch.get_rng_state()
    outs = []
    for _ in range(2):
        with random_token_subset(tiny_vit, 7, torch.Generator().manual_seed(5)):
            assert tokens_after_each_block(tiny_vit, x) == [7] * 4
            with torch.no_grad():
                outs.append(tiny_vit(x))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert tokens_after_each_block(tiny_vit, x) == [17] * 4  # hook removed
    with pytest.raises(ValueError, match="n must be"):
        with random_token_subset(tiny_vit, 1):
            pass


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "pomt", "r": -1}, r"r must be an int in 0\.\.15"),
        ({"method": "pomt", "r": 16}, r"r must be an int in 0\.\.15"),
        ({"method": "pomt", "r": 2.5}, r"r must be an int"),
        ({"method": "pomt", "r": 2, "layer": 4}, r"layer must be an int in 0\.\.3"),
        ({"method": "pomt", "r": 2, "layer": -1}, r"layer must be an int in 0\.\.3"),
        ({"method": "evit", "r": 2}, r"unknown pruning method 'evit'; valid: none, pomt, topk, tome"),
        ({"method": "topk", "r": [1, 2]}, r"needs 4 values"),
        ({"method": "topk", "r": [1, -2, 0, 0]}, r"r must be >= 0"),
        ({"method": "topk", "r": 4}, r"at most 15 can be removed"),
        ({"method": "tome", "r": [8, 8, 0]}, r"needs 4 values"),
    ],
)
def test_bad_arguments_raise_and_leave_the_model_untouched(tiny_vit, kwargs, match):
    pomt.apply_pruning(tiny_vit, "pomt", r=3, layer=2)
    classes = [type(b) for b in vit_blocks(tiny_vit)]
    with pytest.raises(ValueError, match=match):
        pomt.apply_pruning(tiny_vit, **kwargs)
    assert [type(b) for b in vit_blocks(tiny_vit)] == classes
    assert pomt.pruning_config(tiny_vit).r == 3


def test_larger_input_than_profiled_is_checked_at_runtime():
    model = make_tiny_vit(dynamic_img_size=True)
    pomt.apply_pruning(model, "pomt", r=15, layer=0)
    with pytest.raises(ValueError, match="leaves no ordinary token"):
        model(torch.randn(1, 3, 16, 16))  # 4 patches only


def test_unsupported_model_is_named():
    with pytest.raises(
        ValueError, match=r"no supported ViT found inside Sequential: Sequential has no `blocks`"
    ):
        pomt.apply_pruning(nn.Sequential(nn.Linear(2, 2)), "pomt", r=1)

    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Identity()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.blocks = nn.Sequential(nn.Linear(4, 4))

    with pytest.raises(ValueError, match=r"Weird.blocks\[0\] \(Linear\) lacks norm1, attn"):
        pomt.token_layout(Weird())


# ----------------------------------------------------------------------------- hub-style DINOv2


class HubAttention(nn.Module):
    """Attention with the DINOv2 authors' attribute names (no q/k norm, no gate)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = torch.softmax(q @ k.transpose(-2, -1) * self.scale, -1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class HubBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), HubAttention(dim, heads)
        self.ls1, self.drop_path1 = nn.Identity(), nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ls2, self.drop_path2 = nn.Identity(), nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class HubPatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.patch_size = (14, 14)
        self.patches_resolution = (4, 4)
        self.proj = nn.Conv2d(3, dim, 14, 14)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class HubDinoV2(nn.Module):
    """The shape of the DINOv2 authors' model: cls + register tokens, chunked blocks."""

    def __init__(self, dim: int = 32, depth: int = 3, registers: int = 4):
        super().__init__()
        self.patch_embed = HubPatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.num_register_tokens = registers
        self.register_tokens = nn.Parameter(torch.randn(1, registers, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = nn.ModuleList([nn.Sequential(*[HubBlock(dim, 2) for _ in range(depth)])])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        x = torch.cat([x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]], 1)
        for chunk in self.blocks:
            x = chunk(x)
        return self.norm(x)[:, 0]


def test_hub_style_dinov2_with_registers():
    torch.manual_seed(0)
    model = HubDinoV2().eval()
    layout = pomt.token_layout(model)
    assert (layout.n_total, layout.prefix, layout.depth) == (21, 5, 3)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        reference = model(x)
        for method in pomt.METHODS:
            pomt.apply_pruning(model, method, r=0, layer=1)
            assert (model(x) - reference).abs().max() <= 1e-5
    pomt.apply_pruning(model, "pomt", r=10, layer=1)
    assert tokens_after_each_block(model, x) == [21, 11, 11]
    pomt.apply_pruning(model, "pomt", r=15, layer=1)  # only the fused token remains besides the prefix
    assert tokens_after_each_block(model, x) == [21, 6, 6]
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("method", ["pomt", "topk", "tome"])
def test_pruned_model_trains(method):
    """Training through the pruning blocks (the torch path): gradients reach every block, the
    optimiser changes the weights, the token counts are the pruned ones during the training
    steps, and removing the pruning gives back the unpruned model with the trained weights."""
    torch.manual_seed(0)
    model = make_tiny_vit(reg_tokens=1).train()
    pomt.apply_pruning(model, method, r=3, layer=1)
    schedule = pomt.token_schedule(model, method, 3, layer=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    counts: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for b in vit_blocks(model)]
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert all(
            p.grad is not None and torch.isfinite(p.grad).all() for p in vit_blocks(model)[1].parameters()
        )
        optimiser.step()
    for h in hooks:
        h.remove()
    assert counts == schedule * 3
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("blocks.1.") for k in changed) and any(k.startswith("blocks.3.") for k in changed)
    pomt.remove_pruning(model)
    assert tokens_after_each_block(model.eval(), x) == [pomt.token_layout(model).n_total] * 4
