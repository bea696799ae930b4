"""What a pruning block computes besides timm's own block: token scores and the new sequence.

Two implementations, which must agree (tests hold them to 1e-5 in float32 and to the same
token choice):

- plain torch, used on the CPU, under autograd, inside ``torch.compile``/``torch.export``
  and wherever Triton is missing. On the CPU, POMT's block computes its attention with an
  explicit softmax (as fast as the fused kernel there) and scores from its probabilities;
  on CUDA without Triton it scores with one aligned GEMM and one softmax beside fused
  attention;
- Triton kernels (``pomt._triton``), used on CUDA: two kernels score POMT's tokens from q
  and k without writing a (B, H, N, N) tensor, one kernel ranks and gathers (Top-K: scores
  too).

``POMT_KERNELS=auto|torch|triton`` (or the :func:`kernels` context manager) picks them;
``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (the tests run the kernels so).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch
import torch.nn.functional as F

__all__ = [
    "KERNEL_MODES",
    "Trace",
    "kernels",
    "scores_from_probabilities",
    "pomt_scores",
    "pomt_scores_from_probabilities",
    "cls_attention",
    "pomt_select",
    "pomt_prune",
    "topk_prune",
    "gather_tokens",
]

KERNEL_MODES = ("auto", "torch", "triton")
_mode = os.environ.get("POMT_KERNELS", "auto")
_triton_module: ModuleType | None | bool = False  # False: not imported yet


@contextlib.contextmanager
def kernels(mode: str) -> Iterator[None]:
    """Use ``mode`` (``auto``: Triton on CUDA when installed; ``torch``; ``triton``) inside."""
    global _mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def _triton() -> ModuleType | None:
    global _triton_module
    if _triton_module is False:
        try:
            from pomt import _triton as module
        except ImportError:  # no triton (CPU-only installs, macOS, Windows)
            module = None
        _triton_module = module
    return _triton_module  # type: ignore[return-value]


def _use_triton(t: torch.Tensor) -> bool:
    if _mode == "torch" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if _mode == "triton":
        if _triton() is None:
            raise RuntimeError("POMT_KERNELS=triton but triton is not installed")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("POMT_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return t.is_cuda and _triton() is not None


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


def _tracing(trace: Trace | None) -> bool:
    return trace is not None and trace.where is not None


def _grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def scores_from_probabilities(x: torch.Tensor) -> bool:
    """Whether POMT's block should take its scores from an explicit softmax (the CPU path)."""
    return not x.is_cuda and not _use_triton(x)


# --------------------------------------------------------------------------- scores (torch)


def _normalised_sum(top: torch.Tensor, values: torch.Tensor, prefix: int) -> torch.Tensor:
    """POMT's score from ``top`` (B, N - p rows, N - p cols: max over heads of the ordinary
    block of the attention probabilities) and the values (B, H, N, D)."""
    attn_term = top.sum(dim=1, dtype=torch.float32)
    attn_term = attn_term / attn_term.amax(dim=1, keepdim=True)
    value_term = values.amax(dim=1).sum(dim=-1, dtype=torch.float32).softmax(dim=-1)[:, prefix:]
    return attn_term + value_term


@torch.no_grad()
def pomt_scores_from_probabilities(probs: torch.Tensor, values: torch.Tensor, prefix: int) -> torch.Tensor:
    """POMT importance of each ordinary token, (B, N - prefix) float32, from the attention
    probabilities (B, H, N, N) and the values (B, H, N, D).

    Attention term: the probabilities among ordinary tokens (rows normalised over all keys),
    max over heads, summed over the rows, divided by the image's maximum. Value term: V's max
    over heads, summed over features, softmax over all tokens, prefix dropped.
    """
    return _normalised_sum(probs[:, :, prefix:, prefix:].amax(dim=1), values, prefix)


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
    return _normalised_sum(probs[..., prefix:].amax(dim=1), v, prefix)


@torch.no_grad()
def cls_attention(q: torch.Tensor, k: torch.Tensor, prefix: int, scale: float, has_cls: bool) -> torch.Tensor:
    """Top-K importance, (B, N - prefix): the CLS row of attention averaged over heads; without
    a CLS token, the attention each token receives, averaged over queries and heads."""
    if has_cls:
        probs = (torch.matmul(q[:, :, :1], k.transpose(-1, -2)) * scale).softmax(dim=-1)
        return probs[:, :, 0, prefix:].mean(dim=1, dtype=torch.float32)
    probs = (torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(dim=-1)
    return probs[:, :, :, prefix:].mean(dim=(1, 2), dtype=torch.float32)


# --------------------------------------------------------------------------- selection


_ROWS: dict[tuple[int, int, int, torch.device], tuple[torch.Tensor, torch.Tensor | None]] = {}


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


def gather_tokens(x: torch.Tensor, index: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """The ``prefix`` first tokens of each image followed by its tokens ``prefix + index[b, i]``,
    shape (B, prefix + K, C): one ``index_select`` of whole rows (on the CPU several times
    faster than ``torch.gather``, which reads an index per element)."""
    b, n, c = x.shape
    first, prefix_rows = _rows(b, n, prefix, x.device)
    rows = index + first
    if prefix_rows is not None:
        rows = torch.cat([prefix_rows, rows], dim=1)
    return x.reshape(b * n, c).index_select(0, rows.flatten()).view(b, -1, c)


def pomt_select(
    x: torch.Tensor, scores: torch.Tensor, prefix: int, r: int, trace: Trace | None = None
) -> torch.Tensor:
    """``x`` with ``r`` tokens removed: the prefix, the ``N - prefix - r - 1`` best-scoring
    ordinary tokens (best first) and the mean of the other ``r + 1``."""
    keep = x.shape[1] - prefix - r - 1
    order = scores.argsort(dim=1, descending=True)  # (a stable sort would not export to ONNX)
    if _tracing(trace):
        b, no = order.shape
        target = (prefix + torch.arange(no, device=x.device)).clamp(max=prefix + keep).expand(b, no)
        moved = torch.empty_like(order).scatter_(1, order, target)
        trace.move(torch.cat([_prefix_index(b, prefix, x.device), moved], dim=1))
    ranked = gather_tokens(x, order, prefix)
    end = prefix + keep
    ranked[:, end] = ranked[:, end:].mean(dim=1)  # the mean of the discarded tokens takes the first's place
    return ranked[:, : end + 1]


def _topk_select(
    x: torch.Tensor, importance: torch.Tensor, prefix: int, keep: int, trace: Trace | None = None
) -> torch.Tensor:
    index = importance.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values  # original order
    if _tracing(trace):
        b, no = importance.shape
        moved = torch.full((b, no), -1, dtype=torch.long, device=x.device)
        moved.scatter_(1, index, prefix + torch.arange(keep, device=x.device).expand(b, keep))
        trace.move(torch.cat([_prefix_index(b, prefix, x.device), moved], dim=1))
    return gather_tokens(x, index, prefix)


def pomt_prune(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: int,
    r: int,
    scale: float,
    trace: Trace | None = None,
) -> torch.Tensor:
    """:func:`pomt_select` with the scores computed from q, k, v (Triton on CUDA)."""
    if _use_triton(x) and not _tracing(trace):
        ops = _triton()
        keep = x.shape[1] - prefix - r - 1
        with torch.no_grad():
            q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
            col, val = ops.column_scores(q, k, v, ops.row_lse(q, k, prefix, scale), prefix, scale)
            out, scores = ops.select_tokens(x.detach().contiguous(), prefix, keep, pomt=(col, val))
        if not _grad(x):
            return out
    else:
        scores = pomt_scores(q, k, v, prefix, scale)
    return pomt_select(x, scores, prefix, r, trace)


def topk_prune(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    prefix: int,
    r: int,
    scale: float,
    has_cls: bool,
    trace: Trace | None = None,
) -> torch.Tensor:
    """``x`` with the ``r`` ordinary tokens of least CLS attention dropped (order kept)."""
    keep = x.shape[1] - prefix - r
    if has_cls and _use_triton(x) and not _tracing(trace):
        ops = _triton()
        q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
        with torch.no_grad():
            out, importance = ops.select_tokens(x.detach().contiguous(), prefix, keep, qk=(q, k, scale))
        if not _grad(x):
            return out
    else:
        importance = cls_attention(q, k, prefix, scale, has_cls)
    return _topk_select(x, importance, prefix, keep, trace)
