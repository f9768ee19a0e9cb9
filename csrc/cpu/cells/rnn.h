// Elman RNN cell, tanh or relu: h' = act(a + b_ih + h W_hh^T + b_hh).
// Cache: gates = h_out = h' (post-activation).
#pragma once

#include "cpu/blas.h"
#include "cpu/cells/cell.h"
#include "cpu/vmath.h"

namespace tbptt::cpu {

// The pointwise passes below, compiled per ISA level for float
// (cells/kernels.cpp); forward/backward call these, never the bodies directly.
void rnn_forward_pass(const LayerParams<float>& p, int64_t batch, int64_t hidden, float* gates,
                      bool relu);
void rnn_forward_pass(const LayerParams<double>& p, int64_t batch, int64_t hidden, double* gates,
                      bool relu);
void rnn_backward_pass(int64_t n, const float* y, const StepGrad<float>& d, bool has_carry,
                       bool relu);
void rnn_backward_pass(int64_t n, const double* y, const StepGrad<double>& d, bool has_carry,
                       bool relu);

template <typename T, bool kRelu>
struct RnnCell {
  static constexpr int kGates = 1;

  // scratch unused (kept for a uniform cell signature).
  static void forward(const LayerParams<T>& p, int64_t batch, int64_t hidden, const StepCache<T>& s,
                      T* /*c_state*/, T* /*scratch*/) {
    const int64_t h = hidden;
    recurrent_product(p, batch, h, h, s.h_in, T(1), s.gates);
    rnn_forward_pass(p, batch, hidden, s.gates, kRelu);
  }

  static void backward(const LayerParams<T>& p, int64_t batch, int64_t hidden,
                       const StepCache<T>& s, const StepGrad<T>& d, bool has_carry,
                       bool want_carry) {
    const int64_t h = hidden;
    rnn_backward_pass(batch * h, s.gates, d, has_carry, kRelu);
    if (want_carry) recurrent_grad_product(p, batch, h, h, d.dg, T(0), d.dh_carry);
  }
};

// Pointwise bodies shared by the tanh and relu cells (relu: a runtime flag,
// so one clone set serves both).
template <typename T>
TBPTT_INLINE void rnn_forward_pointwise(const LayerParams<T>& p, int64_t batch, int64_t hidden,
                                        T* gates, bool relu) {
  const int64_t h = hidden;
  const T* __restrict bi = p.b_ih;
  const T* __restrict bh = p.b_hh;
  for (int64_t b = 0; b < batch; ++b) {
    T* __restrict g = gates + b * h;
    if (relu) {
      for (int64_t j = 0; j < h; ++j) {
        const T v = g[j] + bi[j] + bh[j];
        g[j] = v > T(0) ? v : T(0);
      }
    } else {
      for (int64_t j = 0; j < h; ++j) g[j] = vmath::tanh(g[j] + bi[j] + bh[j]);
    }
  }
}

// kCarry: dh_carry holds the gradient from step s+1 (a template flag so the
// loop has no branch and vectorises).
template <bool kCarry, typename T>
TBPTT_INLINE void rnn_backward_pointwise(int64_t n, const T* __restrict y, const StepGrad<T>& d,
                                         bool relu) {
  const T* __restrict dhi = d.dh_in;
  const T* __restrict dhc = d.dh_carry;
  T* __restrict dg = d.dg;
  if (relu) {
    for (int64_t i = 0; i < n; ++i)
      dg[i] = y[i] > T(0) ? (kCarry ? dhi[i] + dhc[i] : dhi[i]) : T(0);
  } else {
    for (int64_t i = 0; i < n; ++i)
      dg[i] = (kCarry ? dhi[i] + dhc[i] : dhi[i]) * (T(1) - y[i] * y[i]);
  }
}

}  // namespace tbptt::cpu
