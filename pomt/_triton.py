"""Triton kernels of the pruning blocks (CUDA; on the CPU only under ``TRITON_INTERPRET=1``).

Three kernels replace the ten to twenty small torch kernels that scoring and selecting
tokens would otherwise launch, and none of them writes a (B, H, N, N) tensor:

- ``_row_lse``: log-sum-exp of every ordinary query row over all keys, per head;
- ``_column_scores``: for POMT, per key j the sum over ordinary rows i of
  ``max_h exp(q_hi . k_hj * scale - lse_hi)`` (the max over heads fused with the column
  sum), and per token the value statistic ``sum_d max_h v_hjd``;
- ``_select``: one program per image turns the statistics into scores (POMT: column sum
  over its image maximum plus the softmax of the value statistic; Top-K: the CLS row of
  attention, averaged over heads), ranks the ordinary tokens (a stable descending order,
  ties to the lower index, as a Python ``sorted``), and writes the new sequence: the prefix
  tokens, the kept tokens, and for POMT the mean of the others.

``pomt.ops`` decides when these run and holds the plain torch path they must equal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["row_lse", "column_scores", "select_tokens"]

# Tile sizes, chosen so that no kernel spills registers on sm_90 (checked by compiling for it;
# see tests/test_kernels.py) while small batches still spread over many programs.
_LSE_M, _LSE_N = 64, 64  # _row_lse: query rows x key columns
_COL_M, _COL_N = 32, 64  # _column_scores: query rows (x2 for 16-bit inputs) x key columns
_SEL_J, _SEL_I, _SEL_C = 32, 128, 128  # _select: tokens ranked x compared per step; channels per program
_WARPS = 8  # every kernel: 256 threads per program


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # float32 inputs: no TF32 rounding, so the scores equal the torch path's
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _cls_logits(k_ptr, q, b, h, j, ok, d, d_ok, sk_b, sk_h, sk_n, scale):
    """q_cls . k_j * scale of head h for the tokens j (-inf where not ``ok``), float32."""
    k = tl.load(
        k_ptr + b * sk_b + h * sk_h + j[:, None] * sk_n + d[None, :],
        mask=ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    return tl.where(ok, tl.sum(k * q[None, :], 1) * scale, float("-inf"))


@triton.jit
def _row_lse(
    q_ptr, k_ptr, lse_ptr,
    N, prefix, H, D, scale,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """lse[b, h, i - prefix] = logsumexp_j(q_hi . k_hj * scale) for the ordinary rows i."""
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    rows = prefix + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_n + d[None, :],
        mask=(rows < N)[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_ptr + b * sk_b + h * sk_h + cols[:, None] * sk_n + d[None, :],
            mask=(cols < N)[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = _dot(q, tl.trans(k), IEEE) * scale
        s = tl.where((cols < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    no = N - prefix
    out = rows - prefix
    tl.store(lse_ptr + (b * H + h) * no + out, m_i + tl.log(l_i), mask=rows < N)


@triton.jit
def _column_scores(
    q_ptr, k_ptr, v_ptr, lse_ptr, col_ptr, val_ptr,
    N, prefix, H, D, scale,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """One (image, column block, row block): col[b, s, j] = sum over the ordinary rows i of
    row block s of max_h softmax_h[i, j]; row block 0 also writes val[b, j] = sum_d max_h v."""
    b, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows = prefix + pid_s * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    no = N - prefix
    q_tile = q_ptr + b * sq_b + rows[:, None] * sq_n + d[None, :]  # head 0; head h is + h * sq_h
    k_tile = k_ptr + b * sk_b + cols[:, None] * sk_n + d[None, :]
    lse_row = lse_ptr + b * H * no + rows - prefix
    top = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # probabilities are >= 0
    for h in range(H):
        q = tl.load(q_tile + h * sq_h, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(k_tile + h * sk_h, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_row + h * no, mask=row_ok, other=0.0)
        top = tl.maximum(top, tl.exp(_dot(q, tl.trans(k), IEEE) * scale - lse[:, None]))
    partial = tl.sum(tl.where(row_ok[:, None], top, 0.0), 0)
    tl.store(col_ptr + (b * splits + pid_s) * N + cols, partial, mask=col_ok)
    if pid_s == 0:
        vmax = tl.full([BLOCK_N, BLOCK_D], float("-inf"), tl.float32)
        v_tile = v_ptr + b * sv_b + cols[:, None] * sv_n + d[None, :]
        for h in range(H):
            v = tl.load(v_tile + h * sv_h, mask=col_ok[:, None] & d_ok[None, :], other=float("-inf"))
            vmax = tl.maximum(vmax, v.to(tl.float32))
        tl.store(val_ptr + b * N + cols, tl.sum(tl.where(d_ok[None, :], vmax, 0.0), 1), mask=col_ok)


@triton.jit
def _pomt_column(col_ptr, b, j, ok, splits, N):
    """POMT's attention column sum of tokens j: the sum of the row-block partials."""
    total = tl.zeros(j.shape, tl.float32)
    for s in range(splits):
        total += tl.load(col_ptr + (b * splits + s) * N + j, mask=ok, other=0.0)
    return tl.where(ok, total, float("-inf"))


@triton.jit
def _select(
    x_ptr, out_ptr, score_ptr, pos_ptr,
    col_ptr, val_ptr, q_ptr, k_ptr,
    N, prefix, keep, C, H, D, splits, scale,
    sx_b, sx_n, so_b, so_n, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
    POMT: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """One (image, channel block): score, rank, and write this block of channels of the
    ``prefix + keep (+ 1 fused)`` tokens. The programs of one image compute the same scores
    and ranks (so they never wait for each other) and store the same values to scratch."""
    b, pid_c = tl.program_id(0), tl.program_id(1)
    no = N - prefix
    ii = tl.arange(0, BLOCK_I)
    # ---- 1. scores of the ordinary tokens into score[b, :]
    if POMT:
        top = tl.full([BLOCK_I], float("-inf"), tl.float32)
        vmax = tl.full([BLOCK_I], float("-inf"), tl.float32)
        for start in range(0, N, BLOCK_I):
            j = start + ii
            top = tl.maximum(top, _pomt_column(col_ptr, b, j, (j >= prefix) & (j < N), splits, N))
            vmax = tl.maximum(vmax, tl.load(val_ptr + b * N + j, mask=j < N, other=float("-inf")))
        top_all = tl.max(top, 0)
        v_all = tl.max(vmax, 0)
        den = tl.zeros([BLOCK_I], tl.float32)
        for start in range(0, N, BLOCK_I):
            j = start + ii
            den += tl.exp(tl.load(val_ptr + b * N + j, mask=j < N, other=float("-inf")) - v_all)
        den_all = tl.sum(den, 0)
        for start in range(0, no, BLOCK_I):
            j = start + ii
            ok = j < no
            col = _pomt_column(col_ptr, b, prefix + j, ok, splits, N)
            val = tl.load(val_ptr + b * N + prefix + j, mask=ok, other=float("-inf"))
            tl.store(score_ptr + b * no + j, col / top_all + tl.exp(val - v_all) / den_all, mask=ok)
    else:  # Top-K: softmax of the CLS query over all keys, per head, averaged over heads
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        hh = tl.arange(0, BLOCK_H)
        lse_h = tl.zeros([BLOCK_H], tl.float32)
        for h in range(H):  # log-sum-exp of the CLS row: its maximum, then the sum
            q = tl.load(q_ptr + b * sq_b + h * sq_h + d, mask=d_ok, other=0.0).to(tl.float32)
            m = tl.full([BLOCK_I], float("-inf"), tl.float32)
            for start in range(0, N, BLOCK_I):
                j = start + ii
                m = tl.maximum(m, _cls_logits(k_ptr, q, b, h, j, j < N, d, d_ok, sk_b, sk_h, sk_n, scale))
            m_all = tl.max(m, 0)
            s_sum = tl.zeros([BLOCK_I], tl.float32)
            for start in range(0, N, BLOCK_I):
                j = start + ii
                s_sum += tl.exp(
                    _cls_logits(k_ptr, q, b, h, j, j < N, d, d_ok, sk_b, sk_h, sk_n, scale) - m_all
                )
            lse_h = tl.where(hh == h, m_all + tl.log(tl.sum(s_sum, 0)), lse_h)
        for start in range(0, no, BLOCK_I):
            j = start + ii
            ok = j < no
            acc = tl.zeros([BLOCK_I], tl.float32)
            for h in range(H):
                q = tl.load(q_ptr + b * sq_b + h * sq_h + d, mask=d_ok, other=0.0).to(tl.float32)
                s = _cls_logits(k_ptr, q, b, h, prefix + j, ok, d, d_ok, sk_b, sk_h, sk_n, scale)
                acc += tl.exp(s - tl.sum(tl.where(hh == h, lse_h, 0.0), 0))
            tl.store(score_ptr + b * no + j, acc / H, mask=ok)
    tl.debug_barrier()  # the scores are read back below by other threads of this program
    # ---- 2. rank: a stable descending order; position of each ordinary token, -1 if not kept
    jj = tl.arange(0, BLOCK_J)
    running = tl.full([], 0, tl.int32)
    for start in range(0, no, BLOCK_J):
        j = start + jj
        j_ok = j < no
        s_j = tl.load(score_ptr + b * no + j, mask=j_ok, other=0.0)
        rank = tl.zeros([BLOCK_J], tl.int32)
        for i0 in range(0, no, BLOCK_I):
            i = i0 + ii
            s_i = tl.load(score_ptr + b * no + i, mask=i < no, other=float("-inf"))
            ahead = (s_i[None, :] > s_j[:, None]) | (
                (s_i[None, :] == s_j[:, None]) & (i[None, :] < j[:, None])
            )
            rank += tl.sum((ahead & (i < no)[None, :]).to(tl.int32), 1)
        kept = (rank < keep) & j_ok
        if POMT:  # kept tokens in score order (as the reference), the rest fused
            pos = tl.where(kept, rank, -1)
        else:  # Top-K keeps the original order of the tokens
            flags = kept.to(tl.int32)
            pos = tl.where(kept, running + tl.cumsum(flags, 0) - flags, -1)
            running += tl.sum(flags, 0)
        tl.store(pos_ptr + b * no + j, pos, mask=j_ok)
    tl.debug_barrier()
    # ---- 3. gather this channel block: prefix tokens, kept tokens, (POMT) the mean of the others
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    for t in range(0, prefix):
        row = tl.load(x_ptr + b * sx_b + t * sx_n + c, mask=c_ok)
        tl.store(out_ptr + b * so_b + t * so_n + c, row, mask=c_ok)
    fused = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, no, BLOCK_J):
        j = start + jj
        j_ok = j < no
        pos = tl.load(pos_ptr + b * no + j, mask=j_ok, other=-1)
        rows = tl.load(
            x_ptr + b * sx_b + (prefix + j)[:, None] * sx_n + c[None, :],
            mask=j_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        tl.store(
            out_ptr + b * so_b + (prefix + pos)[:, None] * so_n + c[None, :],
            rows,
            mask=(pos >= 0)[:, None] & c_ok[None, :],
        )
        if POMT:
            fused += tl.sum(tl.where(((pos < 0) & j_ok)[:, None], rows.to(tl.float32), 0.0), 0)
    if POMT:
        mean = fused / (no - keep)
        tl.store(
            out_ptr + b * so_b + (prefix + keep) * so_n + c, mean.to(out_ptr.dtype.element_ty), mask=c_ok
        )


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(int(n)))


def _ieee(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32


def row_lse(q: torch.Tensor, k: torch.Tensor, prefix: int, scale: float) -> torch.Tensor:
    """(B, H, N - prefix) float32 log-sum-exp of the ordinary query rows over all keys."""
    b, h, n, d = q.shape
    lse = torch.empty(b, h, n - prefix, device=q.device, dtype=torch.float32)
    grid = (b * h, triton.cdiv(n - prefix, _LSE_M))
    _row_lse[grid](
        q, k, lse, n, prefix, h, d, float(scale),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        BLOCK_M=_LSE_M, BLOCK_N=_LSE_N, BLOCK_D=_pow2(d), IEEE=_ieee(q), num_warps=_WARPS,
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
    col = torch.empty(b, splits, n, device=q.device, dtype=torch.float32)
    val = torch.empty(b, n, device=q.device, dtype=torch.float32)
    _column_scores[(b, triton.cdiv(n, _COL_N), splits)](
        q, k, v, lse, col, val, n, prefix, h, d, float(scale),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        BLOCK_M=block_m, BLOCK_N=_COL_N, BLOCK_D=_pow2(d), IEEE=_ieee(q), num_warps=_WARPS,
    )  # fmt: skip
    return col, val


def select_tokens(
    x: torch.Tensor,
    prefix: int,
    keep: int,
    *,
    pomt: tuple[torch.Tensor, torch.Tensor] | None = None,
    qk: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new sequence and the scores of the ordinary tokens (B, N - prefix).

    ``pomt=(col, val)`` from :func:`column_scores` selects as POMT (the ``keep`` best in
    score order, then the mean of the rest); ``qk=(q, k, scale)`` as Top-K (the ``keep``
    tokens with the most CLS attention, in their original order).
    """
    b, n, c = x.shape
    no = n - prefix
    out = torch.empty(b, prefix + keep + (1 if pomt is not None else 0), c, device=x.device, dtype=x.dtype)
    score = torch.empty(b, no, device=x.device, dtype=torch.float32)
    pos = torch.empty(b, no, device=x.device, dtype=torch.int32)
    if pomt is not None:
        col, val = pomt
        q = k = col  # unused
        h, d, splits, scale, strides = 1, 16, col.shape[1], 1.0, (0,) * 6
    else:
        q, k, scale = qk
        col = val = score  # unused
        h, d, splits = q.shape[1], q.shape[3], 1
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    _select[(b, triton.cdiv(c, _SEL_C))](
        x, out, score, pos, col, val, q, k,
        n, prefix, keep, c, h, d, splits, float(scale),
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), *strides,
        POMT=pomt is not None,
        BLOCK_J=_SEL_J, BLOCK_I=_SEL_I, BLOCK_C=_SEL_C, BLOCK_D=_pow2(d), BLOCK_H=_pow2(h, 2), num_warps=_WARPS,
    )  # fmt: skip
    return out, score
