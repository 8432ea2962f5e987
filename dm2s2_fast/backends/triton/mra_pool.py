"""IntraMRA + InterMRA (docs/model.md#intramra): scores, segment softmax, residual pooling.

Per segment (intra) ``α = softmax(vᵀ tanh(W h + c))``, ``z = Σ (1 + α_i) h_i / (L + 1)``; per sample
(inter) ``β = softmax(uᵀ tanh(U z + g))``, ``r = Σ (1 + β_m) z_m / (K + 1)``. Softmax statistics,
pooling accumulators and the weights are fp32; z and r are stored in h's dtype.

Scores
------
*Element scores* ``s_i = vᵀ tanh(W h_i + c)`` are ~all of the FLOPs (N·a·d), so they are one GEMM
kernel with the ``tanh``, ``·v`` and row-sum fused into its epilogue (the [N, a] activations never
reach memory), not part of a per-group kernel: one program per sample would run that GEMM on only B
programs (< 2 waves of an H200's SMs for the ads batch, imbalanced by sample length) and re-read
W [a, d] once per sample. ``_score_tile_kernel`` runs a 2-D grid of [BLOCK_N rows] x [BLOCK_A
columns of a] tiles, each running the whole d-loop on the tensor cores (bf16/fp16: 128x128x64,
8 warps, 3 stages, wgmma on sm_90) and writing the partial score Σ_{a in its block} v_a tanh(...)
to ``P[a_block, i]``; the pooling kernel adds the cdiv(a, BLOCK_A) partials of a row in a fixed order
(deterministic, no atomics).

Pooling
-------
``_group_pool_kernel``: one program per group (segment for IntraMRA, sample for InterMRA): online
softmax over its rows' scores and residual pooling, then the weights. ``mra_pool`` is IntraMRA then
InterMRA: four launches, each parallel over its own items. (A row-block score kernel and a fused
per-sample kernel were slower on the H200: docs/performance.md#mra-pooling.)
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from ... import dispatch, tuning
from ..._intmath import cdiv, next_pow2
from . import INTERPRET, cast_out, compiling, mma, sm_count, tanh_f32, triton_op, wrap

MAX_DIM = 1024  # d (the pooled width) held whole in registers; BERT-large's 1024 is the limit
# Score columns (W's rows, a): the pooling kernels sum a row's cdiv(a, BLOCK_A) partial scores in an
# unrolled loop; 4096 (32 partials at bf16's 128 columns, 64 at fp32's 64) builds without spills on
# sm_90, 128 partials spill and 782 did not compile in 15 minutes.
MAX_SCORE_WIDTH = 4096


@triton.jit
def _score_tile_kernel(X, W, C, V, P, n_rows, dim, width, stride_xn, stride_wa,
                       BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN_K: tl.constexpr, EVEN_A: tl.constexpr, INTERP: tl.constexpr):
    """P[j, i] = Σ_{a in column block j} V[a] tanh((X[i] @ W[a]) + C[a]), fp32, for one
    [BLOCK_N rows] x [BLOCK_A columns] tile; the consumer sums P over j in a fixed order.

    Program ids run column-block fastest, so the cdiv(width, BLOCK_A) programs of one row block
    are adjacent and read their X tile from L2 after the first; W (a x d) stays L2-resident.
    """
    pid = tl.program_id(0)
    n_ab = tl.cdiv(width, BLOCK_A)
    pid_n = pid // n_ab
    pid_a = pid % n_ab
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    acols = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = acols < width
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xn + offs_k[None, :]
    # W chunk loaded transposed: [BLOCK_K, BLOCK_A] (column-major B operand of the dot)
    w_ptrs = W + acols.to(tl.int64)[None, :] * stride_wa + offs_k[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_A], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            if EVEN_A:
                wt = tl.load(w_ptrs)
            else:
                wt = tl.load(w_ptrs, mask=a_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + offs_k) < dim
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None] & a_ok[None, :], other=0.0)
        acc = mma(x, wt, acc, INTERP)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    c = tl.load(C + acols, mask=a_ok, other=0.0).to(tl.float32)
    v = tl.load(V + acols, mask=a_ok, other=0.0).to(tl.float32)  # v = 0 on padding columns
    part = tl.sum(tanh_f32(acc + c[None, :]) * v[None, :], axis=1)
    tl.store(P + pid_a.to(tl.int64) * n_rows + rows, part, mask=row_ok)


@triton.jit
def _load_scores(SC, rows, ok, part_stride, N_PART: tl.constexpr):
    """Σ_j SC[j * part_stride + rows] (fixed order: deterministic); -inf where not ``ok``."""
    s = tl.load(SC + rows, mask=ok, other=0.0)
    for j in tl.static_range(1, N_PART):
        s += tl.load(SC + j * part_stride.to(tl.int64) + rows, mask=ok, other=0.0)  # int32 wraps at 2^31
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _pool_group(X, SC, WT, start, end, stride_xn, offs_d, d_ok, part_stride, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, N_PART: tl.constexpr):
    """Online-softmax residual pooling of rows [start, end) of X by their scores SC.

    Returns the fp32 pooled row Σ (1 + w_i) x_i / (L + 1) (zeros when L = 0) and writes the softmax
    weights w_i to WT[start:end] (a second, cheap pass over the 4-byte scores). The score of row i
    is Σ_j SC[j * part_stride + i] over the N_PART partial sums of the score kernel.
    """
    offs_n = tl.arange(0, BLOCK_N)
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.full((), 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    tot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i0 in range(start, end, BLOCK_N):
        rows = i0 + offs_n
        ok = rows < end
        s = _load_scores(SC, rows, ok, part_stride, N_PART)
        x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xn + offs_d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(s, axis=0))  # finite: the block has >= 1 row
        rescale = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        l = l * rescale + tl.sum(p, axis=0)
        acc = acc * rescale + tl.sum(p[:, None] * x, axis=0)
        tot += tl.sum(x, axis=0)
        m = m_new
    l_safe = tl.where(l > 0.0, l, 1.0)
    pooled = (tot + acc / l_safe) / ((end - start) + 1).to(tl.float32)
    for i0 in range(start, end, BLOCK_N):
        rows = i0 + offs_n
        ok = rows < end
        s = _load_scores(SC, rows, ok, part_stride, N_PART)
        tl.store(WT + rows, tl.exp(s - m) / l_safe, mask=ok)
    return pooled


@triton.jit
def _group_pool_kernel(X, SC, CU, OUT, WT, dim, stride_xn, stride_on, part_stride,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_PART: tl.constexpr,
                       INTERP: tl.constexpr):
    g = tl.program_id(0)
    start = tl.load(CU + g)
    end = tl.load(CU + g + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    pooled = _pool_group(X, SC, WT, start, end, stride_xn, offs_d, d_ok, part_stride, BLOCK_N, BLOCK_D,
                         N_PART)
    tl.store(OUT + g.to(tl.int64) * stride_on + offs_d, cast_out(pooled, OUT.dtype.element_ty, INTERP), mask=d_ok)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def tile_config(dtype: torch.dtype, n: int, dim: int, width: int, sms: int = 132):
    """(BLOCK_N, BLOCK_A, BLOCK_K, num_warps, num_stages) of ``_score_tile_kernel``.

    bf16/fp16: 128x128 tiles (8 warps = two wgmma warpgroups of 64 rows, 64 fp32 accumulators a
    thread) with BLOCK_K 64 and 3 cp.async stages (96 KB smem: 2 programs per SM); when that gives
    fewer programs than SMs (InterMRA's ~1k rows) 64-row tiles at 4 warps instead. fp32 (IEEE dots
    on the FMA units) keeps 64x64x32 tiles. Tiles never exceed the problem (interpreter speed).
    ``Tuning.triton_mra_scores`` forces a config.
    """
    forced = tuning.current().triton_mra_scores
    if forced is not None:
        return forced.block_n, forced.block_a, forced.block_k, forced.num_warps, forced.num_stages
    half = dtype != torch.float32
    ba = min(128 if half else 64, max(16, next_pow2(width)))
    bk = min(64 if half else 32, max(16, next_pow2(dim)))
    cap = max(16, next_pow2(max(n, 1)))
    if half:
        bn = 128 if cdiv(n, 128) * cdiv(width, ba) >= sms else 64
        bn = min(bn, cap)
        warps = 8 if bn * ba >= 128 * 128 else 4
        return bn, ba, bk, warps, 3
    return min(64, cap), ba, bk, 4, 2


def _scores(x: torch.Tensor, W: torch.Tensor, c: torch.Tensor, v: torch.Tensor):
    """fp32 scores vᵀ tanh(W x_i + c) as ``(partials [P, n], P)``: the score of row i is
    Σ_j partials[j, i] (P = 1 for degenerate shapes). Launches nothing for n = 0.
    """
    n, dim = x.shape
    width = W.shape[0]
    if n == 0 or width == 0 or dim == 0:
        out = torch.empty((1, n), dtype=torch.float32, device=x.device)
        if n and width == 0:  # no score columns: s = 0
            out.zero_()
        elif n:  # no features: s = vᵀ tanh(c)
            out.copy_((torch.tanh(c.float()) @ v.float()).expand(1, n))
        return out, 1
    bn, ba, bk, warps, stages = tile_config(x.dtype, n, dim, width, sm_count(x.device))
    n_ab = cdiv(width, ba)
    out = torch.empty((n_ab, n), dtype=torch.float32, device=x.device)
    wrap(_score_tile_kernel)[(cdiv(n, bn) * n_ab,)](
        x, W, c, v, out, n, dim, width, x.stride(0), W.stride(0),
        BLOCK_N=bn, BLOCK_A=ba, BLOCK_K=bk, EVEN_K=dim % bk == 0, EVEN_A=width % ba == 0,
        INTERP=INTERPRET, num_warps=warps, num_stages=stages)
    return out, n_ab


def _pool_config(dim: int):
    block_d = max(16, next_pow2(dim))
    block_n = max(2, min(64, 8192 // block_d))
    warps = 4 if block_d <= 256 else 8
    return block_d, block_n, warps


def _pool_launch_config(dim: int, dtype: torch.dtype):
    """(BLOCK_D, BLOCK_N, num_warps, num_stages) of ``_group_pool_kernel``.

    bf16/fp16: 32 KB row blocks (BLOCK_N = 16384 / BLOCK_D), 4 warps, the row loop software-pipelined
    3 deep (H200, ads B=256 bf16 d=384: intra_mra 61.7 µs against 154.6 with the unpipelined
    16-row, 8-warp loop of ``_pool_config``, which fp32 keeps: unmeasured there, and 3 stages of fp32
    blocks would take 192 KB of shared memory). ``Tuning.triton_mra_pool`` forces one.
    """
    block_d, block_n, warps = _pool_config(dim)
    forced = tuning.current().triton_mra_pool
    if forced is not None:
        return block_d, forced.block_n, forced.num_warps, forced.num_stages
    if dtype == torch.float32:
        return block_d, block_n, warps, 1
    return block_d, max(2, min(64, 16384 // block_d)), 4, 3


def _group_pool(x: torch.Tensor, cu: torch.Tensor, scores: torch.Tensor, n_part: int):
    groups = cu.numel() - 1
    dim = x.shape[1]
    pooled = torch.empty((groups, dim), dtype=x.dtype, device=x.device)
    weights = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if groups > 0:
        block_d, block_n, warps, stages = _pool_launch_config(dim, x.dtype)
        wrap(_group_pool_kernel)[(groups,)](
            x, scores, cu, pooled, weights, dim, x.stride(0), pooled.stride(0), x.shape[0],
            BLOCK_N=block_n, BLOCK_D=block_d, N_PART=n_part, INTERP=INTERPRET, num_warps=warps,
            num_stages=stages)
    return pooled, weights


def _intra_launch(h: torch.Tensor, cu_seqlens_segment: torch.Tensor, W: torch.Tensor, c: torch.Tensor,
                  v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    h, W = _last_contiguous(h), _last_contiguous(W)
    cu, c, v = (t.contiguous() for t in (cu_seqlens_segment, c, v))  # the kernels read them with unit stride
    return _group_pool(h, cu, *_scores(h, W, c, v))


def _inter_launch(z: torch.Tensor, cu_segments_per_sample: torch.Tensor, U: torch.Tensor, g: torch.Tensor,
                  u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    z, U = _last_contiguous(z), _last_contiguous(U)
    cu, g, u = (t.contiguous() for t in (cu_segments_per_sample, g, u))
    return _group_pool(z, cu, *_scores(z, U, g, u))


def _mra_pool_launch(h: torch.Tensor, cu_seqlens_segment: torch.Tensor, cu_segments_per_sample: torch.Tensor,
                     W: torch.Tensor, c: torch.Tensor, v: torch.Tensor, U: torch.Tensor, g: torch.Tensor,
                     u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    z, alpha = _intra_launch(h, cu_seqlens_segment, W, c, v)
    r, beta = _inter_launch(z, cu_segments_per_sample, U, g, u)
    return z, r, alpha, beta


_intra_op = triton_op("intra_mra")(_intra_launch)
_inter_op = triton_op("inter_mra")(_inter_launch)
_mra_pool_op = triton_op("mra_pool")(_mra_pool_launch)


def _limits(x, *widths) -> list:
    found = []
    if x.shape[1] > MAX_DIM:
        found.append(f"triton MRA kernels hold a row of d <= {MAX_DIM} in registers, got d = {x.shape[1]}")
    if max(widths, default=0) > MAX_SCORE_WIDTH:
        found.append(f"triton MRA kernels take score widths a <= {MAX_SCORE_WIDTH}, got {max(widths)}")
    return found


@dispatch.register_kernel("intra_mra", "triton", limits=lambda h, cu, W, c, v: _limits(h, W.shape[0]))
def intra_mra_triton(h, cu_seqlens_segment, W, c, v):
    fn = _intra_op if compiling() else _intra_launch
    return fn(h, cu_seqlens_segment, W, c, v)


@dispatch.register_kernel("inter_mra", "triton", limits=lambda z, cu, U, g, u: _limits(z, U.shape[0]))
def inter_mra_triton(z, cu_segments_per_sample, U, g, u):
    fn = _inter_op if compiling() else _inter_launch
    return fn(z, cu_segments_per_sample, U, g, u)


@dispatch.register_kernel("mra_pool", "triton",
                          limits=lambda h, cu1, cu2, W, c, v, U, g, u: _limits(h, W.shape[0], U.shape[0]))
def mra_pool_triton(h, cu_seqlens_segment, cu_segments_per_sample, W, c, v, U, g, u):
    fn = _mra_pool_op if compiling() else _mra_pool_launch
    return fn(h, cu_seqlens_segment, cu_segments_per_sample, W, c, v, U, g, u)
