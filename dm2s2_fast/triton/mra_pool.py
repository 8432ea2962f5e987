"""IntraMRA + InterMRA (DESIGN §1, §3): scores, segment softmax, residual pooling.

Per segment (intra) ``α = softmax(vᵀ tanh(W h + c))``, ``z = Σ (1 + α_i) h_i / (L + 1)``; per sample
(inter) ``β = softmax(uᵀ tanh(U z + g))``, ``r = Σ (1 + β_m) z_m / (K + 1)``. Softmax statistics,
pooling accumulators and the weights are fp32; z and r are stored in h's dtype.

Where the scores are computed
-----------------------------
*Element scores* ``s_i = vᵀ tanh(W h_i + c)`` are one preceding GEMM kernel (``_score_kernel``:
row-blocked ``tl.dot`` over ``h @ Wᵀ`` with the ``tanh``, ``·v`` and row-sum fused into the epilogue,
so the [N, a] activations never reach memory; it writes 4 bytes per element). They are not computed
inside the per-sample kernel because they are ~all of the FLOPs (N·a·d): a one-program-per-sample
kernel would run that GEMM on only B programs (256 for the ads batch, < 2 waves of 132 SMs and
imbalanced by sample length) and re-read W [a, d] once per sample, while the row-blocked kernel runs
N/64 programs on the tensor cores at full occupancy.

*Segment scores* ``t_m = uᵀ tanh(U z_m + g)`` are computed inside the fused per-sample kernel, since
z_m is made there: after pooling up to 16 of its segments the kernel reads their z back as one
[16, d] tile and scores them with ``tl.dot`` against ``Uᵀ`` (U is read once per sample, not once per
segment as a mat-vec would).

Kernels
-------
* ``mra_pool``: ``_score_kernel`` then ``_mra_fused_kernel`` (one program per sample: online softmax
  over each segment's elements, then over the sample's segments; writes z, r, α, β in one pass over h).
* ``intra_mra`` / ``inter_mra``: ``_score_kernel`` then ``_group_pool_kernel`` (one program per group).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import backends
from . import INTERPRET, cast_out, compiling, dtype_reason, mma, tanh_f32, triton_op, wrap

MAX_DIM = 1024  # d (the pooled width) held whole in registers; BERT-large's 1024 is the limit
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
def _pool_group(X, SC, WT, start, end, stride_xn, offs_d, d_ok, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Online-softmax residual pooling of rows [start, end) of X by their scores SC.

    Returns the fp32 pooled row Σ (1 + w_i) x_i / (L + 1) (zeros when L = 0) and writes the softmax
    weights w_i to WT[start:end] (a second, cheap pass over the 4-byte scores).
    """
    offs_n = tl.arange(0, BLOCK_N)
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.full((), 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    tot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i0 in range(start, end, BLOCK_N):
        rows = i0 + offs_n
        ok = rows < end
        s = tl.load(SC + rows, mask=ok, other=float("-inf"))
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
        s = tl.load(SC + rows, mask=ok, other=float("-inf"))
        tl.store(WT + rows, tl.exp(s - m) / l_safe, mask=ok)
    return pooled


@triton.jit
def _group_pool_kernel(X, SC, CU, OUT, WT, dim, stride_xn, stride_on,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INTERP: tl.constexpr):
    g = tl.program_id(0)
    start = tl.load(CU + g)
    end = tl.load(CU + g + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    pooled = _pool_group(X, SC, WT, start, end, stride_xn, offs_d, d_ok, BLOCK_N, BLOCK_D)
    tl.store(OUT + g.to(tl.int64) * stride_on + offs_d, cast_out(pooled, OUT.dtype.element_ty, INTERP), mask=d_ok)


@triton.jit
def _mra_fused_kernel(H, SC, CU_SEG, CU_SMP, U, G, UV, Z, R, ALPHA, BETA, TSCR,
                      dim, width, stride_hn, stride_ua, stride_zn, stride_rn,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, INTERP: tl.constexpr):
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
            z = _pool_group(H, SC, ALPHA, start, end, stride_hn, offs_d, d_ok, BLOCK_N, BLOCK_D)
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
    """(BLOCK_N, BLOCK_A, BLOCK_K, num_warps, num_stages); spill-free on sm_90 (bf16 168 regs)."""
    half = dtype != torch.float32
    bn = 64 if half else 32
    ba = min(64 if half else 32, max(16, triton.next_power_of_2(width)))
    bk = min(32, max(16, triton.next_power_of_2(dim)))
    return bn, ba, bk, 4, 3 if half else 2


def _scores(x: torch.Tensor, W: torch.Tensor, c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp32 [n] scores vᵀ tanh(W x_i + c) (launches nothing for n = 0)."""
    n, dim = x.shape
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    width = W.shape[0]
    if width == 0 or dim == 0:
        # degenerate shapes: no score columns (s = 0), or no features (s = vᵀ tanh(c))
        return out.zero_() if width == 0 else out.copy_((torch.tanh(c.float()) @ v.float()).expand(n))
    bn, ba, bk, warps, stages = _score_config(x.dtype, dim, width)
    wrap(_score_kernel)[(triton.cdiv(n, bn),)](
        x, W, c, v, out, n, dim, width, x.stride(0), W.stride(0),
        BLOCK_N=bn, BLOCK_A=ba, BLOCK_K=bk, INTERP=INTERPRET, num_warps=warps, num_stages=stages)
    return out


def _pool_config(dim: int):
    block_d = max(16, triton.next_power_of_2(dim))
    block_n = max(2, min(64, 8192 // block_d))
    warps = 4 if block_d <= 256 else 8
    return block_d, block_n, warps


def _fused_config(dtype: torch.dtype, dim: int, width: int):
    """(BLOCK_D, BLOCK_N, BLOCK_A, BLOCK_K, num_warps) of the fused kernel (spill-free on sm_90)."""
    block_d, block_n, _ = _pool_config(dim)
    half = dtype != torch.float32
    block_a = min(32, max(16, triton.next_power_of_2(width)))
    block_k = min(64 if half else 32, max(16, triton.next_power_of_2(dim)))
    return block_d, block_n, block_a, block_k, 8 if block_d >= 256 else 4


def _group_pool(x: torch.Tensor, cu: torch.Tensor, scores: torch.Tensor):
    groups = cu.numel() - 1
    dim = x.shape[1]
    pooled = torch.empty((groups, dim), dtype=x.dtype, device=x.device)
    weights = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if groups > 0:
        block_d, block_n, warps = _pool_config(dim)
        wrap(_group_pool_kernel)[(groups,)](
            x, scores, cu, pooled, weights, dim, x.stride(0), pooled.stride(0),
            BLOCK_N=block_n, BLOCK_D=block_d, INTERP=INTERPRET, num_warps=warps, num_stages=1)
    return pooled, weights


def _intra_launch(h: torch.Tensor, cu_seqlens_segment: torch.Tensor, W: torch.Tensor, c: torch.Tensor,
                  v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    h, W = _last_contiguous(h), _last_contiguous(W)
    return _group_pool(h, cu_seqlens_segment, _scores(h, W, c, v))


def _inter_launch(z: torch.Tensor, cu_segments: torch.Tensor, U: torch.Tensor, g: torch.Tensor,
                  u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    z, U = _last_contiguous(z), _last_contiguous(U)
    return _group_pool(z, cu_segments, _scores(z, U, g, u))


def _fused_launch(h: torch.Tensor, cu_seqlens_segment: torch.Tensor, cu_segments: torch.Tensor,
                  W: torch.Tensor, c: torch.Tensor, v: torch.Tensor, U: torch.Tensor, g: torch.Tensor,
                  u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h, W, U = _last_contiguous(h), _last_contiguous(W), _last_contiguous(U)
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
    scores = _scores(h, W, c, v)
    block_d, block_n, block_a, block_k, warps = _fused_config(h.dtype, dim, U.shape[0])
    wrap(_mra_fused_kernel)[(samples,)](
        h, scores, cu_seqlens_segment, cu_segments, U, g, u, z, r, alpha, beta, t_scratch,
        dim, U.shape[0], h.stride(0), U.stride(0), z.stride(0), r.stride(0),
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_A=block_a, BLOCK_K=block_k, BLOCK_S=SEG_TILE,
        INTERP=INTERPRET, num_warps=warps, num_stages=1)
    return z, r, alpha, beta


_intra_op = triton_op("intra_mra")(_intra_launch)
_inter_op = triton_op("inter_mra")(_inter_launch)
_fused_op = triton_op("mra_pool")(_fused_launch)


def _reason(x, *params) -> Optional[str]:
    reason = dtype_reason(x, *params)
    if reason:
        return reason
    if x.shape[1] > MAX_DIM:
        return f"triton MRA kernels hold a row of d <= {MAX_DIM} in registers, got d = {x.shape[1]}"
    return None


def _supports_intra(h, cu_seqlens_segment, W, c, v):
    return _reason(h, W, c, v)


def _supports_inter(z, cu_segments, U, g, u):
    return _reason(z, U, g, u)


def _supports_fused(h, cu_seqlens_segment, cu_segments, W, c, v, U, g, u):
    return _reason(h, W, c, v, U, g, u)


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
