// cuBLAS for the engine: loaded at run time with dlopen (never a link-time
// dependency), so `tbptt_fast._core` imports on machines without cuBLAS or a
// GPU and the CPU engine keeps working; only constructing a CUDA engine needs
// it. The library is looked up, in order, at
//   1. $TBPTT_CUBLAS_LIBRARY (a full path), if set;
//   2. "libcublas.so.13" through the dynamic loader (already loaded, e.g. by
//      PyTorch, or on LD_LIBRARY_PATH / ldconfig);
//   3. <site-packages>/nvidia/cu13/lib/libcublas.so.13 next to this module
//      (the nvidia-cublas wheel, the `cuda` extra);
//   4. the wheel directory found at build time (TBPTT_CUBLAS_HINT_DIR).
// The wheel's libcublas.so.13 finds its libcublasLt.so.13 through its own
// RPATH ($ORIGIN).
//
// Blas wraps one cuBLAS handle bound to the policy's stream and offers
// ROW-MAJOR gemm/gemv with the same conventions as cpu/blas.h.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace tbptt::cuda {

// Function table filled by dlsym; types come from cublas_v2.h.
struct CublasApi {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasSgemm_v2) sgemm = nullptr;
  decltype(&cublasDgemm_v2) dgemm = nullptr;
  decltype(&cublasSgemv_v2) sgemv = nullptr;
  decltype(&cublasDgemv_v2) dgemv = nullptr;
  std::string path;  // the file that was loaded
};

// Loads cuBLAS once (thread-safe); throws std::runtime_error listing every
// place tried when it cannot be found.
const CublasApi& cublas_api();
// Never throws: true when cublas_api() would succeed.
bool cublas_loadable() noexcept;

// One cuBLAS handle on one stream. Move-only; the destructor never throws.
class Blas {
 public:
  explicit Blas(cudaStream_t stream);
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  Blas(Blas&&) = delete;
  Blas& operator=(Blas&&) = delete;

  // C[m, n] = alpha * op(A) op(B) + beta * C, all ROW-major device pointers
  // (same contract as cpu::gemm): op(A) is [m, k] (A stored [m, lda] or, when
  // trans_a, [k, lda]); op(B) is [k, n] (B stored [k, ldb] or, when trans_b,
  // [n, ldb]). C must not alias A or B. m or n == 0: no-op.
  template <typename T>
  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
            int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

  // y[n] = alpha * A^T x + beta * y for A ROW-major [m, n] (lda >= n), x [m]:
  // the column sums of A when x is all ones (bias gradients).
  template <typename T>
  void gemv_t(int64_t m, int64_t n, T alpha, const T* a, int64_t lda, const T* x, T beta, T* y);

 private:
  const CublasApi& api_;
  cublasHandle_t handle_ = nullptr;
};

// The specialisations defined in cublas.cpp (float and double only).
template <>
void Blas::gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                       const float*, int64_t, float, float*, int64_t);
template <>
void Blas::gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                        const double*, int64_t, double, double*, int64_t);
template <>
void Blas::gemv_t<float>(int64_t, int64_t, float, const float*, int64_t, const float*, float,
                         float*);
template <>
void Blas::gemv_t<double>(int64_t, int64_t, double, const double*, int64_t, const double*, double,
                          double*);

}  // namespace tbptt::cuda
