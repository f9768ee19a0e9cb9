// cuBLAS loader and the row-major wrappers; see cublas.h.
#include "cuda/cublas.h"

#include <dlfcn.h>

#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "cuda/check.h"
#include "tbptt/errors.h"

#ifndef TBPTT_CUBLAS_HINT_DIR
#define TBPTT_CUBLAS_HINT_DIR ""
#endif

namespace tbptt::cuda {
namespace {

constexpr const char* kSoname = "libcublas.so.13";

// Directory of the shared object that holds this code (the _core module).
std::string module_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&module_dir), &info) == 0 || info.dli_fname == nullptr)
    return "";
  std::string p(info.dli_fname);
  const auto slash = p.rfind('/');
  return slash == std::string::npos ? std::string(".") : p.substr(0, slash);
}

std::vector<std::string> candidates() {
  std::vector<std::string> c;
  if (const char* env = std::getenv("TBPTT_CUBLAS_LIBRARY"); env != nullptr && *env != '\0')
    c.emplace_back(env);
  c.emplace_back(kSoname);
  const std::string dir = module_dir();
  if (!dir.empty()) c.push_back(dir + "/../nvidia/cu13/lib/" + kSoname);
  const std::string hint = TBPTT_CUBLAS_HINT_DIR;
  if (!hint.empty()) c.push_back(hint + "/" + kSoname);
  return c;
}

template <typename F>
void bind(void* lib, const char* name, F& fn, const std::string& path) {
  void* sym = dlsym(lib, name);
  TBPTT_CHECK_RT(sym != nullptr, "cuBLAS library ", path, " lacks the symbol ", name);
  fn = reinterpret_cast<F>(sym);
}

struct Loaded {
  CublasApi api;
  std::string error;  // empty when loaded
};

const Loaded& loaded() {
  static const Loaded result = [] {
    Loaded r;
    std::string tried;
    for (const auto& path : candidates()) {
      void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (lib == nullptr) {
        const char* why = dlerror();
        tried += str_cat("\n  ", path, ": ", why != nullptr ? why : "not found");
        continue;
      }
      try {
        bind(lib, "cublasCreate_v2", r.api.create, path);
        bind(lib, "cublasDestroy_v2", r.api.destroy, path);
        bind(lib, "cublasSetStream_v2", r.api.set_stream, path);
        bind(lib, "cublasSgemm_v2", r.api.sgemm, path);
        bind(lib, "cublasDgemm_v2", r.api.dgemm, path);
        bind(lib, "cublasSgemv_v2", r.api.sgemv, path);
        bind(lib, "cublasDgemv_v2", r.api.dgemv, path);
      } catch (const std::exception& e) {
        tried += str_cat("\n  ", e.what());
        r.api = CublasApi{};
        continue;  // the handle stays open: never dlclose a library that may be shared
      }
      r.api.path = path;
      return r;
    }
    r.error = str_cat(
        "CUDA backend: could not load cuBLAS (", kSoname,
        "); install it with `pip install nvidia-cublas` (the tbptt-fast[cuda] extra) or set "
        "TBPTT_CUBLAS_LIBRARY to its full path. Tried:",
        tried);
    return r;
  }();
  return result;
}

cublasOperation_t op(bool trans) {
  return trans ? CUBLAS_OP_T : CUBLAS_OP_N;
}

int as_int(int64_t v) {
  return static_cast<int>(v);
}

}  // namespace

const CublasApi& cublas_api() {
  const Loaded& l = loaded();
  if (!l.error.empty()) throw std::runtime_error(l.error);
  return l.api;
}

bool cublas_loadable() noexcept {
  try {
    return loaded().error.empty();
  } catch (...) {
    return false;
  }
}

Blas::Blas(cudaStream_t stream) : api_(cublas_api()) {
  TBPTT_CUDA_CHECK(api_.create(&handle_));
  try {
    TBPTT_CUDA_CHECK(api_.set_stream(handle_, stream));
  } catch (...) {
    (void)api_.destroy(handle_);
    throw;
  }
}

Blas::~Blas() {
  if (handle_ != nullptr) (void)api_.destroy(handle_);
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: a row-major
// X[r, ld] is the column-major X^T with the same leading dimension, so the
// operands swap and keep their own transpose flags.
template <>
void Blas::gemm<float>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                       const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                       float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  TBPTT_CUDA_CHECK(api_.sgemm(handle_, op(trans_b), op(trans_a), as_int(n), as_int(m), as_int(k),
                              &alpha, b, as_int(ldb), a, as_int(lda), &beta, c, as_int(ldc)));
}

template <>
void Blas::gemm<double>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                        const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                        double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  TBPTT_CUDA_CHECK(api_.dgemm(handle_, op(trans_b), op(trans_a), as_int(n), as_int(m), as_int(k),
                              &alpha, b, as_int(ldb), a, as_int(lda), &beta, c, as_int(ldc)));
}

// Row-major A[m, n] is column-major A^T [n, m]; A^T x is then an untransposed gemv.
template <>
void Blas::gemv_t<float>(int64_t m, int64_t n, float alpha, const float* a, int64_t lda,
                         const float* x, float beta, float* y) {
  if (m == 0 || n == 0) return;
  TBPTT_CUDA_CHECK(api_.sgemv(handle_, CUBLAS_OP_N, as_int(n), as_int(m), &alpha, a, as_int(lda), x,
                              1, &beta, y, 1));
}

template <>
void Blas::gemv_t<double>(int64_t m, int64_t n, double alpha, const double* a, int64_t lda,
                          const double* x, double beta, double* y) {
  if (m == 0 || n == 0) return;
  TBPTT_CUDA_CHECK(api_.dgemv(handle_, CUBLAS_OP_N, as_int(n), as_int(m), &alpha, a, as_int(lda), x,
                              1, &beta, y, 1));
}

}  // namespace tbptt::cuda
