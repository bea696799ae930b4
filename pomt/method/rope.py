"""Pruning timm's ``Eva`` family (EVA02, DINOv3, RoPE-ViT, Perception Encoder): the blocks'
rotary positions follow the tokens.

``Eva.forward_features`` builds one rotary table for the patch grid, (patches, dim), and hands
it to every block (``rope_type="mixed"``: a table per block, (heads, patches, dim)); the
attention rotates q and k of every token after the prefix by its row. Once tokens are dropped,
merged or reordered, the table no longer lines up. So when ``apply_pruning`` patches an Eva
model it patches *every* block: the blocks that prune (``pomt.method.blocks``' methods, rewritten
for Eva's attention and layer scale) record each token's original patch, and every block
then rotates each token by its own row, a table gathered per image, (B, 1 or heads, n, dim).

- POMT: a kept token keeps its own row; the fused token (mean of the dropped ones) has no
  grid position and gets no rotation, like a prefix token (``docs/method.md``, section 4).
- Top-K: kept tokens keep their own rows.
- ToMe: a merged token keeps its destination (B) token's row.

Positions are stored as ``row + 1`` of the original table, ``0`` meaning "no rotation": the
gathered table is the original with an identity row (sin 0, cos 1) put first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import EvaBlock, EvaBlockPostNorm
from torch import nn

from pomt.errors import PruningError
from pomt.method import dispatch, ops
from pomt.method.blocks import BlockSpec, PrunedBlock, ToMeState, check_room, no_mask, patched_class
from pomt.method.functional import (
    cls_attention,
    pomt_fuse,
    pomt_order,
    pomt_scores,
    pomt_scores_from_probabilities,
    tome_apply,
    tome_match,
    topk_index,
    topk_keep,
    tracing_tokens,
)
from pomt.models import eva_block_unsupported_reason as block_unsupported_reason
from pomt.models import is_eva

__all__ = ["RopeState", "is_eva", "block_unsupported_reason", "eva_plan", "following", "rope_rows", "MIXINS"]

EVA_BLOCKS = (EvaBlock, EvaBlockPostNorm)


class RopeState(ToMeState):
    """Shared by the patched blocks of one Eva model within a forward pass: ToMe's sizes and each
    ordinary token's original row + 1 (0: no rotation), None while no token moved."""

    def __init__(self) -> None:
        super().__init__()
        self.positions: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None  # set before block 0 by ``random_token_subset``
        self.cache: tuple | None = None

    def __reduce__(self) -> tuple:
        return (RopeState, ())  # a pickled model carries no tensor of its last forward pass


def rope_rows(rope: torch.Tensor | None, positions: torch.Tensor | None) -> torch.Tensor | None:
    """The rotary rows of the tokens at ``positions`` (B, n) (row + 1 of ``rope``, 0: none):
    (B, 1, n, dim) from a (patches, dim) table, (B, heads, n, dim) from a per-head one."""
    if rope is None or positions is None:
        return rope
    dim = rope.shape[-1]
    identity = torch.cat([rope.new_zeros(dim // 2), rope.new_ones(dim - dim // 2)])  # sin 0, cos 1
    b, n = positions.shape
    if rope.ndim == 2:
        table = torch.cat([identity.unsqueeze(0), rope])
        return table.index_select(0, positions.reshape(-1)).view(b, 1, n, dim)
    table = torch.cat([identity.expand(*rope.shape[:-2], 1, dim), rope], dim=-2)
    if table.ndim == 3:
        table = table.unsqueeze(0)
    index = positions[:, None, :, None].expand(b, table.shape[1], n, dim)
    return table.expand(b, -1, -1, -1).gather(2, index)


def _enter(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Start a block: the positions of its input tokens and their rotary rows."""
    spec: BlockSpec = block._pomt_spec
    state: RopeState = spec.state
    if spec.first:
        state.positions, state.pending, state.cache = state.pending, None, None
    positions = state.positions
    if positions is None:
        return None, rope
    if positions.shape != (x.shape[0], x.shape[1] - spec.prefix):
        raise PruningError(
            f"Eva block got {x.shape[1]} tokens of {x.shape[0]} images, but positions for "
            f"{tuple(positions.shape)} ordinary tokens: the blocks must run in order, from block 0"
        )
    if rope is None:
        return positions, None
    cache = state.cache
    compiling = torch.compiler.is_compiling()
    if not compiling and cache is not None and cache[0] is rope and cache[1] is positions:
        return positions, cache[2]
    rows = rope_rows(rope, positions)
    if not compiling:
        state.cache = (rope, positions, rows)
    return positions, rows


def _leave(block: nn.Module, positions: torch.Tensor | None) -> None:
    spec: BlockSpec = block._pomt_spec
    state: RopeState = spec.state
    state.positions = None if spec.last else positions
    if spec.last:
        state.cache = None


def _kept_from_moves(moved: torch.Tensor, keep: int) -> torch.Tensor:
    """The kept ordinary tokens in their new order, (B, keep), from the kernels' record of each
    token's new place (B, N - prefix; -1: fused)."""
    b, no = moved.shape
    slot = torch.where(moved < 0, keep, moved).long()  # the fused ones all land in a spare slot
    index = torch.zeros(b, keep + 1, dtype=torch.long, device=moved.device)
    index.scatter_(1, slot, torch.arange(no, device=moved.device).expand(b, no))
    return index[:, :keep]


def _kept_positions(positions: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
    """Positions of the ordinary tokens ``index`` (B, k) of a sequence whose are ``positions``."""
    return index + 1 if positions is None else positions.gather(1, index)


# --------------------------------------------------------------------------- Eva's attention


def eva_qkv(attn: nn.Module, h: torch.Tensor, rope: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, heads, N, head_dim) as Eva's attention uses them: biases, q/k norms, rotation
    of the tokens after the prefix, grouped key/value heads repeated."""
    b, n, _ = h.shape
    if getattr(attn, "qkv", None) is not None:
        if getattr(attn, "q_bias", None) is None:
            qkv = attn.qkv(h)
        else:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if getattr(attn, "qkv_bias_separate", False):
                qkv = attn.qkv(h)
                qkv += bias
            else:
                qkv = F.linear(h, weight=attn.qkv.weight, bias=bias)
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        q = attn.q_proj(h).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(h).reshape(b, n, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(h).reshape(b, n, kv_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return q, k, v


def _post_norm(block: nn.Module) -> bool:
    return isinstance(block, EvaBlockPostNorm)


def attention_residual(
    block: nn.Module,
    x: torch.Tensor,
    rope: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    explicit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` plus Eva's attention branch, and (probabilities or None, q, k, v) for scoring.
    ``explicit``: an explicit softmax whose probabilities are returned (POMT's CPU path)."""
    attn = block.attn
    h = x if _post_norm(block) else block.norm1(x)
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = eva_qkv(attn, h, rope)
    dropout = attn.attn_drop.p if attn.training else 0.0
    probs = None
    if explicit:
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        heads_out = attn.attn_drop(probs) @ v
    else:
        heads_out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    out = attn.norm(heads_out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    if _post_norm(block):
        out = block.norm1(out)
    elif block.gamma_1 is not None:
        out = block.gamma_1 * out
    return x + block.drop_path1(out), probs, q, k, v


def mlp_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if _post_norm(block):
        return x + block.drop_path2(block.norm2(block.mlp(x)))
    out = block.mlp(block.norm2(x))
    if block.gamma_2 is not None:
        out = block.gamma_2 * out
    return x + block.drop_path2(out)


# --------------------------------------------------------------------------- the blocks


class _EvaFollowBlock(PrunedBlock):
    """Mixin: timm's own block, fed the rotary rows of the tokens it really gets."""

    def forward(self, x, rope=None, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        positions, rows = _enter(self, x, rope)
        x = super().forward(x, rope=rows, attn_mask=attn_mask, is_causal=is_causal)
        _leave(self, positions)
        return x


class _EvaPOMTBlock(PrunedBlock):
    """Mixin: POMT in an Eva block; scores from q and k as the block uses them (q/k-normed and
    rotated); the fused token gets no rotation in later blocks."""

    def forward(self, x, rope=None, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        no_mask(attn_mask, is_causal)
        spec: BlockSpec = self._pomt_spec
        check_room(x.shape[1], spec.prefix, spec.r, "POMT")
        positions, rows = _enter(self, x, rope)
        p, r = spec.prefix, spec.r
        if ops.scores_from_probabilities(x):
            x, probs, _, _, v = attention_residual(self, x, rows, explicit=True)
            scores = pomt_scores_from_probabilities(probs, v, p)
        else:
            x, _, q, k, v = attention_residual(self, x, rows)
            scale = self.attn.scale
            if not tracing_tokens(spec.trace) and ops.use_kernels(x, q, k, v, p, r, scale):
                x, _, moved = dispatch.launch_kernels(x, q, k, v, p, r, scale)  # Triton (pomt.method.ops)
                return self._finish(x, _kept_from_moves(moved, x.shape[1] - p - 1), positions)
            scores = pomt_scores(q, k, v, p, scale)
        order = pomt_order(scores)
        keep = x.shape[1] - p - r - 1
        x = pomt_fuse(x, order, p, r, spec.trace)
        return self._finish(x, order[:, :keep], positions)

    def _finish(
        self, x: torch.Tensor, kept_index: torch.Tensor, positions: torch.Tensor | None
    ) -> torch.Tensor:
        kept = _kept_positions(positions, kept_index)
        positions = torch.cat([kept, kept.new_zeros(kept.shape[0], 1)], dim=1)  # fused: no rotation
        x = mlp_residual(self, x)
        _leave(self, positions)
        return x


class _EvaTopKBlock(PrunedBlock):
    """Mixin: Top-K in an Eva block; kept tokens keep their own rotary rows."""

    def forward(self, x, rope=None, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        no_mask(attn_mask, is_causal)
        spec: BlockSpec = self._pomt_spec
        check_room(x.shape[1], spec.prefix, spec.r, "Top-K")
        positions, rows = _enter(self, x, rope)
        x, _, q, k, _ = attention_residual(self, x, rows)
        if spec.r > 0:
            importance = cls_attention(q, k, spec.prefix, self.attn.scale, spec.has_cls)
            index = topk_index(importance, x.shape[1] - spec.prefix - spec.r)
            x = topk_keep(x, index, spec.prefix, spec.trace)
            positions = _kept_positions(positions, index)
        x = mlp_residual(self, x)
        _leave(self, positions)
        return x


class _EvaToMeBlock(PrunedBlock):
    """Mixin: ToMe in an Eva block; a merged token keeps its destination token's rotary row."""

    def forward(self, x, rope=None, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        no_mask(attn_mask, is_causal)
        spec: BlockSpec = self._pomt_spec
        state: RopeState = spec.state
        positions, rows = _enter(self, x, rope)
        if spec.first or state.size is None or state.size.shape[:2] != x.shape[:2]:
            state.size = None  # a new forward pass starts with every token of size 1
        size = state.size
        bias = None if size is None else size.log()[:, None, None, :, 0].to(x.dtype)
        x, _, _, k, _ = attention_residual(self, x, rows, bias)
        r = min(spec.r, (x.shape[1] - spec.prefix) // 2)
        if r > 0:
            p = spec.prefix
            if size is None:
                size = x.new_ones(x.shape[0], x.shape[1], 1)
            if positions is None:
                positions = torch.arange(1, x.shape[1] - p + 1, device=x.device).expand(x.shape[0], -1)
            match = tome_match(k, r, p)
            x, size = tome_apply(x, size, match, p, spec.trace)
            # every token's position, prefix ones 0, split like the tokens into A (even) and B (odd)
            full = torch.cat([positions.new_zeros(x.shape[0], p), positions], dim=1)
            positions = torch.cat([full[:, ::2].gather(1, match[1]), full[:, 1::2][:, p // 2 :]], dim=1)
        state.size = None if spec.last else size
        x = mlp_residual(self, x)
        _leave(self, positions)
        return x


MIXINS: dict[str, type[nn.Module]] = {"pomt": _EvaPOMTBlock, "topk": _EvaTopKBlock, "tome": _EvaToMeBlock}


def eva_plan(
    method: str, targets: dict[int, BlockSpec], depth: int, common: dict
) -> dict[int, tuple[type[nn.Module], BlockSpec]]:
    """Every block of an Eva model patched: the ``targets`` prune, the others follow; one state."""
    state = RopeState()
    plan = {}
    for i in range(depth):
        spec = targets.get(i) or BlockSpec(r=0, **common)
        spec = BlockSpec(
            r=spec.r, prefix=spec.prefix, has_cls=spec.has_cls, first=i == 0, last=i == depth - 1,
            state=state, trace=spec.trace,
        )  # fmt: skip
        plan[i] = (MIXINS[method] if i in targets else _EvaFollowBlock, spec)
    return plan


@contextlib.contextmanager
def following(blocks: list[nn.Module], prefix: int) -> Iterator[RopeState]:
    """While active, every Eva block of ``blocks`` follows the tokens' positions (those already
    patched by ``apply_pruning`` as they are; the others as followers, unpatched afterwards).
    Yields the shared state: set ``pending`` (B, n) before block 0 to cut the sequence."""
    patched = [b for b in blocks if isinstance(getattr(b, "_pomt_spec", None), BlockSpec)]
    if patched:
        yield patched[0]._pomt_spec.state
        return
    state = RopeState()
    for i, block in enumerate(blocks):
        block.__class__ = patched_class(_EvaFollowBlock, type(block))
        block._pomt_spec = BlockSpec(
            r=0, prefix=prefix, has_cls=False, first=i == 0, last=i == len(blocks) - 1, state=state
        )
    try:
        yield state
    finally:
        for block in blocks:
            block.__class__ = block._pomt_base_class
            del block._pomt_spec
