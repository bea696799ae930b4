"""The pruning blocks: mixins that ``pomt.method.pruning.apply_pruning`` puts in front of a timm-style
block's class, so that its ``forward`` prunes while its parameters stay where they are.

Blocks keep fused attention (``F.scaled_dot_product_attention``) for their output, and
what a method needs beyond it is computed on the side (``pomt.method.functional``, the method as tensor
functions; ``pomt.method.ops`` picks POMT's Triton kernels where they run): POMT's scores from
the queries and keys (one block only), Top-K's CLS row, ToMe's key similarities. The one
exception is POMT's block on the CPU, where an explicit softmax is as fast as the fused
kernel and its probabilities are the scores' input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pomt.errors import PomtValueError
from pomt.method import ops
from pomt.method.functional import Trace, pomt_scores_from_probabilities, pomt_select, tome_merge

__all__ = [
    "BlockSpec",
    "ToMeState",
    "MIXINS",
    "qkv_heads",
    "attention_residual",
    "mlp_residual",
    "check_room",
    "patched_class",
]


@dataclass(frozen=True)
class BlockSpec:
    """What one patched block removes: ``r`` tokens, never the ``prefix`` first ones."""

    r: int
    prefix: int
    has_cls: bool
    first: bool = False
    last: bool = False
    state: ToMeState | None = None
    trace: Trace | None = None


class ToMeState:
    """Token sizes carried from block to block within one forward pass (ToMe only)."""

    def __init__(self) -> None:
        self.size: torch.Tensor | None = None


# --------------------------------------------------------------------------- attention


def qkv_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of shape (B, heads, N, head_dim), with the module's q/k norms applied."""
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    return q, k, v


def _scale(attn: nn.Module, head_dim: int) -> float:
    return float(getattr(attn, "scale", head_dim**-0.5))


def _dropout(attn: nn.Module) -> float:
    attn_drop = getattr(attn, "attn_drop", None)
    return attn_drop.p if (attn.training and attn_drop is not None) else 0.0


def _attn_output(attn: nn.Module, heads_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Merge heads and apply the module's output norm, gate and projection."""
    b, _, n, _ = heads_out.shape
    out = heads_out.transpose(1, 2).reshape(b, n, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    out = attn.proj(out)
    proj_drop = getattr(attn, "proj_drop", None)
    return proj_drop(out) if proj_drop is not None else out


def no_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise PomtValueError("attention masks and causal attention are not supported in pruned blocks")


def check_room(tokens: int, prefix: int, removed: int, where: str) -> None:
    if tokens - removed < prefix + 1:
        raise PomtValueError(
            f"{where}: removing {removed} of {tokens} tokens ({prefix} prefix) leaves no ordinary token; "
            f"at most {tokens - prefix - 1} can be removed for this input size"
        )


def attention_residual(
    block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x + attention(x)`` through fused attention, with q, k, v exposed for scoring."""
    attn = block.attn
    h = block.norm1(x)
    q, k, v = qkv_heads(attn, h)
    heads_out = nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=_dropout(attn), scale=_scale(attn, q.shape[-1])
    )
    return x + block.drop_path1(block.ls1(_attn_output(attn, heads_out, h))), q, k, v


def _explicit_attention_residual(
    block: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x + attention(x)`` through an explicit softmax, with its probabilities (B, H, N, N) and
    the values exposed. Outside autograd the softmax runs in place: one (B, H, N, N) buffer."""
    attn = block.attn
    h = block.norm1(x)
    q, k, v = qkv_heads(attn, h)
    logits = (q * _scale(attn, q.shape[-1])) @ k.transpose(-2, -1)
    if logits.requires_grad:
        probs = logits.softmax(dim=-1)
    else:
        probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        probs = probs.div_(probs.sum(dim=-1, keepdim=True))
    attn_drop = getattr(attn, "attn_drop", None)
    heads_out = (attn_drop(probs) if attn_drop is not None else probs) @ v
    return x + block.drop_path1(block.ls1(_attn_output(attn, heads_out, h))), probs, v


def mlp_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


# --------------------------------------------------------------------------- patched classes


class PrunedBlock(nn.Module):
    """Base of the mixins: a patched block pickles (``torch.save``, ``copy.deepcopy``, Lightning
    checkpoints that hold the module) by naming its mixin and original class, both importable,
    instead of its generated class, which ``patched_class`` rebuilds when it is loaded."""

    _pomt_spec: BlockSpec

    def __reduce_ex__(self, protocol: int) -> tuple:
        cls = type(self)
        base = getattr(cls, "_pomt_base_class", None)
        reduced = super().__reduce_ex__(protocol)
        if base is None or not isinstance(reduced, tuple) or len(reduced) < 3:
            return reduced
        return (_rebuild_block, (cls._pomt_mixin, base), *reduced[2:])


_CLASS_CACHE: dict[tuple[type, type], type] = {}


def patched_class(mixin: type[nn.Module], base: type[nn.Module]) -> type[nn.Module]:
    """The class of a ``base`` block whose ``forward`` is ``mixin``'s: one per pair, so that
    blocks patched, copied or loaded alike share it (and ``isinstance`` holds across them)."""
    key = (mixin, base)
    if key not in _CLASS_CACHE:
        name = f"{mixin.__name__.lstrip('_').removesuffix('Block')}{base.__name__}"
        attrs = {"_pomt_base_class": base, "_pomt_mixin": mixin, "__module__": __name__}
        _CLASS_CACHE[key] = type(name, (mixin, base), attrs)
    return _CLASS_CACHE[key]


def _rebuild_block(mixin: type[nn.Module], base: type[nn.Module]) -> nn.Module:
    """An empty block of the patched class (pickle then restores its state)."""
    cls = patched_class(mixin, base)
    return cls.__new__(cls)


# --------------------------------------------------------------------------- POMT, Top-K


class _POMTBlock(PrunedBlock):
    """Mixin: POMT pruning inside one block: score after the attention, keep the best, fuse the rest.

    On CUDA the block keeps fused attention and scores from q and k on the side (Triton
    kernels, or one aligned GEMM and a softmax). On the CPU an explicit softmax attention
    costs no more than the fused kernel and its probabilities give the scores for free.
    """

    _pomt_spec: BlockSpec

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        no_mask(attn_mask, is_causal)
        spec = self._pomt_spec
        check_room(x.shape[1], spec.prefix, spec.r, "POMT")
        if ops.scores_from_probabilities(x):
            x, probs, v = _explicit_attention_residual(self, x)
            scores = pomt_scores_from_probabilities(probs, v, spec.prefix)
            x = pomt_select(x, scores, spec.prefix, spec.r, spec.trace)
        else:
            x, q, k, v = attention_residual(self, x)
            x = ops.pomt_prune(x, q, k, v, spec.prefix, spec.r, _scale(self.attn, q.shape[-1]), spec.trace)
        return mlp_residual(self, x)


class _TopKBlock(PrunedBlock):
    """Mixin: drop the r ordinary tokens with the least CLS attention (mean over heads)."""

    _pomt_spec: BlockSpec

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        no_mask(attn_mask, is_causal)
        spec = self._pomt_spec
        check_room(x.shape[1], spec.prefix, spec.r, "Top-K")
        x, q, k, _ = attention_residual(self, x)
        scale = _scale(self.attn, q.shape[-1])
        x = ops.topk_prune(x, q, k, spec.prefix, spec.r, scale, spec.has_cls, spec.trace)
        return mlp_residual(self, x)


class _ToMeBlock(PrunedBlock):
    """Mixin: proportional attention, then merge r token pairs (sizes carried in shared state)."""

    _pomt_spec: BlockSpec

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        no_mask(attn_mask, is_causal)
        spec = self._pomt_spec
        state = spec.state
        if spec.first or state.size is None or state.size.shape[:2] != x.shape[:2]:
            state.size = None  # a new forward pass starts with every token of size 1
        size = state.size
        bias = None if size is None else size.log()[:, None, None, :, 0].to(x.dtype)
        x, _, keys, _ = attention_residual(self, x, bias)
        r = min(spec.r, (x.shape[1] - spec.prefix) // 2)
        if r > 0:
            if size is None:
                size = x.new_ones(x.shape[0], x.shape[1], 1)
            x, size = tome_merge(x, keys, size, r, spec.prefix, spec.trace)
        state.size = None if spec.last else size
        return mlp_residual(self, x)


MIXINS: dict[str, type[nn.Module]] = {"pomt": _POMTBlock, "topk": _TopKBlock, "tome": _ToMeBlock}
