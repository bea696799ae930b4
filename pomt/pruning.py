"""Token pruning for timm-style ViTs: POMT, and the Top-K and ToMe baselines.

``apply_pruning(model, method, r, layer)`` changes the model in place by swapping the
class of the blocks that prune for a subclass whose ``forward`` prunes; parameters,
buffers and ``state_dict`` keys are untouched, and ``remove_pruning`` swaps the classes
back. Blocks that do not prune are not touched at all, so they keep timm's fused
attention (``F.scaled_dot_product_attention``); only a block that needs the attention
matrix computes it explicitly.

Methods
-------
- ``pomt``: at block ``layer`` only, after the attention residual and before the MLP, keep
  the prefix tokens and the best-scoring ordinary tokens and append one token, the mean of
  the discarded ones. Exactly ``N - r`` tokens leave that block.
- ``topk``: at every block, keep the ordinary tokens with the highest CLS attention (mean
  over heads); ``r`` (or ``r[i]`` at block ``i``) are dropped, no fusion.
- ``tome``: Token Merging. At every block, bipartite soft matching on the attention keys
  merges ``r`` pairs by size-weighted average; token sizes are tracked and attention is
  proportional (``+ log(size)`` on the logits, still through the fused SDPA kernel).
- ``none``: the unpruned model.

Prefix tokens (CLS, distillation token, registers) are never pruned or merged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pomt.models import TokenLayout, token_layout, vit_blocks

__all__ = [
    "METHODS",
    "PruningConfig",
    "apply_pruning",
    "remove_pruning",
    "pruning_config",
    "token_schedule",
    "random_token_subset",
    "pomt_token_scores",
]

METHODS = ("none", "pomt", "topk", "tome")
# Not a pruning method: keeps the first N - r tokens where POMT would prune, with no scoring
# and fused attention. It is the latency floor of POMT and is used by the benchmarks.
CUT_METHOD = "cut"
PER_BLOCK_METHODS = ("topk", "tome")


@dataclass(frozen=True)
class PruningConfig:
    """What ``apply_pruning`` did to a model.

    ``tokens[i]`` is the number of tokens leaving block ``i`` at the model's own image size.
    """

    method: str
    r: int | tuple[int, ...]
    layer: int
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class _BlockSpec:
    r: int
    prefix: int
    has_cls: bool
    first: bool = False
    last: bool = False
    state: _ToMeState | None = None


class _ToMeState:
    """Token sizes carried from block to block within one forward pass (ToMe only)."""

    def __init__(self) -> None:
        self.size: torch.Tensor | None = None


# --------------------------------------------------------------------------- attention


def _qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of shape (B, heads, N, head_dim), with the module's q/k norms applied."""
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    return q, k, v


def _attn_scale(attn: nn.Module, head_dim: int) -> float:
    return float(getattr(attn, "scale", head_dim**-0.5))


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


def _explicit_attention(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention output, softmax probabilities (B, H, N, N) and values (B, H, N, D)."""
    q, k, v = _qkv(attn, x)
    logits = (q * _attn_scale(attn, q.shape[-1])) @ k.transpose(-2, -1)
    if logits.requires_grad:
        probs = logits.softmax(dim=-1)
    else:  # softmax in place: one (B, H, N, N) buffer instead of two (large CPU allocations page-fault)
        probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        probs = probs.div_(probs.sum(dim=-1, keepdim=True))
    attn_drop = getattr(attn, "attn_drop", None)
    heads_out = (attn_drop(probs) if attn_drop is not None else probs) @ v
    return _attn_output(attn, heads_out, x), probs, v


def _fused_attention(
    attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output through SDPA (optionally with an additive bias) and the keys."""
    q, k, v = _qkv(attn, x)
    attn_drop = getattr(attn, "attn_drop", None)
    dropout = attn_drop.p if (attn.training and attn_drop is not None) else 0.0
    heads_out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=dropout, scale=_attn_scale(attn, q.shape[-1])
    )
    return _attn_output(attn, heads_out, x), k


def _no_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("attention masks and causal attention are not supported in pruned blocks")


def _mlp_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _explicit_attention_residual(
    block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks, then ``x + attention(x)`` with the attention probabilities and values exposed."""
    _no_mask(attn_mask, is_causal)
    _check_room(x.shape[1], block._pomt_spec.prefix, block._pomt_spec.r, method)
    attn_out, probs, values = _explicit_attention(block.attn, block.norm1(x))
    return x + block.drop_path1(block.ls1(attn_out)), probs, values


# --------------------------------------------------------------------------- POMT


def pomt_token_scores(probs: torch.Tensor, values: torch.Tensor, prefix: int) -> torch.Tensor:
    """POMT importance of each ordinary token, shape (B, N - prefix), in float32.

    Attention term: max over heads of the attention among ordinary tokens, summed over the
    rows (how much each token is attended to), divided by its per-image maximum. Value term:
    max over heads of V summed over features, softmax over all tokens, prefix dropped.
    """
    attn_term = probs.amax(dim=1)[:, prefix:, prefix:].sum(dim=1, dtype=torch.float32)
    attn_term = attn_term / attn_term.amax(dim=1, keepdim=True)
    value_term = values.amax(dim=1).sum(dim=-1, dtype=torch.float32).softmax(dim=-1)[:, prefix:]
    return attn_term + value_term


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Tokens ``x[b, index[b, i]]`` of each image b, shape (B, K, C)."""
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), index]


def _check_room(tokens: int, prefix: int, removed: int, where: str) -> None:
    if tokens - removed < prefix + 1:
        raise ValueError(
            f"{where}: removing {removed} of {tokens} tokens ({prefix} prefix) leaves no ordinary token; "
            f"at most {tokens - prefix - 1} can be removed for this input size"
        )


class _POMTBlock(nn.Module):
    """Mixin: POMT pruning inside one block (explicit attention here only)."""

    _pomt_spec: _BlockSpec

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        x, probs, values = _explicit_attention_residual(self, x, attn_mask, is_causal, "POMT")
        prefix, r = self._pomt_spec.prefix, self._pomt_spec.r
        ordinary = x[:, prefix:]
        keep = ordinary.shape[1] - r - 1
        order = pomt_token_scores(probs, values, prefix).argsort(dim=1, descending=True)
        kept = _gather_tokens(ordinary, order[:, :keep])
        fused = _gather_tokens(ordinary, order[:, keep:]).mean(dim=1, keepdim=True)
        x = torch.cat([x[:, :prefix], kept, fused], dim=1)
        return _mlp_residual(self, x)


class _CutBlock(nn.Module):
    """Mixin: keep the first N - r tokens where POMT prunes; no scoring, fused attention."""

    _pomt_spec: _BlockSpec

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        _check_room(x.shape[1], self._pomt_spec.prefix, self._pomt_spec.r, "cut")
        attn_out, _ = _fused_attention(self.attn, self.norm1(x))
        x = x + self.drop_path1(self.ls1(attn_out))
        return _mlp_residual(self, x[:, : x.shape[1] - self._pomt_spec.r])


# --------------------------------------------------------------------------- Top-K


class _TopKBlock(nn.Module):
    """Mixin: drop the r ordinary tokens with the least CLS attention (mean over heads)."""

    _pomt_spec: _BlockSpec

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        x, probs, _ = _explicit_attention_residual(self, x, attn_mask, is_causal, "Top-K")
        spec = self._pomt_spec
        prefix, r = spec.prefix, spec.r
        if spec.has_cls:
            importance = probs[:, :, 0, prefix:].mean(dim=1)
        else:  # no CLS token: the attention each token receives, averaged over queries and heads
            importance = probs[:, :, :, prefix:].mean(dim=(1, 2))
        ordinary = x[:, prefix:]
        keep = importance.topk(ordinary.shape[1] - r, dim=1).indices.sort(dim=1).values
        x = torch.cat([x[:, :prefix], _gather_tokens(ordinary, keep)], dim=1)
        return _mlp_residual(self, x)


# --------------------------------------------------------------------------- ToMe


def _tome_merge(
    x: torch.Tensor, keys: torch.Tensor, size: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite soft matching of the ordinary tokens; merge the ``r`` most similar pairs.

    Ordinary tokens alternate into sets A and B; each A token finds its most similar B token
    (cosine similarity of the keys, averaged over heads); the ``r`` best edges are merged
    into their B token by size-weighted average. Returns the new tokens and sizes.
    """
    metric = keys.mean(dim=1)[:, prefix:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    best, best_b = similarity.max(dim=-1)
    edges = best.argsort(dim=-1, descending=True)
    merged_a, kept_a = edges[:, :r], edges[:, r:]
    target_b = best_b.gather(1, merged_a)

    ordinary, ordinary_size = x[:, prefix:], size[:, prefix:]
    weighted = ordinary * ordinary_size
    wa, wb = weighted[:, ::2], weighted[:, 1::2]
    sa, sb = ordinary_size[:, ::2], ordinary_size[:, 1::2]
    channels = x.shape[-1]
    wb = wb.scatter_add(1, target_b.unsqueeze(-1).expand(-1, -1, channels), _gather_tokens(wa, merged_a))
    sb = sb.scatter_add(1, target_b.unsqueeze(-1), sa.gather(1, merged_a.unsqueeze(-1)))
    kept_w, kept_s = _gather_tokens(wa, kept_a), sa.gather(1, kept_a.unsqueeze(-1))
    new_x = torch.cat([x[:, :prefix], kept_w / kept_s, wb / sb], dim=1)
    new_size = torch.cat([size[:, :prefix], kept_s, sb], dim=1)
    return new_x, new_size


class _ToMeBlock(nn.Module):
    """Mixin: proportional attention, then merge r token pairs (sizes carried in shared state)."""

    _pomt_spec: _BlockSpec

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        spec = self._pomt_spec
        state = spec.state
        if spec.first or state.size is None or state.size.shape[:2] != x.shape[:2]:
            state.size = None  # a new forward pass starts with every token of size 1
        size = state.size
        bias = None if size is None else size.log()[:, None, None, :, 0].to(x.dtype)
        attn_out, keys = _fused_attention(self.attn, self.norm1(x), bias)
        x = x + self.drop_path1(self.ls1(attn_out))
        r = min(spec.r, (x.shape[1] - spec.prefix) // 2)
        if r > 0:
            if size is None:
                size = x.new_ones(x.shape[0], x.shape[1], 1)
            x, size = _tome_merge(x, keys, size, r, spec.prefix)
        state.size = None if spec.last else size
        return _mlp_residual(self, x)


_MIXINS: dict[str, type[nn.Module]] = {
    "pomt": _POMTBlock,
    "topk": _TopKBlock,
    "tome": _ToMeBlock,
    CUT_METHOD: _CutBlock,
}
_CLASS_CACHE: dict[tuple[type, type], type] = {}


def _patched_class(mixin: type[nn.Module], base: type[nn.Module]) -> type[nn.Module]:
    key = (mixin, base)
    if key not in _CLASS_CACHE:
        name = f"{mixin.__name__.lstrip('_').removesuffix('Block')}{base.__name__}"
        _CLASS_CACHE[key] = type(name, (mixin, base), {"_pomt_base_class": base})
    return _CLASS_CACHE[key]


# --------------------------------------------------------------------------- validation


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_block_r(method: str, r: int | Sequence[int], depth: int) -> tuple[int, ...]:
    if _is_int(r):
        values = (int(r),) * depth
    elif isinstance(r, Sequence) and not isinstance(r, str) and all(_is_int(v) for v in r):
        values = tuple(int(v) for v in r)
        if len(values) != depth:
            raise ValueError(
                f"{method}: a per-block r needs {depth} values (one per block), got {len(values)}"
            )
    else:
        raise ValueError(f"{method}: r must be an int or a list of {depth} ints, got {r!r}")
    if any(v < 0 for v in values):
        raise ValueError(f"{method}: r must be >= 0, got {r!r}")
    return values


def _schedule(method: str, r: int | Sequence[int], layer: int, layout: TokenLayout) -> tuple[int, ...]:
    """Validate arguments and return the tokens leaving each block."""
    if method not in METHODS and method != CUT_METHOD:
        raise ValueError(f"unknown pruning method {method!r}; valid: {', '.join(METHODS)}")
    depth, n, p = layout.depth, layout.tokens, layout.prefix_tokens
    if not _is_int(layer) or not 0 <= layer < depth:
        raise ValueError(
            f"layer must be an int in 0..{depth - 1} for this {depth}-block model, got {layer!r}"
        )
    if method == "none":
        return (n,) * depth
    if method in ("pomt", CUT_METHOD):
        if not _is_int(r) or not 0 <= r <= n - p - 1:
            raise ValueError(
                f"{method}: r must be an int in 0..{n - p - 1} (N={n} tokens, {p} prefix; at least one "
                f"ordinary token must remain), got {r!r}"
            )
        return (n,) * layer + (n - r,) * (depth - layer)
    per_block = _per_block_r(method, r, depth)
    # ToMe never over-prunes: each block merges at most half of its ordinary tokens (below).
    if method == "topk" and n - sum(per_block) < p + 1:
        raise ValueError(
            f"{method}: r={r!r} removes {sum(per_block)} of {n} tokens ({p} prefix); at most "
            f"{n - p - 1} can be removed in total so that one ordinary token remains"
        )
    tokens, current = [], n
    for value in per_block:
        if method == "tome":
            value = min(value, (current - p) // 2)  # bipartite matching merges at most half
        current -= value
        tokens.append(current)
    return tuple(tokens)


# --------------------------------------------------------------------------- public API


def pruning_config(model: nn.Module) -> PruningConfig | None:
    """The pruning currently applied to ``model``, or None."""
    return getattr(model, "_pomt_config", None)


def token_schedule(
    model: nn.Module,
    method: str,
    r: int | Sequence[int],
    layer: int = 3,
    img_size: int | tuple[int, int] | None = None,
) -> list[int]:
    """Tokens leaving each block of ``model`` under ``method`` (validates like ``apply_pruning``)."""
    return list(_schedule(method, r, layer, token_layout(model, img_size)))


def remove_pruning(model: nn.Module) -> nn.Module:
    """Undo ``apply_pruning``: every block gets its original class back. Returns ``model``."""
    for block in vit_blocks(model):
        base = getattr(type(block), "_pomt_base_class", None)
        if base is not None:
            block.__class__ = base
            del block._pomt_spec
    if hasattr(model, "_pomt_config"):
        del model._pomt_config
    return model


def apply_pruning(
    model: nn.Module, method: str = "pomt", r: int | Sequence[int] = 0, layer: int = 3
) -> nn.Module:
    """Prune ``model`` in place and return it; replaces any earlier pruning.

    ``r`` is the number of tokens removed: once, at block ``layer``, for ``pomt``; at every
    block for ``topk``/``tome`` (an int, or one value per block; ``layer`` is then unused but
    still validated). Arguments are validated before anything changes, so an error leaves
    the model as it was.
    """
    layout = token_layout(model)
    schedule = _schedule(method, r, layer, layout)
    blocks = vit_blocks(model)
    remove_pruning(model)
    if method == "none":
        return model
    has_cls = getattr(model, "cls_token", None) is not None
    common = dict(prefix=layout.prefix_tokens, has_cls=has_cls)
    if method in ("pomt", CUT_METHOD):
        # r=0 deploys the unpruned model: no block pays for scoring that removes nothing
        targets = {layer: _BlockSpec(r=int(r), **common)} if r > 0 else {}
        stored_r: int | tuple[int, ...] = int(r)
    else:
        per_block = _per_block_r(method, r, layout.depth)
        state = _ToMeState() if method == "tome" else None
        targets = {
            i: _BlockSpec(r=v, first=i == 0, last=i == layout.depth - 1, state=state, **common)
            for i, v in enumerate(per_block)
            if v > 0 or method == "tome"  # ToMe's proportional attention runs in every block
        }
        stored_r = int(r) if _is_int(r) else per_block
    for i, spec in targets.items():
        block = blocks[i]
        block.__class__ = _patched_class(_MIXINS[method], type(block))
        block._pomt_spec = spec
    model._pomt_config = PruningConfig(method=method, r=stored_r, layer=layer, tokens=schedule)
    return model


@contextlib.contextmanager
def random_token_subset(
    model: nn.Module, tokens: int, generator: torch.Generator | None = None
) -> Iterator[None]:
    """While active, keep exactly ``tokens`` tokens right after the embedding.

    All prefix tokens are kept, plus a random subset of ordinary tokens drawn per image with
    ``generator`` (a CPU generator; the global RNG is not touched when one is given). This is
    the cheap accuracy proxy of POMT's offline step: accuracy with n random tokens.
    """
    layout = token_layout(model)
    p = layout.prefix_tokens
    if not _is_int(tokens) or not p + 1 <= tokens <= layout.tokens:
        raise ValueError(
            f"tokens must be an int in {p + 1}..{layout.tokens} (N={layout.tokens}, {p} prefix), got {tokens!r}"
        )

    def keep_random(_module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        n_ordinary = x.shape[1] - p
        keep = tokens - p
        if keep >= n_ordinary:
            return None
        noise = torch.rand(x.shape[0], n_ordinary, generator=generator)
        index = noise.argsort(dim=1)[:, :keep].sort(dim=1).values.to(x.device)
        return (torch.cat([x[:, :p], _gather_tokens(x[:, p:], index)], dim=1), *rest)

    handle = vit_blocks(model)[0].register_forward_pre_hook(keep_random)
    try:
        yield
    finally:
        handle.remove()
