// GRU cell, gate order r, z, n (PyTorch):
//   r = sigmoid(a_r + b_ir + u_r + b_hr), z = sigmoid(a_z + b_iz + u_z + b_hz),
//   n = tanh(a_n + b_in + r * (u_n + b_hn)),  h' = (1 - z) * n + z * h,
// with u = h W_hh^T. Cache: gates = post-activation r, z, n; aux = u_n + b_hn
// (as computed in the forward, so "stored" backprop reuses it); h_in, h_out.
// The hidden-side gradient differs in the n block (dgu_n = dg_n * r).
// Twin of cpu/cells/gru.h.
#pragma once

#include "cuda/cells/cell.cuh"

namespace tbptt::cuda {

template <typename T>
__global__ void gru_forward_kernel(CellFwd<T> a) {
  const int64_t h = a.hidden, n = a.batch * h;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / h, j = idx % h;
    T* g = a.gates + b * 3 * h;
    const T* u = a.u + b * 3 * h;
    const T r = sigmoid(g[j] + a.b_ih[j] + u[j] + a.b_hh[j]);
    const T z = sigmoid(g[h + j] + a.b_ih[h + j] + u[h + j] + a.b_hh[h + j]);
    const T un = u[2 * h + j] + a.b_hh[2 * h + j];
    const T nn = tanh(g[2 * h + j] + (a.b_ih[2 * h + j] + r * un));
    g[j] = r;
    g[h + j] = z;
    g[2 * h + j] = nn;
    a.aux[idx] = un;
    const T hn = (T(1) - z) * nn + z * a.h_in[idx];
    a.h_out[idx] = hn;
    hand_over(a, b, idx, hn, T(0), false);
  }
}

template <typename T>
__global__ void gru_backward_kernel(CellBwd<T> a) {
  const int64_t h = a.hidden, n = a.batch * h;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / h, j = idx % h;
    const T* g = a.gates + b * 3 * h;
    const T r = g[j], z = g[h + j], nn = g[2 * h + j];
    const T dh = a.dh_in[idx] + carry(a, a.dh_carry, b, idx);
    const T dn = dh * (T(1) - z) * (T(1) - nn * nn);
    const T dr = dn * a.aux[idx] * r * (T(1) - r);
    const T dz = dh * (a.h_in[idx] - nn) * z * (T(1) - z);
    T* dg = a.dg + b * 3 * h;
    T* dgu = a.dgu + b * 3 * h;
    dg[j] = dr;
    dg[h + j] = dz;
    dg[2 * h + j] = dn;
    dgu[j] = dr;
    dgu[h + j] = dz;
    dgu[2 * h + j] = dn * r;
    a.dh_carry[idx] = dh * z;  // the GEMM adds dgu W_hh on top (beta = 1)
  }
}

}  // namespace tbptt::cuda
