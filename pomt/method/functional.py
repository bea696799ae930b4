"""The method, as tensor functions: POMT's score and selection, Top-K's, and ToMe's merge.

This is the module to read first. Each function is what the paper (and its baselines) state,
in a screenful, with no dispatch, timing or model code around it; ``pomt.method.blocks`` calls them
from inside a timm block, and ``pomt.method.dispatch`` decides when POMT's Triton kernels compute
the same thing instead (they must equal :func:`pomt_select` after :func:`pomt_scores`).

- **POMT** (*Pruning One More Token is Enough*, WACV 2025; ``docs/method.md`` section 2, the
  pruning block): inside one block, after the attention residual, every ordinary token j
  gets the score :func:`pomt_score` = attention term (the softmax attention among ordinary
  tokens, max over heads, summed over the rows, divided by the image's maximum: per image,
  not per batch, unlike the authors' code) + value term (V's max over heads, summed over
  features, softmax over all tokens, prefix dropped). :func:`pomt_select` keeps the prefix,
  the best ``N - prefix - r - 1`` tokens and one more: the mean of the others (EViT-style
  fusion), so exactly ``N - r`` tokens leave the block.
- **Top-K** (the paper's baseline; ``docs/method.md`` section 3): :func:`cls_attention`
  (CLS row of attention, mean over heads) and :func:`topk_select` (keep the best, in order,
  no fusion).
- **ToMe** (Bolya et al., ICLR 2023; ``docs/method.md`` section 3): :func:`tome_merge`,
  bipartite soft matching on the keys, size-weighted merge of the r best edges.

Prefix tokens (CLS, registers, distillation token) are never scored, dropped or merged.
A :class:`Trace`, when given, follows where each patch goes (``pomt.token_groups``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "Trace",
    "pomt_score",
    "pomt_scores_from_probabilities",
    "pomt_scores",
    "pomt_select",
    "gather_tokens",
    "cls_attention",
    "topk_select",
    "tome_merge",
    "tome_match",
    "tome_apply",
    "pomt_order",
    "pomt_fuse",
    "topk_index",
    "topk_keep",
    "tracing_tokens",
]


# --------------------------------------------------------------------------- POMT's score
# The paper's pruning block, its importance (docs/method.md, section 2).


def pomt_score(top: torch.Tensor, values: torch.Tensor, prefix: int) -> torch.Tensor:
    """POMT's score from ``top`` (B, N - p rows, N - p cols: max over heads of the ordinary
    block of the attention probabilities) and the values (B, H, N, D).

    An image whose column sums are all 0 (its ordinary queries attend only to the prefix: an
    attention sink) gets an attention term of 0, not 0/0; a score that is not a number
    becomes ``-inf``, so that it ranks last."""
    attn_term = top.sum(dim=1, dtype=torch.float32)
    attn_term = attn_term / attn_term.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    value_term = values.amax(dim=1).sum(dim=-1, dtype=torch.float32).softmax(dim=-1)[:, prefix:]
    return (attn_term + value_term).nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)


@torch.no_grad()
def pomt_scores_from_probabilities(probs: torch.Tensor, values: torch.Tensor, prefix: int) -> torch.Tensor:
    """POMT importance of each ordinary token, (B, N - prefix) float32, from the attention
    probabilities (B, H, N, N) and the values (B, H, N, D).

    Attention term: the probabilities among ordinary tokens (rows normalised over all keys),
    max over heads, summed over the rows, divided by the image's maximum. Value term: V's max
    over heads, summed over features, softmax over all tokens, prefix dropped.
    """
    return pomt_score(probs[:, :, prefix:, prefix:].amax(dim=1), values, prefix)


@torch.no_grad()
def pomt_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: float, align: bool | None = None
) -> torch.Tensor:
    """The same scores from q, k, v (B, H, N, D): the probabilities of the ordinary query rows
    only, from one GEMM and one softmax. With ``align`` (default: on CUDA) the keys are padded
    to a multiple of 8, so that the GEMM runs on aligned tensor-core kernels."""
    n = k.shape[2]
    if (q.is_cuda if align is None else align) and n % 8:
        k = F.pad(k, (0, 0, 0, 8 - n % 8))
    logits = torch.matmul(q[:, :, prefix:], k.transpose(-1, -2))
    probs = (logits[..., :n] * scale).softmax(dim=-1)
    return pomt_score(probs[..., prefix:].amax(dim=1), v, prefix)


# --------------------------------------------------------------------------- POMT's selection
# Keep the prefix and the best tokens, fuse the rest into their mean (EViT-style).


def pomt_select(
    x: torch.Tensor, scores: torch.Tensor, prefix: int, r: int, trace: Trace | None = None
) -> torch.Tensor:
    """``x`` with ``r`` tokens removed: the prefix, the ``N - prefix - r - 1`` best-scoring
    ordinary tokens (best first) and the mean of the other ``r + 1``."""
    return pomt_fuse(x, pomt_order(scores), prefix, r, trace)


def pomt_order(scores: torch.Tensor) -> torch.Tensor:
    """The ordinary tokens best first, (B, N - prefix): indices into the ordinary tokens."""
    # finite scores are >= 0; those that are -inf rank after them, by index as in the kernels
    # (an image whose statistics hold a NaN keeps its first tokens). A stable sort would not
    # export to ONNX.
    return torch.where(scores == -torch.inf, _last(scores), scores).argsort(dim=1, descending=True)


def pomt_fuse(
    x: torch.Tensor, order: torch.Tensor, prefix: int, r: int, trace: Trace | None = None
) -> torch.Tensor:
    """:func:`pomt_select` from the ranking :func:`pomt_order`: the prefix, the first
    ``N - prefix - r - 1`` tokens of ``order`` and the mean of the others (last)."""
    keep = x.shape[1] - prefix - r - 1
    if tracing_tokens(trace):
        b, no = order.shape
        target = (prefix + torch.arange(no, device=x.device)).clamp(max=prefix + keep).expand(b, no)
        moved = torch.empty_like(order).scatter_(1, order, target)
        trace.move(torch.cat([_prefix_index(b, prefix, x.device), moved], dim=1))
    ranked = gather_tokens(x, order, prefix)
    end = prefix + keep
    # the mean of the discarded tokens takes the first's place (narrow, not indexing: a symbolic
    # ``end`` exports)
    ranked.narrow(1, end, 1).copy_(ranked.narrow(1, end, ranked.shape[1] - end).mean(dim=1, keepdim=True))
    return ranked.narrow(1, 0, end + 1)


def _last(scores: torch.Tensor) -> torch.Tensor:
    """Sort keys for scores that are -inf: below every finite score (>= 0), the lower index first."""
    key = (scores.shape[1], scores.device)
    if type(scores) is not torch.Tensor:  # traced (export, compile): no traced tensor may stay cached
        _LAST.pop(key, None)
        return -1.0 - torch.arange(key[0], device=key[1], dtype=torch.float32) / key[0]
    if key not in _LAST:
        if len(_LAST) > 64:
            _LAST.clear()
        with torch.inference_mode(False):
            _LAST[key] = -1.0 - torch.arange(key[0], device=key[1], dtype=torch.float32) / key[0]
    return _LAST[key]


_LAST: dict[tuple[int, torch.device], torch.Tensor] = {}


# --------------------------------------------------------------------------- Top-K
# The paper's baseline: CLS attention, keep the best, no fusion (docs/method.md, section 3).


@torch.no_grad()
def cls_attention(q: torch.Tensor, k: torch.Tensor, prefix: int, scale: float, has_cls: bool) -> torch.Tensor:
    """Top-K importance, (B, N - prefix): the CLS row of attention averaged over heads; without
    a CLS token, the attention each token receives, averaged over queries and heads. A score
    that is not a number becomes ``-inf``."""
    if has_cls:
        probs = (torch.matmul(q[:, :, :1], k.transpose(-1, -2)) * scale).softmax(dim=-1)
        importance = probs[:, :, 0, prefix:].mean(dim=1, dtype=torch.float32)
    else:
        probs = (torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(dim=-1)
        importance = probs[:, :, :, prefix:].mean(dim=(1, 2), dtype=torch.float32)
    return importance.nan_to_num(nan=-torch.inf)  # a score that is not a number ranks last


def topk_select(
    x: torch.Tensor, importance: torch.Tensor, prefix: int, keep: int, trace: Trace | None = None
) -> torch.Tensor:
    return topk_keep(x, topk_index(importance, keep), prefix, trace)


def topk_index(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` ordinary tokens of highest importance, in their original order, (B, keep)."""
    return importance.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values


def topk_keep(x: torch.Tensor, index: torch.Tensor, prefix: int, trace: Trace | None = None) -> torch.Tensor:
    """The prefix and the ordinary tokens ``index`` (B, keep) of ``x``."""
    if tracing_tokens(trace):
        b, no, keep = x.shape[0], x.shape[1] - prefix, index.shape[1]
        moved = torch.full((b, no), -1, dtype=torch.long, device=x.device)
        moved.scatter_(1, index, prefix + torch.arange(keep, device=x.device).expand(b, keep))
        trace.move(torch.cat([_prefix_index(b, prefix, x.device), moved], dim=1))
    return gather_tokens(x, index, prefix)


# --------------------------------------------------------------------------- ToMe
# Token Merging, Bolya et al., ICLR 2023: bipartite soft matching (docs/method.md, section 3).


def tome_merge(
    x: torch.Tensor,
    keys: torch.Tensor,
    size: torch.Tensor,
    r: int,
    prefix: int,
    trace: Trace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching; merges the ``r`` most similar pairs of tokens.

    All tokens alternate into sets A (even positions) and B (odd positions), as in the ToMe
    paper's code. Each A token finds its most similar B token (cosine similarity of the
    keys averaged over heads); the ``r`` best edges are merged into their B token by
    size-weighted average. The prefix tokens are protected where they stand: as a source
    they get no edge, as a destination they take none. The result holds the prefix tokens
    first in their original order, then the unmerged A tokens in order, then the B tokens.
    Returns the new tokens and sizes (B, N - r, 1).
    """
    return tome_apply(x, size, tome_match(keys, r, prefix), prefix, trace)


def tome_match(keys: torch.Tensor, r: int, prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's matching (see :func:`tome_merge`): the merged A tokens (B, r), the kept A tokens
    in order, protected ones out, and each merged token's B token (B, r); A = even positions."""
    with torch.no_grad():  # the matching is not differentiated (as in ToMe)
        metric = keys.mean(dim=1)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        if prefix:  # a mask, not slice writes: those export as a ScatterND that OpenVINO rejects
            similarity.masked_fill_(_protected(similarity, prefix), -math.inf)
        best, best_b = similarity.max(dim=-1)
        edges = best.argsort(dim=-1, descending=True)
        merged_a = edges[:, :r]
        kept_a = edges[:, r:].sort(dim=-1).values[:, (prefix + 1) // 2 :]  # original order
        return merged_a, kept_a, best_b.gather(1, merged_a)


def tome_apply(
    x: torch.Tensor,
    size: torch.Tensor,
    match: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    prefix: int,
    trace: Trace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the pairs of :func:`tome_match` by size-weighted average: new tokens and sizes."""
    merged_a, kept_a, target_b = match
    protected_b = prefix // 2
    weighted = x * size
    wa, wb = weighted[:, ::2], weighted[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    wb = wb.scatter_add(1, target_b.unsqueeze(-1).expand(-1, -1, x.shape[-1]), gather_tokens(wa, merged_a))
    sb = sb.scatter_add(1, target_b.unsqueeze(-1), sa.gather(1, merged_a.unsqueeze(-1)))
    kept_w, kept_s = gather_tokens(wa, kept_a), sa.gather(1, kept_a.unsqueeze(-1))
    wb, sb = wb[:, protected_b:], sb[:, protected_b:]
    new_x = torch.cat([x[:, :prefix], kept_w / kept_s, wb / sb], dim=1)
    new_size = torch.cat([size[:, :prefix], kept_s, sb], dim=1)
    if trace is not None and trace.where is not None:
        trace.move(_tome_moves(x.shape[1], prefix, kept_a, merged_a, target_b))
    return new_x, new_size


def _protected(similarity: torch.Tensor, prefix: int) -> torch.Tensor:
    """The (A, B) pairs ToMe may not match, (1, A, B): a protected source row or destination
    column; cached (building it costs several small ops), never while traced."""
    key = (similarity.shape[1], similarity.shape[2], prefix, similarity.device)
    if type(similarity) is not torch.Tensor:  # traced (export, compile): nothing traced is cached
        _PROTECTED.pop(key, None)
    if key not in _PROTECTED:
        if len(_PROTECTED) > 64:
            _PROTECTED.clear()
        with torch.inference_mode(False):
            rows = torch.arange(key[0], device=key[3]).unsqueeze(1) < (prefix + 1) // 2
            mask = (rows | (torch.arange(key[1], device=key[3]) < prefix // 2)).unsqueeze(0)
        if type(similarity) is not torch.Tensor:
            return mask
        _PROTECTED[key] = mask
    return _PROTECTED[key]


_PROTECTED: dict[tuple[int, int, int, torch.device], torch.Tensor] = {}


def _tome_moves(
    n: int, prefix: int, kept_a: torch.Tensor, merged_a: torch.Tensor, target_b: torch.Tensor
) -> torch.Tensor:
    """Where each token of a ToMe block's input is in its output (merged ones: their B token)."""
    b, device = kept_a.shape[0], kept_a.device
    protected_a, protected_b = (prefix + 1) // 2, prefix // 2
    new_a = torch.empty(b, (n + 1) // 2, dtype=torch.long, device=device)
    new_a[:, :protected_a] = 2 * torch.arange(protected_a, device=device)  # prefix: where they stand
    new_a.scatter_(1, kept_a, prefix + torch.arange(kept_a.shape[1], device=device).expand_as(kept_a))
    new_b = torch.empty(b, n // 2, dtype=torch.long, device=device)
    new_b[:, :protected_b] = 2 * torch.arange(protected_b, device=device) + 1
    new_b[:, protected_b:] = prefix + kept_a.shape[1] + torch.arange(n // 2 - protected_b, device=device)
    new_a.scatter_(1, merged_a, new_b.gather(1, target_b))
    moves = torch.empty(b, n, dtype=torch.long, device=device)
    moves[:, ::2], moves[:, 1::2] = new_a, new_b
    return moves


# --------------------------------------------------------------------------- bookkeeping
# Gathering whole rows; following where each patch goes (pomt.token_groups).


def gather_tokens(x: torch.Tensor, index: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """The ``prefix`` first tokens of each image followed by its tokens ``prefix + index[b, i]``,
    shape (B, prefix + K, C): one ``index_select`` of whole rows (on the CPU several times
    faster than ``torch.gather``, which reads an index per element)."""
    b, n, c = x.shape
    first, prefix_rows = _rows(b, n, prefix, x.device)
    if type(x) is not torch.Tensor:  # traced (export, compile): no traced tensor may stay cached
        _ROWS.pop((b, n, prefix, x.device), None)
    rows = index + first
    if prefix_rows is not None:
        rows = torch.cat([prefix_rows, rows], dim=1)
    return x.reshape(b * n, c).index_select(0, rows.flatten()).view(b, -1, c)


def _rows(b: int, n: int, prefix: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row offsets of each image's first ordinary token (B, 1) and the rows of its prefix
    tokens (B, prefix) in a flattened (B * N, C) batch; cached (``arange`` costs ~10 us on a CPU)."""
    key = (b, n, prefix, device)
    if key not in _ROWS:
        if len(_ROWS) > 64:
            _ROWS.clear()
        with torch.inference_mode(False):  # plain tensors: usable under autograd as well
            first = torch.arange(prefix, b * n, n, device=device).unsqueeze(1)
            prefix_rows = first - torch.arange(prefix, 0, -1, device=device) if prefix else None
        _ROWS[key] = (first, prefix_rows)
    return _ROWS[key]


_ROWS: dict[tuple[int, int, int, torch.device], tuple[torch.Tensor, torch.Tensor | None]] = {}


class Trace:
    """Where each patch of the input is: while ``where`` (B, patches) is set, by
    :func:`pomt.token_groups`, the pruning blocks move it along with the tokens (-1: dropped).
    Otherwise it is None and the blocks do nothing more than check that."""

    def __init__(self) -> None:
        self.where: torch.Tensor | None = None

    def move(self, new_index: torch.Tensor) -> None:
        """Tokens moved: token i of the old sequence is now at ``new_index[:, i]`` (-1: gone)."""
        if self.where is not None:
            kept = self.where >= 0
            self.where = torch.where(kept, new_index.gather(1, self.where.clamp(min=0)), -1)


def _prefix_index(b: int, prefix: int, device: torch.device) -> torch.Tensor:
    return torch.arange(prefix, device=device).expand(b, prefix)


def tracing_tokens(trace: Trace | None) -> bool:
    return trace is not None and trace.where is not None
