// Elman RNN cell, tanh or relu: h' = act(a + b_ih + h W_hh^T + b_hh).
// Cache: gates = h_out = h' (post-activation). Twin of cpu/cells/rnn.h.
#pragma once

#include "cuda/cells/cell.cuh"

namespace tbptt::cuda {

template <typename T, bool kRelu>
__global__ void rnn_forward_kernel(CellFwd<T> a) {
  const int64_t n = a.batch * a.hidden;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / a.hidden, j = idx % a.hidden;
    T g = a.gates[idx] + (a.b_ih[j] + a.b_hh[j]);
    if constexpr (kRelu) {
      g = g > T(0) ? g : T(0);
    } else {
      g = tanh(g);
    }
    a.gates[idx] = g;  // == h_out
    hand_over(a, b, idx, g, T(0), false);
  }
}

template <typename T, bool kRelu>
__global__ void rnn_backward_kernel(CellBwd<T> a) {
  const int64_t n = a.batch * a.hidden;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / a.hidden;
    const T dh = a.dh_in[idx] + carry(a, a.dh_carry, b, idx);
    const T y = a.gates[idx];
    if constexpr (kRelu) {
      a.dg[idx] = y > T(0) ? dh : T(0);
    } else {
      a.dg[idx] = dh * (T(1) - y * y);
    }
  }
}

}  // namespace tbptt::cuda
