"""Token pruning for timm-style ViTs: POMT, and the Top-K and ToMe baselines.

``apply_pruning(model, method, r, layer)`` changes the model in place by swapping the
class of the blocks that prune for a subclass whose ``forward`` prunes (``pomt.method.blocks``);
parameters, buffers and ``state_dict`` keys are untouched, and ``remove_pruning`` swaps
the classes back. A pruned model pickles (``torch.save``, ``copy.deepcopy``, a Lightning
checkpoint that keeps the network in its hyperparameters) and loads back pruned: a patched
block is saved as its mixin and original class, and its class is rebuilt on loading. Every block keeps fused attention for its output, except POMT's one block
on the CPU (an explicit softmax costs no more there, and its probabilities give the
scores); blocks that do not prune are not touched at all.

Methods
-------
- ``pomt``: at block ``layer`` only, after the attention residual and before the MLP, keep
  the prefix tokens and the best-scoring ordinary tokens and append one token, the mean of
  the discarded ones. Exactly ``N - r`` tokens leave that block.
- ``topk``: at every block, keep the ordinary tokens with the highest CLS attention (mean
  over heads); ``r`` (or ``r[i]`` at block ``i``) are dropped, no fusion.
- ``tome``: Token Merging. At every block, bipartite soft matching on the attention keys
  (all tokens alternate into the two sets, prefix tokens protected in place) merges ``r``
  pairs by size-weighted average; token sizes are tracked and attention is proportional
  (``+ log(size)`` on the logits, still through the fused SDPA kernel).
- ``none``: the unpruned model.

Prefix tokens (CLS, distillation token, registers) are never pruned or merged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pomt.errors import PomtValueError, PruningError, is_int
from pomt.method import rope
from pomt.method.blocks import MIXINS, BlockSpec, ToMeState, patched_class
from pomt.method.functional import Trace, gather_tokens
from pomt.method.ops import kernels
from pomt.models import TokenLayout, find_vit, token_layout, vit_blocks

__all__ = [
    "METHODS",
    "PruningConfig",
    "apply_pruning",
    "check_layer",
    "remove_pruning",
    "pruning_config",
    "token_schedule",
    "random_token_subset",
    "token_groups",
]

METHODS = ("none", "pomt", "topk", "tome")


@dataclass(frozen=True)
class PruningConfig:
    """What ``apply_pruning`` did to a model.

    ``schedule[i]`` is the number of tokens leaving block ``i`` at the model's own image size.
    """

    method: str
    r: int | tuple[int, ...]
    layer: int
    schedule: tuple[int, ...]


# --------------------------------------------------------------------------- validation


def _per_block_r(method: str, r: int | Sequence[int], depth: int) -> tuple[int, ...]:
    if is_int(r):
        values = (int(r),) * depth
    elif isinstance(r, Sequence) and not isinstance(r, str) and all(is_int(v) for v in r):
        values = tuple(int(v) for v in r)
        if len(values) != depth:
            raise PruningError(
                f"{method}: a per-block r needs {depth} values (one per block), got {len(values)}"
            )
    else:
        raise PruningError(f"{method}: r must be an int or a list of {depth} ints, got {r!r}")
    if any(v < 0 for v in values):
        raise PruningError(f"{method}: r must be >= 0, got {r!r}")
    return values


def check_layer(layer: object, depth: int) -> None:
    """The one check of a pruning block index: a PruningError unless ``layer`` is in 0..depth - 1."""
    if not is_int(layer) or not 0 <= layer < depth:
        raise PruningError(
            f"layer must be an int in 0..{depth - 1} for this {depth}-block model, got {layer!r}"
        )


def _schedule(method: str, r: int | Sequence[int], layer: int, layout: TokenLayout) -> tuple[int, ...]:
    """Validate arguments and return the tokens leaving each block."""
    if method not in METHODS:
        raise PruningError(f"unknown pruning method {method!r}; valid: {', '.join(METHODS)}")
    depth, n, p = layout.depth, layout.n_total, layout.prefix
    check_layer(layer, depth)
    if method == "none":
        return (n,) * depth
    if method == "pomt":
        if not is_int(r) or not 0 <= r <= n - p - 1:
            raise PruningError(
                f"{method}: r must be an int in 0..{n - p - 1} (N={n} tokens, {p} prefix; at least one "
                f"ordinary token must remain), got {r!r}"
            )
        return (n,) * layer + (n - r,) * (depth - layer)
    per_block = _per_block_r(method, r, depth)
    # ToMe never over-prunes: each block merges at most half of its ordinary tokens (below).
    if method == "topk" and n - sum(per_block) < p + 1:
        raise PruningError(
            f"{method}: r={r!r} removes {sum(per_block)} of {n} tokens ({p} prefix); at most "
            f"{n - p - 1} can be removed in total so that one ordinary token remains"
        )
    schedule, current = [], n
    for value in per_block:
        if method == "tome":
            value = min(value, (current - p) // 2)  # bipartite matching merges at most half
        current -= value
        schedule.append(current)
    return tuple(schedule)


# --------------------------------------------------------------------------- public API


def pruning_config(model: nn.Module) -> PruningConfig | None:
    """The pruning currently applied to the ViT in ``model``, or None."""
    return getattr(find_vit(model)[1], "_pomt_config", None)


def token_schedule(
    model: nn.Module,
    method: str,
    r: int | Sequence[int],
    layer: int = 3,
    img_size: int | tuple[int, int] | None = None,
) -> list[int]:
    """Tokens leaving each block of the ViT in ``model`` under ``method`` (validates like
    ``apply_pruning``)."""
    return list(_schedule(method, r, layer, token_layout(model, img_size)))


def remove_pruning(model: nn.Module) -> nn.Module:
    """Undo ``apply_pruning``: every block gets its original class back. Returns ``model``."""
    vit = find_vit(model)[1]
    for block in vit_blocks(vit):
        base = getattr(type(block), "_pomt_base_class", None)
        if base is not None:
            block.__class__ = base
            del block._pomt_spec
    for attribute in ("_pomt_config", "_pomt_trace"):
        if hasattr(vit, attribute):
            delattr(vit, attribute)
    return model


def apply_pruning(
    model: nn.Module, method: str = "pomt", r: int | Sequence[int] = 0, layer: int = 3
) -> nn.Module:
    """Prune the ViT in ``model`` in place and return ``model``; replaces any earlier pruning.

    ``r`` is the number of tokens removed: once, at block ``layer``, for ``pomt``; at every
    block for ``topk``/``tome`` (an int, or one value per block; ``layer`` is then unused but
    still validated). Arguments are validated before anything changes, so an error leaves
    the model as it was. ``model`` may be the ViT or any module that contains one.
    """
    vit = find_vit(model)[1]
    layout = token_layout(vit)
    schedule = _schedule(method, r, layer, layout)
    blocks = vit_blocks(vit)
    remove_pruning(vit)
    if method == "none":
        return model
    has_cls = getattr(vit, "cls_token", None) is not None
    vit._pomt_trace = Trace()  # shared by the patched blocks; idle unless token_groups runs
    common = dict(prefix=layout.prefix, has_cls=has_cls, trace=vit._pomt_trace)
    if method == "pomt":
        # r=0 deploys the unpruned model: no block pays for scoring that removes nothing
        targets = {layer: BlockSpec(r=int(r), **common)} if r > 0 else {}
        stored_r: int | tuple[int, ...] = int(r)
    else:
        per_block = _per_block_r(method, r, layout.depth)
        state = ToMeState() if method == "tome" else None
        targets = {
            i: BlockSpec(r=v, first=i == 0, last=i == layout.depth - 1, state=state, **common)
            for i, v in enumerate(per_block)
            if v > 0 or method == "tome"  # ToMe's proportional attention runs in every block
        }
        stored_r = int(r) if is_int(r) else per_block
    if rope.is_eva(vit):  # rotary tables follow the tokens: every block is patched (pomt.method.rope)
        plan = rope.eva_plan(method, targets, layout.depth, common) if targets else {}
    else:
        plan = {i: (MIXINS[method], spec) for i, spec in targets.items()}
    for i, (mixin, spec) in plan.items():
        block = blocks[i]
        block.__class__ = patched_class(mixin, type(block))
        block._pomt_spec = spec
    vit._pomt_config = PruningConfig(method=method, r=stored_r, layer=layer, schedule=schedule)
    return model


@contextlib.contextmanager
def pruning_restored(model: nn.Module) -> Iterator[nn.Module]:
    """While active, the pruning of the ViT in ``model`` may change at will; afterwards it is
    the pruning it had on entry (none, or the user's), also after an error. The one restore
    rule of every temporary pruning (profiling, verification, the sweep's timing)."""
    vit = find_vit(model)[1]
    before = pruning_config(vit)
    try:
        yield model
    finally:
        if before is None:
            remove_pruning(vit)
        else:
            apply_pruning(vit, before.method, r=before.r, layer=before.layer)


@contextlib.contextmanager
def pruned(
    model: nn.Module, method: str = "pomt", r: int | Sequence[int] = 0, layer: int = 3
) -> Iterator[nn.Module]:
    """While active, the ViT in ``model`` is pruned by ``method`` at ``r`` (as
    :func:`apply_pruning`, which validates first); afterwards its pruning is what it was
    (:func:`pruning_restored`)."""
    with pruning_restored(model):
        apply_pruning(model, method, r=r, layer=layer)
        yield model


@contextlib.contextmanager
def random_token_subset(model: nn.Module, n: int, generator: torch.Generator | None = None) -> Iterator[None]:
    """While active, keep exactly ``n`` tokens right after the embedding.

    All prefix tokens are kept, plus a random subset of ordinary tokens drawn per image with
    ``generator`` (a CPU generator; the global RNG is not touched when one is given). This is
    the cheap accuracy proxy of POMT's offline step: accuracy with n random tokens.
    """
    vit = find_vit(model)[1]
    layout = token_layout(vit)
    p = layout.prefix
    if not is_int(n) or not p + 1 <= n <= layout.n_total:
        raise PomtValueError(
            f"n must be an int in {p + 1}..{layout.n_total} (N={layout.n_total}, {p} prefix), got {n!r}"
        )

    blocks = vit_blocks(vit)
    with rope.following(blocks, p) if rope.is_eva(vit) else contextlib.nullcontext() as state:

        def keep_random(_module: nn.Module, args: tuple) -> tuple | None:
            x, *rest = args
            n_ordinary = x.shape[1] - p
            keep = n - p
            if keep >= n_ordinary:
                return None
            noise = torch.rand(x.shape[0], n_ordinary, generator=generator, dtype=torch.float32)
            index = noise.argsort(dim=1)[:, :keep].sort(dim=1).values.to(x.device)
            if state is not None:  # Eva: the blocks rotate each kept token by its own row
                state.pending = index + 1
            return (gather_tokens(x, index, p), *rest)

        handle = blocks[0].register_forward_pre_hook(keep_random)
        try:
            yield
        finally:
            handle.remove()


@torch.no_grad()
def token_groups(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The token each patch of ``images`` ends in, after the last block: a LongTensor
    (B, patches) of token indices (prefix tokens come first), -1 where the patch was dropped.

    For POMT a kept patch maps to its own token and the R + 1 fused patches to the fused token;
    for Top-K dropped patches are -1; for ToMe merged patches share their token, through
    every block. An unpruned model maps every patch to its own token. The model runs once
    (the plain torch path, so that the choices can be followed); the blocks track nothing
    outside this call.
    """
    vit = find_vit(model)[1]
    layout = token_layout(vit, tuple(images.shape[-2:]))
    b, device = images.shape[0], images.device
    where = (layout.prefix + torch.arange(layout.n_patches, device=device)).expand(b, -1).clone()
    trace = getattr(vit, "_pomt_trace", None)
    if trace is None:
        return where
    trace.where = where
    try:
        with kernels("torch"):
            vit(images)
        return trace.where
    finally:
        trace.where = None
