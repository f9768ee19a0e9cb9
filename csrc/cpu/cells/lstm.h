// LSTM cell, gate order i, f, g, o (PyTorch):
//   [i f g o] = act(a + b_ih + h W_hh^T + b_hh), i,f,o sigmoid, g tanh,
//   c' = f*c + i*g,  h' = o*tanh(c').
// Cache: gates = post-activation i,f,g,o; aux = tanh(c'); c_in, h_in, h_out.
#pragma once

#include "cpu/blas.h"
#include "cpu/cells/cell.h"
#include "cpu/vmath.h"

namespace tbptt::cpu {

template <typename T>
struct LstmCell {
  static constexpr int kGates = 4;

  // c_state [B, H]: out: c' (must not alias s.c_in). scratch unused.
  static void forward(const LayerParams<T>& p, int64_t batch, int64_t hidden, const StepCache<T>& s,
                      T* c_state, T* /*scratch*/) {
    const int64_t h = hidden, gh = 4 * hidden;
    gemm<T>(false, true, batch, gh, h, T(1), s.h_in, h, p.w_hh, h, T(1), s.gates, gh);
    for (int64_t b = 0; b < batch; ++b) {
      T* g = s.gates + b * gh;
      for (int64_t j = 0; j < gh; ++j) g[j] += p.b_ih[j] + p.b_hh[j];
      vmath::sigmoid(g, 2 * h);
      vmath::tanh(g + 2 * h, h);
      vmath::sigmoid(g + 3 * h, h);
      const T* ci = s.c_in + b * h;
      T* c = c_state + b * h;
      for (int64_t j = 0; j < h; ++j) c[j] = g[h + j] * ci[j] + g[j] * g[2 * h + j];
      T* tc = s.aux + b * h;
      vmath::tanh(c, tc, h);
      T* ho = s.h_out + b * h;
      for (int64_t j = 0; j < h; ++j) ho[j] = g[3 * h + j] * tc[j];
    }
  }

  static void backward(const LayerParams<T>& p, int64_t batch, int64_t hidden,
                       const StepCache<T>& s, const StepGrad<T>& d, bool has_carry,
                       bool want_carry) {
    const int64_t h = hidden, gh = 4 * hidden;
    for (int64_t b = 0; b < batch; ++b) {
      const T* g = s.gates + b * gh;
      const T* tc = s.aux + b * h;
      const T* ci = s.c_in + b * h;
      const T* dhi = d.dh_in + b * h;
      T* dhc = d.dh_carry + b * h;
      T* dcc = d.dc_carry + b * h;
      T* dg = d.dg + b * gh;
      for (int64_t j = 0; j < h; ++j) {
        const T dh = has_carry ? dhi[j] + dhc[j] : dhi[j];
        const T i = g[j], f = g[h + j], gg = g[2 * h + j], o = g[3 * h + j];
        const T dc = (has_carry ? dcc[j] : T(0)) + dh * o * (T(1) - tc[j] * tc[j]);
        dg[j] = dc * gg * i * (T(1) - i);
        dg[h + j] = dc * ci[j] * f * (T(1) - f);
        dg[2 * h + j] = dc * i * (T(1) - gg * gg);
        dg[3 * h + j] = dh * tc[j] * o * (T(1) - o);
        dcc[j] = dc * f;
      }
    }
    if (want_carry)
      gemm<T>(false, false, batch, h, gh, T(1), d.dg, gh, p.w_hh, h, T(0), d.dh_carry, h);
  }
};

}  // namespace tbptt::cpu
