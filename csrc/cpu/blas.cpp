// The only translation unit that includes cblas.h (scipy-openblas32 wheel).
#include "cpu/blas.h"

#include <cblas.h>

#include <climits>
#include <cstdlib>

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
  return 67108864.0;  // 2^26
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

}  // namespace

template <>
void gemm<float>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  if (m == 0 || n == 0) return;
  SmallProductThreads threads(m, n, k);
  scipy_cblas_sgemm(CblasRowMajor, tr(trans_a), tr(trans_b), to_blasint(m), to_blasint(n),
                    to_blasint(k), alpha, a, to_blasint(lda), b, to_blasint(ldb), beta, c,
                    to_blasint(ldc));
}

template <>
void gemm<double>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                  const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                  double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  SmallProductThreads threads(m, n, k);
  scipy_cblas_dgemm(CblasRowMajor, tr(trans_a), tr(trans_b), to_blasint(m), to_blasint(n),
                    to_blasint(k), alpha, a, to_blasint(lda), b, to_blasint(ldb), beta, c,
                    to_blasint(ldc));
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
