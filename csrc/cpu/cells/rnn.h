// Elman RNN cell, tanh or relu: h' = act(a + b_ih + h W_hh^T + b_hh).
// Cache: gates = h_out = h' (post-activation).
#pragma once

#include "cpu/blas.h"
#include "cpu/cells/cell.h"
#include "cpu/vmath.h"

namespace tbptt::cpu {

template <typename T, bool kRelu>
struct RnnCell {
  static constexpr int kGates = 1;

  // scratch unused (kept for a uniform cell signature).
  static void forward(const LayerParams<T>& p, int64_t batch, int64_t hidden, const StepCache<T>& s,
                      T* /*c_state*/, T* /*scratch*/) {
    const int64_t h = hidden;
    gemm<T>(false, true, batch, h, h, T(1), s.h_in, h, p.w_hh, h, T(1), s.gates, h);
    for (int64_t b = 0; b < batch; ++b) {
      T* g = s.gates + b * h;
      for (int64_t j = 0; j < h; ++j) g[j] += p.b_ih[j] + p.b_hh[j];
      if constexpr (kRelu) {
        for (int64_t j = 0; j < h; ++j) g[j] = g[j] > T(0) ? g[j] : T(0);
      } else {
        vmath::tanh(g, h);
      }
    }
  }

  static void backward(const LayerParams<T>& p, int64_t batch, int64_t hidden,
                       const StepCache<T>& s, const StepGrad<T>& d, bool has_carry,
                       bool want_carry) {
    const int64_t h = hidden;
    const int64_t n = batch * h;
    const T* y = s.gates;
    for (int64_t i = 0; i < n; ++i) {
      const T dh = has_carry ? d.dh_in[i] + d.dh_carry[i] : d.dh_in[i];
      if constexpr (kRelu) {
        d.dg[i] = y[i] > T(0) ? dh : T(0);
      } else {
        d.dg[i] = dh * (T(1) - y[i] * y[i]);
      }
    }
    if (want_carry)
      gemm<T>(false, false, batch, h, h, T(1), d.dg, h, p.w_hh, h, T(0), d.dh_carry, h);
  }
};

}  // namespace tbptt::cpu
