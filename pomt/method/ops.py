"""Which implementation computes what a pruning block adds to timm's block, and the entry
points the blocks call (:func:`pomt_prune`, :func:`topk_prune`).

The method itself, as tensor functions, is in ``pomt.method.functional``. POMT's block has two
implementations, which must agree (tests hold them to 1e-5 in float32 and to the same token
choice, ties aside):

- the plain torch path (``pomt.method.functional``), used on the CPU, under autograd, inside
  ``torch.compile``/``torch.export`` and wherever Triton is missing. On the CPU, POMT's block
  computes its attention with an explicit softmax (as fast as the fused kernel there) and
  scores from its probabilities; on CUDA it scores with one aligned GEMM and one softmax
  beside fused attention;
- Triton kernels (``pomt.method._triton``): two kernels score POMT's tokens from q and k without
  writing a (B, H, N, N) tensor, three rank and gather.

``POMT_KERNELS=auto|torch|triton`` (or the :func:`kernels` context manager) picks them.
``auto`` trusts the kernels on a device only after checking them there (``pomt.method.dispatch``):
the first time a POMT block runs with a given device, dtypes, shapes and autocast state, the
kernels must equal the torch path computed in float32 on a few images of the real input, at
the extremes of r and at the call's, and be faster side by side; the choice then covers
every r. One line on the ``pomt`` logger says what was chosen and why (:func:`kernel_choices`
keeps it). ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (the tests run the kernels
so). Top-K and ToMe always use the torch path: a CLS row, a ``topk`` and one
``index_select`` leave nothing to fuse.

Both paths treat a NaN alike: a NaN in an image's attention probabilities among its ordinary
queries or in its values (NaN or inf in its q, k or v) makes every score of that image NaN,
ranked as ``-inf``: the image keeps its first ``keep`` ordinary tokens, in order, and fuses
the rest. Other images of the batch are not affected.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from pomt.errors import PomtValueError, UnavailableError
from pomt.method import dispatch
from pomt.method.dispatch import KernelChoice
from pomt.method.functional import (  # the public ones are re-exported: they lived here before
    Trace,
    cls_attention,
    gather_tokens,
    pomt_scores,
    pomt_scores_from_probabilities,
    pomt_select,
    topk_select,
    tracing_tokens,
)

__all__ = [
    "KERNEL_MODES",
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
_DEFAULT_MODE = os.environ.get("POMT_KERNELS", "auto")
# Context-local, like autocast's state: a thread or task started inside ``kernels(...)`` starts
# from the default (threads do not inherit context variables), not from the caller's choice.
_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("pomt_kernels", default=None)
_triton_module: ModuleType | None | bool = False  # False: not imported yet


@contextlib.contextmanager
def kernels(mode: str) -> Iterator[None]:
    """Use ``mode`` inside: ``auto`` (the Triton kernels where they were measured equal and
    faster on this device), ``torch`` or ``triton`` (forced). Context-local: other threads
    (and threads started inside) keep ``POMT_KERNELS``'s mode."""
    if mode not in KERNEL_MODES:
        raise PomtValueError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def _current_mode() -> str:
    mode = _MODE.get()
    return _DEFAULT_MODE if mode is None else mode


def _triton() -> ModuleType | None:
    global _triton_module
    if _triton_module is False:
        try:
            from pomt.method import _triton as module
        except ImportError:  # no triton (CPU-only installs, macOS, Windows)
            module = None
        _triton_module = module
    return _triton_module  # type: ignore[return-value]


_CHOICES: dict[tuple, KernelChoice] = {}  # filled by pomt.method.dispatch.choose


def kernel_choices() -> dict[tuple, KernelChoice]:
    """The choices ``auto`` made so far, keyed by (device, x dtype, x shape, q dtype, q shape,
    prefix, autocast dtype or None); each covers every r."""
    return dict(_CHOICES)


def kernel_backend(device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The implementation POMT's block runs with on ``device`` (and ``dtype``), for labels:
    ``torch``, ``triton`` (forced), or under ``auto`` on CUDA what it chose for the shapes
    measured so far (``auto: triton``, ``auto: torch``, ``auto: triton+torch``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # as tensors report it
    if (mode := _checked_mode()) != "auto":
        return mode
    chosen = {c.backend for key, c in _CHOICES.items() if key[0] == str(device) and dtype in (None, key[1])}
    if chosen:
        return "auto: " + "+".join(sorted(chosen))
    return "torch" if device.type != "cuda" or _triton() is None else "auto: not measured yet"


def _checked_mode() -> str:
    mode = _current_mode()
    if mode not in KERNEL_MODES:
        raise PomtValueError(f"POMT_KERNELS must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    return mode


def _forced_triton(t: torch.Tensor) -> bool:
    """``POMT_KERNELS=triton``: whether it can run here (else a clear error)."""
    if _triton() is None:
        raise UnavailableError("POMT_KERNELS=triton but triton is not installed")
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise UnavailableError("POMT_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
    return True


def _grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def scores_from_probabilities(x: torch.Tensor) -> bool:
    """Whether POMT's block should take its scores from an explicit softmax (the CPU path)."""
    return not x.is_cuda and _current_mode() != "triton"


def _auto_device(t: torch.Tensor) -> bool:
    """Where ``auto`` considers the kernels at all: CUDA tensors."""
    return t.is_cuda


def use_kernels(
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
    choice = _CHOICES.get(key := _choice_key(x, q, prefix))
    if choice is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False  # nothing can be measured inside a capture: the torch path, until measured
        choice = dispatch.choose(key, (x, q, k, v, prefix, r, scale), _CHOICES)
    return choice.backend == "triton"


def _choice_key(x: torch.Tensor, q: torch.Tensor, prefix: int) -> tuple:
    """What ``auto``'s choice depends on: device, dtypes, shapes, prefix and autocast (any r)."""
    kind = x.device.type
    autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    return (str(x.device), x.dtype, tuple(x.shape), q.dtype, tuple(q.shape), prefix, autocast)


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
    if not tracing_tokens(trace) and use_kernels(x, q, k, v, prefix, r, scale):
        return dispatch.launch_kernels(x, q, k, v, prefix, r, scale)[0]
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
    return topk_select(x, importance, prefix, keep, trace)
