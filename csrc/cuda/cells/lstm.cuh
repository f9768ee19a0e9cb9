// LSTM cell, gate order i, f, g, o (PyTorch):
//   [i f g o] = act(a + b_ih + h W_hh^T + b_hh), i,f,o sigmoid, g tanh,
//   c' = f*c + i*g,  h' = o*tanh(c').
// Cache: gates = post-activation i,f,g,o; aux = tanh(c'); c_in, h_in, h_out.
// Twin of cpu/cells/lstm.h.
#pragma once

#include "cuda/cells/cell.cuh"

namespace tbptt::cuda {

template <typename T>
__global__ void lstm_forward_kernel(CellFwd<T> a) {
  const int64_t h = a.hidden, n = a.batch * h;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / h, j = idx % h;
    T* g = a.gates + b * 4 * h;
    const T i = sigmoid(g[j] + (a.b_ih[j] + a.b_hh[j]));
    const T f = sigmoid(g[h + j] + (a.b_ih[h + j] + a.b_hh[h + j]));
    const T gg = tanh(g[2 * h + j] + (a.b_ih[2 * h + j] + a.b_hh[2 * h + j]));
    const T o = sigmoid(g[3 * h + j] + (a.b_ih[3 * h + j] + a.b_hh[3 * h + j]));
    g[j] = i;
    g[h + j] = f;
    g[2 * h + j] = gg;
    g[3 * h + j] = o;
    const T c = f * a.c_in[idx] + i * gg;
    const T tc = tanh(c);
    a.aux[idx] = tc;
    const T hn = o * tc;
    a.h_out[idx] = hn;
    hand_over(a, b, idx, hn, c, true);
  }
}

template <typename T>
__global__ void lstm_backward_kernel(CellBwd<T> a) {
  const int64_t h = a.hidden, n = a.batch * h;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / h, j = idx % h;
    const T* g = a.gates + b * 4 * h;
    const T i = g[j], f = g[h + j], gg = g[2 * h + j], o = g[3 * h + j];
    const T tc = a.aux[idx];
    const T dh = a.dh_in[idx] + carry(a, a.dh_carry, b, idx);
    const T dc = carry(a, a.dc_carry, b, idx) + dh * o * (T(1) - tc * tc);
    T* dg = a.dg + b * 4 * h;
    dg[j] = dc * gg * i * (T(1) - i);
    dg[h + j] = dc * a.c_in[idx] * f * (T(1) - f);
    dg[2 * h + j] = dc * i * (T(1) - gg * gg);
    dg[3 * h + j] = dh * tc * o * (T(1) - o);
    a.dc_carry[idx] = dc * f;
  }
}

}  // namespace tbptt::cuda
