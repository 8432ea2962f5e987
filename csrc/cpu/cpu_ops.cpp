// CPU implementations of the dm2s2_fast ops: argument checks, output allocation, threading
// (at::parallel_for over torch's OpenMP pool) and run-time selection of the kernel table
// (AVX-512 set_attention + AVX2/FMA rest, or AVX2/FMA, or the portable one, by what the running
// CPU has; DM2S2_FAST_CPU_ISA=avx2|generic or the _cpu_isa op picks a lower one). The arithmetic
// is in the torch-free kernels_*.cpp. GEMMs (the MRA score projections) go to torch's BLAS via
// at::addmm.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "kernels.h"

namespace dm2s2_fast {
namespace cpu {

// ------------------------------------------------------------------ kernel table selection
namespace {

// (__builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 register state.)
bool cpu_has_avx2_fma() {
#if defined(DM2S2_FAST_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(DM2S2_FAST_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

const KernelTable* pick(const char* request) {
  if (request == nullptr || !*request || std::strcmp(request, "auto") == 0) {
#if defined(DM2S2_FAST_HAVE_AVX512)
    if (cpu_has_avx512()) return &avx512_kernels();
#endif
#if defined(DM2S2_FAST_HAVE_AVX2)
    if (cpu_has_avx2_fma()) return &avx2_kernels();
#endif
    return &generic_kernels();
  }
  if (std::strcmp(request, "generic") == 0) return &generic_kernels();
#if defined(DM2S2_FAST_HAVE_AVX2)
  if (std::strcmp(request, "avx2") == 0) return cpu_has_avx2_fma() ? &avx2_kernels() : nullptr;
#endif
#if defined(DM2S2_FAST_HAVE_AVX512)
  if (std::strcmp(request, "avx512") == 0) return cpu_has_avx512() ? &avx512_kernels() : nullptr;
#endif
  return nullptr;
}

std::atomic<const KernelTable*> g_active{nullptr};

}  // namespace

const KernelTable& active_kernels() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (t == nullptr) {
    // DM2S2_FAST_CPU_ISA=avx2|generic caps the kernels; an unusable value means auto.
    t = pick(std::getenv("DM2S2_FAST_CPU_ISA"));
    if (t == nullptr) t = pick("auto");
    g_active.store(t, std::memory_order_release);
  }
  return *t;
}

const char* select_kernels(const char* request) {
  if (request != nullptr && *request) {
    const KernelTable* t = pick(request);
    if (t == nullptr) return nullptr;
    g_active.store(t, std::memory_order_release);
  }
  return active_kernels().name;
}

namespace {

// ------------------------------------------------------------------ helpers

void check_f32(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "dm2s2_fast::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "dm2s2_fast::", op, ": the cpp kernels are fp32 only; ", name,
              " is ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "dm2s2_fast::", op, ": ", name, " must have ", dim, " dims, got shape ", t.sizes());
}

void check_vec(const at::Tensor& t, const char* op, const char* name, int64_t n) {
  check_f32(t, op, name, 1);
  TORCH_CHECK(t.size(0) == n, "dm2s2_fast::", op, ": ", name, " must have ", n, " entries, got ", t.size(0));
}

// The kernels need a unit stride in the last dim (any stride between rows).
at::Tensor unit_last(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// 1-D int32 offsets from 0 to `total`, non-decreasing; returns the group count, sets `longest`.
int64_t check_offsets(const at::Tensor& cu, const char* op, const char* name, int64_t total, int64_t* longest) {
  TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1,
              "dm2s2_fast::", op, ": ", name, " must be a 1-D int32 CPU tensor of G+1 offsets");
  TORCH_CHECK(cu.is_contiguous(), "dm2s2_fast::", op, ": ", name, " must be contiguous");
  const int32_t* p = cu.data_ptr<int32_t>();
  const int64_t G = cu.numel() - 1;
  TORCH_CHECK(p[0] == 0 && p[G] == total, "dm2s2_fast::", op, ": ", name, " must run from 0 to ", total,
              ", got ", p[0], "..", p[G]);
  int64_t big = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t len = static_cast<int64_t>(p[g + 1]) - p[g];
    TORCH_CHECK(len >= 0, "dm2s2_fast::", op, ": ", name, " must be non-decreasing (entry ", g + 1, ")");
    big = std::max(big, len);
  }
  if (longest) *longest = big;
  return G;
}

// Per-thread scratch, 64-byte aligned, grown on demand and kept (no malloc per call).
float* thread_scratch(int64_t floats) {
  thread_local std::unique_ptr<float[]> buf;
  thread_local int64_t cap = 0;
  if (cap < floats + 16) {
    cap = floats + 16;
    buf.reset(new float[static_cast<size_t>(cap)]);
  }
  auto addr = reinterpret_cast<std::uintptr_t>(buf.get());
  return reinterpret_cast<float*>((addr + 63) & ~std::uintptr_t{63});
}

// Tasks [0, ntasks) pulled from a shared counter by one worker per thread (dynamic balance for
// uneven tasks); each worker gets its own scratch.
template <typename F>
void run_dynamic(int64_t ntasks, int64_t scratch_floats, const F& f) {
  if (ntasks <= 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), ntasks);
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    float* scratch = thread_scratch(scratch_floats);
    for (;;) {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= ntasks) break;
      f(t, scratch);
    }
  };
  if (workers <= 1) {
    worker(0, 1);
  } else {
    at::parallel_for(0, workers, 1, worker);
  }
}

// A fresh output of many MB comes from mmap (glibc's threshold tops out at 32 MB) and every 4 KB
// page faults on first touch, which costs more than the op itself (bias_gelu on the FFN
// activations). Asking for transparent huge pages on it (THP "madvise" mode) makes that ~500x
// fewer faults. Advisory only: nothing changes where THP is off.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  const auto nbytes = static_cast<std::uintptr_t>(t.nbytes());
  if (nbytes < 4 * kHuge) return;
  const auto begin = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const std::uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + nbytes) & ~(kHuge - 1);
  if (hi > lo && std::getenv("DM2S2_FAST_NO_THP") == nullptr) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

// Rows per parallel chunk so that a chunk has at least ~`elems` elements of work.
int64_t grain_rows(int64_t row_elems, int64_t elems) {
  return std::max<int64_t>(1, elems / std::max<int64_t>(1, row_elems));
}

Index as_index(const at::Tensor& t) {
  Index ix;
  ix.ptr = t.data_ptr();
  ix.is64 = t.scalar_type() == at::kLong;
  return ix;
}

at::Tensor check_index(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && (t.scalar_type() == at::kInt || t.scalar_type() == at::kLong),
              "dm2s2_fast::embed_layernorm: ", name, " must be a 1-D int32/int64 CPU tensor");
  TORCH_CHECK(t.numel() == n, "dm2s2_fast::embed_layernorm: ", name, " must have ", n, " entries, got ", t.numel());
  return t.contiguous();
}

// ------------------------------------------------------------------ ops

at::Tensor set_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         const at::Tensor& cu_in, int64_t max_seqlen, double scale) {
  const char* op = "set_attention";
  check_f32(q_in, op, "q", 3);
  check_f32(k_in, op, "k", 3);
  check_f32(v_in, op, "v", 3);
  TORCH_CHECK(k_in.sizes() == q_in.sizes() && v_in.sizes() == q_in.sizes(),
              "dm2s2_fast::set_attention: q, k, v must share a shape, got ", q_in.sizes(), ", ", k_in.sizes(),
              ", ", v_in.sizes());
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const at::Tensor cu = cu_in.contiguous();
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  int64_t longest = 0;
  const int64_t G = check_offsets(cu, op, "cu_seqlens", N, &longest);
  TORCH_CHECK(max_seqlen >= longest, "dm2s2_fast::set_attention: max_seqlen ", max_seqlen,
              " is shorter than the longest group (", longest, ")");
  at::Tensor out = at::empty({N, H, D}, q.options());
  if (N == 0 || H == 0 || D == 0) return out;
  advise_huge_pages(out);

  AttnParams p;
  p.q = q.data_ptr<float>();
  p.k = k.data_ptr<float>();
  p.v = v.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.q_row = q.stride(0), p.q_head = q.stride(1);
  p.k_row = k.stride(0), p.k_head = k.stride(1);
  p.v_row = v.stride(0), p.v_head = v.stride(1);
  p.o_row = out.stride(0), p.o_head = out.stride(1);
  p.D = D;
  p.scale = static_cast<float>(scale);

  // Work items: (group, block of at most kAttnQBlock query rows), largest first (LPT order), each
  // run for every head; workers pull (item, head) tasks off a shared counter.
  struct Item {
    int64_t g0, g1, q0, q1;
  };
  std::vector<Item> items;
  items.reserve(static_cast<size_t>(G));
  const int32_t* c = cu.data_ptr<int32_t>();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t g0 = c[g], g1 = c[g + 1], L = g1 - g0;
    if (L == 0) continue;
    const int64_t blocks = (L + kAttnQBlock - 1) / kAttnQBlock, rows = (L + blocks - 1) / blocks;
    for (int64_t q0 = g0; q0 < g1; q0 += rows) items.push_back({g0, g1, q0, std::min(q0 + rows, g1)});
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return (a.q1 - a.q0) * (a.g1 - a.g0) > (b.q1 - b.q0) * (b.g1 - b.g0);
  });
  const KernelTable& kern = active_kernels();
  run_dynamic(static_cast<int64_t>(items.size()) * H, attn_scratch_floats(longest, D),
              [&](int64_t t, float* scratch) {
                const Item& it = items[static_cast<size_t>(t / H)];
                kern.attention(p, it.g0, it.g1, it.q0, it.q1, t % H, scratch);
              });
  return out;
}

at::Tensor add_layernorm(const at::Tensor& x_in, const at::Tensor& r_in, const at::Tensor& w_in,
                         const at::Tensor& b_in, double eps) {
  const char* op = "add_layernorm";
  check_f32(x_in, op, "x", 2);
  check_f32(r_in, op, "residual", 2);
  TORCH_CHECK(r_in.sizes() == x_in.sizes(), "dm2s2_fast::add_layernorm: residual must have shape ", x_in.sizes(),
              ", got ", r_in.sizes());
  const int64_t N = x_in.size(0), d = x_in.size(1);
  check_vec(w_in, op, "weight", d);
  check_vec(b_in, op, "bias", d);
  const at::Tensor x = unit_last(x_in), r = unit_last(r_in), w = w_in.contiguous(), b = b_in.contiguous();
  at::Tensor y = at::empty({N, d}, x.options());
  if (N == 0 || d == 0) return y;
  advise_huge_pages(y);
  const float *xp = x.data_ptr<float>(), *rp = r.data_ptr<float>(), *wp = w.data_ptr<float>(),
              *bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xs = x.stride(0), rs = r.stride(0), ys = y.stride(0);
  const float e = static_cast<float>(eps);
  const KernelTable& kern = active_kernels();
  at::parallel_for(0, N, grain_rows(d, 32768), [&](int64_t begin, int64_t end) {
    kern.add_layernorm(xp, xs, rp, rs, wp, bp, yp, ys, d, e, begin, end);
  });
  return y;
}

at::Tensor bias_gelu(const at::Tensor& x_in, const at::Tensor& b_in) {
  const char* op = "bias_gelu";
  check_f32(x_in, op, "x", 2);
  const int64_t N = x_in.size(0), f = x_in.size(1);
  check_vec(b_in, op, "bias", f);
  const at::Tensor x = unit_last(x_in), b = b_in.contiguous();
  at::Tensor y = at::empty({N, f}, x.options());
  if (N == 0 || f == 0) return y;
  advise_huge_pages(y);
  const float *xp = x.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xs = x.stride(0), ys = y.stride(0);
  const KernelTable& kern = active_kernels();
  at::parallel_for(0, N, grain_rows(f, 16384), [&](int64_t begin, int64_t end) {
    kern.bias_gelu(xp, xs, bp, yp, ys, f, begin, end);
  });
  return y;
}

// ------------------------------------------------------------------ linear layers
// The GEMM output is allocated here and advised onto huge pages before BLAS first touches it:
// fresh 4 KB pages fault on first touch, which cost MKL's FFN GEMM (7121 x 384 -> 1536, fp32)
// 37 ms against 29 (2 cores). The epilogue then runs in place on that buffer (the kernels read
// each element before writing it), so no second output is allocated and faulted in.
at::Tensor gemm_into_new(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias) {
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  advise_huge_pages(y);
  if (bias != nullptr)
    at::addmm_out(y, *bias, x, w.t());
  else
    at::mm_out(y, x, w.t());
  return y;
}

void check_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const char* op) {
  check_f32(x, op, "x", 2);
  check_f32(w, op, "weight", 2);
  TORCH_CHECK(w.size(1) == x.size(1), "dm2s2_fast::", op, ": weight must have shape (", w.size(0), ", ",
              x.size(1), "), got ", w.sizes());
  check_vec(b, op, "bias", w.size(0));
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  check_linear(x, w, b, "linear");
  return gemm_into_new(x, w, &b);
}

at::Tensor linear_bias_gelu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b_in) {
  check_linear(x, w, b_in, "linear_bias_gelu");
  at::Tensor y = gemm_into_new(x, w, nullptr);
  const int64_t N = y.size(0), f = y.size(1);
  if (N == 0 || f == 0) return y;
  const at::Tensor b = b_in.contiguous();
  const float* bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const KernelTable& kern = active_kernels();
  at::parallel_for(0, N, grain_rows(f, 16384), [&](int64_t begin, int64_t end) {
    kern.bias_gelu(yp, f, bp, yp, f, f, begin, end);
  });
  return y;
}

at::Tensor linear_add_layernorm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                const at::Tensor& r_in, const at::Tensor& lw_in, const at::Tensor& lb_in,
                                double eps) {
  const char* op = "linear_add_layernorm";
  check_linear(x, w, b, op);
  const int64_t N = x.size(0), d = w.size(0);
  check_f32(r_in, op, "residual", 2);
  TORCH_CHECK(r_in.size(0) == N && r_in.size(1) == d, "dm2s2_fast::", op, ": residual must have shape (", N,
              ", ", d, "), got ", r_in.sizes());
  check_vec(lw_in, op, "ln_weight", d);
  check_vec(lb_in, op, "ln_bias", d);
  at::Tensor y = gemm_into_new(x, w, &b);
  if (N == 0 || d == 0) return y;
  const at::Tensor r = unit_last(r_in), lw = lw_in.contiguous(), lb = lb_in.contiguous();
  const float *rp = r.data_ptr<float>(), *wp = lw.data_ptr<float>(), *bp = lb.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t rs = r.stride(0);
  const float e = static_cast<float>(eps);
  const KernelTable& kern = active_kernels();
  at::parallel_for(0, N, grain_rows(d, 32768), [&](int64_t begin, int64_t end) {
    kern.add_layernorm(yp, d, rp, rs, wp, bp, yp, d, d, e, begin, end);
  });
  return y;
}

void embed_layernorm(const at::Tensor& positions_in, const at::Tensor& type_ids_in, const at::Tensor& pos_in,
                     const at::Tensor& type_in, const at::Tensor& w_in, const at::Tensor& b_in, double eps,
                     const std::optional<at::Tensor>& ids_in, const std::optional<at::Tensor>& table_in,
                     const std::optional<at::Tensor>& dense_in, at::Tensor& out, const at::Tensor& out_rows_in) {
  const char* op = "embed_layernorm";
  check_f32(pos_in, op, "position_table", 2);
  check_f32(type_in, op, "type_table", 2);
  const int64_t d = pos_in.size(1);
  TORCH_CHECK(type_in.size(1) == d, "dm2s2_fast::embed_layernorm: type_table must have ", d, " columns");
  check_vec(w_in, op, "weight", d);
  check_vec(b_in, op, "bias", d);
  check_f32(out, op, "out", 2);
  TORCH_CHECK(out.size(1) == d, "dm2s2_fast::embed_layernorm: out must have ", d, " columns, got ", out.size(1));
  TORCH_CHECK(d <= 1 || out.stride(1) == 1, "dm2s2_fast::embed_layernorm: out needs a unit column stride");
  TORCH_CHECK(out.size(0) <= 1 || out.stride(0) >= d, "dm2s2_fast::embed_layernorm: out rows overlap");
  const bool has_ids = ids_in.has_value() && ids_in->defined();
  const bool has_table = table_in.has_value() && table_in->defined();
  const bool has_dense = dense_in.has_value() && dense_in->defined();
  TORCH_CHECK(has_ids == has_table && has_ids != has_dense,
              "dm2s2_fast::embed_layernorm: give either ids and table, or dense");
  const int64_t n = positions_in.numel();
  const at::Tensor positions = check_index(positions_in, "positions", n);
  const at::Tensor type_ids = check_index(type_ids_in, "type_ids", n);
  const at::Tensor out_rows = check_index(out_rows_in, "out_rows", n);
  at::Tensor ids, table, dense;
  if (has_ids) {
    ids = check_index(*ids_in, "ids", n);
    check_f32(*table_in, op, "table", 2);
    TORCH_CHECK(table_in->size(1) == d, "dm2s2_fast::embed_layernorm: table must have ", d, " columns");
    table = unit_last(*table_in);
  } else {
    check_f32(*dense_in, op, "dense", 2);
    TORCH_CHECK(dense_in->size(0) == n && dense_in->size(1) == d, "dm2s2_fast::embed_layernorm: dense must have shape [",
                n, ", ", d, "], got ", dense_in->sizes());
    dense = unit_last(*dense_in);
  }
  if (n == 0 || d == 0) return;
  const at::Tensor pos = unit_last(pos_in), typ = unit_last(type_in), w = w_in.contiguous(), b = b_in.contiguous();
  EmbedParams p;
  p.table = has_ids ? table.data_ptr<float>() : nullptr;
  p.table_rows = has_ids ? table.size(0) : 0;
  p.table_row = has_ids ? table.stride(0) : 0;
  if (has_ids) p.ids = as_index(ids);
  p.dense = has_dense ? dense.data_ptr<float>() : nullptr;
  p.dense_row = has_dense ? dense.stride(0) : 0;
  p.pos_table = pos.data_ptr<float>();
  p.pos_rows = pos.size(0);
  p.pos_row = pos.stride(0);
  p.positions = as_index(positions);
  p.type_table = typ.data_ptr<float>();
  p.type_rows = typ.size(0);
  p.type_row = typ.stride(0);
  p.type_ids = as_index(type_ids);
  p.weight = w.data_ptr<float>();
  p.bias = b.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.out_rows_total = out.size(0);
  p.out_row = out.stride(0);
  p.out_rows = as_index(out_rows);
  p.d = d;
  p.eps = static_cast<float>(eps);
  const KernelTable& kern = active_kernels();
  std::atomic<int64_t> bad{n};
  at::parallel_for(0, n, grain_rows(d, 16384), [&](int64_t begin, int64_t end) {
    const int64_t i = kern.embed_layernorm(p, begin, end);
    if (i >= 0) {
      int64_t cur = bad.load();
      while (i < cur && !bad.compare_exchange_weak(cur, i)) {
      }
    }
  });
  const int64_t i = bad.load();
  TORCH_CHECK(i == n, "dm2s2_fast::embed_layernorm: element ", i, " has an index out of range (id ",
              has_ids ? as_index(ids)[i] : -1, ", position ", p.positions[i], ", type ", p.type_ids[i],
              ", out row ", p.out_rows[i], ")");
}

// One level of residual-attention pooling over groups of x's rows.
std::tuple<at::Tensor, at::Tensor> mra_level(const at::Tensor& x_in, const at::Tensor& cu_in, const at::Tensor& W,
                                             const at::Tensor& c, const at::Tensor& v, const char* op,
                                             const char* x_name, const char* cu_name) {
  check_f32(x_in, op, x_name, 2);
  const int64_t n = x_in.size(0), d = x_in.size(1);
  check_f32(W, op, "W", 2);
  const int64_t a = W.size(0);
  TORCH_CHECK(W.size(1) == d, "dm2s2_fast::", op, ": W must have shape [", a, ", ", d, "], got ", W.sizes());
  check_vec(c, op, "c", a);
  check_vec(v, op, "v", a);
  const at::Tensor cu = cu_in.contiguous();
  const int64_t G = check_offsets(cu, op, cu_name, n, nullptr);
  at::Tensor pooled = at::empty({G, d}, x_in.options());
  at::Tensor weights = at::empty({n}, x_in.options().dtype(at::kFloat));
  if (G == 0) return {pooled, weights};  // then n == 0 too
  const at::Tensor x = unit_last(x_in), vc = v.contiguous();
  // W x + c on torch's BLAS; tanh, the dot with v, the group softmax and the pooling are fused.
  const at::Tensor pre = n > 0 ? at::addmm(c, x, W.t()) : at::empty({0, a}, x.options());
  const float *xp = x.data_ptr<float>(), *pp = pre.data_ptr<float>(), *vp = vc.data_ptr<float>();
  const int64_t xs = x.stride(0), ps = a > 0 ? pre.stride(0) : 0;
  const int32_t* cp = cu.data_ptr<int32_t>();
  float *wp = weights.data_ptr<float>(), *zp = pooled.data_ptr<float>();
  const int64_t zs = pooled.stride(0);
  const KernelTable& kern = active_kernels();
  // Static chunks of groups; grain so that tiny batches stay on one thread.
  const int64_t per_group = std::max<int64_t>(1, n / G) * (a + d);
  at::parallel_for(0, G, grain_rows(per_group, 65536), [&](int64_t begin, int64_t end) {
    kern.mra_pool(xp, xs, pp, ps, vp, a, cp, wp, zp, zs, d, begin, end);
  });
  return {pooled, weights};
}

std::tuple<at::Tensor, at::Tensor> intra_mra(const at::Tensor& h, const at::Tensor& cu, const at::Tensor& W,
                                             const at::Tensor& c, const at::Tensor& v) {
  return mra_level(h, cu, W, c, v, "intra_mra", "h", "cu_seqlens_segment");
}

std::tuple<at::Tensor, at::Tensor> inter_mra(const at::Tensor& z, const at::Tensor& cu, const at::Tensor& U,
                                             const at::Tensor& g, const at::Tensor& u) {
  return mra_level(z, cu, U, g, u, "inter_mra", "z", "cu_segments");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mra_pool(
    const at::Tensor& h, const at::Tensor& cu_seg, const at::Tensor& cu_segments, const at::Tensor& W,
    const at::Tensor& c, const at::Tensor& v, const at::Tensor& U, const at::Tensor& g, const at::Tensor& u) {
  auto [z, alpha] = mra_level(h, cu_seg, W, c, v, "mra_pool", "h", "cu_seqlens_segment");
  auto [r, beta] = mra_level(z, cu_segments, U, g, u, "mra_pool", "z", "cu_segments");
  return {z, r, alpha, beta};
}

}  // namespace
}  // namespace cpu
}  // namespace dm2s2_fast

TORCH_LIBRARY_IMPL(dm2s2_fast, CPU, m) {
  using namespace dm2s2_fast::cpu;
  m.impl("set_attention", &set_attention);
  m.impl("add_layernorm", &add_layernorm);
  m.impl("bias_gelu", &bias_gelu);
  m.impl("linear", &linear);
  m.impl("linear_bias_gelu", &linear_bias_gelu);
  m.impl("linear_add_layernorm", &linear_add_layernorm);
  m.impl("embed_layernorm", &embed_layernorm);
  m.impl("intra_mra", &intra_mra);
  m.impl("inter_mra", &inter_mra);
  m.impl("mra_pool", &mra_pool);
}
