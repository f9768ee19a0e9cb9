// The engine's own per-step product kernel (own_gemm.cpp), internal to the
// CPU policy: blas.cpp routes NN float products it takes here, and shares
// threaded OpenBLAS work with the same helper thread (run_parts).
// AVX-512 only (the 8 x 32 register tile needs 32 zmm); elsewhere
// TBPTT_OWN_KERNEL is undefined and every product goes to OpenBLAS.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(TBPTT_NO_CLONES)
#define TBPTT_OWN_KERNEL 1
#endif

namespace tbptt::cpu {

constexpr double kOwnMaxBElems = 1024 * 1024;  // k * n: own kernel for B up to 4 MB

// True when gemm<float>(NN, alpha = 1) of this shape runs the own kernel.
bool own_kernel_takes(int64_t m, int64_t n, int64_t k);

#ifdef TBPTT_OWN_KERNEL
// C[m, n] = A[m, k] B[k, n] + beta * C on the own kernel (own_kernel_takes).
void own_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float beta, float* c, int64_t ldc);

// Work split into `count` independent parts: fn(ctx, i) for i < count.
struct Parts {
  void (*fn)(const void* ctx, int64_t part);
  const void* ctx;
  int64_t count;
};
// Runs all parts, sharing them with the helper thread unless another caller
// holds it. Returns false (nothing run) when the helper is busy and !must_run.
bool run_parts(const Parts& parts, bool must_run);
#endif

}  // namespace tbptt::cpu
