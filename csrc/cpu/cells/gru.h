// GRU cell, gate order r, z, n (PyTorch):
//   r = sigmoid(a_r + b_ir + u_r + b_hr), z = sigmoid(a_z + b_iz + u_z + b_hz),
//   n = tanh(a_n + b_in + r * (u_n + b_hn)),  h' = (1 - z) * n + z * h,
// with u = h W_hh^T. Cache: gates = post-activation r, z, n; aux = u_n + b_hn
// (as computed in the forward, so "stored" backprop reuses it); h_in, h_out.
// The input-side and hidden-side gate gradients differ in the n block
// (dgu_n = dg_n * r), hence StepGrad::dgu.
#pragma once

#include "cpu/blas.h"
#include "cpu/cells/cell.h"
#include "cpu/vmath.h"

namespace tbptt::cpu {

template <typename T>
struct GruCell {
  static constexpr int kGates = 3;

  // scratch [B, 3H]: holds u = h W_hh^T during the step.
  static void forward(const LayerParams<T>& p, int64_t batch, int64_t hidden, const StepCache<T>& s,
                      T* /*c_state*/, T* scratch) {
    const int64_t h = hidden, gh = 3 * hidden;
    gemm<T>(false, true, batch, gh, h, T(1), s.h_in, h, p.w_hh, h, T(0), scratch, gh);
    for (int64_t b = 0; b < batch; ++b) {
      T* g = s.gates + b * gh;
      const T* u = scratch + b * gh;
      for (int64_t j = 0; j < 2 * h; ++j) g[j] += p.b_ih[j] + u[j] + p.b_hh[j];
      vmath::sigmoid(g, 2 * h);
      T* un = s.aux + b * h;
      for (int64_t j = 0; j < h; ++j) {
        un[j] = u[2 * h + j] + p.b_hh[2 * h + j];
        g[2 * h + j] += p.b_ih[2 * h + j] + g[j] * un[j];
      }
      vmath::tanh(g + 2 * h, h);
      const T* hi = s.h_in + b * h;
      T* ho = s.h_out + b * h;
      for (int64_t j = 0; j < h; ++j) {
        const T z = g[h + j];
        ho[j] = (T(1) - z) * g[2 * h + j] + z * hi[j];
      }
    }
  }

  static void backward(const LayerParams<T>& p, int64_t batch, int64_t hidden,
                       const StepCache<T>& s, const StepGrad<T>& d, bool has_carry,
                       bool want_carry) {
    const int64_t h = hidden, gh = 3 * hidden;
    for (int64_t b = 0; b < batch; ++b) {
      const T* g = s.gates + b * gh;
      const T* un = s.aux + b * h;
      const T* hi = s.h_in + b * h;
      const T* dhi = d.dh_in + b * h;
      T* dhc = d.dh_carry + b * h;
      T* dg = d.dg + b * gh;
      T* dgu = d.dgu + b * gh;
      for (int64_t j = 0; j < h; ++j) {
        const T dh = has_carry ? dhi[j] + dhc[j] : dhi[j];
        const T r = g[j], z = g[h + j], n = g[2 * h + j];
        const T dn = dh * (T(1) - z) * (T(1) - n * n);
        const T dr = dn * un[j] * r * (T(1) - r);
        const T dz = dh * (hi[j] - n) * z * (T(1) - z);
        dg[j] = dr;
        dg[h + j] = dz;
        dg[2 * h + j] = dn;
        dgu[j] = dr;
        dgu[h + j] = dz;
        dgu[2 * h + j] = dn * r;
        dhc[j] = dh * z;
      }
    }
    if (want_carry)
      gemm<T>(false, false, batch, h, gh, T(1), d.dgu, gh, p.w_hh, h, T(1), d.dh_carry, h);
  }
};

}  // namespace tbptt::cpu
