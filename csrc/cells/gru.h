// GRU, gate order r, z, n (PyTorch), u = h W_hh^T kept apart (kSplitU):
//   r = sigmoid(a_r + b_ir + u_r + b_hr), z = sigmoid(a_z + b_iz + u_z + b_hz),
//   n = tanh(a_n + b_in + r * (u_n + b_hn)),  h' = (1 - z) * n + z * h.
// Cache: post-activation gates; aux = u_n + b_hn as computed in the forward
// (the "stored" rule reuses it). The hidden-side gradient differs from the
// input side in the n block (dgu_n = dg_n * r); dh_carry gets the direct part dh * z.
#pragma once

#include "cells/cell.h"

namespace tbptt::cells {

struct GruCell {
  static constexpr const char* kName = "gru";
  static constexpr int kGates = 3, kStates = 1;
  static constexpr bool kAux = true, kSplitU = true;

  template <typename M, typename T>
  TBPTT_HD static void forward(const Fwd<T>& r, int64_t h, int64_t j) {
    const T rr = M::sigmoid(r.g[j] + r.bi[j] + r.u[j] + r.bh[j]);
    const T z = M::sigmoid(r.g[h + j] + r.bi[h + j] + r.u[h + j] + r.bh[h + j]);
    const T un = r.u[2 * h + j] + r.bh[2 * h + j];
    const T n = M::tanh(r.g[2 * h + j] + r.bi[2 * h + j] + rr * un);
    r.g[j] = rr;
    r.g[h + j] = z;
    r.g[2 * h + j] = n;
    r.aux[j] = un;
    r.h_out[j] = (T(1) - z) * n + z * r.h_in[j];
  }

  template <bool kCarry, typename T>
  TBPTT_HD static void backward(const Bwd<T>& r, int64_t h, int64_t j) {
    const T dh = kCarry ? r.dh_in[j] + r.dh_carry[j] : r.dh_in[j];
    const T rr = r.g[j], z = r.g[h + j], n = r.g[2 * h + j];
    const T dn = dh * (T(1) - z) * (T(1) - n * n);
    const T dr = dn * r.aux[j] * rr * (T(1) - rr);
    const T dz = dh * (r.h_in[j] - n) * z * (T(1) - z);
    r.dg[j] = dr;
    r.dg[h + j] = dz;
    r.dg[2 * h + j] = dn;
    r.dgu[j] = dr;
    r.dgu[h + j] = dz;
    r.dgu[2 * h + j] = dn * rr;
    r.dh_carry[j] = dh * z;
  }
};

}  // namespace tbptt::cells
