// The ONE pair of cell kernels, for every cell of cells/registry.h: one
// thread per element (b, j) of a step's [B, H], running the cell's own
// per-element math (cells/*.h) with CUDA's activations. What a cell reads and
// writes, and the conventions around it (state entered and recurrent product
// done before forward; carry product and reset cut after backward), are in
// cells/cell.h; the engine skeleton (tbptt/engine.h) makes those calls.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cells/cell.h"
#include "cuda/kernels.cuh"

namespace tbptt::cuda {

// The activations the cells call (their M), float and double. Host-callable
// too, as the cells' math is __host__ __device__.
struct CudaMath {
  __host__ __device__ __forceinline__ static float sigmoid(float x) {
    return 1.0f / (1.0f + ::expf(-x));
  }
  __host__ __device__ __forceinline__ static double sigmoid(double x) {
    return 1.0 / (1.0 + ::exp(-x));
  }
  __host__ __device__ __forceinline__ static float tanh(float x) { return ::tanhf(x); }
  __host__ __device__ __forceinline__ static double tanh(double x) { return ::tanh(x); }
};

// Forward of one step of one layer over all B rows (cells::StepFwd).
template <typename Cell, typename T>
__global__ void cell_forward_kernel(cells::StepFwd<T> s) {
  const int64_t h = s.hidden;
  TBPTT_GRID_STRIDE(idx, s.batch * h) {
    const int64_t b = idx / h;
    Cell::template forward<CudaMath>(s.row(b), h, idx - b * h);
  }
}

// Backward of one step of one layer over all B rows (cells::StepBwd); kCarry:
// the carry buffers hold the gradient from step s + 1.
template <typename Cell, bool kCarry, typename T>
__global__ void cell_backward_kernel(cells::StepBwd<T> s) {
  const int64_t h = s.hidden;
  TBPTT_GRID_STRIDE(idx, s.batch * h) {
    const int64_t b = idx / h;
    Cell::template backward<kCarry>(s.row(b), h, idx - b * h);
  }
}

}  // namespace tbptt::cuda
