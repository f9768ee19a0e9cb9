// The BLAS wrapper and its thread policy (blas.h): the only translation unit
// that includes cblas.h (scipy-openblas32 wheel). Products the own kernel
// takes go to own_gemm.cpp; parallel parts run on the pool (pool.h).
#include "cpu/blas.h"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <type_traits>

#include "cpu/own_gemm.h"
#include "cpu/pool.h"
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

template <typename T>
void gemm_impl(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
#ifdef TBPTT_OWN_KERNEL
  if constexpr (std::is_same_v<T, float>) {
    if (!trans_a && !trans_b && alpha == 1.0f && own_kernel_takes(m, n, k)) {
      own_gemm(m, 0, n, k, a, lda, b, ldb, false, beta, c, ldc);
      return;
    }
  }
#endif
  blas_gemm<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// How a product is cut into parts: from its shape alone (see blas.h).
struct Cut {
  int64_t parts, step;
  bool by_rows;
};
constexpr double kPartFlops = 2097152.0;  // 2^21 FLOP: ~30 us on one core
constexpr int64_t kMaxParts = 32;

int64_t round_up(int64_t v, int64_t a) {
  return (v + a - 1) / a * a;
}

// A part re-packs the operand it shares with the others (B when cut by rows,
// A by columns); when that operand is large a part must be long enough for
// the re-packing to stay small next to its multiply-adds (128 rows or
// columns: about 10 % on one core).
Cut cut(int64_t m, int64_t n, int64_t k, int64_t col_align, size_t elem) {
  const double flops =
      2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const int64_t want =
      std::clamp<int64_t>(static_cast<int64_t>(flops / kPartFlops), int64_t{1}, kMaxParts);
  const bool by_rows = m >= n;
  const int64_t len = by_rows ? m : n, align = by_rows ? 8 : col_align;
  const double shared =
      static_cast<double>(k) * static_cast<double>(by_rows ? n : m) * static_cast<double>(elem);
  const int64_t min_len = shared > 262144.0 ? 128 : 1;
  const int64_t step = round_up(std::max((len + want - 1) / want, min_len), align);
  return {(len + step - 1) / step, step, by_rows};
}

std::mutex pin_mu;
int pins = 0;          // live BlasPins
int pinned_saved = 1;  // the setting to restore when the last pin goes

}  // namespace

BlasPin::BlasPin() {
  const std::lock_guard<std::mutex> lock(pin_mu);
  if (pins++ == 0) {
    pinned_saved = scipy_openblas_get_num_threads();
    if (pinned_saved != 1) scipy_openblas_set_num_threads(1);
  }
  threads_ = std::max(1, pinned_saved);
}

BlasPin::~BlasPin() {
  const std::lock_guard<std::mutex> lock(pin_mu);
  if (--pins == 0 && pinned_saved != 1) scipy_openblas_set_num_threads(pinned_saved);
}

template <typename T>
void gemm_parallel(int threads, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                   T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                   int64_t ldc) {
  const Cut p = cut(m, n, k, 32, sizeof(T));
  if (p.parts <= 1) {
    gemm_impl<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  parallel_for(threads, p.parts, [&](int64_t i) {
    const int64_t lo = i * p.step, hi = std::min(p.by_rows ? m : n, lo + p.step);
    if (p.by_rows) {
      gemm_impl<T>(trans_a, trans_b, hi - lo, n, k, alpha, trans_a ? a + lo : a + lo * lda, lda, b,
                   ldb, beta, c + lo * ldc, ldc);
    } else {
      gemm_impl<T>(trans_a, trans_b, m, hi - lo, k, alpha, a, lda, trans_b ? b + lo * ldb : b + lo,
                   ldb, beta, c + lo, ldc);
    }
  });
}
template void gemm_parallel<float>(int, bool, bool, int64_t, int64_t, int64_t, float, const float*,
                                   int64_t, const float*, int64_t, float, float*, int64_t);
template void gemm_parallel<double>(int, bool, bool, int64_t, int64_t, int64_t, double,
                                    const double*, int64_t, const double*, int64_t, double, double*,
                                    int64_t);

bool packed_available(int64_t m, int64_t n, int64_t k) {
#ifdef TBPTT_OWN_KERNEL
  return m >= 1 && m <= kOwnMaxM && n % 16 == 0 && k >= 1;
#else
  (void)m, (void)n, (void)k;
  return false;
#endif
}

void pack_panels(int64_t k, int64_t n, const float* b, int64_t ldb, bool trans_b, float* out) {
  const int64_t width = own_panel_width();
  for (int64_t j0 = 0; j0 < n; j0 += width) {
    const int64_t nr = std::min<int64_t>(width, n - j0);
    float* panel = out + j0 * k;  // [k, nr]
    if (trans_b) {  // b is [n, ldb >= k]: panel row p gathers column p of nr rows of b
      for (int64_t p = 0; p < k; ++p)
        for (int64_t c = 0; c < nr; ++c) panel[p * nr + c] = b[(j0 + c) * ldb + p];
    } else {
      for (int64_t p = 0; p < k; ++p)
        std::memcpy(panel + p * nr, b + p * ldb + j0, static_cast<size_t>(nr) * sizeof(float));
    }
  }
}

void gemm_packed(int threads, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const float* bp, float beta, float* c, int64_t ldc) {
#ifdef TBPTT_OWN_KERNEL
  const Cut p = cut(1, n, m * k, own_panel_width(), 0);  // column parts, whole panels
  parallel_for(threads, p.parts, [&](int64_t i) {
    const int64_t lo = i * p.step;
    own_gemm(m, lo, std::min(n, lo + p.step), k, a, lda, bp, 0, true, beta, c, ldc);
  });
#else
  (void)threads, (void)m, (void)n, (void)k, (void)a, (void)lda, (void)bp, (void)beta, (void)c;
  (void)ldc;
  throw std::logic_error("gemm_packed: no packed kernel in this build");
#endif
}

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
  const std::lock_guard<std::mutex> lock(pin_mu);
  n = std::max(1, n);
  if (pins > 0) {
    pinned_saved = n;  // applied when the last pin goes; the engine reads it per call
  } else {
    scipy_openblas_set_num_threads(n);
  }
}
int get_num_threads() {
  const std::lock_guard<std::mutex> lock(pin_mu);
  return pins > 0 ? pinned_saved : scipy_openblas_get_num_threads();
}

const char* blas_name() {
  return "scipy-openblas32";
}

}  // namespace tbptt::cpu
