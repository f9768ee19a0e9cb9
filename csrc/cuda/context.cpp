// Device discovery and build information (engine_api.h: cuda_device_available,
// cuda_build_info). The CUDA runtime is linked statically: it loads the
// driver (libcuda.so.1) lazily, so none of this needs a GPU to import.
#include "cuda/context.h"

#include <cuda_runtime.h>

#include <string>

#include "cuda/check.h"
#include "cuda/cublas.h"
#include "tbptt/engine_api.h"
#include "tbptt/errors.h"

namespace tbptt::cuda {
namespace {

// Number of visible devices, or the runtime's complaint (no driver, no device).
int device_count(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    if (why != nullptr) *why = str_cat(cudaGetErrorName(e), ": ", cudaGetErrorString(e));
    return 0;
  }
  if (n == 0 && why != nullptr) *why = "no CUDA device is visible";
  return n;
}

}  // namespace

int require_device() {
  std::string why;
  if (device_count(&why) == 0)
    throw std::runtime_error(str_cat("CUDA backend unavailable: no usable CUDA GPU (", why, ")"));
  (void)cublas_api();  // throws its own message naming cuBLAS
  int dev = 0;
  TBPTT_CUDA_CHECK(cudaGetDevice(&dev));
  if (!kernels_run_here(&why)) {
    cudaDeviceProp prop{};
    TBPTT_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    throw std::runtime_error(
        str_cat("CUDA backend unavailable: this build's kernels do not run on ", prop.name,
                " (compute capability ", prop.major, ".", prop.minor, "; ", why,
                "); rebuild with -DTBPTT_CUDA_ARCHITECTURES=", prop.major, prop.minor));
  }
  return dev;
}

}  // namespace tbptt::cuda

bool tbptt::cuda_device_available() {
  try {
    return cuda::device_count(nullptr) > 0 && cuda::cublas_loadable() &&
           cuda::kernels_run_here(nullptr);
  } catch (...) {
    return false;
  }
}

std::string tbptt::cuda_build_info() {
  int rt = 0;
  const std::string runtime = cudaRuntimeGetVersion(&rt) == cudaSuccess
                                  ? str_cat(rt / 1000, ".", (rt % 1000) / 10)
                                  : std::string("?");
  (void)cudaGetLastError();
  return str_cat("cuda runtime ", runtime, " (built with ", CUDART_VERSION / 1000, ".",
                 (CUDART_VERSION % 1000) / 10, ", static), cuBLAS headers ", CUBLAS_VER_MAJOR, ".",
                 CUBLAS_VER_MINOR, " loaded at run time");
}
