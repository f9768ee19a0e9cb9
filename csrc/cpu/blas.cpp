// The BLAS wrapper and its thread policy (blas.h): the only translation unit
// that includes cblas.h (scipy-openblas32 wheel). Products the own kernel
// takes go to own_gemm.cpp.
#include "cpu/blas.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "cpu/own_gemm.h"
#include "tbptt/errors.h"

namespace tbptt::cpu {
namespace {

CBLAS_TRANSPOSE tr(bool t) {
  return t ? CblasTrans : CblasNoTrans;
}

blasint to_blasint(int64_t v) {
  TBPTT_CHECK_RT(v >= 0 && v <= INT_MAX, "BLAS dimension ", v, " exceeds the 32-bit BLAS limit");
  return static_cast<blasint>(v);
}

double read_threshold() {
  const char* env = std::getenv("TBPTT_PARALLEL_MIN_FLOPS");
  if (env != nullptr) {
    char* end = nullptr;
    const double v = std::strtod(env, &end);
    if (end != env && v >= 0.0) return v;
  }
  return 8388608.0;  // 2^23, see blas.h
}

// Single-threaded OpenBLAS for the lifetime of the object when the product is
// below the threshold (see blas.h).
class SmallProductThreads {
 public:
  SmallProductThreads(int64_t m, int64_t n, int64_t k) {
    const double flops =
        2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
    if (flops >= parallel_min_flops()) return;
    const int current = scipy_openblas_get_num_threads();
    if (current <= 1) return;
    saved_ = current;
    scipy_openblas_set_num_threads(1);
  }
  ~SmallProductThreads() {
    if (saved_ > 0) scipy_openblas_set_num_threads(saved_);
  }
  SmallProductThreads(const SmallProductThreads&) = delete;
  SmallProductThreads& operator=(const SmallProductThreads&) = delete;

 private:
  int saved_ = 0;
};

template <typename T>
void blas_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    scipy_cblas_sgemm(CblasRowMajor, tr(trans_a), tr(trans_b), to_blasint(m), to_blasint(n),
                      to_blasint(k), alpha, a, to_blasint(lda), b, to_blasint(ldb), beta, c,
                      to_blasint(ldc));
  } else {
    scipy_cblas_dgemm(CblasRowMajor, tr(trans_a), tr(trans_b), to_blasint(m), to_blasint(n),
                      to_blasint(k), alpha, a, to_blasint(lda), b, to_blasint(ldb), beta, c,
                      to_blasint(ldc));
  }
}

// A threaded product as single-threaded OpenBLAS calls on row (or column)
// blocks of C, shared by the caller and the helper thread. OpenBLAS's own
// pool is then never used, so its workers never spin-wait next to ours (with
// both, 3 busy threads on 2 cores: the helper got a third of a core).
template <typename T>
struct SplitGemm {
  bool trans_a, trans_b;
  int64_t m, n, k;
  T alpha;
  const T* a;
  int64_t lda;
  const T* b;
  int64_t ldb;
  T beta;
  T* c;
  int64_t ldc;
  int64_t parts;
  bool by_rows;

  void run(int64_t i) const {
    const int64_t len = by_rows ? m : n, step = (len + parts - 1) / parts;
    const int64_t lo = std::min(len, i * step), hi = std::min(len, lo + step);
    if (hi <= lo) return;
    if (by_rows) {
      blas_gemm<T>(trans_a, trans_b, hi - lo, n, k, alpha, trans_a ? a + lo : a + lo * lda, lda, b,
                   ldb, beta, c + lo * ldc, ldc);
    } else {
      blas_gemm<T>(trans_a, trans_b, m, hi - lo, k, alpha, a, lda, trans_b ? b + lo * ldb : b + lo,
                   ldb, beta, c + lo, ldc);
    }
  }
};

template <typename T>
void gemm_impl(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
#ifdef TBPTT_OWN_KERNEL
  if constexpr (std::is_same_v<T, float>) {
    if (!trans_a && !trans_b && alpha == 1.0f && own_kernel_takes(m, n, k)) {
      own_gemm(m, n, k, a, lda, b, ldb, beta, c, ldc);
      return;
    }
  }
  const double flops =
      2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const int threads = scipy_openblas_get_num_threads();
  // Exactly 2 threads (the helper is one thread); more go to OpenBLAS's pool.
  if (threads == 2 && flops >= parallel_min_flops()) {
    // Parts of >= 2^22 FLOP, at most 8: a helper that starts late still
    // takes some; the caller never waits for a part nobody started.
    const int64_t parts =
        std::max<int64_t>(2, std::min<int64_t>(8, static_cast<int64_t>(flops / 4194304.0)));
    const bool by_rows = m >= n;
    const SplitGemm<T> job{trans_a, trans_b, m,   n,    k, alpha, a,
                           lda,     b,       ldb, beta, c, ldc,   std::min(parts, by_rows ? m : n),
                           by_rows};
    scipy_openblas_set_num_threads(1);
    const bool ran = run_parts(
        {[](const void* ctx, int64_t i) { static_cast<const SplitGemm<T>*>(ctx)->run(i); }, &job,
         job.parts},
        false);
    scipy_openblas_set_num_threads(threads);
    if (ran) return;
  }
#endif
  SmallProductThreads threads_guard(m, n, k);
  blas_gemm<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace

template <>
void gemm<float>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  gemm_impl<float>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <>
void gemm<double>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                  const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                  double* c, int64_t ldc) {
  gemm_impl<double>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

bool small_product_prefers_nn(int64_t m, int64_t n, int64_t k, bool fp32) {
  // Measured OpenBLAS NT vs NN, row-major, on the AVX-512 EPYC:
  //  * m*n*k <= 100^3: NN takes the no-packing small kernels (3-5x faster);
  //  * weights over 4 MB (H = 1024): NN 4.5 vs NT 7.5 ms on 1 thread, 2.3 vs
  //    2.7 ms on 2 ([32 x 4096 x 1024]);
  //  * in between NT is faster (H = 256, B = 32, 2 threads: 108 vs 128 us),
  //    unless the own kernel takes the product.
  const double mnk = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const double kn = static_cast<double>(k) * static_cast<double>(n);
  return (fp32 && own_kernel_takes(m, n, k)) || mnk <= 1e6 || kn > kOwnMaxBElems;
}

void set_num_threads(int n) {
  scipy_openblas_set_num_threads(n < 1 ? 1 : n);
}
int get_num_threads() {
  return scipy_openblas_get_num_threads();
}

double parallel_min_flops() {
  static const double threshold = read_threshold();
  return threshold;
}

const char* blas_name() {
  return "scipy-openblas32";
}

}  // namespace tbptt::cpu
