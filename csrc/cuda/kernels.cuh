// Kernels that are not cells: the state entering a chunk, the fused readout
// loss + dLoss/dy, the deterministic gradient-norm / loss reductions, and the
// guarded optimizer step. Twins of the loops in cpu/engine.cpp; the NumPy
// reference (python/tbptt_fast/reference.py, losses.py, optim.py) is the
// yardstick. Launch helpers are in engine.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tbptt::cuda {

constexpr int kThreads = 256;
constexpr int kReduceBlocks = 264;  // fixed grid: the reduction order never changes
// Layout of the per-update status words (device, copied to the host once).
constexpr int kStatusLoss = 0;       // sum over the block of mask * l
constexpr int kStatusSumSq = 1;      // sum of squared gradient elements (double)
constexpr int kStatusNonFinite = 2;  // 1.0 if any gradient element is NaN/Inf
constexpr int kStatusWords = 4;

#define TBPTT_GRID_STRIDE(i, n)                                             \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); \
       i += int64_t(gridDim.x) * blockDim.x)

// State entering step `first` of a chunk: dst = resets ? init : src, per row
// b of [B, H]. src may equal dst only if no row is reset (not used that way).
template <typename T>
__global__ void enter_state_kernel(int64_t batch, int64_t hidden, const T* src, const T* init,
                                   const uint8_t* resets, T* dst) {
  TBPTT_GRID_STRIDE(idx, batch * hidden) {
    const int64_t b = idx / hidden;
    dst[idx] = resets != nullptr && resets[b] != 0 ? init[idx] : src[idx];
  }
}

template <typename T>
__global__ void fill_kernel(int64_t n, T value, T* out) {
  TBPTT_GRID_STRIDE(i, n) {
    out[i] = value;
  }
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_max(double v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Readout loss over `rows` consecutive (step, b) rows; one warp per row.
// y [rows, O] holds h_top W_out^T (no bias) on entry and dLoss/dy
// UNNORMALISED on exit (0 where mask == 0); outputs [rows, O] (nullable)
// receives y + b_out; row_loss [rows] (nullable) receives mask * l in double.
// mse: target [rows, O]; cross_entropy: label [rows] in [0, O) where unmasked.
template <typename T>
struct LossArgs {
  int64_t rows, out_size;
  bool cross_entropy;
  T* y;
  const T* b_out;
  const T* mask;
  const T* target;
  const int64_t* label;
  T* outputs;
  double* row_loss;
};

template <typename T>
__global__ void loss_kernel(LossArgs<T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const int64_t o = a.out_size;
  for (int64_t r = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32; r < a.rows;
       r += warps) {
    T* y = a.y + r * o;
    T* out = a.outputs == nullptr ? nullptr : a.outputs + r * o;
    const bool used = a.mask[r] != T(0);
    double l = 0.0;
    if (!a.cross_entropy) {
      const T* tg = a.target + r * o;
      const T two_over_o = T(2) / static_cast<T>(o);
      for (int64_t j = lane; j < o; j += 32) {
        const T yj = y[j] + a.b_out[j];
        if (out != nullptr) out[j] = yj;
        const T diff = yj - tg[j];
        l += static_cast<double>(diff) * static_cast<double>(diff);
        y[j] = used ? two_over_o * diff : T(0);
      }
      l = warp_sum(l) / static_cast<double>(o);
    } else {
      double mx = -INFINITY;
      for (int64_t j = lane; j < o; j += 32) {
        const T yj = y[j] + a.b_out[j];
        if (out != nullptr) out[j] = yj;
        y[j] = yj;
        mx = fmax(mx, static_cast<double>(yj));
      }
      mx = warp_max(mx);
      __syncwarp();  // y with bias, written by other lanes, is read below
      if (used) {
        double se = 0.0;
        for (int64_t j = lane; j < o; j += 32) se += exp(static_cast<double>(y[j]) - mx);
        se = warp_sum(se);
        const double lse = mx + log(se);
        const int64_t k = a.label[r];
        l = lse - static_cast<double>(y[k]);
        __syncwarp();  // every lane has read y[k] before it is overwritten
        for (int64_t j = lane; j < o; j += 32) {
          T v = static_cast<T>(exp(static_cast<double>(y[j]) - lse));
          if (j == k) v -= T(1);
          y[j] = v;
        }
      } else {
        for (int64_t j = lane; j < o; j += 32) y[j] = T(0);
      }
    }
    if (lane == 0 && a.row_loss != nullptr) a.row_loss[r] = used ? l : 0.0;
  }
}

// Per-block partial sums of g^2 (double) and a non-finite flag over n elements.
template <typename T>
__global__ void grad_norm_partial_kernel(int64_t n, const T* g, double* partial_sumsq,
                                         int* partial_bad) {
  __shared__ double s_sum[kThreads / 32];
  __shared__ int s_bad[kThreads / 32];
  double acc = 0.0;
  int bad = 0;
  TBPTT_GRID_STRIDE(i, n) {
    const T v = g[i];
    if (!isfinite(v)) bad = 1;
    acc += static_cast<double>(v) * static_cast<double>(v);
  }
  acc = warp_sum(acc);
  bad = __any_sync(0xffffffffu, bad) ? 1 : 0;
  if ((threadIdx.x & 31) == 0) {
    s_sum[threadIdx.x / 32] = acc;
    s_bad[threadIdx.x / 32] = bad;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    int b = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      t += s_sum[w];
      b |= s_bad[w];
    }
    partial_sumsq[blockIdx.x] = t;
    partial_bad[blockIdx.x] = b;
  }
}

// One block: status = {sum of row_loss over the block's <= 2 row ranges,
// sum of the partials, non-finite flag}.
__global__ void finish_status_kernel(const double* row_loss, int64_t r0, int64_t n0, int64_t r1,
                                     int64_t n1, const double* partial_sumsq,
                                     const int* partial_bad, int partials, double* status) {
  __shared__ double s_loss[kThreads / 32];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n0; i += blockDim.x) acc += row_loss[r0 + i];
  for (int64_t i = threadIdx.x; i < n1; i += blockDim.x) acc += row_loss[r1 + i];
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) s_loss[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double loss = 0.0, sumsq = 0.0;
    int bad = 0;
    for (int w = 0; w < kThreads / 32; ++w) loss += s_loss[w];
    for (int p = 0; p < partials; ++p) {
      sumsq += partial_sumsq[p];
      bad |= partial_bad[p];
    }
    status[kStatusLoss] = loss;
    status[kStatusSumSq] = sumsq;
    status[kStatusNonFinite] = bad ? 1.0 : 0.0;
  }
}

// Everything the optimizer kernel needs besides the arrays.
struct OptArgs {
  bool adam;
  double lr, momentum, weight_decay, beta1, beta2, eps, clip;
  bool nesterov;
  double step_size, bc2_sqrt;  // adam: lr / (1 - beta1^s), sqrt(1 - beta2^s)
  double denom;                // max(1, mask count) of the block
};

// One torch.optim SGD / Adam step over all parameters (flat), after
// clip_grad_norm_. Does nothing when the update is non-finite (the host then
// raises): parameters and optimizer state stay as they were.
template <typename T>
__global__ void optimizer_kernel(int64_t n, OptArgs a, const double* status, T* p, const T* g, T* m,
                                 T* v) {
  const double loss = status[kStatusLoss] / a.denom;
  if (!isfinite(static_cast<T>(loss)) || status[kStatusNonFinite] != 0.0) return;
  T coef = T(1);
  if (a.clip > 0.0) {
    const double c = a.clip / (sqrt(status[kStatusSumSq]) + 1e-6);
    if (c < 1.0) coef = static_cast<T>(c);
  }
  const T lr = static_cast<T>(a.lr), wd = static_cast<T>(a.weight_decay);
  if (a.adam) {
    const T step_size = static_cast<T>(a.step_size), bc2_sqrt = static_cast<T>(a.bc2_sqrt);
    const T b1 = static_cast<T>(a.beta1), b2 = static_cast<T>(a.beta2);
    const T eps = static_cast<T>(a.eps);
    TBPTT_GRID_STRIDE(j, n) {
      const T gj = g[j] * coef + wd * p[j];
      const T mj = m[j] + (T(1) - b1) * (gj - m[j]);
      const T vj = b2 * v[j] + (T(1) - b2) * gj * gj;
      m[j] = mj;
      v[j] = vj;
      p[j] -= step_size * mj / (sqrt(vj) / bc2_sqrt + eps);
    }
    return;
  }
  const T mom = static_cast<T>(a.momentum);
  TBPTT_GRID_STRIDE(j, n) {
    const T dp = g[j] * coef + wd * p[j];
    if (mom == T(0)) {
      p[j] -= lr * dp;
    } else {
      const T buf = mom * m[j] + dp;  // first step: m = 0 -> dp, as torch
      m[j] = buf;
      p[j] -= lr * (a.nesterov ? dp + mom * buf : buf);
    }
  }
}

}  // namespace tbptt::cuda
