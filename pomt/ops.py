"""What a pruning block computes besides timm's own block: token scores and the new sequence.

Two implementations of POMT's block, which must agree (tests hold them to 1e-5 in float32
and to the same token choice, ties aside):

- plain torch, used on the CPU, under autograd, inside ``torch.compile``/``torch.export``
  and wherever Triton is missing. On the CPU, POMT's block computes its attention with an
  explicit softmax (as fast as the fused kernel there) and scores from its probabilities;
  on CUDA it scores with one aligned GEMM and one softmax beside fused attention;
- Triton kernels (``pomt._triton``): two kernels score POMT's tokens from q and k without
  writing a (B, H, N, N) tensor, three rank and gather.

``POMT_KERNELS=auto|torch|triton`` (or the :func:`kernels` context manager) picks them.
``auto`` trusts the kernels on a device only after measuring them there, as POMT itself
measures latency: the first time a POMT block runs on a device, dtype and shape, the
kernels are checked against the torch path computed in float32 on a few images of the real
input (same scores, same tokens up to ties, same output) and timed against the torch path
side by side; they run only if they are equal and faster. One line on the ``pomt`` logger
says what was chosen and why (:func:`kernel_choices` keeps it). ``triton`` on CPU tensors
needs ``TRITON_INTERPRET=1`` (the tests run the kernels so). Top-K and ToMe always use the
torch path: a CLS row, a ``topk`` and one ``index_select`` leave nothing to fuse.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

__all__ = [
    "KERNEL_MODES",
    "KernelChoice",
    "Trace",
    "kernels",
    "kernel_choices",
    "kernel_backend",
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
_log = logging.getLogger(__name__)


@contextlib.contextmanager
def kernels(mode: str) -> Iterator[None]:
    """Use ``mode`` inside: ``auto`` (the Triton kernels where they were measured equal and
    faster on this device), ``torch`` or ``triton`` (forced)."""
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


@dataclass(frozen=True)
class KernelChoice:
    """What ``auto`` chose for POMT's block on one device, dtype and shape, and why."""

    backend: str  # "triton" or "torch"
    reason: str


_CHOICES: dict[tuple, KernelChoice] = {}


def kernel_choices() -> dict[tuple, KernelChoice]:
    """The choices ``auto`` made so far, keyed by (device, dtype, x shape, q shape, prefix)."""
    return dict(_CHOICES)


def kernel_backend(device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The implementation POMT's block runs with on ``device`` (and ``dtype``), for labels:
    ``torch``, ``triton`` (forced), or under ``auto`` on CUDA what it chose for the shapes
    measured so far (``auto: triton``, ``auto: torch``, ``auto: triton+torch``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # as tensors report it
    if _checked_mode() != "auto":
        return _mode
    chosen = {c.backend for key, c in _CHOICES.items() if key[0] == str(device) and dtype in (None, key[1])}
    if chosen:
        return "auto: " + "+".join(sorted(chosen))
    return "torch" if device.type != "cuda" or _triton() is None else "auto: not measured yet"


def _checked_mode() -> str:
    if _mode not in KERNEL_MODES:
        raise ValueError(f"POMT_KERNELS must be one of {', '.join(KERNEL_MODES)}, got {_mode!r}")
    return _mode


def _forced_triton(t: torch.Tensor) -> bool:
    """``POMT_KERNELS=triton``: whether it can run here (else a clear error)."""
    if _triton() is None:
        raise RuntimeError("POMT_KERNELS=triton but triton is not installed")
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("POMT_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
    return True


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
    return not x.is_cuda and _mode != "triton"


# --------------------------------------------------------------------------- scores (torch)


def _normalised_sum(top: torch.Tensor, values: torch.Tensor, prefix: int) -> torch.Tensor:
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
    a CLS token, the attention each token receives, averaged over queries and heads. A score
    that is not a number becomes ``-inf``."""
    if has_cls:
        probs = (torch.matmul(q[:, :, :1], k.transpose(-1, -2)) * scale).softmax(dim=-1)
        importance = probs[:, :, 0, prefix:].mean(dim=1, dtype=torch.float32)
    else:
        probs = (torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(dim=-1)
        importance = probs[:, :, :, prefix:].mean(dim=(1, 2), dtype=torch.float32)
    return importance.nan_to_num(nan=-torch.inf)  # a score that is not a number ranks last


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
    if type(x) is not torch.Tensor:  # traced (export, compile): no traced tensor may stay cached
        _ROWS.pop((b, n, prefix, x.device), None)
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
    ranked.narrow(1, end, 1).copy_(ranked.narrow(1, end, ranked.shape[1] - end).mean(dim=1, keepdim=True))
    return ranked.narrow(1, 0, end + 1)  # (narrow, not indexing: a symbolic ``end`` exports)


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


def _pomt_kernels(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, r: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """POMT's block through the Triton kernels, launched on ``x``'s device: (new sequence,
    scores, each token's position or -1)."""
    ops = _triton()
    keep = x.shape[1] - prefix - r - 1
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with torch.no_grad(), guard:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        col, val = ops.column_scores(q, k, v, ops.row_lse(q, k, prefix, scale), prefix, scale)
        x = x if x.stride(-1) == 1 else x.contiguous()
        return ops.select_tokens(x, col, val, prefix, keep)


def _pomt_torch(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, r: int, scale: float
) -> torch.Tensor:
    return pomt_select(x, pomt_scores(q, k, v, prefix, scale), prefix, r)


def _kernel_mismatch(
    got: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    x: torch.Tensor,
    reference: torch.Tensor,
    prefix: int,
    keep: int,
) -> str | None:
    """Why the kernels' (out, scores, positions) on ``x`` differ from the float32 torch path
    (``reference``: its scores), or None. Tokens whose reference scores tie with the last kept
    one, within the tolerance, may be swapped."""
    out, scores, pos = got
    out, no = out.float(), pos.shape[1]
    tol = 1e-4 if x.dtype == torch.float32 else 2e-3
    if not torch.allclose(scores, reference, atol=tol, rtol=tol):
        worst = (scores - reference).abs().nan_to_num(nan=torch.inf).max().item()
        return f"scores differ by up to {worst:.3g} (tolerance {tol:g})"
    kept = pos >= 0
    ranking = pos.masked_fill(~kept, no).long().sort(dim=1).values[:, :keep]
    if not (kept.sum(dim=1) == keep).all() or not (ranking == torch.arange(keep, device=pos.device)).all():
        return f"the kept tokens are not a ranking of {keep} tokens in each image"
    edge = reference.topk(keep, dim=1).values[:, -1:]  # the last kept score, per image
    if (kept & (reference < edge - tol)).any() or (~kept & (reference > edge + tol)).any():
        return "a token kept by the kernels is not among the best by the float32 scores"
    order = pos.masked_fill(~kept, no).long().argsort(dim=1)[:, :keep]
    x32, dropped = x.float(), (~kept).unsqueeze(-1)
    expected = torch.cat(
        [
            x32[:, :prefix],
            x32[:, prefix:].gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1])),
            (x32[:, prefix:] * dropped).sum(dim=1, keepdim=True) / dropped.sum(dim=1, keepdim=True),
        ],
        dim=1,
    )
    if not torch.allclose(out, expected, atol=tol, rtol=tol, equal_nan=True):
        return "the new sequence is not the kept tokens and the mean of the others"
    return None


def _faster(
    fn: Callable[[], object], reference: Callable[[], object], device: torch.device
) -> tuple[bool, float]:
    """Whether ``fn`` is faster than ``reference``, timed side by side (CUDA graphs where they
    capture): (the 95 % interval of the median time ratio lies below 1, the median ratio)."""
    from pomt.timing import cuda_graph, median_interval, time_paired

    try:
        fn, reference = cuda_graph(fn, device), cuda_graph(reference, device)
    except Exception:  # noqa: BLE001 - not capturable here: time eager calls
        pass
    ratios, _ = time_paired(fn, reference, device=device, warmup=3, min_run_time=0.05, min_pairs=21)
    median, _, high = median_interval(ratios)
    return high < 1.0, median


def _measure_kernels(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, r: int, scale: float
) -> KernelChoice:
    """``auto``'s check of the kernels on this input: equal to the float32 torch path on a few
    images, then faster side by side on the whole batch."""
    keep = x.shape[1] - prefix - r - 1
    few = slice(0, min(x.shape[0], 4))
    xs, qs, ks, vs = x[few], q[few], k[few], v[few]
    try:
        got = _pomt_kernels(xs, qs, ks, vs, prefix, r, scale)
    except Exception as err:  # noqa: BLE001 - a kernel that cannot build or run here is not used
        return KernelChoice("torch", f"the kernels failed: {type(err).__name__}: {err}")
    with torch.no_grad():
        reference = pomt_scores(qs.float(), ks.float(), vs.float(), prefix, scale)
    problem = _kernel_mismatch(got, xs, reference, prefix, keep)
    if problem is not None:
        return KernelChoice("torch", f"the kernels differ from the float32 torch path: {problem}")
    with torch.no_grad():
        faster, ratio = _faster(
            lambda: _pomt_kernels(x, q, k, v, prefix, r, scale),
            lambda: _pomt_torch(x, q, k, v, prefix, r, scale),
            x.device,
        )
    if not faster:
        return KernelChoice(
            "torch", f"the kernels are equal but not faster (x{ratio:.2f} the torch path's time)"
        )
    return KernelChoice("triton", f"equal to the float32 torch path and faster (x{ratio:.2f} its time)")


def _auto_device(t: torch.Tensor) -> bool:
    """Where ``auto`` considers the kernels at all: CUDA tensors."""
    return t.is_cuda


def _use_kernels(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, r: int, scale: float
) -> bool:
    """Whether POMT's block runs the Triton kernels on this input (see the module docstring)."""
    mode = _checked_mode()
    if mode == "torch" or torch.compiler.is_compiling() or torch.jit.is_tracing() or _grad(x, q, k, v):
        return False
    if mode == "triton":
        return _forced_triton(x)
    if not _auto_device(x) or _triton() is None:
        return False
    key = (str(x.device), x.dtype, tuple(x.shape), tuple(q.shape), prefix)  # any r: measured at the first
    choice = _CHOICES.get(key)
    if choice is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False  # nothing can be measured inside a capture: the torch path, until measured
        choice = _CHOICES[key] = _measure_kernels(x, q, k, v, prefix, r, scale)
        b, n, _ = x.shape
        _log.info(
            "pomt: POMT block on %s, %s, batch %d, %d tokens, r=%d: %s path (%s)",
            x.device, str(x.dtype).removeprefix("torch."), b, n, r, choice.backend, choice.reason,
        )  # fmt: skip
    return choice.backend == "triton"


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
    """:func:`pomt_select` with the scores computed from q, k, v: through the Triton kernels
    where ``kernels`` says so (never under autograd or while tracing tokens)."""
    if not _tracing(trace) and _use_kernels(x, q, k, v, prefix, r, scale):
        return _pomt_kernels(x, q, k, v, prefix, r, scale)[0]
    return pomt_select(x, pomt_scores(q, k, v, prefix, scale), prefix, r, trace)


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
    importance = cls_attention(q, k, prefix, scale, has_cls)
    return _topk_select(x, importance, prefix, keep, trace)
