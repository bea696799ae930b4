"""``POMT_KERNELS=auto``'s check: whether POMT's Triton kernels run in place of the torch path.

The first time a POMT block runs on a device with a given input (dtypes, shapes, prefix and
autocast state: the key of :func:`pomt.method.ops.kernel_choices`), :func:`choose` checks the
kernels on a few images of the real input and times them side by side with the torch path:

- **equal**, at the call's r, at r = 0 and at keep = 0 (the extremes of the selection; the
  scoring does not depend on r), to the torch path computed in float32 outside autocast:
  at full float32 precision whatever ``torch.set_float32_matmul_precision`` says (TF32 would
  blame correct kernels for its own rounding; the user's setting is restored after): the
  same scores (1e-4 for float32 q, 2e-3 for 16-bit q), the same tokens kept (tokens whose
  float32 scores tie with the last kept one, within that tolerance, may swap), and the same
  new sequence, to the rounding of x's dtype at x's own magnitude;
- **faster** at a typical r (keep = half the ordinary tokens, whatever r came first), timed
  on the whole input under the caller's autocast state (CUDA graphs where they capture): the
  95 % interval of the median time ratio lies below 1.

So one decision covers every r of that input. Anything that goes wrong during the check (a
kernel that does not build, an out-of-memory error) chooses the torch path and says why; the
user's forward never sees it. One lock makes threads measure a key once. Under
``torch.distributed`` the first rank to reach a key decides and every other rank takes its
choice from the process group's store, so all ranks run the same backend and keep the same
tokens. One line on the ``pomt`` logger says what was chosen and why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pomt.method import functional as method

__all__ = ["KernelChoice", "choose", "launch_kernels", "torch_path"]

_log = logging.getLogger(__name__)
_LOCK = threading.Lock()
_FEW = 4  # images checked for equality


@contextlib.contextmanager
def full_float32():
    """float32 matmuls at full precision inside (no TF32, no bfloat16 passes), whatever the
    user set, through the API the user set it with; the user's setting is restored after.

    The setting is process-wide: ``choose`` holds its lock meanwhile, and the reference it
    guards is a few images' scores."""
    try:
        before = torch.get_float32_matmul_precision()
    except RuntimeError:  # set through torch's per-backend API (``...matmul.fp32_precision``)
        before = None
    if before is not None:
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
        return
    backends = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    saved = [backend.fp32_precision for backend in backends]
    for backend in backends:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, value in zip(backends, saved, strict=True):
            backend.fp32_precision = value


@dataclass(frozen=True)
class KernelChoice:
    """What ``auto`` chose for POMT's block on one device and input, and why."""

    backend: str  # "triton" or "torch"
    reason: str


def launch_kernels(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, r: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """POMT's block through the Triton kernels, launched on ``x``'s device: (new sequence,
    scores, each token's position or -1)."""
    from pomt.method import _triton as kernels  # needs triton: imported where the kernels run

    keep = x.shape[1] - prefix - r - 1
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with torch.no_grad(), guard:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        col, val = kernels.column_scores(q, k, v, kernels.row_lse(q, k, prefix, scale), prefix, scale)
        x = x if x.stride(-1) == 1 else x.contiguous()
        return kernels.select_tokens(x, col, val, prefix, keep)


def torch_path(
    x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, r: int, scale: float
) -> torch.Tensor:
    """POMT's block on the plain torch path (what the kernels are checked against)."""
    return method.pomt_select(x, method.pomt_scores(q, k, v, prefix, scale), prefix, r)


def _worst(a: torch.Tensor, b: torch.Tensor) -> str:
    """The largest difference between ``a`` and ``b``; ``nan`` where only one is NaN."""
    if (a.isnan() ^ b.isnan()).any():
        return "nan"
    same = (a == b) | (a.isnan() & b.isnan())
    return f"{(a - b).abs().masked_fill(same, 0).max().item():.3g}"


def _close(got: torch.Tensor, expected: torch.Tensor, atol: torch.Tensor | float, rtol: float) -> bool:
    same = (got == expected) | (got.isnan() & expected.isnan())
    return bool((same | ((got - expected).abs() <= atol + rtol * expected.abs())).all())


def mismatch(
    got: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    x: torch.Tensor,
    reference: torch.Tensor,
    prefix: int,
    keep: int,
    q_dtype: torch.dtype,
) -> str | None:
    """Why the kernels' (out, scores, positions) on ``x`` differ from the float32 torch path
    (``reference``: its scores), or None.

    Scores: 1e-4 for float32 q, 2e-3 for 16-bit q. The new sequence: within the rounding of
    x's dtype (its eps, relative) plus float32 accumulation over the fused tokens (their
    count x 2**-24 x the image's largest |x|), so a correct bfloat16 kernel passes at
    residual-stream magnitudes and a wrong mean does not."""
    out, scores, pos = got
    out, no = out.float(), pos.shape[1]
    tol = 1e-4 if q_dtype == torch.float32 else 2e-3
    if not _close(scores, reference, tol, tol):
        return f"scores differ by up to {_worst(scores, reference)} (tolerance {tol:g})"
    kept = pos >= 0
    ranking = pos.masked_fill(~kept, no).long().sort(dim=1).values[:, :keep]
    if not (kept.sum(dim=1) == keep).all() or not (ranking == torch.arange(keep, device=pos.device)).all():
        return f"the kept tokens are not a ranking of {keep} tokens in each image"
    if keep > 0:
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
    magnitude = x32.abs().nan_to_num(nan=0.0, posinf=0.0).flatten(1).amax(dim=1)[:, None, None]
    atol = (no - keep) * 2.0**-24 * magnitude + torch.finfo(torch.float32).tiny
    if not _close(out, expected, atol, torch.finfo(x.dtype).eps):
        worst = _worst(out, expected)
        return f"the new sequence is not the kept tokens and the mean of the others (up to {worst} apart)"
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


def measure(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: int,
    r: int,
    scale: float,
    *,
    faster: Callable[..., tuple[bool, float]] | None = None,
) -> KernelChoice:
    """The kernels against the torch path on this input (see the module docstring), timed by
    ``faster`` (default :func:`_faster`: side by side, CUDA graphs where they capture)."""
    no = x.shape[1] - prefix
    typical = no - 1 - (no - 1) // 2  # keep = half the ordinary tokens (rounded down)
    few = slice(0, min(x.shape[0], _FEW))
    xs, qs, ks, vs = x[few], q[few], k[few], v[few]
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False), full_float32():
        reference = method.pomt_scores(qs.float(), ks.float(), vs.float(), prefix, scale)
    checked = sorted({r, 0, no - 1, typical})
    for at in checked:
        try:
            got = launch_kernels(xs, qs, ks, vs, prefix, at, scale)
        except Exception as err:  # noqa: BLE001 - a kernel that cannot build or run here is not used
            return KernelChoice("torch", f"the kernels failed at r={at}: {type(err).__name__}: {err}")
        problem = mismatch(got, xs, reference, prefix, no - at - 1, q.dtype)
        if problem is not None:
            return KernelChoice(
                "torch", f"the kernels differ from the float32 torch path at r={at}: {problem}"
            )
    equal = f"equal to the float32 torch path at r={', '.join(map(str, checked))} (keep=0 at r={no - 1})"
    with torch.no_grad():
        faster, ratio = (faster or _faster)(
            lambda: launch_kernels(x, q, k, v, prefix, typical, scale),
            lambda: torch_path(x, q, k, v, prefix, typical, scale),
            x.device,
        )
    if not faster:
        return KernelChoice("torch", f"{equal} but not faster at r={typical} (x{ratio:.2f} its time)")
    return KernelChoice("triton", f"{equal} and faster at r={typical} (x{ratio:.2f} its time)")


def _safe_measure(*inputs, faster: Callable[..., tuple[bool, float]] | None = None) -> KernelChoice:
    """:func:`measure` on the tensor's device; any error (out of memory included) chooses the
    torch path, with the reason."""
    x = inputs[0]
    try:
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            return measure(*inputs, faster=faster)
    except Exception as err:  # noqa: BLE001 - the check must never break the user's forward
        if x.is_cuda:
            torch.cuda.empty_cache()
        return KernelChoice("torch", f"the check failed: {type(err).__name__}: {err}")


def _process_group() -> tuple[int, object] | None:
    """(this rank, the default process group's store) when several ranks run, else None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.get_rank(), dist.distributed_c10d._get_default_store()


def _rank_free(key: tuple) -> str:
    """``key`` with the device index replaced by the device's name: the same on every rank."""
    device = torch.device(key[0])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return json.dumps([name, *map(str, key[1:])])


def _shared(key: tuple, decide: Callable[[], KernelChoice]) -> KernelChoice:
    """``decide()`` once for all ranks: the first rank to reach ``key`` decides, the others wait
    for its choice in the store (they never wait for a rank that is not measuring it)."""
    group = _process_group()
    if group is None:
        return decide()
    rank, store = group
    name = "pomt/kernels/" + _rank_free(key)
    if store.add(name + "/claims", 1) == 1:
        choice = decide()
        store.set(name, json.dumps([choice.backend, choice.reason, rank]))
        return choice
    store.wait([name])
    backend, reason, decider = json.loads(store.get(name))
    return KernelChoice(backend, f"{reason}; decided by rank {decider} for every rank")


def _describe(key: tuple, x: torch.Tensor, q: torch.Tensor, choice: KernelChoice) -> str:
    autocast = f"autocast {str(key[-1]).removeprefix('torch.')}" if key[-1] is not None else "no autocast"
    b, h, n, d = q.shape
    return (
        f"pomt: POMT block on {x.device}, x {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}, "
        f"q {str(q.dtype).removeprefix('torch.')}, {h} heads of dim {d}, {n} tokens, {autocast}: "
        f"{choice.backend} path for every r ({choice.reason})"
    )


def choose(
    key: tuple,
    inputs: tuple,
    choices: dict[tuple, KernelChoice],
    *,
    faster: Callable[..., tuple[bool, float]] | None = None,
    decide: Callable[..., KernelChoice] | None = None,
) -> KernelChoice:
    """The backend for ``key`` (``inputs``: x, q, k, v, prefix, r, scale), from the cache
    ``choices`` or decided now (``decide``, default :func:`measure` made safe, timed by
    ``faster``), shared across ranks, logged once and stored in ``choices``."""
    with _LOCK:
        choice = choices.get(key)
        if choice is None:
            try:
                choice = _shared(
                    key, lambda: decide(*inputs) if decide else _safe_measure(*inputs, faster=faster)
                )
            except Exception as err:  # noqa: BLE001 - the store failed: every rank falls back alike
                choice = KernelChoice("torch", f"the choice could not be shared: {type(err).__name__}: {err}")
            choices[key] = choice
            _log.info(_describe(key, inputs[0], inputs[1], choice))
        return choice
