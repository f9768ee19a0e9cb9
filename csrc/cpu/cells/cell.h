// What every cell (rnn.h, lstm.h, gru.h) works on: the parameters of one
// layer and one cache slot (one time step of one layer). A cell maps
// (input projection, state, params) -> state for ONE step and fills its cache
// slot; its backward maps (dh from above, carried dh/dc, slot) -> gate
// gradients and the carry into the previous step. Cells never loop over time:
// the engine (engine.cpp) owns the time loop, resets and the ring.
// Shapes follow the legend in tbptt/engine_api.h.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu/blas.h"

namespace tbptt::cpu {

// One layer's parameters, borrowed from the caller's arrays (read-only here;
// the optimizer in engine.cpp is the only writer).
template <typename T>
struct LayerParams {
  const T* w_ih;    // [G*H, D_l]
  const T* w_hh;    // [G*H, H]
  const T* b_ih;    // [G*H]
  const T* b_hh;    // [G*H]
  int64_t d_in;     // D_l
  const T* w_hh_t;  // [H, G*H] engine-owned transposed copy of w_hh, or nullptr
                    // (see recurrent_product)
  // float only, engine-owned, or nullptr: w_hh^T [H, G*H] and w_hh [G*H, H]
  // packed by pack_panels for the per-step products (blas.h).
  const float* w_hh_t_packed;
  const float* w_hh_packed;
};

// One ring slot of one layer. Every pointer is a [B, ...] row block owned by
// a Store (ring_buffer.h); distinct fields never alias, except h_out == gates
// for the plain RNN cells (G = 1, the post-activation IS the output).
template <typename T>
struct StepCache {
  T* gates;  // [B, G*H] forward in: a = x W_ih^T (no bias); out: post-activation gates
  T* h_in;   // [B, H] state entering the step, after resets (read-only in the cell)
  T* c_in;   // [B, H] lstm: cell state entering the step; else nullptr
  T* aux;    // [B, H] lstm: tanh(c'); gru: u_n = h W_hn^T + b_hn; rnn: nullptr
  T* h_out;  // [B, H] output h' of the step
};

// Backward buffers of one step, owned by the engine's workspace.
template <typename T>
struct StepGrad {
  const T* dh_in;  // [B, H] dLoss/dh' from the readout or the layer above (read-only)
  T* dh_carry;     // [B, H] in: dLoss/dh' via step s+1 (if has_carry); out: dLoss/dh_in
  T* dc_carry;     // [B, H] lstm only, same in/out convention for c
  T* dg;           // [B, G*H] out: dLoss/d(input-side pre-activation a + b_ih)
  T* dgu;          // [B, G*H] out: dLoss/d(hidden-side u + b_hh); == dg except for gru
};

// out[B, G*H] = h_in W_hh^T + beta * out: the per-step forward product of
// every cell. Fastest first: W_hh^T packed into panels for the own kernel;
// the transposed copy p.w_hh_t as a plain NN product (the own kernel, or
// OpenBLAS's no-packing small-matrix kernels: H = 64, B = 8: 2.3 us instead
// of 10.9 us for the NT form); else NT against W_hh (see blas.h).
template <typename T>
void recurrent_product(const LayerParams<T>& p, int64_t batch, int64_t hidden, int64_t gh,
                       const T* h_in, T beta, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    if (p.w_hh_t_packed != nullptr) {
      gemm_packed(batch, gh, hidden, h_in, hidden, p.w_hh_t_packed, beta, out, gh);
      return;
    }
  }
  if (p.w_hh_t != nullptr) {
    gemm<T>(false, false, batch, gh, hidden, T(1), h_in, hidden, p.w_hh_t, gh, beta, out, gh);
  } else {
    gemm<T>(false, true, batch, gh, hidden, T(1), h_in, hidden, p.w_hh, hidden, beta, out, gh);
  }
}

// out[B, H] = dG W_hh + beta * out (dG [B, G*H]): the per-step backward
// product of every cell (dLoss/dh of the previous step).
template <typename T>
void recurrent_grad_product(const LayerParams<T>& p, int64_t batch, int64_t hidden, int64_t gh,
                            const T* dg, T beta, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    if (p.w_hh_packed != nullptr) {
      gemm_packed(batch, hidden, gh, dg, gh, p.w_hh_packed, beta, out, hidden);
      return;
    }
  }
  gemm<T>(false, false, batch, hidden, gh, T(1), dg, gh, p.w_hh, hidden, beta, out, hidden);
}

}  // namespace tbptt::cpu
