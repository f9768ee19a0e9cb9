// The CUDA engine: the engine skeleton (tbptt/engine.h) on the CUDA device
// policy (cuda/device_policy.cuh), one instantiation per dtype and registry
// cell, like cpu/engine.cpp. The skeleton owns the schedule, the ring and
// every message; the policy supplies the primitives on the GPU.
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cells/registry.h"
#include "cuda/context.h"
#include "cuda/device_policy.cuh"
#include "cuda/kernels.cuh"
#include "tbptt/engine.h"
#include "tbptt/errors.h"

namespace tbptt {
namespace {

template <typename T>
std::unique_ptr<EngineBase> make_typed(const Config& cfg, const std::vector<void*>& params) {
#define TBPTT_CUDA_ENGINE_CASE(name, Type) \
  case CellKind::name:                     \
    return std::make_unique<Engine<T, cuda::Device<T>, Type>>(cfg, params);
  switch (cfg.cell) { TBPTT_CELLS(TBPTT_CUDA_ENGINE_CASE) }
#undef TBPTT_CUDA_ENGINE_CASE
  throw std::invalid_argument("unknown cell");
}

}  // namespace

std::unique_ptr<EngineBase> make_cuda_engine(const Config& cfg, const std::vector<void*>& params) {
  if (cfg.dtype == DType::kFloat64) return make_typed<double>(cfg, params);
  return make_typed<float>(cfg, params);
}

// Whether this build's kernels have an image (machine code or PTX) the
// current device can run; cudaFuncGetAttributes says so without a launch.
// Here because it needs a kernel of this translation unit (context.cpp is
// host code).
bool cuda::kernels_run_here(std::string* why) {
  cudaFuncAttributes attr{};
  const cudaError_t e = cudaFuncGetAttributes(&attr, fill_kernel<float>);
  if (e == cudaSuccess) return true;
  (void)cudaGetLastError();
  if (why != nullptr) *why = str_cat(cudaGetErrorName(e), ": ", cudaGetErrorString(e));
  return false;
}

}  // namespace tbptt
