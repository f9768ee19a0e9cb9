// Elman RNN, tanh or relu: h' = act(a + b_ih + u + b_hh). The post-activation
// is the output (G = 1): g holds h' and is the layer output.
#pragma once

#include "cells/cell.h"

namespace tbptt::cells {

template <bool kRelu>
struct RnnCell {
  static constexpr const char* kName = kRelu ? "rnn_relu" : "rnn_tanh";
  static constexpr int kGates = 1, kStates = 1;
  static constexpr bool kAux = false, kSplitU = false;

  template <typename M, typename T>
  TBPTT_HD static void forward(const Fwd<T>& r, int64_t /*h*/, int64_t j) {
    const T v = r.g[j] + r.bi[j] + r.bh[j];
    if constexpr (kRelu) {
      r.g[j] = v > T(0) ? v : T(0);
    } else {
      r.g[j] = M::tanh(v);
    }
  }

  template <bool kCarry, typename T>
  TBPTT_HD static void backward(const Bwd<T>& r, int64_t /*h*/, int64_t j) {
    const T y = r.g[j];
    const T dh = kCarry ? r.dh_in[j] + r.dh_carry[j] : r.dh_in[j];
    if constexpr (kRelu) {
      r.dg[j] = y > T(0) ? dh : T(0);
    } else {
      r.dg[j] = dh * (T(1) - y * y);
    }
  }
};

using RnnTanhCell = RnnCell<false>;
using RnnReluCell = RnnCell<true>;

}  // namespace tbptt::cells
