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

// The pointwise passes below, compiled per ISA level for float
// (cells/kernels.cpp); forward/backward call these, never the bodies directly.
void gru_forward_pass(const LayerParams<float>& p, int64_t batch, int64_t hidden,
                      const StepCache<float>& s, const float* u);
void gru_forward_pass(const LayerParams<double>& p, int64_t batch, int64_t hidden,
                      const StepCache<double>& s, const double* u);
void gru_backward_pass(int64_t batch, int64_t hidden, const StepCache<float>& s,
                       const StepGrad<float>& d, bool has_carry);
void gru_backward_pass(int64_t batch, int64_t hidden, const StepCache<double>& s,
                       const StepGrad<double>& d, bool has_carry);

template <typename T>
struct GruCell {
  static constexpr int kGates = 3;

  // scratch [B, 3H]: holds u = h W_hh^T during the step.
  static void forward(const LayerParams<T>& p, int64_t batch, int64_t hidden, const StepCache<T>& s,
                      T* /*c_state*/, T* scratch) {
    const int64_t h = hidden, gh = 3 * hidden;
    recurrent_product(p, batch, h, gh, s.h_in, T(0), scratch);
    gru_forward_pass(p, batch, hidden, s, scratch);
  }

  static void backward(const LayerParams<T>& p, int64_t batch, int64_t hidden,
                       const StepCache<T>& s, const StepGrad<T>& d, bool has_carry,
                       bool want_carry) {
    const int64_t h = hidden, gh = 3 * hidden;
    gru_backward_pass(batch, hidden, s, d, has_carry);
    if (want_carry) recurrent_grad_product(p, batch, h, gh, d.dgu, T(1), d.dh_carry);
  }

  // s.gates holds a = x W_ih^T (no bias), u = h W_hh^T [B, 3H]; one pass per
  // row.
  TBPTT_INLINE static void forward_pointwise(const LayerParams<T>& p, int64_t batch, int64_t hidden,
                                             const StepCache<T>& s, const T* u_all) {
    const int64_t h = hidden, gh = 3 * hidden;
    const T* __restrict bir = p.b_ih, * __restrict biz = p.b_ih + h, * __restrict bin = p.b_ih + 2 * h;
    const T* __restrict bhr = p.b_hh, * __restrict bhz = p.b_hh + h, * __restrict bhn = p.b_hh + 2 * h;
    for (int64_t b = 0; b < batch; ++b) {
      T* __restrict gr = s.gates + b * gh, * __restrict gz = gr + h, * __restrict gn = gr + 2 * h;
      const T* __restrict ur = u_all + b * gh, * __restrict uz = ur + h, * __restrict un_in = ur + 2 * h;
      T* __restrict un = s.aux + b * h;
      const T* __restrict hi = s.h_in + b * h;
      T* __restrict ho = s.h_out + b * h;
      TBPTT_IVDEP
      for (int64_t j = 0; j < h; ++j) {
        const T r = vmath::sigmoid(gr[j] + bir[j] + ur[j] + bhr[j]);
        const T z = vmath::sigmoid(gz[j] + biz[j] + uz[j] + bhz[j]);
        const T unj = un_in[j] + bhn[j];
        const T n = vmath::tanh(gn[j] + bin[j] + r * unj);
        gr[j] = r;
        gz[j] = z;
        gn[j] = n;
        un[j] = unj;
        ho[j] = (T(1) - z) * n + z * hi[j];
      }
    }
  }

  // kCarry: dh_carry holds the gradient from step s+1 (a template flag so the
  // loop has no branch and vectorises).
  template <bool kCarry>
  TBPTT_INLINE static void backward_pointwise(int64_t batch, int64_t hidden, const StepCache<T>& s,
                                              const StepGrad<T>& d) {
    const int64_t h = hidden, gh = 3 * hidden;
    for (int64_t b = 0; b < batch; ++b) {
      const T* __restrict gr = s.gates + b * gh, * __restrict gz = gr + h, * __restrict gn = gr + 2 * h;
      const T* __restrict un = s.aux + b * h;
      const T* __restrict hi = s.h_in + b * h;
      const T* __restrict dhi = d.dh_in + b * h;
      T* __restrict dhc = d.dh_carry + b * h;
      T* __restrict dr_ = d.dg + b * gh, * __restrict dz_ = dr_ + h, * __restrict dn_ = dr_ + 2 * h;
      T* __restrict ur_ = d.dgu + b * gh, * __restrict uz_ = ur_ + h, * __restrict un_ = ur_ + 2 * h;
      TBPTT_IVDEP
      for (int64_t j = 0; j < h; ++j) {
        const T dh = kCarry ? dhi[j] + dhc[j] : dhi[j];
        const T r = gr[j], z = gz[j], n = gn[j];
        const T dn = dh * (T(1) - z) * (T(1) - n * n);
        const T dr = dn * un[j] * r * (T(1) - r);
        const T dz = dh * (hi[j] - n) * z * (T(1) - z);
        dr_[j] = dr;
        dz_[j] = dz;
        dn_[j] = dn;
        ur_[j] = dr;
        uz_[j] = dz;
        un_[j] = dn * r;
        dhc[j] = dh * z;
      }
    }
  }
};

}  // namespace tbptt::cpu
