"""Triton kernels of POMT's pruning block (CUDA; on the CPU only under ``TRITON_INTERPRET=1``).

Five small kernels do what ten to twenty torch kernels would, and none of them writes a
(B, H, N, N) tensor:

- ``_row_lse``: log-sum-exp of every ordinary query row over all keys, per head;
- ``_column_scores``: per key j the sum over ordinary rows i of
  ``max_h exp(q_hi . k_hj * scale - lse_hi)`` (the max over heads fused with the column
  sum, in partials over row blocks), and per token the value statistic ``sum_d max_h v_hjd``;
- ``_scores``: one program per image turns the statistics into POMT's scores: the column
  sum over the image's maximum plus the softmax of the value statistic;
- ``_rank``: the position of each ordinary token in a stable descending order (ties to
  the lower index, as a Python ``sorted``), or -1 past the ``keep`` best;
- ``_gather``: the new sequence: the prefix tokens, the kept tokens in score order, and
  the mean of the others.

What makes them safe on any input a GPU will meet:

- every offset that involves the image index is 64-bit (a batch of ViT-L/14 at 518 px
  passes 2**31 elements from image 512 on), and so is a head offset that could pass 2**31
  (``WIDE``: a layout with a huge head stride; otherwise 32 bits hold it and save registers);
- an image whose column sums are all zero (every ordinary query attends only to the
  prefix: an attention sink) gets an attention term of 0, not 0/0;
- a score that is not a number ranks as ``-inf``, so the order is total: the ranks are a
  permutation, every output row is written exactly once, and no store leaves its output;
- NaN as in torch's ``amax``: a NaN in an image's probabilities or values makes all its
  scores NaN (so ``-inf``: the image keeps its first tokens), as on the torch path.

``pomt.method.ops`` decides when these run and holds the plain torch path they must equal.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl

from pomt.errors import PomtValueError

__all__ = ["row_lse", "column_scores", "select_tokens"]

# Tile sizes, chosen so that no kernel spills registers on sm_90 at head dims up to 128
# (checked by compiling for it; see tests/test_kernels.py).
_COL_M, _COL_N = 32, 64  # _column_scores: query rows (x2 for 16-bit inputs) x key columns
_SCORE_BLOCK = 256  # _scores: tokens per step
_RANK_J, _RANK_I = 64, 128  # _rank: tokens ranked per program x compared per step
_GATHER_J, _GATHER_C = 32, 128  # _gather: tokens per step x channels per program
_WARPS = 8  # the two attention kernels: 256 threads per program
_SMALL_WARPS = 4  # the selection kernels
_TINY = 1.1754943508222875e-38  # the smallest normal float32: the divisor when a maximum is 0


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # bfloat16 under Triton's CPU interpreter, whose bf16 tl.dot multiplies wrongly
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:  # float32 inputs: no TF32 rounding, so the scores equal the torch path's
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _row_lse(
    q_ptr, k_ptr, lse_ptr,
    N, prefix, H, D, scale,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """lse[b, h, i - prefix] = logsumexp_j(q_hi . k_hj * scale) for the ordinary rows i."""
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = prefix + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + rows.to(tl.int64)[:, None] * sq_n + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_head = k_ptr + b * sk_b + h * sk_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_head + cols.to(tl.int64)[:, None] * sk_n + d[None, :],
            mask=(cols < N)[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = _dot(q, tl.trans(k), IEEE, UPCAST) * scale
        s = tl.where((cols < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    no = N - prefix
    tl.store(lse_ptr + (b * H + h) * no + rows - prefix, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _column_scores(
    q_ptr, k_ptr, v_ptr, lse_ptr, col_ptr, val_ptr,
    N, prefix, H, D, scale,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """One (image, column block, row block): col[b, s, j] = sum over the ordinary rows i of
    row block s of max_h softmax_h[i, j]; row block 0 also writes val[b, j] = sum_d max_h v."""
    b = tl.program_id(0).to(tl.int64)
    pid_n, pid_s = tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows = prefix + pid_s * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    no = N - prefix
    q_tile = q_ptr + b * sq_b + rows.to(tl.int64)[:, None] * sq_n + d[None, :]  # head h: + h * sq_h
    k_tile = k_ptr + b * sk_b + cols.to(tl.int64)[:, None] * sk_n + d[None, :]
    lse_row = lse_ptr + b * H * no + rows - prefix
    top = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # probabilities are >= 0
    for h in range(H):  # the max over heads keeps NaN, as torch's amax does
        if WIDE:  # a head offset past 2**31 elements: 64-bit (else 32 bits hold it, no spill)
            hh = tl.cast(h, tl.int64)
        else:
            hh = h
        q = tl.load(q_tile + hh * sq_h, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(k_tile + hh * sk_h, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_row + hh * no, mask=row_ok, other=0.0)
        p = tl.exp(_dot(q, tl.trans(k), IEEE, UPCAST) * scale - lse[:, None])
        top = tl.maximum(top, p, propagate_nan=tl.PropagateNan.ALL)
    partial = tl.sum(tl.where(row_ok[:, None], top, 0.0), 0)
    tl.store(col_ptr + (b * splits + pid_s) * N + cols, partial, mask=col_ok)
    if pid_s == 0:
        vmax = tl.full([BLOCK_N, BLOCK_D], float("-inf"), tl.float32)
        v_tile = v_ptr + b * sv_b + cols.to(tl.int64)[:, None] * sv_n + d[None, :]
        for h in range(H):
            if WIDE:
                hh = tl.cast(h, tl.int64)
            else:
                hh = h
            v = tl.load(v_tile + hh * sv_h, mask=col_ok[:, None] & d_ok[None, :], other=float("-inf"))
            vmax = tl.maximum(vmax, v.to(tl.float32), propagate_nan=tl.PropagateNan.ALL)
        tl.store(val_ptr + b * N + cols, tl.sum(tl.where(d_ok[None, :], vmax, 0.0), 1), mask=col_ok)


@triton.jit
def _column_sum(col_ptr, b, j, ok, splits, N):
    """POMT's attention column sum of the tokens j: the sum of the row-block partials."""
    total = tl.zeros(j.shape, tl.float32)
    for s in range(splits):
        total += tl.load(col_ptr + (b * splits + s) * N + j, mask=ok, other=0.0)
    return tl.where(ok, total, float("-inf"))


@triton.jit
def _scores(col_ptr, val_ptr, score_ptr, N, prefix, splits, TINY, BLOCK: tl.constexpr):
    """One image: score[b, j] = col_j / max col + softmax(val)_j for the ordinary tokens j;
    ``-inf`` where that is not a number."""
    b = tl.program_id(0).to(tl.int64)
    no = N - prefix
    jj = tl.arange(0, BLOCK)
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    vmax = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, N, BLOCK):
        j = start + jj
        col = _column_sum(col_ptr, b, j, (j >= prefix) & (j < N), splits, N)
        top = tl.maximum(top, col, propagate_nan=tl.PropagateNan.ALL)
        vmax = tl.maximum(vmax, tl.load(val_ptr + b * N + j, mask=j < N, other=float("-inf")))
    # a column sum that is NaN makes every score of the image NaN, as torch's amax does
    poisoned = tl.max((top != top).to(tl.int32), 0) > 0
    top_all = tl.maximum(tl.max(top, 0), TINY)  # an attention sink: every column sum is 0
    v_all = tl.max(vmax, 0)
    den = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        j = start + jj
        den += tl.exp(tl.load(val_ptr + b * N + j, mask=j < N, other=float("-inf")) - v_all)
    den_all = tl.sum(den, 0)
    for start in range(0, no, BLOCK):
        j = start + jj
        ok = j < no
        col = _column_sum(col_ptr, b, prefix + j, ok, splits, N)
        val = tl.load(val_ptr + b * N + prefix + j, mask=ok, other=float("-inf"))
        score = col / top_all + tl.exp(val - v_all) / den_all
        score = tl.where(poisoned | (score != score), float("-inf"), score)
        tl.store(score_ptr + b * no + j, score, mask=ok)


@triton.jit
def _rank(score_ptr, pos_ptr, no, keep, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr):
    """One (image, block of tokens): pos[b, j] = the rank of token j in a stable descending
    order of the scores (never NaN), or -1 when it is not among the ``keep`` best."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < no
    s_j = tl.load(score_ptr + b * no + j, mask=j_ok, other=float("-inf"))
    ii = tl.arange(0, BLOCK_I)
    rank = tl.zeros([BLOCK_J], tl.int32)
    for start in range(0, no, BLOCK_I):
        i = start + ii
        i_ok = i < no
        s_i = tl.load(score_ptr + b * no + i, mask=i_ok, other=float("-inf"))
        ahead = (s_i[None, :] > s_j[:, None]) | ((s_i[None, :] == s_j[:, None]) & (i[None, :] < j[:, None]))
        rank += tl.sum((ahead & i_ok[None, :]).to(tl.int32), 1)
    tl.store(pos_ptr + b * no + j, tl.where(rank < keep, rank, -1), mask=j_ok)


@triton.jit
def _gather(
    x_ptr, pos_ptr, out_ptr,
    N, prefix, keep, C, sx_b, sx_n, so_b, so_n,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One (image, channel block) of the new sequence: the prefix tokens, the kept tokens at
    their positions, and the mean of the others."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    no = N - prefix
    x_image = x_ptr + b * sx_b
    out_image = out_ptr + b * so_b
    for t in range(0, prefix):
        tl.store(out_image + t * so_n + c, tl.load(x_image + t * sx_n + c, mask=c_ok), mask=c_ok)
    jj = tl.arange(0, BLOCK_J)
    fused = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, no, BLOCK_J):
        j = start + jj
        j_ok = j < no
        pos = tl.load(pos_ptr + b * no + j, mask=j_ok, other=-1)
        kept = (pos >= 0) & (pos < keep)
        rows = tl.load(
            x_image + (prefix + j).to(tl.int64)[:, None] * sx_n + c[None, :],
            mask=j_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        tl.store(
            out_image + (prefix + pos).to(tl.int64)[:, None] * so_n + c[None, :],
            rows,
            mask=kept[:, None] & c_ok[None, :],
        )
        fused += tl.sum(tl.where((j_ok & (pos < 0))[:, None], rows.to(tl.float32), 0.0), 0)
    mean = fused / (no - keep)
    tl.store(out_image + (prefix + keep) * so_n + c, mean.to(out_ptr.dtype.element_ty), mask=c_ok)


# --------------------------------------------------------------------------- launchers


def _empty(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every buffer the kernels write (the tests replace this to put guard rows around them)."""
    return torch.empty(shape, device=like.device, dtype=dtype)


_SENTINEL = {torch.float32: 1234.5, torch.float16: 1234.0, torch.bfloat16: 1232.0, torch.int32: -7777}


@contextlib.contextmanager
def guarded_outputs(guard: int = 3) -> Iterator[Callable[[], None]]:
    """For checks (the tests, the GPU acceptance): inside, every buffer the kernels write lies
    in a sentinel-filled allocation with ``guard`` rows on both sides. The yielded function
    raises AssertionError if a guard row changed (a store out of bounds) or a buffer still
    holds a sentinel (a row left unwritten), then forgets the buffers checked."""
    global _empty
    buffers: list[tuple[torch.Tensor, tuple[int, ...]]] = []
    plain = _empty

    def empty(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        rows, *rest = shape
        whole = torch.full((rows + 2 * guard, *rest), _SENTINEL[dtype], dtype=dtype, device=like.device)
        buffers.append((whole, tuple(shape)))
        return whole[guard : guard + rows]

    def check() -> None:
        assert buffers, "no kernel output was allocated"
        for whole, shape in buffers:
            sentinel = _SENTINEL[whole.dtype]
            outside = torch.cat([whole[:guard], whole[-guard:]])
            assert (outside == sentinel).all(), f"a kernel wrote outside its {shape} output"
            assert not (whole[guard:-guard] == sentinel).any(), (
                f"a kernel left part of its {shape} output unwritten"
            )
        buffers.clear()

    _empty = empty
    try:
        yield check
    finally:
        _empty = plain


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(int(d)))


def _lse_tiles(block_d: int, dtype: torch.dtype) -> tuple[int, int]:
    """``_row_lse``'s tile: query rows per program x key columns per step; smaller for float32
    at head dims above 64, which would otherwise spill registers."""
    return (32, 32) if dtype == torch.float32 and block_d > 64 else (64, 64)


def _flags(t: torch.Tensor) -> dict[str, bool]:
    upcast = t.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    return {"IEEE": t.dtype == torch.float32, "UPCAST": upcast}


def row_lse(q: torch.Tensor, k: torch.Tensor, prefix: int, scale: float) -> torch.Tensor:
    """(B, H, N - prefix) float32 log-sum-exp of the ordinary query rows over all keys."""
    b, h, n, d = q.shape
    lse = _empty((b, h, n - prefix), q, torch.float32)
    block_d = _block_d(d)
    block_m, block_n = _lse_tiles(block_d, q.dtype)
    _row_lse[(b * h, triton.cdiv(n - prefix, block_m))](
        q, k, lse, n, prefix, h, d, float(scale),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **_flags(q), num_warps=_WARPS,
    )  # fmt: skip
    return lse


def column_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor, prefix: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """POMT's per-token statistics: the attention column sums as (B, S, N) partials over S row
    blocks, and the value statistic (B, N), float32 (see the module docstring)."""
    b, h, n, d = q.shape
    block_m = _COL_M if q.dtype == torch.float32 else 2 * _COL_M
    splits = triton.cdiv(n - prefix, block_m)
    col = _empty((b, splits, n), q, torch.float32)
    val = _empty((b, n), q, torch.float32)
    wide = (h - 1) * max(q.stride(1), k.stride(1), v.stride(1), n - prefix) >= 2**31
    _column_scores[(b, triton.cdiv(n, _COL_N), splits)](
        q, k, v, lse, col, val, n, prefix, h, d, float(scale),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        BLOCK_M=block_m, BLOCK_N=_COL_N, BLOCK_D=_block_d(d), **_flags(q), WIDE=wide, num_warps=_WARPS,
    )  # fmt: skip
    return col, val


def select_tokens(
    x: torch.Tensor, col: torch.Tensor, val: torch.Tensor, prefix: int, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """POMT's selection from :func:`column_scores`' statistics: the new sequence
    (B, prefix + keep + 1, C) (the prefix, the ``keep`` best tokens in score order, the mean
    of the rest), the scores (B, N - prefix) and each token's position (-1: fused).

    ``x`` must have unit stride along its channels."""
    b, n, c = x.shape
    no = n - prefix
    if not 0 <= keep < no:
        raise PomtValueError(f"keep must be in 0..{no - 1} for {no} ordinary tokens, got {keep}")
    score = _empty((b, no), x, torch.float32)
    pos = _empty((b, no), x, torch.int32)
    out = _empty((b, prefix + keep + 1, c), x, x.dtype)
    _scores[(b,)](col, val, score, n, prefix, col.shape[1], _TINY, BLOCK=_SCORE_BLOCK, num_warps=_SMALL_WARPS)
    _rank[(b, triton.cdiv(no, _RANK_J))](
        score, pos, no, keep, BLOCK_J=_RANK_J, BLOCK_I=_RANK_I, num_warps=_SMALL_WARPS
    )
    _gather[(b, triton.cdiv(c, _GATHER_C))](
        x, pos, out, n, prefix, keep, c, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BLOCK_J=_GATHER_J, BLOCK_C=_GATHER_C, num_warps=_SMALL_WARPS,
    )  # fmt: skip
    return out, score, pos
