// The engine's own per-step product kernel (own_gemm.cpp), internal to the
// CPU policy: C[m, n] = A[m, k] B[k, n] + beta * C for a small m (the batch,
// or a group of it) against W_hh read in place or packed once per update.
// One register-tiled template, compiled three times and picked at run time:
//   avx512   8 x 32 tile on zmm (x86-64-v4)
//   avx2     6 x 16 tile on ymm (x86-64-v3: AVX2 + FMA)
//   generic  4 x 16 tile on 16-byte vectors, plain C++ (GCC/Clang vector
//            extensions): SSE2 on x86-64, NEON on aarch64
// TBPTT_ISA=avx512|avx2|generic picks a path the CPU supports (the test
// suite runs every path this way); TBPTT_NO_AVX512=1 acts as a CPU without
// AVX-512 (the avx2 path). The own kernel computes every element of C as one
// chain of multiply-adds over k in order, so how the rows or columns of C are
// split never changes a result.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && !defined(TBPTT_NO_CLONES)
#define TBPTT_OWN_KERNEL 1
#endif

namespace tbptt::cpu {

constexpr double kOwnMaxBElems = 1024 * 1024;  // k * n: own kernel on B in place up to 4 MB
constexpr int64_t kOwnMaxM = 32;               // rows (batch) the own kernel takes

// The kernel path in use: "avx512", "avx2", "generic" or "none".
const char* own_kernel_isa();
// Columns per panel of the path in use (32 on avx512, 16 otherwise): packed
// B is laid out in panels of this width, and n must be a multiple of 16.
int64_t own_panel_width();

// True when gemm<float>(NN, alpha = 1) of this shape runs the own kernel.
bool own_kernel_takes(int64_t m, int64_t n, int64_t k);

#ifdef TBPTT_OWN_KERNEL
// C[m, n] = A[m, k] B[k, n] + beta * C on the own kernel (own_kernel_takes);
// columns [j0, j1) of C only, j0 a multiple of own_panel_width().
void own_gemm(int64_t m, int64_t j0, int64_t j1, int64_t k, const float* a, int64_t lda,
              const float* b, int64_t ldb, bool packed, float beta, float* c, int64_t ldc);
#endif

}  // namespace tbptt::cpu
