// The engine's own per-step GEMM kernel (AVX-512, register-tiled, on W_hh
// read in place or packed once per update) and the helper thread that shares
// a product's parts with the caller. blas.cpp (the OpenBLAS wrapper) routes
// the products it takes here; see own_gemm.h and blas.h for the policy.
#include "cpu/own_gemm.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "cpu/blas.h"

namespace tbptt::cpu {
#ifdef TBPTT_OWN_KERNEL
namespace {

// C[m, n] = A[m, k] B[k, n] + beta * C (row-major, NN, alpha = 1) for small m
// (the batch): h W_hh^T and dG W_hh. OpenBLAS packs B on every call; this
// kernel reads B in place (gemm(), B up to 4 MB) or from panels packed once
// per update (gemm_packed(), any size: a plain row-major 16 MB B at H = 1024
// is strided and memory-bound). Measured single-thread on the AVX-512 EPYC:
// [8 x 1024 x 256] 44 us vs 157 us, [32 x 256 x 1024] 144 vs 206 us, packed
// [32 x 4096 x 1024] 2.7 vs 4.6 ms, equal at H = 64. AVX-512 only (the 8 x 32
// register tile needs 32 zmm); other CPUs use OpenBLAS throughout.
typedef float v16 __attribute__((vector_size(64), aligned(4)));  // unaligned loads/stores

constexpr int64_t kMr = 8;     // rows per register tile
constexpr int64_t kMaxM = 32;  // batch sizes handled

// Rows [0, MR) x columns [0, 16 * NV) of C: MR * NV accumulators, B read once
// per k for all MR rows.
template <int MR, int NV>
__attribute__((always_inline)) inline void nn_tile(int64_t k, const float* a, int64_t lda,
                                                   const float* b, int64_t ldb, float beta,
                                                   float* c, int64_t ldc) {
  v16 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = v16{};
  for (int64_t p = 0; p < k; ++p) {
    v16 bv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + p * ldb + 16 * v, sizeof(v16));
    for (int r = 0; r < MR; ++r) {
      const float av = a[r * lda + p];
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + 16 * v;
      if (beta != 0.0f) {
        v16 cv;
        std::memcpy(&cv, cp, sizeof(v16));
        acc[r][v] += beta * cv;
      }
      std::memcpy(cp, &acc[r][v], sizeof(v16));
    }
  }
}

template <int MR>
__attribute__((always_inline)) inline void nn_rows(int64_t nr, int64_t k, const float* a,
                                                   int64_t lda, const float* b, int64_t ldb,
                                                   float beta, float* c, int64_t ldc) {
  if (nr == 32) {
    nn_tile<MR, 2>(k, a, lda, b, ldb, beta, c, ldc);
  } else {
    nn_tile<MR, 1>(k, a, lda, b, ldb, beta, c, ldc);
  }
}

// One column panel of C (32 columns, or 16 for the last when n % 32 == 16):
// every row tile of it. b points at the panel's first column, ldb its row
// stride (n for a plain B, the panel width for a packed one).
__attribute__((target("arch=x86-64-v4"))) void nn_panel_avx512(int64_t m, int64_t nr, int64_t k,
                                                               const float* a, int64_t lda,
                                                               const float* b, int64_t ldb,
                                                               float beta, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + kMr <= m; i += kMr)
    nn_rows<8>(nr, k, a + i * lda, lda, b, ldb, beta, c + i * ldc, ldc);
  const float* ai = a + i * lda;
  float* ci = c + i * ldc;
  switch (m - i) {
    case 1:
      nn_rows<1>(nr, k, ai, lda, b, ldb, beta, ci, ldc);
      break;
    case 2:
      nn_rows<2>(nr, k, ai, lda, b, ldb, beta, ci, ldc);
      break;
    case 3:
      nn_rows<3>(nr, k, ai, lda, b, ldb, beta, ci, ldc);
      break;
    case 4:
      nn_rows<4>(nr, k, ai, lda, b, ldb, beta, ci, ldc);
      break;
    case 5:
      nn_rows<5>(nr, k, ai, lda, b, ldb, beta, ci, ldc);
      break;
    case 6:
      nn_rows<6>(nr, k, ai, lda, b, ldb, beta, ci, ldc);
      break;
    case 7:
      nn_rows<7>(nr, k, ai, lda, b, ldb, beta, ci, ldc);
      break;
    default:
      break;
  }
}

// A product split into column panels; `packed`: b is the pack_panels layout.
struct PanelJob {
  int64_t m, n, k;
  const float* a;
  int64_t lda;
  const float* b;
  int64_t ldb;
  bool packed;
  float beta;
  float* c;
  int64_t ldc;

  int64_t panels() const { return (n + 31) / 32; }
  void run(int64_t panel) const {
    const int64_t j0 = 32 * panel, nr = std::min<int64_t>(32, n - j0);
    if (packed) {
      nn_panel_avx512(m, nr, k, a, lda, b + j0 * k, nr, beta, c + j0, ldc);
    } else {
      nn_panel_avx512(m, nr, k, a, lda, b + j0, ldb, beta, c + j0, ldc);
    }
  }
};

// One helper thread that shares the panels of a product with the calling
// thread (2-core target; OpenBLAS's pool cannot run our kernel). Panels are
// claimed one at a time with a CAS on (generation << 32 | next panel), so
// the caller never waits for a panel nobody has started: a helper that is
// asleep or descheduled (another process on the core) just leaves all the
// work to the caller, which avoids the multi-ms stalls of a fixed split
// (blas.h). The helper spins ~100 us for the next product, then sleeps in
// growing steps. Never destroyed (a detached thread for the process life);
// after fork() the child has no helper and the caller does every panel.
class PanelHelper {
 public:
  static PanelHelper& get() {
    static PanelHelper* helper = new PanelHelper();
    return *helper;
  }

  void run(const Parts& job) {
    const int64_t panels = job.count;
    const uint64_t g = ++gen_;
    // Close first: a helper still inside work() for the previous product
    // fails its CAS (the word changed) instead of claiming a panel of a job
    // that is half written, and nobody can claim generation g until it opens.
    word_.store((g << 32) | kClosed, std::memory_order_release);
    job_ = job;
    total_.store(panels, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    word_.store(g << 32, std::memory_order_release);
    const int64_t mine = work(g, false);
    while (done_.load(std::memory_order_acquire) != panels - mine) __builtin_ia32_pause();
  }

 private:
  PanelHelper() {
    std::thread([this] { loop(); }).detach();
  }

  // Claims and runs panels of generation g until none is left; returns how many.
  int64_t work(uint64_t g, bool helper) {
    int64_t ran = 0;
    for (;;) {
      uint64_t w = word_.load(std::memory_order_acquire);
      if ((w >> 32) != g) break;
      const int64_t i = static_cast<int64_t>(w & 0xffffffffu);
      if (i >= total_.load(std::memory_order_relaxed)) break;
      if (!word_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel)) continue;
      job_.fn(job_.ctx, i);
      ++ran;
      if (helper) done_.fetch_add(1, std::memory_order_release);
    }
    return ran;
  }

  void loop() {
    uint64_t seen = 0;
    int64_t idle = 0;
    for (;;) {
      const uint64_t w = word_.load(std::memory_order_acquire);
      const uint64_t g = w >> 32;
      if (g != seen && (w & 0xffffffffu) != kClosed) {
        seen = g;
        work(g, true);
        idle = 0;
        continue;
      }
      ++idle;
      if (idle < 4000) {
        __builtin_ia32_pause();
      } else {
        const int64_t us = idle < 6000 ? 20 : (idle < 10000 ? 200 : 2000);
        std::this_thread::sleep_for(std::chrono::microseconds(us));
      }
    }
  }

  static constexpr uint64_t kClosed = 0xffffffffu;  // panel field of a job being set up
  std::atomic<uint64_t> word_{0};
  std::atomic<int64_t> total_{0}, done_{0};
  uint64_t gen_ = 0;  // caller only
  Parts job_{};       // written by the caller before word_ is published

 public:
  std::atomic<bool> busy{false};  // one caller at a time (engines in several Python threads)
};

}  // namespace

bool run_parts(const Parts& parts, bool must_run) {
  PanelHelper& helper = PanelHelper::get();
  if (!helper.busy.exchange(true, std::memory_order_acquire)) {
    helper.run(parts);
    helper.busy.store(false, std::memory_order_release);
    return true;
  }
  if (!must_run) return false;
  for (int64_t i = 0; i < parts.count; ++i) parts.fn(parts.ctx, i);
  return true;
}

namespace {

// Products from ~2 MFLOP up share their panels with the helper when the
// configured thread count is >= 2 (H = 256, B = 32: 16.7 MFLOP in ~80 us).
void run_panels(const PanelJob& job) {
  const double flops =
      2.0 * static_cast<double>(job.m) * static_cast<double>(job.n) * static_cast<double>(job.k);
  if (flops >= 2097152.0 && job.panels() >= 2 && get_num_threads() >= 2) {
    run_parts({[](const void* ctx, int64_t i) { static_cast<const PanelJob*>(ctx)->run(i); }, &job,
               job.panels()},
              true);
    return;
  }
  for (int64_t p = 0; p < job.panels(); ++p) job.run(p);
}

// TBPTT_NO_AVX512=1 turns the own kernels off as on a CPU without AVX-512, so
// the OpenBLAS paths such CPUs take are tested here too (test_native_battery).
bool have_avx512() {
  static const bool ok = [] {
    const char* off = std::getenv("TBPTT_NO_AVX512");
    if (off != nullptr && off[0] != '\0' && std::strcmp(off, "0") != 0) return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  }();
  return ok;
}

}  // namespace

void own_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float beta, float* c, int64_t ldc) {
  run_panels({m, n, k, a, lda, b, ldb, false, beta, c, ldc});
}
#endif

// True when gemm<float>(NN) of this shape runs the own kernel (see above).
bool own_kernel_takes(int64_t m, int64_t n, int64_t k) {
#ifdef TBPTT_OWN_KERNEL
  if (m < 1 || m > kMaxM || n % 16 != 0 || k < 1) return false;
  return static_cast<double>(k) * static_cast<double>(n) <= kOwnMaxBElems && have_avx512();
#else
  (void)m, (void)n, (void)k;
  return false;
#endif
}

bool packed_available(int64_t m, int64_t n, int64_t k) {
#ifdef TBPTT_OWN_KERNEL
  return m >= 1 && m <= kMaxM && n % 16 == 0 && k >= 1 && have_avx512();
#else
  (void)m, (void)n, (void)k;
  return false;
#endif
}

void pack_panels(int64_t k, int64_t n, const float* b, int64_t ldb, bool trans_b, float* out) {
  for (int64_t j0 = 0; j0 < n; j0 += 32) {
    const int64_t nr = std::min<int64_t>(32, n - j0);
    float* panel = out + j0 * k;  // [k, nr]
    if (trans_b) {  // b is [n, ldb >= k]: panel row p gathers column p of nr rows of b
      for (int64_t p = 0; p < k; ++p)
        for (int64_t c = 0; c < nr; ++c) panel[p * nr + c] = b[(j0 + c) * ldb + p];
    } else {
      for (int64_t p = 0; p < k; ++p)
        std::memcpy(panel + p * nr, b + p * ldb + j0, nr * sizeof(float));
    }
  }
}

void gemm_packed(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* bp,
                 float beta, float* c, int64_t ldc) {
#ifdef TBPTT_OWN_KERNEL
  run_panels({m, n, k, a, lda, bp, 0, true, beta, c, ldc});
#else
  (void)m, (void)n, (void)k, (void)a, (void)lda, (void)bp, (void)beta, (void)c, (void)ldc;
  throw std::logic_error("gemm_packed: no packed kernel in this build");
#endif
}

}  // namespace tbptt::cpu
