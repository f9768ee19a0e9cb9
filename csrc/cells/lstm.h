// LSTM, gate order i, f, g, o (PyTorch): with z = a + b_ih + u + b_hh,
//   i, f, o = sigmoid, g = tanh;  c' = f*c + i*g;  h' = o*tanh(c').
// Cache: post-activation gates; aux = tanh(c'); c_in.
#pragma once

#include "cells/cell.h"

namespace tbptt::cells {

struct LstmCell {
  static constexpr const char* kName = "lstm";
  static constexpr int kGates = 4, kStates = 2;
  static constexpr bool kAux = true, kSplitU = false;

  template <typename M, typename T>
  TBPTT_HD static void forward(const Fwd<T>& r, int64_t h, int64_t j) {
    const T i = M::sigmoid(r.g[j] + r.bi[j] + r.bh[j]);
    const T f = M::sigmoid(r.g[h + j] + r.bi[h + j] + r.bh[h + j]);
    const T g = M::tanh(r.g[2 * h + j] + r.bi[2 * h + j] + r.bh[2 * h + j]);
    const T o = M::sigmoid(r.g[3 * h + j] + r.bi[3 * h + j] + r.bh[3 * h + j]);
    r.g[j] = i;
    r.g[h + j] = f;
    r.g[2 * h + j] = g;
    r.g[3 * h + j] = o;
    const T cn = f * r.c_in[j] + i * g;
    const T t = M::tanh(cn);
    r.c_out[j] = cn;
    r.aux[j] = t;
    r.h_out[j] = o * t;
  }

  template <bool kCarry, typename T>
  TBPTT_HD static void backward(const Bwd<T>& r, int64_t h, int64_t j) {
    const T dh = kCarry ? r.dh_in[j] + r.dh_carry[j] : r.dh_in[j];
    const T i = r.g[j], f = r.g[h + j], g = r.g[2 * h + j], o = r.g[3 * h + j];
    const T tc = r.aux[j];
    const T dc = (kCarry ? r.dc_carry[j] : T(0)) + dh * o * (T(1) - tc * tc);
    r.dg[j] = dc * g * i * (T(1) - i);
    r.dg[h + j] = dc * r.c_in[j] * f * (T(1) - f);
    r.dg[2 * h + j] = dc * i * (T(1) - g * g);
    r.dg[3 * h + j] = dh * tc * o * (T(1) - o);
    r.dc_carry[j] = dc * f;
  }
};

}  // namespace tbptt::cells
