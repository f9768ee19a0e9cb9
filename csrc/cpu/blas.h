// Typed GEMM wrapper over the scipy-openblas32 wheel (symbols prefixed
// scipy_) and the engine's thread policy. blas.cpp is the only file that
// includes cblas.h.
//
// Threads: the engine's thread count is OpenBLAS's setting (set_num_threads,
// threadpoolctl, OPENBLAS_NUM_THREADS), but OpenBLAS itself always runs
// single-threaded under the engine: while any engine call is active a
// BlasPin holds OpenBLAS at one thread, and the engine runs its own pool
// (pool.h) over work it cuts from the shapes alone. gemm_parallel() is such a
// cut: the same parts, the same single-threaded calls, whatever the thread
// count, so results are bit-identical for any thread count (OpenBLAS's own
// threading splits a product by the thread count, and its kernels for
// different block shapes round differently).
#pragma once

#include <cstdint>

namespace tbptt::cpu {

// C[m, n] = alpha * op(A) op(B) + beta * C, row-major, one single-threaded
// call (the own kernel for the float NN, alpha = 1 shapes it takes).
// op(A) is [m, k] (A stored [m, lda>=k], or [k, lda>=m] when trans_a);
// op(B) is [k, n] (B stored [k, ldb>=n], or [n, ldb>=k] when trans_b).
// C must not alias A or B. m, n or k == 0 is allowed (C scaled by beta, or untouched).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

// The same product cut into row (or column) blocks of C chosen from the
// shape alone (about 2 MFLOP each, at most 32), run on `threads` threads.
template <typename T>
void gemm_parallel(int threads, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                   T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                   int64_t ldc);

// True when gemm() runs C[m, n] = A[m, k] B[k, n] (+ C) faster in the NN
// layout than NT: OpenBLAS's small-matrix kernels and the own per-step kernel
// exist for NN only. Then a per-step product with a weight is faster against
// a transposed copy of the weight.
bool small_product_prefers_nn(int64_t m, int64_t n, int64_t k, bool fp32);

// Packed per-step products (float, own kernel, m <= 32, n % 16 == 0). A
// weight used by every step of an update is packed once into column panels
// (own_panel_width() columns, [k, width] blocks, contiguous), so each product
// streams it sequentially ([32 x 4096 x 1024] 2.7 ms vs OpenBLAS's 4.6 ms on
// one AVX-512 thread: OpenBLAS re-packs it on every call).
bool packed_available(int64_t m, int64_t n, int64_t k);
// out [n * k floats] = panels of op(B) [k, n]; op(B) = b [k, ldb >= n], or
// b^T for trans_b with b [n, ldb >= k].
void pack_panels(int64_t k, int64_t n, const float* b, int64_t ldb, bool trans_b, float* out);
// C[m, n] = A[m, k] op(B) + beta * C with op(B) packed by pack_panels, its
// panels cut into parts from the shape alone and run on `threads` threads.
void gemm_packed(int threads, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const float* bp, float beta, float* c, int64_t ldc);

// Holds OpenBLAS at one thread while it exists (nested and concurrent pins
// are counted; the last one restores the setting). threads() is the engine's
// thread count: the OpenBLAS setting the pin found.
class BlasPin {
 public:
  BlasPin();
  ~BlasPin();
  BlasPin(const BlasPin&) = delete;
  BlasPin& operator=(const BlasPin&) = delete;
  int threads() const { return threads_; }

 private:
  int threads_;
};

// The engine's thread count (while pinned: the setting to restore).
void set_num_threads(int n);
int get_num_threads();
const char* blas_name();

}  // namespace tbptt::cpu
