// The CUDA policy's kernels that are not cells (cell_kernels.cuh has those):
// fills, the embedding lookup and its gradient's scatter-add (token
// inputs), the state entering a step and the carry cut at a reset, the fused
// readout loss + dLoss/dy, the deterministic reductions (a chunk's loss, gradient
// norm and non-finite flag) and the optimizer step. Twins of the loops in
// cpu/device.h; the NumPy reference (python/tbptt_fast/reference.py,
// losses.py, optim.py) is the yardstick. Launched by device_policy.cuh only.
// Shapes: the legend in tbptt/config.h; every pointer is device memory.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace tbptt::cuda {

constexpr int kThreads = 256;
constexpr int kReduceBlocks = 264;  // fixed grid: the reduction order never changes

// Blocks of kThreads for a grid-stride loop over n elements.
inline int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 8192)));
}

#define TBPTT_GRID_STRIDE(i, n)                                             \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); \
       i += int64_t(gridDim.x) * blockDim.x)

template <typename T>
__global__ void fill_kernel(int64_t n, T value, T* out) {
  TBPTT_GRID_STRIDE(i, n) {
    out[i] = value;
  }
}

// Every row of dst [rows, width] = row [width].
template <typename T>
__global__ void fill_rows_kernel(int64_t rows, int64_t width, const T* row, T* dst) {
  TBPTT_GRID_STRIDE(i, rows * width) {
    dst[i] = row[i % width];
  }
}

// Token inputs: x[r, :] = emb[ids[r], :] for the rows r < rows of x
// [rows, width] (emb [V, width]; ids in [0, V), checked by the bindings).
template <typename T>
__global__ void embed_rows_kernel(int64_t rows, int64_t width, const int64_t* __restrict__ ids,
                                  const T* __restrict__ emb, T* __restrict__ x) {
  TBPTT_GRID_STRIDE(i, rows * width) {
    const int64_t r = i / width, j = i - r * width;
    x[i] = emb[ids[r] * width + j];
  }
}

// The embedding's gradient: grad_emb[ids[r], :] += dx[r, :] for r = 0, 1,
// ..., rows - 1 IN THAT ORDER (dx [rows, width], grad_emb [V, width]), with
// no atomics: element (id, j) is only ever touched by the thread of column j
// in the grid row blockIdx.y == id % gridDim.y, which walks all rows in
// order and adds the rows of its ids. So every element's sum is taken in row
// order, whatever the grid: the result is deterministic (and the serial
// loop's). The grid's y dimension only spreads the ids over more threads.
template <typename T>
__global__ void scatter_add_rows_kernel(int64_t rows, int64_t width,
                                        const int64_t* __restrict__ ids, const T* __restrict__ dx,
                                        T* __restrict__ grad_emb) {
  const int64_t part = blockIdx.y, parts = gridDim.y;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < width;
       j += int64_t(gridDim.x) * blockDim.x) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t id = ids[r];  // the same for every thread of the block: uniform branch
      if (id % parts != part) continue;
      grad_emb[id * width + j] += dx[r * width + j];
    }
  }
}

// The state entering a step, per (b, j) of [B, H]: h_in = resets[b] ? h_init
// : h_prev, and the same for c when c_in is set. No argument aliases another.
template <typename T>
__global__ void enter_state_kernel(int64_t batch, int64_t hidden, const T* h_prev, const T* c_prev,
                                   const T* h_init, const T* c_init, const uint8_t* resets, T* h_in,
                                   T* c_in) {
  TBPTT_GRID_STRIDE(idx, batch * hidden) {
    const bool reset = resets[idx / hidden] != 0;
    h_in[idx] = reset ? h_init[idx] : h_prev[idx];
    if (c_in != nullptr) c_in[idx] = reset ? c_init[idx] : c_prev[idx];
  }
}

// No gradient crosses a reset: dh_carry (and dc_carry, if set) [B, H] are
// zero in the rows b where resets[b] is set.
template <typename T>
__global__ void cut_carry_kernel(int64_t batch, int64_t hidden, const uint8_t* resets, T* dh_carry,
                                 T* dc_carry) {
  TBPTT_GRID_STRIDE(idx, batch * hidden) {
    if (resets[idx / hidden] == 0) continue;
    dh_carry[idx] = T(0);
    if (dc_carry != nullptr) dc_carry[idx] = T(0);
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

// Readout loss over `rows` consecutive (step, b) rows of one ring segment;
// one warp per row. y [rows, O] holds the outputs h_top W_out^T + b_out on
// entry and the UNNORMALISED dLoss/dy on exit (0 where mask == 0).
// outputs [rows, O] (nullable) receives y as it came in; row_loss [rows]
// (nullable) receives mask * l in double. mse: target [rows, O];
// cross_entropy: label [rows] in [0, O), read only where the mask is set.
template <typename T>
struct LossArgs {
  int64_t rows, out_size;
  bool cross_entropy;
  T* y;
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
  // r is the same for the 32 lanes of a warp, so every branch on it (and on
  // the row's mask) is warp-uniform, as the full-mask shuffles need.
  for (int64_t r = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32; r < a.rows;
       r += warps) {
    T* y = a.y + r * o;
    if (a.outputs != nullptr) {
      T* out = a.outputs + r * o;
      for (int64_t j = lane; j < o; j += 32) out[j] = y[j];
    }
    double l = 0.0;
    if (a.mask[r] == T(0)) {
      for (int64_t j = lane; j < o; j += 32) y[j] = T(0);
    } else if (!a.cross_entropy) {
      const T* tg = a.target + r * o;
      const T two_over_o = T(2) / static_cast<T>(o);
      for (int64_t j = lane; j < o; j += 32) {
        const T diff = y[j] - tg[j];
        l += static_cast<double>(diff) * static_cast<double>(diff);
        y[j] = two_over_o * diff;
      }
      l = warp_sum(l) / static_cast<double>(o);
    } else {
      double mx = -INFINITY;
      for (int64_t j = lane; j < o; j += 32) mx = fmax(mx, static_cast<double>(y[j]));
      mx = warp_max(mx);
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
    }
    if (lane == 0 && a.row_loss != nullptr) a.row_loss[r] = l;
  }
}

// One block of kThreads: out[0] += the sum of v over the (at most two)
// ranges [r0, r0 + n0) and [r1, r1 + n1), in a fixed order (deterministic).
__global__ void add_sum_ranges_kernel(const double* v, int64_t r0, int64_t n0, int64_t r1,
                                      int64_t n1, double* out) {
  __shared__ double s_sum[kThreads / 32];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n0; i += blockDim.x) acc += v[r0 + i];
  for (int64_t i = threadIdx.x; i < n1; i += blockDim.x) acc += v[r1 + i];
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) s_sum[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) t += s_sum[w];
    out[0] += t;
  }
}

// kReduceBlocks blocks of kThreads: per-block partial sums of g^2 (double)
// and a non-finite flag over n elements.
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

// One thread: out = {sum of the partials, 1.0 if any partial flag is set}.
__global__ void finish_norm_kernel(const double* partial_sumsq, const int* partial_bad,
                                   int partials, double* out) {
  double sumsq = 0.0;
  int bad = 0;
  for (int p = 0; p < partials; ++p) {
    sumsq += partial_sumsq[p];
    bad |= partial_bad[p];
  }
  out[0] = sumsq;
  out[1] = bad ? 1.0 : 0.0;
}

// Everything the optimizer kernel needs besides the arrays.
struct OptArgs {
  bool adam, nesterov;
  double coef;  // clip coefficient applied to the gradient (1: none)
  double lr, momentum, weight_decay, beta1, beta2, eps;
  double step_size, bc2_sqrt;  // adam: lr / (1 - beta1^s), sqrt(1 - beta2^s)
};

// One torch.optim SGD / Adam step (default flags) over all n parameters
// (flat), the gradient scaled by the clip coefficient first. The host has
// checked the update is finite. m: momentum buffer / Adam first moment
// (unused for SGD without momentum, may be null); v: Adam second moment.
template <typename T>
__global__ void optimizer_kernel(int64_t n, OptArgs a, T* p, const T* g, T* m, T* v) {
  const T coef = static_cast<T>(a.coef);
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
