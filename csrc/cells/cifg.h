// CIFG: the LSTM with coupled input and forget gates (Greff et al. 2017,
// "LSTM: A Search Space Odyssey"), gate order f, g, o: with z = a + b_ih + u + b_hh,
//   f, o = sigmoid, g = tanh;  c' = f*c + (1 - f)*g;  h' = o*tanh(c').
// Cache: post-activation gates; aux = tanh(c'); c_in.
#pragma once

#include "cells/cell.h"

namespace tbptt::cells {

struct CifgCell {
  static constexpr const char* kName = "cifg";
  static constexpr int kGates = 3, kStates = 2;
  static constexpr bool kAux = true, kSplitU = false;

  template <typename M, typename T>
  TBPTT_HD static void forward(const Fwd<T>& r, int64_t h, int64_t j) {
    const T f = M::sigmoid(r.g[j] + r.bi[j] + r.bh[j]);
    const T g = M::tanh(r.g[h + j] + r.bi[h + j] + r.bh[h + j]);
    const T o = M::sigmoid(r.g[2 * h + j] + r.bi[2 * h + j] + r.bh[2 * h + j]);
    r.g[j] = f;
    r.g[h + j] = g;
    r.g[2 * h + j] = o;
    const T cn = f * r.c_in[j] + (T(1) - f) * g;
    const T t = M::tanh(cn);
    r.c_out[j] = cn;
    r.aux[j] = t;
    r.h_out[j] = o * t;
  }

  // dc' = dc_carry + dh*o*(1 - tanh(c')^2); c' depends on f through
  // f*c + (1-f)*g, so d f = dc' * (c - g), d g = dc' * (1 - f).
  template <bool kCarry, typename T>
  TBPTT_HD static void backward(const Bwd<T>& r, int64_t h, int64_t j) {
    const T dh = kCarry ? r.dh_in[j] + r.dh_carry[j] : r.dh_in[j];
    const T f = r.g[j], g = r.g[h + j], o = r.g[2 * h + j];
    const T tc = r.aux[j];
    const T dc = (kCarry ? r.dc_carry[j] : T(0)) + dh * o * (T(1) - tc * tc);
    r.dg[j] = dc * (r.c_in[j] - g) * f * (T(1) - f);
    r.dg[h + j] = dc * (T(1) - f) * (T(1) - g * g);
    r.dg[2 * h + j] = dh * tc * o * (T(1) - o);
    r.dc_carry[j] = dc * f;
  }
};

}  // namespace tbptt::cells
