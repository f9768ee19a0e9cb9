// The ONE check for every CUDA runtime and cuBLAS call:
//   TBPTT_CUDA_CHECK(cudaMemcpyAsync(...));
//   TBPTT_CUDA_CHECK(api.sgemm(...));
// On failure it throws std::runtime_error naming the call, file and line and
// the library's error name, e.g.
//   "CUDA error cudaErrorMemoryAllocation (out of memory) in
//    cudaMalloc(&ptr, bytes) at csrc/cuda/device.h:41"
// Kernel launches are checked right after with TBPTT_CUDA_CHECK(cudaGetLastError()).
// Destructors never throw: they release through the *_noexcept helpers.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "tbptt/errors.h"

namespace tbptt::cuda {

inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR:
      return "CUBLAS_STATUS_LICENSE_ERROR";
    default:
      return "CUBLAS_STATUS_<unknown>";
  }
}

[[noreturn]] inline void throw_failure(const std::string& what, const char* expr, const char* file,
                                       int line) {
  throw std::runtime_error(str_cat(what, " in ", expr, " at ", file, ":", line));
}

inline void check(cudaError_t e, const char* expr, const char* file, int line) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();  // clear the sticky-free error so the next call starts clean
  throw_failure(str_cat("CUDA error ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"), expr,
                file, line);
}

inline void check(cublasStatus_t s, const char* expr, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  throw_failure(str_cat("cuBLAS error ", cublas_status_name(s)), expr, file, line);
}

}  // namespace tbptt::cuda

#define TBPTT_CUDA_CHECK(expr) ::tbptt::cuda::check((expr), #expr, __FILE__, __LINE__)
