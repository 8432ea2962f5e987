"""Masked set attention over packed groups: FlashAttention-style online softmax
(docs/ops.md#set_attention).

Every row of q attends to the k/v rows of its own group ``cu_seqlens[g]:cu_seqlens[g+1]``, never
across groups. Statistics (running max, running sum, the accumulator) are fp32 whatever the input
dtype; fp32 inputs use IEEE fp32 dots (no TF32), so fp32 parity is ~1e-7.

Tiling for the workload (groups of 20-200 rows, head dim 32, 12 heads):

* ``group`` mode (groups averaging at least half the per-group tile, e.g. set attention, one group
  per sample): the grid is (group x q-block, head); a program owns ``BLOCK_M`` query rows of one
  group and one head and streams that group's k/v in ``BLOCK_N`` tiles. BLOCK_M/BLOCK_N come from
  ``max_seqlen`` (16..64), not a fixed 128x128, so a 20-row group costs a 32x32 tile, not a
  128x128 one. q-blocks past the end of a shorter group exit at once (two int loads).
* ``packed`` mode (groups averaging under half the per-group tile, e.g. ``attention="modality"``
  on the ads batch: 4-12-row category segments beside 50-118-row descriptions): the grid is
  (row-block, head) over the *packed* rows, so one program takes several short groups at once.
  Each row finds its group by a binary search of ``cu_seqlens``; the program streams k/v over the
  union of its rows' groups and masks every score to ``same group``. No q row is padding and no
  program is idle; the cost is the masked cross-group part of the union. A neighbouring group's v
  rows enter P·V with weight 0, so they must be finite (0·NaN is NaN): the engine's are (validated
  inputs, LayerNorm eps > 0), including the CUDA-graph padding's.

``Tuning.triton_attention`` (an ``AttentionTiles``) forces the mode and tiles, for tuning on a GPU.
"""

import torch
import triton
import triton.language as tl

from ... import dispatch, tuning
from ..._intmath import cdiv, next_pow2
from . import INTERPRET, cast_out, compiling, mma, triton_op, wrap

LOG2E = 1.4426950408889634


@triton.jit
def _set_attention_kernel(
    Q, K, V, O, CU,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    n_rows, n_groups, n_mblocks, search_iters, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    if PACKED:
        # Rows [row0, row0 + BLOCK_M) of the packed sequence, whatever groups they belong to.
        rows = pid * BLOCK_M + offs_m
        row_ok = rows < n_rows
        # Per row: the group g with cu[g] <= row < cu[g+1] (smallest g with cu[g+1] > row, which
        # skips empty groups). Padding rows (>= n_rows) end at g = n_groups.
        lo = tl.zeros([BLOCK_M], dtype=tl.int32)
        hi = tl.zeros([BLOCK_M], dtype=tl.int32) + n_groups
        for _ in range(search_iters):
            active = lo < hi
            mid = (lo + hi) // 2
            end = tl.load(CU + mid + 1, mask=active, other=0)
            right = active & (end <= rows)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(active & (end > rows), mid, hi)
        row_start = tl.load(CU + lo)
        row_end = tl.load(CU + lo + 1, mask=lo < n_groups, other=0)
        row_start = tl.where(row_ok, row_start, n_rows)
        row_end = tl.where(row_ok, row_end, 0)
        kv_lo = tl.min(row_start, axis=0)
        kv_hi = tl.max(row_end, axis=0)
    else:
        group = pid // n_mblocks
        mblock = pid % n_mblocks
        g_start = tl.load(CU + group)
        g_end = tl.load(CU + group + 1)
        row0 = g_start.to(tl.int64) + mblock.to(tl.int64) * BLOCK_M  # int32 would wrap near 2^31
        if row0 >= g_end:  # this group is shorter than max_seqlen: nothing to do
            return
        rows = row0 + offs_m
        row_ok = rows < g_end
        kv_lo = g_start
        kv_hi = g_end

    rows64 = rows.to(tl.int64)
    q_ptrs = Q + rows64[:, None] * stride_qn + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < kv_hi
        cols64 = cols.to(tl.int64)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + cols64[:, None] * stride_kn + head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols64[:, None] * stride_vn + head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), INTERP)
        # log2 domain: exp(x * scale) == exp2(x * scale * log2(e)). The scale is cast because
        # torch.compile (inductor) passes Python floats as fp64, which would turn the softmax
        # statistics and the accumulator fp64 (and fail tl.dot's fp32-accumulator check).
        s = (s * qk_scale).to(tl.float32)
        if PACKED:
            valid = (cols[None, :] >= row_start[:, None]) & (cols[None, :] < row_end[:, None])
        else:  # one group: only the tail of the last k/v tile is masked (padding q rows are not stored)
            valid = col_ok[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing valid yet
        rescale = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * rescale + tl.sum(p, axis=1)
        acc = mma(cast_out(p, V.dtype.element_ty, INTERP), v, acc * rescale[:, None], INTERP)
        m_i = m_new

    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]
    o_ptrs = O + rows64[:, None] * stride_on + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, cast_out(out, O.dtype.element_ty, INTERP), mask=row_ok[:, None] & d_ok[None, :])


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(max(int(x), 1))))


def pick_config(n_rows: int, n_groups: int, max_seqlen: int, head_dim: int, dtype: torch.dtype):
    """(packed, BLOCK_M, BLOCK_N, num_warps, num_stages) for this call, from shapes only (no sync).

    The table keeps every kernel spill-free on sm_90 (checked with ptxas: bf16 D=32 64x64 4 warps
    148 regs; D=64 64x64 8 warps 144; D=128 64x64 8 warps 200; fp32 IEEE dots 32x32).
    """
    forced = tuning.current().triton_attention
    if forced is not None:
        return forced.packed, forced.block_m, forced.block_n, forced.num_warps, forced.num_stages
    block_d = max(16, next_pow2(head_dim))
    half = dtype != torch.float32
    bm = bn = _pow2_clamp(max_seqlen, 16, 64)  # per-group tiles, from the longest group
    # Short groups on average (mean < half that tile, so most of each per-group tile would be
    # padding): pack several groups per program instead.
    packed = max_seqlen > 16 and 2 * n_rows < bm * max(n_groups, 1)
    if packed:
        bm = bn = 32
    elif half and block_d <= 32:
        # Narrower key tiles at D <= 32 (H200, ads B=256 bf16 D=32: 64x32 65.6 µs, 64x64 75.8).
        bn = min(bn, 32)
    if block_d > 128:
        bm, bn = min(bm, 32), 16
    if not half:  # IEEE fp32 dots run on the FMA units and hold fp32 tiles: smaller tiles
        bm = min(bm, 32 if block_d <= 128 else 16)
        bn = min(bn, 32 if block_d <= 64 else 16)
    warps = 4
    if block_d >= 64 and bm * bn >= (32 * 32 if not half else 64 * 64):
        warps = 8
    if block_d >= 128 and half and bm >= 32:
        warps = 8
    return packed, bm, bn, warps, 2


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
            max_seqlen: int, scale: float) -> torch.Tensor:
    n, heads, head_dim = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cu_seqlens = cu_seqlens.contiguous()  # read as CU + g
    out = torch.empty((n, heads, head_dim), dtype=q.dtype, device=q.device)
    groups = cu_seqlens.numel() - 1
    if n == 0 or heads == 0 or head_dim == 0 or groups <= 0:
        return out
    max_seqlen = min(int(max_seqlen), n)  # a larger bound only adds idle q-blocks
    packed, bm, bn, warps, stages = pick_config(n, groups, max_seqlen, head_dim, q.dtype)
    block_d = max(16, next_pow2(head_dim))
    n_mblocks = cdiv(max(max_seqlen, 1), bm)
    if not packed and groups * n_mblocks > 2 ** 31 - 1:
        # Skewed groups (a long one among many short ones): one program per q-block of every group
        # would pass the grid's limit; packed programs cover the rows instead, cdiv(n, BLOCK_M).
        packed = True
    if packed:
        grid = (cdiv(n, bm), heads)
    else:
        grid = (groups * n_mblocks, heads)
    wrap(_set_attention_kernel)[grid](
        q, k, v, out, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        n, groups, n_mblocks, max(1, int(groups).bit_length()), float(scale) * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, PACKED=packed, INTERP=INTERPRET,
        num_warps=warps, num_stages=stages,
    )
    return out


_op = triton_op("set_attention")(_launch)


def _limits(q, k, v, cu_seqlens, max_seqlen, scale) -> list:
    found = []
    if q.shape[-1] > 256:
        found.append(f"triton set_attention supports head dim <= 256, got {q.shape[-1]}")
    if q.shape[1] > 65535:
        found.append(f"triton set_attention supports <= 65535 heads, got {q.shape[1]}")
    if abs(float(scale)) * LOG2E > torch.finfo(torch.float32).max:  # the kernel scales in log2 units, in fp32
        found.append(f"triton set_attention needs |scale| * log2(e) within fp32's range, got scale {scale}")
    return found


@dispatch.register_kernel("set_attention", "triton", limits=_limits)
def set_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale):
    if compiling():
        return _op(q, k, v, cu_seqlens, int(max_seqlen), float(scale))
    return _launch(q, k, v, cu_seqlens, int(max_seqlen), float(scale))


__all__ = ["set_attention_triton", "pick_config"]
