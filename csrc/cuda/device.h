// RAII owners of device resources: DeviceBuffer<T> (cudaMalloc), Stream,
// HostStatus (pinned host words). All move-only; destructors never throw.
// Every allocation and copy goes through TBPTT_CUDA_CHECK (check.h).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "cuda/check.h"

namespace tbptt::cuda {

// n elements of T in device memory; empty when n == 0 (data() == nullptr).
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { allocate(n); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }

  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

  // Fresh contents: NaN bytes (0xFF: a NaN for float and double) in
  // TBPTT_NAN_FILL builds, so a read of never-written memory fails a test.
  void allocate(size_t n) {
    release();
    if (n == 0) return;
    void* p = nullptr;
    TBPTT_CUDA_CHECK(cudaMalloc(&p, n * sizeof(T)));
    ptr_ = static_cast<T*>(p);
    n_ = n;
#if defined(TBPTT_NAN_FILL)
    TBPTT_CUDA_CHECK(cudaMemset(ptr_, 0xFF, n_ * sizeof(T)));
    TBPTT_CUDA_CHECK(cudaDeviceSynchronize());  // the legacy stream does not order the policy's
#endif
  }

  // Grows to n elements keeping the first size() (ring growth); stream-ordered copy.
  void grow_keep(size_t n, cudaStream_t stream) {
    if (n <= n_) return;
    DeviceBuffer<T> next(n);
    if (n_ > 0) {
      TBPTT_CUDA_CHECK(cudaMemcpyAsync(next.ptr_, ptr_, bytes(), cudaMemcpyDeviceToDevice, stream));
      // the old block is freed below; cudaFree waits for pending work on it
    }
    *this = std::move(next);
  }

 private:
  void release() noexcept {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);  // implicit device sync; never throws here
    ptr_ = nullptr;
    n_ = 0;
  }
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// Makes `device` current for a scope and gives the caller's current device
// back afterwards, so a multi-GPU caller (PyTorch, CuPy) keeps its own.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    TBPTT_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) TBPTT_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { (void)cudaSetDevice(prev_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

// A non-blocking stream owned by one engine's device policy.
class Stream {
 public:
  Stream() { TBPTT_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() {
    if (s_ != nullptr) (void)cudaStreamDestroy(s_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  Stream& operator=(Stream&&) = delete;
  cudaStream_t get() const { return s_; }
  void sync() const { TBPTT_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

// n doubles of pinned host memory (the per-update status read back once).
class HostStatus {
 public:
  explicit HostStatus(size_t n) {
    void* p = nullptr;
    TBPTT_CUDA_CHECK(cudaMallocHost(&p, n * sizeof(double)));
    p_ = static_cast<double*>(p);
  }
  ~HostStatus() {
    if (p_ != nullptr) (void)cudaFreeHost(p_);
  }
  HostStatus(const HostStatus&) = delete;
  HostStatus& operator=(const HostStatus&) = delete;
  HostStatus(HostStatus&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  HostStatus& operator=(HostStatus&&) = delete;
  double* data() { return p_; }

 private:
  double* p_ = nullptr;
};

}  // namespace tbptt::cuda
