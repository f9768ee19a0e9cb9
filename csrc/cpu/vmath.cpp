#include "cpu/vmath.h"

namespace tbptt::cpu::vmath {
namespace {

// 16 independent lanes: each lane is a plain sequential sum, so GCC
// vectorises the inner loop without reassociating (no -ffast-math), and the
// dependency chain per lane is n/16 long instead of n.
template <typename T>
TBPTT_INLINE double sum_squares_body(const T* x, int64_t n) {
  constexpr int64_t kLanes = 16;
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const double v = static_cast<double>(x[i + k]);
      acc[k] += v * v;
    }
  }
  double s = 0.0;
  for (; i < n; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  for (int64_t k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

}  // namespace

TBPTT_CLONES double sum_squares(const float* x, int64_t n) {
  return sum_squares_body(x, n);
}
TBPTT_CLONES double sum_squares(const double* x, int64_t n) {
  return sum_squares_body(x, n);
}

}  // namespace tbptt::cpu::vmath
