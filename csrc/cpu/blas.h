// Typed GEMM wrapper over the scipy-openblas32 wheel (symbols prefixed
// scipy_). blas.cpp is the only file that includes cblas.h.
//
// Threading policy (measured on the 2-core CI box): a 2-thread OpenBLAS call
// stalls ~8 ms whenever another process holds a core, and OpenBLAS's idle
// workers spin-wait for a long time after each call. Hence gemm() never uses
// OpenBLAS's own pool on x86-64 (GCC) builds:
//   * 2*m*n*k < parallel_min_flops() (default 2^23 FLOP, ~80 us on one core):
//     one single-threaded call;
//   * larger products, with set_num_threads(2): split into 2-8 row (or
//     column) blocks, each a single-threaded OpenBLAS call, shared between
//     the caller and one helper thread (blas.cpp). Blocks are claimed one at a
//     time, so the caller never waits for a block nobody started (no stall
//     when the helper is descheduled). LSTM H = 1024, B = 32, (64,64), 2
//     threads: 7.7 ms per step instead of 9.6 with OpenBLAS's pool. With
//     more than 2 threads they use OpenBLAS's pool as configured;
//   * per-step products with batch <= 32 run the own AVX-512 kernel (below),
//     its column panels shared with the same helper from ~2 MFLOP up.
// The threshold can be changed with the environment variable
// TBPTT_PARALLEL_MIN_FLOPS (read once). The thread count is OpenBLAS's
// (set_num_threads / threadpoolctl), process-global: an engine running in
// another Python thread at the same moment may see a temporary
// single-thread setting, and only one caller at a time gets the helper.
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

// True when gemm() runs C[m, n] = A[m, k] B[k, n] (+ C) faster in the NN
// layout than NT: OpenBLAS's small-matrix kernels and the own per-step kernel
// (float, AVX-512, batch <= 32; blas.cpp) exist for NN only. Then a per-step
// product with a weight is faster against a transposed copy of the weight.
bool small_product_prefers_nn(int64_t m, int64_t n, int64_t k, bool fp32);

// Packed per-step products (float, AVX-512, m <= 32, n % 16 == 0; see the own
// kernel in blas.cpp). A weight used by every step of an update is packed
// once into column panels ([k, 32] blocks, contiguous), so each product
// streams it sequentially: [32 x 4096 x 1024] 2.7 ms vs OpenBLAS's 4.6 ms on
// one thread (OpenBLAS re-packs it on every call). Products from ~2 MFLOP up
// share panels with one helper thread when set_num_threads(n >= 2).
bool packed_available(int64_t m, int64_t n, int64_t k);
// out [n * k floats] = panels of op(B) [k, n]; op(B) = b [k, ldb >= n], or
// b^T for trans_b with b [n, ldb >= k].
void pack_panels(int64_t k, int64_t n, const float* b, int64_t ldb, bool trans_b, float* out);
// C[m, n] = A[m, k] op(B) + beta * C with op(B) packed by pack_panels.
void gemm_packed(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* bp,
                 float beta, float* c, int64_t ldc);

void set_num_threads(int n);
int get_num_threads();
double parallel_min_flops();
const char* blas_name();

}  // namespace tbptt::cpu
