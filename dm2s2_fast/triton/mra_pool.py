"""IntraMRA + InterMRA (DESIGN §1, §3): scores, segment softmax, residual pooling.

Per segment (intra) ``α = softmax(vᵀ tanh(W h + c))``, ``z = Σ (1 + α_i) h_i / (L + 1)``; per sample
(inter) ``β = softmax(uᵀ tanh(U z + g))``, ``r = Σ (1 + β_m) z_m / (K + 1)``. Softmax statistics,
pooling accumulators and the weights are fp32; z and r are stored in h's dtype.

Where the scores are computed
-----------------------------
*Element scores* ``s_i = vᵀ tanh(W h_i + c)`` are one preceding GEMM kernel with the ``tanh``, ``·v``
and row-sum fused into its epilogue, so the [N, a] activations never reach memory. They are not
computed inside a per-group kernel because they are ~all of the FLOPs (N·a·d): one program per sample
would run that GEMM on only B programs (256 for the ads batch, < 2 waves of 132 SMs, imbalanced by
sample length) and re-read W [a, d] once per sample.

* ``tile`` score kernel (``_score_tile_kernel``, the default): a 2-D grid of [BLOCK_N rows] x
  [BLOCK_A columns of a] tiles, each running the whole d-loop on the tensor cores (bf16/fp16:
  128x128x64, 8 warps, 3 stages, wgmma on sm_90) and writing the partial score
  Σ_{a in its block} v_a tanh(...) to ``P[a_block, i]``; the pooling kernels add the
  cdiv(a, BLOCK_A) partials of a row in a fixed order (deterministic, no atomics). On the ads batch
  that is 207 x 3 = 621 programs of 12.6 MFLOP instead of 413 programs each looping over 6 a-chunks
  of 64x64x32 steps (whose pipeline drains at every a-chunk).
* ``rows`` score kernel (``_score_kernel``, the first version): 1-D grid of BLOCK_N-row blocks, each
  looping over all of a in BLOCK_A chunks; one fp32 score per row.

Pooling
-------
* ``_group_pool_kernel``: one program per group (segment for IntraMRA, sample for InterMRA): online
  softmax over its rows' scores and residual pooling, then the weights. ``intra_mra`` and
  ``inter_mra`` are a score kernel plus this.
* ``_mra_fused_kernel`` (one program per sample): IntraMRA pooling of its segments, then scores of its
  z with ``tl.dot`` against ``Uᵀ`` in [16, d] tiles and InterMRA pooling, in one pass over h. Its
  in-kernel U GEMM runs on B programs with unpipelined loads from L2, which made it the slow part of
  ``mra_pool`` on the H200 (2026-11-30: mra_pool 242 µs vs intra 183 + inter 51).

Modes: ``DM2S2_TRITON_MRA`` (read at every call; for tuning and the benchmark's variants)
* ``tile`` (default): tile scores; ``mra_pool`` = ``intra_mra`` then ``inter_mra`` (4 launches: tile
  scores of h, per-segment pooling, tile scores of z, per-sample pooling), each parallel over its
  own items.
* ``tile-fused``: tile scores of h, then the fused per-sample kernel for ``mra_pool``.
* ``rows``: the first version throughout (row scores; fused per-sample ``mra_pool``).
* ``tile:BLOCK_N,BLOCK_A,BLOCK_K,num_warps,num_stages`` (also ``tile-fused:...``): forces the tile
  kernel's shape.
"""
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import backends
from .._intmath import cdiv, next_pow2
from . import INTERPRET, cast_out, compiling, dtype_reason, mma, sm_count, tanh_f32, triton_op, valid_tiles, wrap

MAX_DIM = 1024  # d (the pooled width) held whole in registers; BERT-large's 1024 is the limit
# Score columns (W's rows, a): the pooling kernels sum a row's cdiv(a, BLOCK_A) partial scores in an
# unrolled loop; 4096 (32 partials at bf16's 128 columns, 64 at fp32's 64) builds without spills on
# sm_90, 128 partials spill and 782 did not compile in 15 minutes.
MAX_SCORE_WIDTH = 4096
SEG_TILE = 16  # segments scored per tl.dot in the fused kernel (tl.dot needs M >= 16)


@triton.jit
def _score_kernel(X, W, C, V, S, n_rows, dim, width, stride_xn, stride_wa,
                  BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr,
                  INTERP: tl.constexpr):
    """S[i] = Σ_a V[a] tanh((X[i] @ W[a]) + C[a]) for a block of BLOCK_N rows, in fp32."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    offs_k = tl.arange(0, BLOCK_K)
    score = tl.zeros([BLOCK_N], dtype=tl.float32)
    for a0 in range(0, width, BLOCK_A):
        acols = a0 + offs_a
        a_ok = acols < width
        acc = tl.zeros([BLOCK_N, BLOCK_A], dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < dim
            x = tl.load(X + rows64[:, None] * stride_xn + kk[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            # W chunk loaded transposed: [BLOCK_K, BLOCK_A]
            wt = tl.load(W + acols[None, :].to(tl.int64) * stride_wa + kk[:, None],
                         mask=k_ok[:, None] & a_ok[None, :], other=0.0)
            acc = mma(x, wt, acc, INTERP)
        c = tl.load(C + acols, mask=a_ok, other=0.0).to(tl.float32)
        v = tl.load(V + acols, mask=a_ok, other=0.0).to(tl.float32)
        score += tl.sum(tanh_f32(acc + c[None, :]) * v[None, :], axis=1)
    tl.store(S + rows, score, mask=row_ok)


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


@triton.jit
def _mra_fused_kernel(H, SC, CU_SEG, CU_SMP, U, G, UV, Z, R, ALPHA, BETA, TSCR,
                      dim, width, stride_hn, stride_ua, stride_zn, stride_rn, part_stride,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, N_PART: tl.constexpr,
                      INTERP: tl.constexpr):
    """One program per sample b: z and α for each of its segments, then r and β."""
    b = tl.program_id(0)
    seg_lo = tl.load(CU_SMP + b)
    seg_hi = tl.load(CU_SMP + b + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    offs_s = tl.arange(0, BLOCK_S)
    offs_a = tl.arange(0, BLOCK_A)
    offs_k = tl.arange(0, BLOCK_K)

    mb = tl.full((), float("-inf"), tl.float32)
    lb = tl.full((), 0.0, tl.float32)
    acc_r = tl.zeros([BLOCK_D], dtype=tl.float32)
    tot_z = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c0 in range(seg_lo, seg_hi, BLOCK_S):
        c1 = tl.minimum(c0 + BLOCK_S, seg_hi)
        # IntraMRA for up to BLOCK_S segments: z and α straight to memory.
        for seg in range(c0, c1):
            start = tl.load(CU_SEG + seg)
            end = tl.load(CU_SEG + seg + 1)
            z = _pool_group(H, SC, ALPHA, start, end, stride_hn, offs_d, d_ok, part_stride, BLOCK_N,
                            BLOCK_D, N_PART)
            tl.store(Z + tl.cast(seg, tl.int64) * stride_zn + offs_d, cast_out(z, Z.dtype.element_ty, INTERP),
                     mask=d_ok)
        # Read those z back (L1/L2-hot; the barrier makes every thread's stores visible to all):
        # holding BLOCK_S rows of z in registers instead spills. Like the reference, the InterMRA
        # level sees z in h's dtype.
        tl.debug_barrier()
        segs = c0 + offs_s
        s_ok = segs < c1
        z_rows = Z + segs.to(tl.int64)[:, None] * stride_zn
        # InterMRA scores t = uᵀ tanh(U z + g): [BLOCK_S, d] @ Uᵀ on the tensor cores (fp32: IEEE),
        # in [BLOCK_S, BLOCK_K] x [BLOCK_K, BLOCK_A] steps; U is read once per BLOCK_S segments, not
        # once per segment as a mat-vec would.
        t = tl.zeros([BLOCK_S], dtype=tl.float32)
        for a0 in range(0, width, BLOCK_A):
            acols = a0 + offs_a
            a_ok = acols < width
            y = tl.zeros([BLOCK_S, BLOCK_A], dtype=tl.float32)
            for k0 in range(0, dim, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < dim
                zk = tl.load(z_rows + kk[None, :], mask=s_ok[:, None] & k_ok[None, :], other=0.0)
                uk = tl.load(U + acols[None, :].to(tl.int64) * stride_ua + kk[:, None],
                             mask=k_ok[:, None] & a_ok[None, :], other=0.0)
                y = mma(zk, uk, y, INTERP)
            gg = tl.load(G + acols, mask=a_ok, other=0.0).to(tl.float32)
            uu = tl.load(UV + acols, mask=a_ok, other=0.0).to(tl.float32)
            t += tl.sum(tanh_f32(y + gg[None, :]) * uu[None, :], axis=1)
        t = tl.where(s_ok, t, float("-inf"))
        tl.store(TSCR + segs, t, mask=s_ok)
        # Online softmax over the sample's segments.
        zf = tl.load(z_rows + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        m_new = tl.maximum(mb, tl.max(t, axis=0))
        rescale = tl.exp(mb - m_new)
        p = tl.exp(t - m_new)
        lb = lb * rescale + tl.sum(p, axis=0)
        acc_r = acc_r * rescale + tl.sum(p[:, None] * zf, axis=0)
        tot_z += tl.sum(zf, axis=0)
        mb = m_new
    lb_safe = tl.where(lb > 0.0, lb, 1.0)
    r = (tot_z + acc_r / lb_safe) / ((seg_hi - seg_lo) + 1).to(tl.float32)
    tl.store(R + b.to(tl.int64) * stride_rn + offs_d, cast_out(r, R.dtype.element_ty, INTERP), mask=d_ok)
    # β needs the final max/sum: re-read this program's raw t. The barrier makes the stores above
    # (made by whichever threads held them) visible to every thread of the program.
    tl.debug_barrier()
    for c0 in range(seg_lo, seg_hi, BLOCK_S):
        segs = c0 + offs_s
        s_ok = segs < seg_hi
        t = tl.load(TSCR + segs, mask=s_ok, other=float("-inf"))
        tl.store(BETA + segs, tl.exp(t - mb) / lb_safe, mask=s_ok)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _score_config(dtype: torch.dtype, dim: int, width: int):
    """``rows`` mode: (BLOCK_N, BLOCK_A, BLOCK_K, num_warps, num_stages); spill-free on sm_90."""
    half = dtype != torch.float32
    bn = 64 if half else 32
    ba = min(64 if half else 32, max(16, next_pow2(width)))
    bk = min(32, max(16, next_pow2(dim)))
    return bn, ba, bk, 4, 3 if half else 2


# ---------------------------------------------------------------------------------- mode selection
MODES = ("tile", "tile-fused", "rows")
_MODE_CACHE: dict = {}


def _mode():
    """(mode, forced tile config or None) from ``DM2S2_TRITON_MRA`` (see the module docstring)."""
    spec = os.environ.get("DM2S2_TRITON_MRA", "").strip()
    if spec not in _MODE_CACHE:
        mode, _, cfg = spec.partition(":")
        mode = mode.strip() or "tile"
        if mode not in MODES:
            raise ValueError(f"DM2S2_TRITON_MRA mode must be one of {MODES}, got {mode!r}")
        forced = None
        if cfg:
            try:
                forced = tuple(int(t) for t in cfg.split(","))
            except ValueError:
                forced = ()
            if len(forced) != 5 or mode == "rows" or not valid_tiles(*forced[:3], warps=forced[3],
                                                                      stages=forced[4]):
                raise ValueError("DM2S2_TRITON_MRA tile config is 'tile:BLOCK_N,BLOCK_A,BLOCK_K,"
                                 f"num_warps,num_stages', got {spec!r}")
        _MODE_CACHE[spec] = (mode, forced)
    return _MODE_CACHE[spec]


def tile_config(dtype: torch.dtype, n: int, dim: int, width: int, sms: int = 132):
    """``tile`` mode: (BLOCK_N, BLOCK_A, BLOCK_K, num_warps, num_stages) of ``_score_tile_kernel``.

    bf16/fp16: 128x128 tiles (8 warps = two wgmma warpgroups of 64 rows, 64 fp32 accumulators a
    thread) with BLOCK_K 64 and 3 cp.async stages (96 KB smem: 2 programs per SM); when that gives
    fewer programs than SMs (InterMRA's ~1k rows) 64-row tiles at 4 warps instead. fp32 (IEEE dots
    on the FMA units) keeps 64x64x32 tiles. Tiles never exceed the problem (interpreter speed).
    """
    forced = _mode()[1]
    if forced is not None:
        return forced
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


def _scores(x: torch.Tensor, W: torch.Tensor, c: torch.Tensor, v: torch.Tensor, mode: str = "tile"):
    """fp32 scores vᵀ tanh(W x_i + c) as ``(partials [P, n], P)``: the score of row i is
    Σ_j partials[j, i] (P = 1 in ``rows`` mode or for degenerate shapes). Launches nothing for n = 0.
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
    if mode == "rows":
        out = torch.empty((1, n), dtype=torch.float32, device=x.device)
        bn, ba, bk, warps, stages = _score_config(x.dtype, dim, width)
        wrap(_score_kernel)[(cdiv(n, bn),)](
            x, W, c, v, out, n, dim, width, x.stride(0), W.stride(0),
            BLOCK_N=bn, BLOCK_A=ba, BLOCK_K=bk, INTERP=INTERPRET, num_warps=warps, num_stages=stages)
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


_POOL_CACHE: dict = {}


def _pool_launch_config(dim: int, dtype: torch.dtype):
    """(BLOCK_D, BLOCK_N, num_warps, num_stages) of ``_group_pool_kernel``.

    bf16/fp16: 32 KB row blocks (BLOCK_N = 16384 / BLOCK_D), 4 warps, the row loop software-pipelined
    3 deep (H200, ads B=256 bf16 d=384: intra_mra 61.7 µs against 154.6 with the unpipelined
    16-row, 8-warp loop of ``_pool_config``, which fp32 keeps: unmeasured there, and 3 stages of fp32
    blocks would take 192 KB of shared memory). ``DM2S2_TRITON_MRA_POOL="BLOCK_N,num_warps,num_stages"``
    overrides it, for timing variants on a GPU.
    """
    block_d, block_n, warps = _pool_config(dim)
    spec = os.environ.get("DM2S2_TRITON_MRA_POOL", "").strip()
    if not spec:
        if dtype == torch.float32:
            return block_d, block_n, warps, 1
        return block_d, max(2, min(64, 16384 // block_d)), 4, 3
    if spec not in _POOL_CACHE:
        try:
            bn, w, st = (int(t) for t in spec.split(","))
        except ValueError:
            bn = w = st = 0
        if bn < 1 or bn & (bn - 1) or w not in (1, 2, 4, 8, 16) or st < 1:
            raise ValueError("DM2S2_TRITON_MRA_POOL is 'BLOCK_N,num_warps,num_stages' (BLOCK_N a power of "
                             f"two, num_warps 1..16 a power of two, num_stages >= 1), got {spec!r}")
        _POOL_CACHE[spec] = (bn, w, st)
    bn, w, st = _POOL_CACHE[spec]
    return block_d, bn, w, st


def _fused_config(dtype: torch.dtype, dim: int, width: int):
    """(BLOCK_D, BLOCK_N, BLOCK_A, BLOCK_K, num_warps) of the fused kernel (spill-free on sm_90 under
    Triton 3.6 and 3.9; fp32 with BLOCK_K=32 spilled 28 bytes under 3.9)."""
    block_d, block_n, _ = _pool_config(dim)
    half = dtype != torch.float32
    block_a = min(32, max(16, next_pow2(width)))
    block_k = min(64 if half else 16, max(16, next_pow2(dim)))
    return block_d, block_n, block_a, block_k, 8 if block_d >= 256 else 4


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


def _score_mode() -> str:
    return "rows" if _mode()[0] == "rows" else "tile"


def _intra_launch(h: torch.Tensor, cu_seqlens_segment: torch.Tensor, W: torch.Tensor, c: torch.Tensor,
                  v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    h, W = _last_contiguous(h), _last_contiguous(W)
    cu, c, v = (t.contiguous() for t in (cu_seqlens_segment, c, v))  # the kernels read them with unit stride
    return _group_pool(h, cu, *_scores(h, W, c, v, _score_mode()))


def _inter_launch(z: torch.Tensor, cu_segments: torch.Tensor, U: torch.Tensor, g: torch.Tensor,
                  u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    z, U = _last_contiguous(z), _last_contiguous(U)
    cu, g, u = (t.contiguous() for t in (cu_segments, g, u))
    return _group_pool(z, cu, *_scores(z, U, g, u, _score_mode()))


def _fused_launch(h: torch.Tensor, cu_seqlens_segment: torch.Tensor, cu_segments: torch.Tensor,
                  W: torch.Tensor, c: torch.Tensor, v: torch.Tensor, U: torch.Tensor, g: torch.Tensor,
                  u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mode = _mode()[0]
    if mode == "tile":  # IntraMRA then InterMRA: four launches, each parallel over its own items
        z, alpha = _intra_launch(h, cu_seqlens_segment, W, c, v)
        r, beta = _inter_launch(z, cu_segments, U, g, u)
        return z, r, alpha, beta
    h, W, U = _last_contiguous(h), _last_contiguous(W), _last_contiguous(U)
    cu_seqlens_segment, cu_segments, c, v, g, u = (t.contiguous() for t in (cu_seqlens_segment, cu_segments,
                                                                           c, v, g, u))
    n, dim = h.shape
    segments = cu_seqlens_segment.numel() - 1
    samples = cu_segments.numel() - 1
    dev = h.device
    z = torch.empty((segments, dim), dtype=h.dtype, device=dev)
    r = torch.empty((samples, dim), dtype=h.dtype, device=dev)
    alpha = torch.empty(n, dtype=torch.float32, device=dev)
    beta = torch.empty(segments, dtype=torch.float32, device=dev)
    t_scratch = torch.empty(segments, dtype=torch.float32, device=dev)
    if samples == 0:
        return z, r, alpha, beta
    scores, n_part = _scores(h, W, c, v, _score_mode())
    block_d, block_n, block_a, block_k, warps = _fused_config(h.dtype, dim, U.shape[0])
    wrap(_mra_fused_kernel)[(samples,)](
        h, scores, cu_seqlens_segment, cu_segments, U, g, u, z, r, alpha, beta, t_scratch,
        dim, U.shape[0], h.stride(0), U.stride(0), z.stride(0), r.stride(0), n,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_A=block_a, BLOCK_K=block_k, BLOCK_S=SEG_TILE,
        N_PART=n_part, INTERP=INTERPRET, num_warps=warps, num_stages=1)
    return z, r, alpha, beta


_intra_op = triton_op("intra_mra")(_intra_launch)
_inter_op = triton_op("inter_mra")(_inter_launch)
_fused_op = triton_op("mra_pool")(_fused_launch)


def _reason(x, *params, widths=()) -> Optional[str]:
    reason = dtype_reason(x, *params)
    if reason:
        return reason
    if x.shape[1] > MAX_DIM:
        return f"triton MRA kernels hold a row of d <= {MAX_DIM} in registers, got d = {x.shape[1]}"
    if max(widths, default=0) > MAX_SCORE_WIDTH:
        return f"triton MRA kernels take score widths a <= {MAX_SCORE_WIDTH}, got {max(widths)}"
    return None


def _supports_intra(h, cu_seqlens_segment, W, c, v):
    return _reason(h, W, c, v, widths=(W.shape[0],))


def _supports_inter(z, cu_segments, U, g, u):
    return _reason(z, U, g, u, widths=(U.shape[0],))


def _supports_fused(h, cu_seqlens_segment, cu_segments, W, c, v, U, g, u):
    return _reason(h, W, c, v, U, g, u, widths=(W.shape[0], U.shape[0]))


@backends.register_kernel("intra_mra", "triton", supports=_supports_intra)
def intra_mra_triton(h, cu_seqlens_segment, W, c, v):
    fn = _intra_op if compiling() else _intra_launch
    return fn(h, cu_seqlens_segment, W, c, v)


@backends.register_kernel("inter_mra", "triton", supports=_supports_inter)
def inter_mra_triton(z, cu_segments, U, g, u):
    fn = _inter_op if compiling() else _inter_launch
    return fn(z, cu_segments, U, g, u)


@backends.register_kernel("mra_pool", "triton", supports=_supports_fused)
def mra_pool_triton(h, cu_seqlens_segment, cu_segments, W, c, v, U, g, u):
    fn = _fused_op if compiling() else _fused_launch
    return fn(h, cu_seqlens_segment, cu_segments, W, c, v, U, g, u)
