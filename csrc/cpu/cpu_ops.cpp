// CPU implementations of the dm2s2_fast ops: argument checks, output allocation, threading
// (at::parallel_for over torch's OpenMP pool) and run-time selection of the kernel table (by what
// the running CPU and OS support: AMX, AVX512_BF16, AVX-512, AVX2/FMA/F16C or the portable one;
// the _cpu_isa op, which Tuning(cpu_isa=...) calls, picks a lower one). The arithmetic is in the
// torch-free kernels_*.cpp. Activations may be fp32, bf16 or fp16 (one dtype per call, the model's);
// the kernels compute in fp32. GEMMs (the MRA score projections) go to torch's BLAS via at::addmm,
// in fp32 (half-precision inputs are widened first: the scores feed fp32 softmax weights).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
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
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include "kernels.h"

namespace dm2s2_fast {
namespace cpu {

// ------------------------------------------------------------------ kernel table selection
namespace {

struct Features {
  bool avx2 = false, fma = false, f16c = false, avx512f = false, avx512bw = false, avx512vl = false,
       avx512bf16 = false, avx512fp16 = false, amx_tile = false, amx_bf16 = false;
};

// (__builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 register state; the AMX
// tile state is asked for separately, amx_ready().)
Features detect() {
  Features f;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
#if (defined(__clang__) && __clang_major__ >= 16) || (!defined(__clang__) && __GNUC__ >= 12)
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
  f.avx512fp16 = __builtin_cpu_supports("avx512fp16");
  f.amx_tile = __builtin_cpu_supports("amx-tile");
  f.amx_bf16 = __builtin_cpu_supports("amx-bf16");
#endif
#endif
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

bool can_avx2() {
#if defined(DM2S2_FAST_HAVE_AVX2)
  const Features& f = features();
  return f.avx2 && f.fma && f.f16c;
#else
  return false;
#endif
}

bool can_avx512() {
#if defined(DM2S2_FAST_HAVE_AVX512)
  const Features& f = features();
  return can_avx2() && f.avx512f && f.avx512bw && f.avx512vl;
#else
  return false;
#endif
}

bool can_avx512bf16() {
#if defined(DM2S2_FAST_HAVE_AVX512BF16)
  const Features& f = features();
  return can_avx512() && f.avx512bw && f.avx512vl && f.avx512bf16;
#else
  return false;
#endif
}

bool can_amx() {
#if defined(DM2S2_FAST_HAVE_AMX)
  const Features& f = features();
  return can_avx512bf16() && f.amx_tile && f.amx_bf16 && amx_ready();
#else
  return false;
#endif
}

// On a CPU with AVX512_BF16 but no AMX, "auto" takes the avx512_bf16 table only if its bf16
// attention (vdpbf16ps: 32 bf16 products an instruction) beats the avx512 table's (fp32 FMAs on
// converted values): that depends on the core — Sapphire Rapids issues vdpbf16ps at half the FMA
// rate (ads B=64, one thread: 19.3 ms against 15.5), Zen 4 issues it at the FMA rate with twice the
// products. Timed once per process on a synthetic group (128 rows, 4 heads, D = 32; ~10 ms).
bool bf16_dot_faster() {
#if defined(DM2S2_FAST_HAVE_AVX512BF16)
  static const bool faster = [] {
    constexpr int64_t L = 128, H = 4, D = 32;
    std::vector<uint16_t> qkv(static_cast<size_t>(L * 3 * H * D)), out(static_cast<size_t>(L * H * D));
    uint32_t x = 12345u;
    for (auto& e : qkv) {  // bf16 values in [-2, 2): sign, exponent 126..127, random mantissa
      x = x * 1664525u + 1013904223u;
      e = static_cast<uint16_t>(((x >> 31) << 15) | ((126u + ((x >> 30) & 1u)) << 7) | ((x >> 16) & 0x7Fu));
    }
    std::unique_ptr<float[]> buf(new float[static_cast<size_t>(attn_scratch_floats(L, D) + 16)]);
    float* scratch = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(buf.get()) + 63) & ~std::uintptr_t{63});
    AttnParams p;
    p.q = qkv.data();
    p.k = qkv.data() + H * D;
    p.v = qkv.data() + 2 * H * D;
    p.out = out.data();
    p.q_row = p.k_row = p.v_row = 3 * H * D;
    p.q_head = p.k_head = p.v_head = D;
    p.o_row = H * D;
    p.o_head = D;
    p.D = D;
    p.scale = 0.17677669f;
    auto best = [&](AttentionFn f) {
      double t_best = 1e30;
      for (int rep = 0; rep < 7; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int64_t h = 0; h < H; ++h) f(p, 0, L, 0, L, h, scratch);
        const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        t_best = std::min(t_best, t);
      }
      return t_best;
    };
    const AttentionFn dot = avx512bf16_kernels().attention[kBF16], fma = avx512_kernels().attention[kBF16];
    best(dot);  // warm both
    best(fma);
    return best(dot) < best(fma);
  }();
  return faster;
#else
  return false;
#endif
}

const KernelTable* pick(const char* request) {
  const bool any = request == nullptr || !*request || std::strcmp(request, "auto") == 0;
#if defined(DM2S2_FAST_HAVE_AMX)
  if ((any || std::strcmp(request, "amx") == 0) && can_amx()) return &amx_kernels();
  if (!any && std::strcmp(request, "amx") == 0) return nullptr;
#endif
#if defined(DM2S2_FAST_HAVE_AVX512BF16)
  if (any && can_avx512bf16() && bf16_dot_faster()) return &avx512bf16_kernels();
  if (!any && std::strcmp(request, "avx512_bf16") == 0 && can_avx512bf16()) return &avx512bf16_kernels();
  if (!any && std::strcmp(request, "avx512_bf16") == 0) return nullptr;
#endif
#if defined(DM2S2_FAST_HAVE_AVX512)
  if ((any || std::strcmp(request, "avx512") == 0) && can_avx512()) return &avx512_kernels();
  if (!any && std::strcmp(request, "avx512") == 0) return nullptr;
#endif
#if defined(DM2S2_FAST_HAVE_AVX2)
  if ((any || std::strcmp(request, "avx2") == 0) && can_avx2()) return &avx2_kernels();
  if (!any && std::strcmp(request, "avx2") == 0) return nullptr;
#endif
  if (any || std::strcmp(request, "generic") == 0) return &generic_kernels();
  return nullptr;
}

std::atomic<const KernelTable*> g_active{nullptr};

}  // namespace

const KernelTable& active_kernels() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = pick("auto");
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

int bf16_dot_faster_probe() { return can_avx512bf16() ? (bf16_dot_faster() ? 1 : 0) : -1; }

const char* cpu_features() {
  static const std::string s = [] {
    const Features& f = features();
    std::string out;
    auto add = [&](bool on, const char* name) {
      if (on) out += (out.empty() ? "" : " ") + std::string(name);
    };
    add(f.avx2, "avx2");
    add(f.fma, "fma");
    add(f.f16c, "f16c");
    add(f.avx512f, "avx512f");
    add(f.avx512bw, "avx512bw");
    add(f.avx512vl, "avx512vl");
    add(f.avx512bf16, "avx512_bf16");
    add(f.avx512fp16, "avx512_fp16");
    add(f.amx_tile, "amx_tile");
    add(f.amx_bf16, "amx_bf16");
#if defined(DM2S2_FAST_HAVE_AMX)
    if (f.amx_tile && f.amx_bf16 && !amx_ready()) out += " (amx: tile state refused by the OS)";
#endif
    return out.empty() ? std::string("baseline") : out;
  }();
  return s.c_str();
}

namespace {

// ------------------------------------------------------------------ helpers

DType dtype_index(at::ScalarType s) {
  return s == at::kBFloat16 ? kBF16 : s == at::kHalf ? kF16 : kF32;
}

// A float tensor of `dim` dims on the CPU; its dtype must be `want` (the call's activation dtype),
// or, when `want` is Undefined, one the kernels take (fp32, bf16, fp16).
void check_float(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                 at::ScalarType want = at::ScalarType::Undefined) {
  TORCH_CHECK(t.device().is_cpu(), "dm2s2_fast::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  const at::ScalarType s = t.scalar_type();
  if (want == at::ScalarType::Undefined) {
    TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, "dm2s2_fast::", op,
                ": the cpp kernels take float32, bfloat16 or float16; ", name, " is ", s);
  } else {
    TORCH_CHECK(s == want, "dm2s2_fast::", op, ": ", name, " is ", s, ", expected ", want,
                " (one dtype for every float argument)");
  }
  TORCH_CHECK(t.dim() == dim, "dm2s2_fast::", op, ": ", name, " must have ", dim, " dims, got shape ", t.sizes());
}

void check_vec(const at::Tensor& t, const char* op, const char* name, int64_t n, at::ScalarType want) {
  check_float(t, op, name, 1, want);
  TORCH_CHECK(t.size(0) == n, "dm2s2_fast::", op, ": ", name, " must have ", n, " entries, got ", t.size(0));
}

// A parameter vector (LayerNorm weight/bias, a bias, a score vector) as contiguous fp32.
at::Tensor f32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous();
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

// The CPU has one kernel per op: `variant` (a CUDA choice) must be 0.
void check_one_kernel(int64_t variant, const char* op) {
  TORCH_CHECK(variant == 0, "dm2s2_fast::", op, ": the CPU has one kernel, variant must be 0, got ", variant);
}

// The kernels take eps and scale as fp32: NaN, +-inf or a value beyond fp32's range is undefined
// there, and a negative eps makes a constant row's variance negative (rsqrt -> NaN).
void check_scalar(double value, const char* op, const char* name, bool nonnegative) {
  TORCH_CHECK(std::isfinite(value) && std::fabs(value) <= static_cast<double>(std::numeric_limits<float>::max()) &&
                  (!nonnegative || value >= 0.0),
              "dm2s2_fast::", op, ": ", name, " must be a finite", nonnegative ? " non-negative" : "",
              " number within fp32's range, got ", value);
}

// An output written in place must share no memory with an input the kernels read while other
// threads write rows of it.
void check_not_aliased(const at::Tensor& out, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(!t.defined() || t.numel() == 0 || !out.is_alias_of(t), "dm2s2_fast::", op,
              ": out shares memory with ", name, "; give a separate output buffer");
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
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

// Rows per parallel chunk so that a chunk has at least ~`elems` elements of work (counted in fp32
// elements: a half-precision row moves half the bytes, so its grain is twice the rows).
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
                         const at::Tensor& cu_in, int64_t max_seqlen, double scale, int64_t variant) {
  const char* op = "set_attention";
  check_one_kernel(variant, op);
  check_scalar(scale, op, "scale", false);
  check_float(q_in, op, "q", 3);
  const at::ScalarType dt = q_in.scalar_type();
  check_float(k_in, op, "k", 3, dt);
  check_float(v_in, op, "v", 3, dt);
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
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
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
  // Tasks: (item, run of heads). With many items a task runs all heads of its item (a kernel with
  // attention_heads packs every head's K and V in one pass over the group's rows, in memory order:
  // one head's q/k/v values are D values in rows 3 H D values apart, a stride no hardware
  // prefetcher follows). Few items (small batches) split the heads so that every thread has work.
  const KernelTable& table = active_kernels();
  const AttentionFn attend = table.attention[dtype_index(dt)];
  const AttentionHeadsFn attend_heads = table.attention_heads[dtype_index(dt)];
  const int64_t nitems = static_cast<int64_t>(items.size());
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t run = std::max<int64_t>(1, std::min<int64_t>(H, H * nitems / (8 * threads)));
  const int64_t runs = (H + run - 1) / run;
  run_dynamic(nitems * runs, attn_scratch_floats(longest, D, attend_heads ? run : 1), [&](int64_t t, float* scratch) {
    const Item& it = items[static_cast<size_t>(t / runs)];
    const int64_t h0 = (t % runs) * run, h1 = std::min(H, h0 + run);
    if (attend_heads) {
      attend_heads(p, it.g0, it.g1, it.q0, it.q1, h0, h1, scratch);
    } else {
      for (int64_t h = h0; h < h1; ++h) attend(p, it.g0, it.g1, it.q0, it.q1, h, scratch);
    }
  });
  return out;
}

// y = LayerNorm(x + r) row by row (y may be x); x, r, y [N, d] of one dtype.
void run_add_layernorm(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w_in, const at::Tensor& b_in,
                       double eps, at::Tensor& y) {
  const int64_t N = x.size(0), d = x.size(1);
  if (N == 0 || d == 0) return;
  const at::Tensor w = f32(w_in), b = f32(b_in);
  const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  const void* xp = x.data_ptr();
  const void* rp = r.data_ptr();
  void* yp = y.data_ptr();
  const int64_t xs = x.stride(0), rs = r.stride(0), ys = y.stride(0);
  const float e = static_cast<float>(eps);
  const AddLayerNormFn kern = active_kernels().add_layernorm[dtype_index(x.scalar_type())];
  at::parallel_for(0, N, grain_rows(d, 32768), [&](int64_t begin, int64_t end) {
    kern(xp, xs, rp, rs, wp, bp, yp, ys, d, e, begin, end);
  });
}

void check_add_layernorm(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w, const at::Tensor& b,
                         const char* op) {
  check_float(x, op, "x", 2);
  const at::ScalarType dt = x.scalar_type();
  check_float(r, op, "residual", 2, dt);
  TORCH_CHECK(r.sizes() == x.sizes(), "dm2s2_fast::", op, ": residual must have shape ", x.sizes(), ", got ",
              r.sizes());
  const int64_t d = x.size(1);
  check_vec(w, op, "weight", d, dt);
  check_vec(b, op, "bias", d, dt);
}

at::Tensor add_layernorm(const at::Tensor& x_in, const at::Tensor& r_in, const at::Tensor& w_in,
                         const at::Tensor& b_in, double eps, int64_t variant) {
  const char* op = "add_layernorm";
  check_one_kernel(variant, op);
  check_scalar(eps, op, "eps", true);
  check_add_layernorm(x_in, r_in, w_in, b_in, op);
  const at::Tensor x = unit_last(x_in), r = unit_last(r_in);
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  if (y.numel() == 0) return y;
  advise_huge_pages(y);
  run_add_layernorm(x, r, w_in, b_in, eps, y);
  return y;
}

// In place: x = LayerNorm(x + residual) (the cpp backend's epilogue after a GEMM it did not run
// here). x needs a unit stride in its last dim.
void add_layernorm_inplace(at::Tensor& x, const at::Tensor& r_in, const at::Tensor& w_in, const at::Tensor& b_in,
                           double eps) {
  const char* op = "_add_layernorm_";
  check_scalar(eps, op, "eps", true);
  check_add_layernorm(x, r_in, w_in, b_in, op);
  check_not_aliased(x, r_in, op, "residual");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "dm2s2_fast::", op, ": x needs a unit column stride");
  const at::Tensor r = unit_last(r_in);
  run_add_layernorm(x, r, w_in, b_in, eps, x);
}

void run_bias_gelu(const at::Tensor& x, const at::Tensor& b_in, at::Tensor& y) {
  const int64_t N = x.size(0), f = x.size(1);
  if (N == 0 || f == 0) return;
  const at::Tensor b = f32(b_in);
  const float* bp = b.data_ptr<float>();
  const void* xp = x.data_ptr();
  void* yp = y.data_ptr();
  const int64_t xs = x.stride(0), ys = y.stride(0);
  const BiasGeluFn kern = active_kernels().bias_gelu[dtype_index(x.scalar_type())];
  at::parallel_for(0, N, grain_rows(f, 16384), [&](int64_t begin, int64_t end) {
    kern(xp, xs, bp, yp, ys, f, begin, end);
  });
}

at::Tensor bias_gelu(const at::Tensor& x_in, const at::Tensor& b_in) {
  const char* op = "bias_gelu";
  check_float(x_in, op, "x", 2);
  check_vec(b_in, op, "bias", x_in.size(1), x_in.scalar_type());
  const at::Tensor x = unit_last(x_in);
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  if (y.numel() == 0) return y;
  advise_huge_pages(y);
  run_bias_gelu(x, b_in, y);
  return y;
}

void bias_gelu_inplace(at::Tensor& x, const at::Tensor& b_in) {
  const char* op = "_bias_gelu_";
  check_float(x, op, "x", 2);
  check_vec(b_in, op, "bias", x.size(1), x.scalar_type());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "dm2s2_fast::", op, ": x needs a unit column stride");
  run_bias_gelu(x, b_in, x);
}

// ------------------------------------------------------------------ linear layers
// The GEMM output is allocated here and advised onto huge pages before BLAS first touches it:
// fresh 4 KB pages fault on first touch, which cost MKL's FFN GEMM (7121 x 384 -> 1536, fp32)
// 37 ms against 29 (2 cores). The epilogue then runs in place on that buffer (the kernels read
// each element before writing it), so no second output is allocated and faulted in.
at::Tensor gemm_into_new(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor* bias) {
  // torch's bf16/fp16 CPU matmul reads a strided x (rows of a wider buffer) wrongly (it picks up the
  // columns between the rows: NaN there gives NaN out, torch 2.13); hand it contiguous rows.
  const at::Tensor x = (x_in.scalar_type() != at::kFloat && x_in.size(0) > 1 && x_in.stride(0) != x_in.size(1))
                           ? x_in.contiguous() : x_in;
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  advise_huge_pages(y);
  if (bias != nullptr)
    at::addmm_out(y, *bias, x, w.t());
  else
    at::mm_out(y, x, w.t());
  return y;
}

void check_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const char* op) {
  check_float(x, op, "x", 2);
  const at::ScalarType dt = x.scalar_type();
  check_float(w, op, "weight", 2, dt);
  TORCH_CHECK(w.size(1) == x.size(1), "dm2s2_fast::", op, ": weight must have shape (", w.size(0), ", ",
              x.size(1), "), got ", w.sizes());
  check_vec(b, op, "bias", w.size(0), dt);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  check_linear(x, w, b, "linear");
  return gemm_into_new(x, w, &b);
}

at::Tensor linear_bias_gelu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  check_linear(x, w, b, "linear_bias_gelu");
  at::Tensor y = gemm_into_new(x, w, nullptr);
  run_bias_gelu(y, b, y);
  return y;
}

at::Tensor linear_add_layernorm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                const at::Tensor& r_in, const at::Tensor& lw, const at::Tensor& lb, double eps) {
  const char* op = "linear_add_layernorm";
  check_scalar(eps, op, "eps", true);
  check_linear(x, w, b, op);
  const at::ScalarType dt = x.scalar_type();
  const int64_t N = x.size(0), d = w.size(0);
  check_float(r_in, op, "residual", 2, dt);
  TORCH_CHECK(r_in.size(0) == N && r_in.size(1) == d, "dm2s2_fast::", op, ": residual must have shape (", N,
              ", ", d, "), got ", r_in.sizes());
  check_vec(lw, op, "ln_weight", d, dt);
  check_vec(lb, op, "ln_bias", d, dt);
  at::Tensor y = gemm_into_new(x, w, &b);
  run_add_layernorm(y, unit_last(r_in), lw, lb, eps, y);
  return y;
}

void embed_layernorm(const at::Tensor& positions_in, const at::Tensor& type_ids_in, const at::Tensor& pos_in,
                     const at::Tensor& type_in, const at::Tensor& w_in, const at::Tensor& b_in, double eps,
                     const std::optional<at::Tensor>& ids_in, const std::optional<at::Tensor>& table_in,
                     const std::optional<at::Tensor>& dense_in, at::Tensor& out, const at::Tensor& out_rows_in,
                     int64_t variant) {
  const char* op = "embed_layernorm";
  check_one_kernel(variant, op);
  check_scalar(eps, op, "eps", true);
  check_float(pos_in, op, "position_table", 2);
  const at::ScalarType dt = pos_in.scalar_type();
  check_float(type_in, op, "type_table", 2, dt);
  const int64_t d = pos_in.size(1);
  TORCH_CHECK(type_in.size(1) == d, "dm2s2_fast::embed_layernorm: type_table must have ", d, " columns");
  check_vec(w_in, op, "weight", d, dt);
  check_vec(b_in, op, "bias", d, dt);
  check_float(out, op, "out", 2, dt);
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
    check_float(*table_in, op, "table", 2, dt);
    TORCH_CHECK(table_in->size(1) == d, "dm2s2_fast::embed_layernorm: table must have ", d, " columns");
    table = unit_last(*table_in);
  } else {
    check_float(*dense_in, op, "dense", 2, dt);
    TORCH_CHECK(dense_in->size(0) == n && dense_in->size(1) == d, "dm2s2_fast::embed_layernorm: dense must have shape [",
                n, ", ", d, "], got ", dense_in->sizes());
    dense = unit_last(*dense_in);
  }
  // Nothing the kernels read may live in out, which other threads write row by row.
  const std::pair<const at::Tensor*, const char*> inputs[] = {
      {&pos_in, "position_table"}, {&type_in, "type_table"}, {&w_in, "weight"}, {&b_in, "bias"},
      {&positions_in, "positions"}, {&type_ids_in, "type_ids"}, {&out_rows_in, "out_rows"}};
  for (const auto& [t, name] : inputs) check_not_aliased(out, *t, op, name);
  if (has_ids) {
    check_not_aliased(out, *ids_in, op, "ids");
    check_not_aliased(out, *table_in, op, "table");
  } else {
    check_not_aliased(out, *dense_in, op, "dense");
  }
  // Distinct rows: two elements writing one row of out would race. (A row out of range is left to
  // the kernels, which write nothing for it and report the element.)
  {
    std::vector<uint8_t> seen(static_cast<size_t>(out.size(0)), 0);
    const Index rows = as_index(out_rows);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t o = rows[i];
      if (o < 0 || o >= out.size(0)) continue;
      TORCH_CHECK(!seen[static_cast<size_t>(o)], "dm2s2_fast::embed_layernorm: out_rows must be distinct; row ", o,
                  " appears twice");
      seen[static_cast<size_t>(o)] = 1;
    }
  }
  if (n == 0 || d == 0) return;
  const at::Tensor pos = unit_last(pos_in), typ = unit_last(type_in), w = f32(w_in), b = f32(b_in);
  EmbedParams p;
  p.table = has_ids ? table.data_ptr() : nullptr;
  p.table_rows = has_ids ? table.size(0) : 0;
  p.table_row = has_ids ? table.stride(0) : 0;
  if (has_ids) p.ids = as_index(ids);
  p.dense = has_dense ? dense.data_ptr() : nullptr;
  p.dense_row = has_dense ? dense.stride(0) : 0;
  p.pos_table = pos.data_ptr();
  p.pos_rows = pos.size(0);
  p.pos_row = pos.stride(0);
  p.positions = as_index(positions);
  p.type_table = typ.data_ptr();
  p.type_rows = typ.size(0);
  p.type_row = typ.stride(0);
  p.type_ids = as_index(type_ids);
  p.weight = w.data_ptr<float>();
  p.bias = b.data_ptr<float>();
  p.out = out.data_ptr();
  p.out_rows_total = out.size(0);
  p.out_row = out.stride(0);
  p.out_rows = as_index(out_rows);
  p.d = d;
  p.eps = static_cast<float>(eps);
  const EmbedFn kern = active_kernels().embed_layernorm[dtype_index(dt)];
  std::atomic<int64_t> bad{n};
  at::parallel_for(0, n, grain_rows(d, 16384), [&](int64_t begin, int64_t end) {
    const int64_t i = kern(p, begin, end);
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

// W x + c for every row of x, in fp32: the scores feed fp32 softmax weights (α, β), which the
// reference computes in fp32 whatever the storage dtype. The products of bf16 or fp16 values are
// exact in fp32, so a half-precision GEMM with fp32 accumulation and an fp32 output matches an fp32
// GEMM on the widened inputs. bf16 on a CPU where torch's brgemm runs bf16 natively (AMX): that
// GEMM, W packed once per call into the VNNI layout, row blocks over the threads; otherwise the
// inputs are widened and the fp32 BLAS runs.
at::Tensor mra_scores(const at::Tensor& x, const at::Tensor& W, const at::Tensor& c) {
  if (x.scalar_type() == at::kFloat) return at::addmm(c, x, W.t());
  const int64_t n = x.size(0), d = x.size(1), a = W.size(0);
  if (x.scalar_type() == at::kBFloat16 && d % 2 == 0 && a > 0 && n > 0 && x.stride(1) == 1 &&
      at::native::cpublas::could_pack(at::kBFloat16)) {
    // W^T [d, a] packed in column chunks of up to 64 (the packed layout's leading dim must be
    // 16, 32, 48 or 64): chunk j holds columns [64 j, 64 j + nb_j) with leading dim ld_j.
    const int64_t chunks = (a + 63) / 64;
    const at::Tensor wt = W.t().contiguous();  // [d, a]
    at::Tensor packed = at::empty({chunks, d, 64}, W.options());
    bool packed_ok = true;
    try {
      for (int64_t j = 0; j < chunks; ++j) {
        const int64_t nb = std::min<int64_t>(64, a - 64 * j), ld = (nb + 15) / 16 * 16;
        at::native::cpublas::pack(d, nb, a, ld, at::kBFloat16, at::kBFloat16,
                                  wt.data_ptr<at::BFloat16>() + 64 * j, packed[j].data_ptr());
      }
    } catch (const c10::Error&) {
      packed_ok = false;  // this torch/CPU cannot pack bf16 for its brgemm: widen instead
    }
    if (packed_ok) {
      at::Tensor pre = at::empty({n, a}, x.options().dtype(at::kFloat));
      const at::Tensor cf = f32(c);
      const auto* xp = x.data_ptr<at::BFloat16>();
      const auto* bp = packed.data_ptr<at::BFloat16>();
      const float* cp = cf.data_ptr<float>();
      float* pp = pre.data_ptr<float>();
      const int64_t xs = x.stride(0);
      constexpr int64_t kRows = 32;
      at::parallel_for(0, (n + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * kRows, rows = std::min(kRows, n - r0);
          float* out = pp + r0 * a;
          for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * a, cp, static_cast<size_t>(a) * sizeof(float));
          for (int64_t j = 0; j < chunks; ++j) {
            const int64_t nb = std::min<int64_t>(64, a - 64 * j), ld = (nb + 15) / 16 * 16;
            at::native::cpublas::brgemm(rows, nb, d, xs, ld, a, /*add_C=*/true, xp + r0 * xs, bp + j * d * 64,
                                        out + 64 * j);
          }
        }
        at::native::cpublas::brgemm_release();
      });
      return pre;
    }
  }
  return at::addmm(f32(c), x.to(at::kFloat), W.to(at::kFloat).t());
}

// One level of residual-attention pooling over groups of x's rows.
std::tuple<at::Tensor, at::Tensor> mra_level(const at::Tensor& x_in, const at::Tensor& cu_in, const at::Tensor& W,
                                             const at::Tensor& c, const at::Tensor& v, const char* op,
                                             const char* x_name, const char* cu_name, const char* const names[3]) {
  check_float(x_in, op, x_name, 2);
  const at::ScalarType dt = x_in.scalar_type();
  const int64_t n = x_in.size(0), d = x_in.size(1);
  const std::string Wn = names[0], cn = names[1], vn = names[2];
  check_float(W, op, Wn.c_str(), 2, dt);
  const int64_t a = W.size(0);
  TORCH_CHECK(W.size(1) == d, "dm2s2_fast::", op, ": ", Wn, " must have shape [", a, ", ", d, "], got ", W.sizes());
  check_vec(c, op, cn.c_str(), a, dt);
  check_vec(v, op, vn.c_str(), a, dt);
  const at::Tensor cu = cu_in.contiguous();
  const int64_t G = check_offsets(cu, op, cu_name, n, nullptr);
  at::Tensor pooled = at::empty({G, d}, x_in.options());
  at::Tensor weights = at::empty({n}, x_in.options().dtype(at::kFloat));
  if (G == 0) return {pooled, weights};  // then n == 0 too
  const at::Tensor x = unit_last(x_in), vc = f32(v);
  // W x + c on torch's BLAS; tanh, the dot with v, the group softmax and the pooling are fused.
  const at::Tensor pre = n > 0 ? mra_scores(x, W, c) : at::empty({0, a}, x.options().dtype(at::kFloat));
  const void* xp = x.data_ptr();
  const float *pp = pre.data_ptr<float>(), *vp = vc.data_ptr<float>();
  const int64_t xs = x.stride(0), ps = a > 0 ? pre.stride(0) : 0;
  const int32_t* cp = cu.data_ptr<int32_t>();
  float* wp = weights.data_ptr<float>();
  void* zp = pooled.data_ptr();
  const int64_t zs = pooled.stride(0);
  const MraPoolFn kern = active_kernels().mra_pool[dtype_index(dt)];
  // Static chunks of groups; grain so that tiny batches stay on one thread.
  const int64_t per_group = std::max<int64_t>(1, n / G) * (a + d);
  at::parallel_for(0, G, grain_rows(per_group, 65536), [&](int64_t begin, int64_t end) {
    kern(xp, xs, pp, ps, vp, a, cp, wp, zp, zs, d, begin, end);
  });
  return {pooled, weights};
}

const char* const kIntraNames[3] = {"W", "c", "v"};
const char* const kInterNames[3] = {"U", "g", "u"};

std::tuple<at::Tensor, at::Tensor> intra_mra(const at::Tensor& h, const at::Tensor& cu, const at::Tensor& W,
                                             const at::Tensor& c, const at::Tensor& v) {
  return mra_level(h, cu, W, c, v, "intra_mra", "h", "cu_seqlens_segment", kIntraNames);
}

std::tuple<at::Tensor, at::Tensor> inter_mra(const at::Tensor& z, const at::Tensor& cu, const at::Tensor& U,
                                             const at::Tensor& g, const at::Tensor& u) {
  return mra_level(z, cu, U, g, u, "inter_mra", "z", "cu_segments_per_sample", kInterNames);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mra_pool(
    const at::Tensor& h, const at::Tensor& cu_seg, const at::Tensor& cu_segments, const at::Tensor& W,
    const at::Tensor& c, const at::Tensor& v, const at::Tensor& U, const at::Tensor& g, const at::Tensor& u) {
  auto [z, alpha] = mra_level(h, cu_seg, W, c, v, "mra_pool", "h", "cu_seqlens_segment", kIntraNames);
  auto [r, beta] = mra_level(z, cu_segments, U, g, u, "mra_pool", "z", "cu_segments_per_sample", kInterNames);
  return {z, r, alpha, beta};
}

// A 64-bit fingerprint of `samples` elements of t spread over it (one per stratum of numel /
// samples elements, at a hashed offset inside it), from their raw bits. The cpp backend keeps it
// beside each packed weight: a change of the weight that its version counter does not see (an
// in-place write through `.data`) still changes the sampled elements when it rewrites the tensor.
int64_t fingerprint(const at::Tensor& t, int64_t samples) {
  TORCH_CHECK(t.device().is_cpu(), "dm2s2_fast::_fingerprint: a CPU tensor is needed, got ", t.device());
  const int64_t n = t.numel();
  uint64_t h = 0xcbf29ce484222325ull ^ static_cast<uint64_t>(n);
  if (n == 0) return static_cast<int64_t>(h);
  const int64_t k = std::max<int64_t>(1, std::min(samples, n));
  const int64_t esize = t.element_size();
  TORCH_CHECK(esize == 1 || esize == 2 || esize == 4 || esize == 8, "dm2s2_fast::_fingerprint: element size ",
              esize);
  const char* base = static_cast<const char*>(t.data_ptr());
  const int64_t dims = t.dim();
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  for (int64_t s = 0; s < k; ++s) {
    const int64_t lo = s * n / k, hi = (s + 1) * n / k;
    uint64_t j = static_cast<uint64_t>(s) * 0x9E3779B97F4A7C15ull;
    j ^= j >> 29;
    int64_t idx = lo + static_cast<int64_t>(j % static_cast<uint64_t>(std::max<int64_t>(1, hi - lo)));
    int64_t off = 0;  // element offset of the idx-th element (row-major order) through the strides
    for (int64_t dim = dims - 1; dim >= 0; --dim) {
      const int64_t size = sizes[dim];
      off += (idx % size) * strides[dim];
      idx /= size;
    }
    uint64_t bits = 0;
    std::memcpy(&bits, base + off * esize, static_cast<size_t>(esize));
    h = (h ^ bits) * 0x100000001b3ull;
    h ^= h >> 32;
  }
  return static_cast<int64_t>(h);
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
  m.impl("_add_layernorm_", &add_layernorm_inplace);
  m.impl("_bias_gelu_", &bias_gelu_inplace);
  m.impl("_fingerprint", &fingerprint);
}
