#include "cpu/vmath.h"

#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(TBPTT_NO_CLONES)
#define TBPTT_CLONES \
  __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define TBPTT_CLONES
#endif

namespace tbptt::cpu::vmath {

// The bodies are macros, not helper functions, so that each target_clones
// variant inlines and vectorises them (GCC does not inline a default-target
// helper into an avx2/avx512 clone).

// E = exp(X) for X clamped to [-87, 88]: Cephes expf polynomial, branch-free.
#define TBPTT_EXPF(X, E)                                                \
  do {                                                                  \
    float x_ = (X);                                                     \
    x_ = x_ < -87.0f ? -87.0f : (x_ > 88.0f ? 88.0f : x_);              \
    const float t_ = x_ * 1.44269504088896341f;                         \
    const float fn_ = (t_ + 12582912.0f) - 12582912.0f;                 \
    const float r_ = (x_ - fn_ * 0.693359375f) - fn_ * -2.12194440e-4f; \
    float p_ = 1.9875691500e-4f;                                        \
    p_ = p_ * r_ + 1.3981999507e-3f;                                    \
    p_ = p_ * r_ + 8.3334519073e-3f;                                    \
    p_ = p_ * r_ + 4.1665795894e-2f;                                    \
    p_ = p_ * r_ + 1.6666665459e-1f;                                    \
    p_ = p_ * r_ + 5.0000001201e-1f;                                    \
    const float e_ = p_ * r_ * r_ + r_ + 1.0f;                          \
    const int32_t bits_ = (static_cast<int32_t>(fn_) + 127) << 23;      \
    float scale_;                                                       \
    std::memcpy(&scale_, &bits_, sizeof(scale_));                       \
    (E) = e_ * scale_;                                                  \
  } while (0)

TBPTT_CLONES void sigmoid(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float e;
    TBPTT_EXPF(-x[i], e);
    x[i] = 1.0f / (1.0f + e);
  }
}

#define TBPTT_TANHF(V, OUT)                                \
  do {                                                     \
    const float v_ = (V);                                  \
    const float z_ = v_ * v_;                              \
    float q_ = -5.70498872745e-3f;                         \
    q_ = q_ * z_ + 2.06390887954e-2f;                      \
    q_ = q_ * z_ - 5.37397155531e-2f;                      \
    q_ = q_ * z_ + 1.33314422036e-1f;                      \
    q_ = q_ * z_ - 3.33332819422e-1f;                      \
    const float small_ = q_ * z_ * v_ + v_;                \
    float e2_;                                             \
    TBPTT_EXPF(2.0f * v_, e2_);                            \
    const float big_ = 1.0f - 2.0f / (e2_ + 1.0f);         \
    (OUT) = (v_ < 0.625f && v_ > -0.625f) ? small_ : big_; \
  } while (0)

// Small |x|: odd polynomial (no cancellation); else 1 - 2 / (exp(2x) + 1).
TBPTT_CLONES void tanh(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) TBPTT_TANHF(x[i], x[i]);
}

TBPTT_CLONES void tanh(const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) TBPTT_TANHF(x[i], y[i]);
}

void sigmoid(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = 1.0 / (1.0 + std::exp(-x[i]));
}

void tanh(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::tanh(x[i]);
}

void tanh(const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = std::tanh(x[i]);
}

}  // namespace tbptt::cpu::vmath
