// Typed GEMM wrapper over the scipy-openblas32 wheel (symbols prefixed
// scipy_). blas.cpp is the only file that includes cblas.h.
//
// Threading policy (measured on the 2-core CI box): a 2-thread OpenBLAS call
// stalls ~8 ms whenever another process holds a core, so small products ran
// 20-170x slower threaded, and a second thread adds little below batch 8.
// Hence every product decides for itself (inside gemm()):
//   * 2*m*n*k < parallel_min_flops() (default 2^26 FLOP, ~1 ms on one core):
//     run on ONE thread. This covers every per-step recurrent product
//     (h W_hh^T, dG W_hh) except very large ones, and the block/window
//     products of small models;
//   * larger products (block input projections, readout and weight gradients
//     of big models; per-step products from e.g. LSTM H=1024, B=32) use the
//     configured thread count (set_num_threads / threadpoolctl).
// The threshold can be changed with the environment variable
// TBPTT_PARALLEL_MIN_FLOPS (read once). Thread counts are process-global in
// OpenBLAS: an engine running in another Python thread at the same moment may
// see the temporary single-thread setting.
#pragma once

#include <cstdint>

namespace tbptt::cpu {

// C[m, n] = alpha * op(A) op(B) + beta * C, row-major.
// op(A) is [m, k] (A stored [m, lda>=k], or [k, lda>=m] when trans_a);
// op(B) is [k, n] (B stored [k, ldb>=n], or [n, ldb>=k] when trans_b).
// C must not alias A or B. m, n or k == 0 is allowed (C scaled by beta, or untouched).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

void set_num_threads(int n);
int get_num_threads();
double parallel_min_flops();
const char* blas_name();

}  // namespace tbptt::cpu
