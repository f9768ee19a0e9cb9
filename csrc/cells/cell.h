// What a cell is: the per-element forward and backward math of ONE step of
// ONE layer, and its traits. Each cell header (rnn.h, lstm.h, gru.h, cifg.h)
// defines a struct with
//   kName, kGates (G), kStates (1: h; 2: h and c), kAux (one cached [B, H]
//   value per step), kSplitU (the hidden-side product u = h W_hh^T is kept
//   apart from the input side: gru), and
//   forward<M>(const Fwd<T>& r, H, j)    element j of one batch row
//   backward<kCarry>(const Bwd<T>& r, H, j)
// M supplies the activations (sigmoid, tanh) of the device that inlines the
// math: the CPU's vectorising vmath, or CUDA's device functions. The math is
// host- and device-callable; the CPU pointwise loops (cpu/pointwise.cpp) and
// the one generic CUDA cell kernel (cuda/cell_kernels.cuh) are the only
// callers. A cell never loops over time or over the batch: the engine
// skeleton (tbptt/engine.h) owns the time loop, resets and the ring.
//
// Conventions shared by every device: before forward, the engine has written
// the state entering the step (resets applied) into h_in / c_in, and the
// recurrent product into g (g = a + u, no biases) or, for kSplitU cells, into
// u (g = a). After backward<kCarry>, the engine adds the product of dgu (or dg)
// with W_hh to dh_carry: the gradient w.r.t. the entering h.
// Shapes follow the legend in tbptt/config.h.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TBPTT_HD __host__ __device__ __forceinline__
#else
#define TBPTT_HD inline __attribute__((always_inline))
#endif

namespace tbptt::cells {

// One batch row of one step's forward. Fields a cell does not use are null.
template <typename T>
struct Fwd {
  T* g;           // [G*H] in: a (+ u unless kSplitU), no biases; out: post-activation gates
  const T* u;     // [G*H] kSplitU: u = h W_hh^T (no bias)
  const T* bi;    // [G*H] b_ih
  const T* bh;    // [G*H] b_hh
  const T* h_in;  // [H] state entering the step
  const T* c_in;  // [H] kStates == 2: cell state entering the step
  T* aux;         // [H] kAux: the cached value (lstm, cifg: tanh(c'); gru: u_n + b_hn)
  T* h_out;       // [H] h' (G == 1 cells: == g, and forward writes g only)
  T* c_out;       // [H] kStates == 2: c' (must not alias c_in)
};

// One batch row of one step's backward.
template <typename T>
struct Bwd {
  const T* g;      // [G*H] post-activation gates of the step
  const T* aux;    // [H] kAux
  const T* h_in;   // [H] state that entered the step
  const T* c_in;   // [H] kStates == 2
  const T* dh_in;  // [H] dLoss/dh' from the readout or the layer above
  T* dh_carry;     // [H] in (kCarry): dLoss/dh' via step s+1; out: the part of
                   // dLoss/dh_in not through W_hh (0 unless kSplitU)
  T* dc_carry;     // [H] kStates == 2: in (kCarry) dLoss/dc' via s+1; out dLoss/dc_in
  T* dg;           // [G*H] out: dLoss/d(a + b_ih)
  T* dgu;          // [G*H] kSplitU out: dLoss/d(u + b_hh); else == dg
};

// A whole step: B rows of [H] / [G*H] arrays, each row-major [B, ...].
template <typename T>
struct StepFwd {
  int64_t batch, hidden, gh;
  T* g;
  const T* u;
  const T* bi;
  const T* bh;
  const T* h_in;
  const T* c_in;
  T* aux;
  T* h_out;
  T* c_out;
  TBPTT_HD Fwd<T> row(int64_t b) const {
    const int64_t h = hidden;
    return {g + b * gh,
            u == nullptr ? nullptr : u + b * gh,
            bi,
            bh,
            h_in + b * h,
            c_in == nullptr ? nullptr : c_in + b * h,
            aux == nullptr ? nullptr : aux + b * h,
            h_out + b * h,
            c_out == nullptr ? nullptr : c_out + b * h};
  }
  // Rows [b0, b0 + nb) of the step (a group of the batch).
  TBPTT_HD StepFwd rows(int64_t b0, int64_t nb) const {
    const int64_t h = hidden;
    return {nb,
            hidden,
            gh,
            g + b0 * gh,
            u == nullptr ? nullptr : u + b0 * gh,
            bi,
            bh,
            h_in + b0 * h,
            c_in == nullptr ? nullptr : c_in + b0 * h,
            aux == nullptr ? nullptr : aux + b0 * h,
            h_out + b0 * h,
            c_out == nullptr ? nullptr : c_out + b0 * h};
  }
};

template <typename T>
struct StepBwd {
  int64_t batch, hidden, gh;
  const T* g;
  const T* aux;
  const T* h_in;
  const T* c_in;
  const T* dh_in;
  T* dh_carry;
  T* dc_carry;
  T* dg;
  T* dgu;
  TBPTT_HD Bwd<T> row(int64_t b) const {
    const int64_t h = hidden;
    return {g + b * gh,
            aux == nullptr ? nullptr : aux + b * h,
            h_in + b * h,
            c_in == nullptr ? nullptr : c_in + b * h,
            dh_in + b * h,
            dh_carry + b * h,
            dc_carry == nullptr ? nullptr : dc_carry + b * h,
            dg + b * gh,
            dgu + b * gh};
  }
  // Rows [b0, b0 + nb) of the step (a group of the batch).
  TBPTT_HD StepBwd rows(int64_t b0, int64_t nb) const {
    const int64_t h = hidden;
    return {nb,
            hidden,
            gh,
            g + b0 * gh,
            aux == nullptr ? nullptr : aux + b0 * h,
            h_in + b0 * h,
            c_in == nullptr ? nullptr : c_in + b0 * h,
            dh_in + b0 * h,
            dh_carry + b0 * h,
            dc_carry == nullptr ? nullptr : dc_carry + b0 * h,
            dg + b0 * gh,
            dgu + b0 * gh};
  }
};

}  // namespace tbptt::cells
