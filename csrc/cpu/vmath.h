// Scalar activations written so that a loop calling them vectorises: the cells'
// fused pointwise passes (cells/*.h) call these per element, and
// cells/kernels.cpp compiles those passes once per x86-64 ISA level
// (target_clones), so no CPU feature is required at build or load time.
// float: branch-free Cephes-style exp/tanh (about 2 ulp); double: libm (the
// float64 contract is 1e-10 relative, so no approximation there).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// always_inline: GCC inlines a default-target function into a target_clones
// clone only when forced, and the clones exist to vectorise these bodies.
#define TBPTT_INLINE inline __attribute__((always_inline))

// Before a cell's inner loop over j: its rows (gate blocks of one array, c,
// h, ...) never overlap, which GCC cannot prove (it ignores restrict on local
// pointers) and with a dozen arrays exceeds its runtime alias-check budget.
#if defined(__clang__)
#define TBPTT_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define TBPTT_IVDEP _Pragma("GCC ivdep")
#else
#define TBPTT_IVDEP
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(TBPTT_NO_CLONES)
// ISA levels, not CPU models: "arch=skylake-avx512" / "arch=haswell" dispatch
// on the CPU *model* (__builtin_cpu_is), so every AMD CPU got the SSE2 default
// (measured 5.4 ns per sigmoid on an AVX-512 EPYC vs 0.35 ns for x86-64-v4).
#define TBPTT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TBPTT_CLONES
#endif

namespace tbptt::cpu::vmath {

// exp(x) for x clamped to [-87, 88]: Cephes expf polynomial, branch-free.
TBPTT_INLINE float exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float fn = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;  // 2^fn
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

TBPTT_INLINE float sigmoid(float x) {
  return 1.0f / (1.0f + exp(-x));
}

// Small |x|: odd polynomial (no cancellation); else 1 - 2 / (exp(2x) + 1).
TBPTT_INLINE float tanh(float v) {
  const float z = v * v;
  float q = -5.70498872745e-3f;
  q = q * z + 2.06390887954e-2f;
  q = q * z - 5.37397155531e-2f;
  q = q * z + 1.33314422036e-1f;
  q = q * z - 3.33332819422e-1f;
  const float small = q * z * v + v;
  const float big = 1.0f - 2.0f / (exp(2.0f * v) + 1.0f);
  return (v < 0.625f && v > -0.625f) ? small : big;
}

TBPTT_INLINE double sigmoid(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}
TBPTT_INLINE double tanh(double x) {
  return std::tanh(x);
}

}  // namespace tbptt::cpu::vmath

namespace tbptt::cpu::vmath {

// sum_i x[i]^2 accumulated in double (gradient norm for clipping and the
// finiteness check); vmath.cpp, one clone per ISA level.
double sum_squares(const float* x, int64_t n);
double sum_squares(const double* x, int64_t n);

}  // namespace tbptt::cpu::vmath
