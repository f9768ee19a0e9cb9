// What every CUDA cell kernel (rnn.cuh, lstm.cuh, gru.cuh) works on: one
// fused pointwise kernel per step for the forward (gates, state update, cache
// write, and the hand-over of the state to the next step with its resets
// applied) and one for the backward (gate gradients and the carry into the
// previous step). The recurrent products around them are cuBLAS calls made by
// the engine (engine.cu), the only code with a time loop. Same cache layout
// and formulas as the CPU cells (csrc/cpu/cells/), which mirror reference.py.
// Shapes follow the legend in tbptt/engine_api.h; one thread per (b, j) of
// [B, H].
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tbptt::cuda {

// Forward of one step of one layer. Pointers are [B, ...] row blocks of
// device memory; distinct fields never alias, except h_out == gates for the
// plain RNN cells (G = 1, the post-activation IS the output).
template <typename T>
struct CellFwd {
  int64_t batch, hidden;
  T* gates;       // [B, G*H] in: x W_ih^T (+ h W_hh^T for rnn/lstm); out: post-activation gates
  const T* u;     // [B, G*H] gru only: h W_hh^T (no bias); else nullptr
  const T* b_ih;  // [G*H]
  const T* b_hh;  // [G*H]
  const T* h_in;  // [B, H] state entering the step, resets applied
  const T* c_in;  // [B, H] lstm: cell state entering the step; else nullptr
  T* aux;         // [B, H] lstm: tanh(c'); gru: u_n + b_hn; rnn: nullptr
  T* h_out;       // [B, H] h' (rnn: == gates)
  // Where the produced state goes: the next step's h_in/c_in slot (with the
  // next step's resets applied), or the running state after the last step.
  T* h_next;                  // [B, H]
  T* c_next;                  // [B, H] lstm only
  const uint8_t* reset_next;  // [B] resets of the next step; nullptr: copy as is
  const T* h_init;            // [B, H] initial state (what a reset restores)
  const T* c_init;            // [B, H] lstm only
};

// Backward of one step of one layer.
template <typename T>
struct CellBwd {
  int64_t batch, hidden;
  const T* gates;  // [B, G*H] post-activation gates of the step
  const T* h_in;   // [B, H] state that entered the step
  const T* c_in;   // [B, H] lstm only
  const T* aux;    // [B, H] lstm: tanh(c'); gru: u_n + b_hn
  const T* dh_in;  // [B, H] dLoss/dh' from the readout or the layer above
  T* dh_carry;     // [B, H] in: dLoss/dh' via step s+1 (if has_carry); gru out: dh * z
  T* dc_carry;     // [B, H] lstm: in dLoss/dc' via s+1, out dLoss/dc_in (direct part)
  bool has_carry;  // false at the last step of the window
  // Resets of step s+1: where set, no gradient crossed into this step, so the
  // carry read here is zero (the engine's CPU twin zeroes it after the GEMM).
  const uint8_t* carry_reset;  // [B] or nullptr
  T* dg;                       // [B, G*H] out: dLoss/d(input-side pre-activation)
  T* dgu;  // [B, G*H] out: dLoss/d(hidden-side pre-activation); == dg except gru
};

template <typename T>
__device__ __forceinline__ T sigmoid(T x) {
  return T(1) / (T(1) + exp(-x));
}

// Hands h' (and c') of element (b, j) to the next step, applying its reset.
template <typename T>
__device__ __forceinline__ void hand_over(const CellFwd<T>& a, int64_t b, int64_t idx, T h, T c,
                                          bool lstm) {
  const bool reset = a.reset_next != nullptr && a.reset_next[b] != 0;
  a.h_next[idx] = reset ? a.h_init[idx] : h;
  if (lstm) a.c_next[idx] = reset ? a.c_init[idx] : c;
}

// The carry entering the backward of a step, zero across a reset.
template <typename T>
__device__ __forceinline__ T carry(const CellBwd<T>& a, const T* buf, int64_t b, int64_t idx) {
  if (!a.has_carry) return T(0);
  if (a.carry_reset != nullptr && a.carry_reset[b] != 0) return T(0);
  return buf[idx];
}

}  // namespace tbptt::cuda
