// LSTM cell, gate order i, f, g, o (PyTorch):
//   [i f g o] = act(a + b_ih + h W_hh^T + b_hh), i,f,o sigmoid, g tanh,
//   c' = f*c + i*g,  h' = o*tanh(c').
// Cache: gates = post-activation i,f,g,o; aux = tanh(c'); c_in, h_in, h_out.
#pragma once

#include "cpu/blas.h"
#include "cpu/cells/cell.h"
#include "cpu/vmath.h"

namespace tbptt::cpu {

// The pointwise passes below, compiled per ISA level for float
// (cells/kernels.cpp); forward/backward call these, never the bodies directly.
void lstm_forward_pass(const LayerParams<float>& p, int64_t batch, int64_t hidden,
                       const StepCache<float>& s, float* c_state);
void lstm_forward_pass(const LayerParams<double>& p, int64_t batch, int64_t hidden,
                       const StepCache<double>& s, double* c_state);
void lstm_backward_pass(int64_t batch, int64_t hidden, const StepCache<float>& s,
                        const StepGrad<float>& d, bool has_carry);
void lstm_backward_pass(int64_t batch, int64_t hidden, const StepCache<double>& s,
                        const StepGrad<double>& d, bool has_carry);

template <typename T>
struct LstmCell {
  static constexpr int kGates = 4;

  // c_state [B, H]: out: c' (must not alias s.c_in). scratch unused.
  static void forward(const LayerParams<T>& p, int64_t batch, int64_t hidden, const StepCache<T>& s,
                      T* c_state, T* /*scratch*/) {
    const int64_t h = hidden, gh = 4 * hidden;
    recurrent_product(p, batch, h, gh, s.h_in, T(1), s.gates);
    lstm_forward_pass(p, batch, hidden, s, c_state);
  }

  static void backward(const LayerParams<T>& p, int64_t batch, int64_t hidden,
                       const StepCache<T>& s, const StepGrad<T>& d, bool has_carry,
                       bool want_carry) {
    const int64_t h = hidden, gh = 4 * hidden;
    lstm_backward_pass(batch, hidden, s, d, has_carry);
    if (want_carry) recurrent_grad_product(p, batch, h, gh, d.dg, T(0), d.dh_carry);
  }

  // s.gates holds a + u (pre-activation, biases not yet added); one pass per
  // row: biases, activations, c', tanh(c'), h'.
  TBPTT_INLINE static void forward_pointwise(const LayerParams<T>& p, int64_t batch, int64_t hidden,
                                             const StepCache<T>& s, T* c_state) {
    const int64_t h = hidden, gh = 4 * hidden;
    const T* __restrict bi = p.b_ih, * __restrict bf = p.b_ih + h, * __restrict bg = p.b_ih + 2 * h, * __restrict bo = p.b_ih + 3 * h;
    const T* __restrict hi = p.b_hh, * __restrict hf = p.b_hh + h, * __restrict hg = p.b_hh + 2 * h, * __restrict ho = p.b_hh + 3 * h;
    for (int64_t b = 0; b < batch; ++b) {
      T* __restrict gi = s.gates + b * gh, * __restrict gf = gi + h, * __restrict gg = gi + 2 * h, * __restrict go = gi + 3 * h;
      const T* __restrict ci = s.c_in + b * h;
      T* __restrict c = c_state + b * h;
      T* __restrict tc = s.aux + b * h;
      T* __restrict hout = s.h_out + b * h;
      TBPTT_IVDEP
      for (int64_t j = 0; j < h; ++j) {
        const T i = vmath::sigmoid(gi[j] + bi[j] + hi[j]);
        const T f = vmath::sigmoid(gf[j] + bf[j] + hf[j]);
        const T g = vmath::tanh(gg[j] + bg[j] + hg[j]);
        const T o = vmath::sigmoid(go[j] + bo[j] + ho[j]);
        gi[j] = i;
        gf[j] = f;
        gg[j] = g;
        go[j] = o;
        const T cn = f * ci[j] + i * g;
        const T t = vmath::tanh(cn);
        c[j] = cn;
        tc[j] = t;
        hout[j] = o * t;
      }
    }
  }

  // kCarry: dh_carry/dc_carry hold the gradient from step s+1 (a template
  // flag so the loop has no branch and vectorises).
  template <bool kCarry>
  TBPTT_INLINE static void backward_pointwise(int64_t batch, int64_t hidden, const StepCache<T>& s,
                                              const StepGrad<T>& d) {
    const int64_t h = hidden, gh = 4 * hidden;
    for (int64_t b = 0; b < batch; ++b) {
      const T* __restrict gi = s.gates + b * gh, * __restrict gf = gi + h, * __restrict gg = gi + 2 * h, * __restrict go = gi + 3 * h;
      const T* __restrict tc = s.aux + b * h;
      const T* __restrict ci = s.c_in + b * h;
      const T* __restrict dhi = d.dh_in + b * h;
      const T* __restrict dhc = d.dh_carry + b * h;
      T* __restrict dcc = d.dc_carry + b * h;
      T* __restrict di = d.dg + b * gh, * __restrict df = di + h, * __restrict dgg = di + 2 * h, * __restrict dO = di + 3 * h;
      TBPTT_IVDEP
      for (int64_t j = 0; j < h; ++j) {
        const T dh = kCarry ? dhi[j] + dhc[j] : dhi[j];
        const T i = gi[j], f = gf[j], g = gg[j], o = go[j];
        const T dc = (kCarry ? dcc[j] : T(0)) + dh * o * (T(1) - tc[j] * tc[j]);
        di[j] = dc * g * i * (T(1) - i);
        df[j] = dc * ci[j] * f * (T(1) - f);
        dgg[j] = dc * i * (T(1) - g * g);
        dO[j] = dh * tc[j] * o * (T(1) - o);
        dcc[j] = dc * f;
      }
    }
  }
};

}  // namespace tbptt::cpu
