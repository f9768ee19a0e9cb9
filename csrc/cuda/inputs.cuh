// Inputs that are already on the device (CuPy, PyTorch, anything with
// __cuda_array_interface__ or DLPack): read in place, never through the host.
// Two kernels over a strided view of any element type (DeviceView in
// tbptt/device_views.h), launched by device_policy.cuh:
//   scan_kernel   the value checks of python/tbptt_fast/_validation.py
//                 (first NaN/Inf, first class index out of range where the
//                 mask is set, nonzero flags per step) with the first bad
//                 element found by flat C-order index, so the error names the
//                 same element as the NumPy path;
//   gather_kernel a run of consecutive elements cast to the engine's type and
//                 written contiguously into a ring slot range (flags -> 0/1,
//                 labels and mse targets -> 0 where the mask is not set), the
//                 same values the host path's np.ascontiguousarray(a, dtype)
//                 and np.where(read, a, 0) produce.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels.cuh"
#include "tbptt/device_views.h"

namespace tbptt::cuda {

// Kernel-side copy of a DeviceView, padded to rank 3 at the front (size 1,
// stride 0), so element i of the C-order flattening is one divmod chain away.
struct View {
  const char* data;
  int type;  // ElemType
  int64_t shape[3];
  int64_t strides[3];  // bytes
};

inline View make_view(const DeviceView& v) {
  View k{};
  k.data = static_cast<const char*>(v.data);
  k.type = static_cast<int>(v.type);
  const int pad = 3 - v.ndim;
  for (int i = 0; i < 3; ++i) {
    k.shape[i] = i < pad ? 1 : v.shape[i - pad];
    k.strides[i] = i < pad ? 0 : v.strides[i - pad];
  }
  return k;
}

// A view with no data: "no mask".
inline View no_view() {
  View k{};
  k.data = nullptr;
  for (int i = 0; i < 3; ++i) {
    k.shape[i] = 1;
    k.strides[i] = 0;
  }
  return k;
}

// Address of element i (flat, C order).
__device__ __forceinline__ const char* element(const View& v, int64_t i) {
  const int64_t c2 = i % v.shape[2];
  i /= v.shape[2];
  const int64_t c1 = i % v.shape[1];
  const int64_t c0 = i / v.shape[1];
  return v.data + c0 * v.strides[0] + c1 * v.strides[1] + c2 * v.strides[2];
}

// Element i as a double (every type: floats exactly, bool as 0/1, integers
// rounded beyond 2^53, which only matters for values that are checked as
// integers anyway).
__device__ __forceinline__ double load_double(const View& v, int64_t i) {
  const char* p = element(v, i);
  switch (static_cast<ElemType>(v.type)) {
    case ElemType::kF16:
      return static_cast<double>(__half2float(*reinterpret_cast<const __half*>(p)));
    case ElemType::kF32:
      return static_cast<double>(*reinterpret_cast<const float*>(p));
    case ElemType::kF64:
      return *reinterpret_cast<const double*>(p);
    case ElemType::kBool:
      return *reinterpret_cast<const uint8_t*>(p) != 0 ? 1.0 : 0.0;
    case ElemType::kI8:
      return static_cast<double>(*reinterpret_cast<const int8_t*>(p));
    case ElemType::kI16:
      return static_cast<double>(*reinterpret_cast<const int16_t*>(p));
    case ElemType::kI32:
      return static_cast<double>(*reinterpret_cast<const int32_t*>(p));
    case ElemType::kI64:
      return static_cast<double>(*reinterpret_cast<const int64_t*>(p));
    case ElemType::kU8:
      return static_cast<double>(*reinterpret_cast<const uint8_t*>(p));
    case ElemType::kU16:
      return static_cast<double>(*reinterpret_cast<const uint16_t*>(p));
    case ElemType::kU32:
      return static_cast<double>(*reinterpret_cast<const uint32_t*>(p));
    case ElemType::kU64:
      return static_cast<double>(*reinterpret_cast<const uint64_t*>(p));
  }
  return 0.0;
}

// Element i of an integer view as int64 (uint64 beyond INT64_MAX saturates,
// which keeps it out of any class range).
__device__ __forceinline__ int64_t load_int(const View& v, int64_t i) {
  const char* p = element(v, i);
  switch (static_cast<ElemType>(v.type)) {
    case ElemType::kI8:
      return *reinterpret_cast<const int8_t*>(p);
    case ElemType::kI16:
      return *reinterpret_cast<const int16_t*>(p);
    case ElemType::kI32:
      return *reinterpret_cast<const int32_t*>(p);
    case ElemType::kI64:
      return *reinterpret_cast<const int64_t*>(p);
    case ElemType::kU8:
      return *reinterpret_cast<const uint8_t*>(p);
    case ElemType::kU16:
      return *reinterpret_cast<const uint16_t*>(p);
    case ElemType::kU32:
      return *reinterpret_cast<const uint32_t*>(p);
    case ElemType::kU64: {
      const uint64_t u = *reinterpret_cast<const uint64_t*>(p);
      return u > uint64_t(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(u);
    }
    default:
      return static_cast<int64_t>(load_double(v, i));
  }
}

__device__ __forceinline__ bool is_float_type(int type) {
  return type == static_cast<int>(ElemType::kF16) || type == static_cast<int>(ElemType::kF32) ||
         type == static_cast<int>(ElemType::kF64);
}

// Whether element i of an array whose mask is `mask` (nullable) is read.
__device__ __forceinline__ bool is_read(const View& mask, int64_t mask_div, int64_t i) {
  return mask.data == nullptr || load_double(mask, i / mask_div) != 0.0;
}

// first_bad: one word, ~0 on entry; receives the smallest bad flat index.
// to_float: the engine computes in float32, so a finite value that overflows
// in that cast (float64 1e39) is as bad as an Inf: judged after the same
// round-to-nearest cast the gather kernels make.
// counts (kFlag with row_len > 0): [n / row_len] zeros on entry; receives the
// number of nonzero entries of each row.
__global__ void scan_kernel(View a, int kind, View mask, int64_t mask_div, int64_t row_len,
                            int64_t num_classes, int64_t n, bool to_float,
                            unsigned long long* first_bad, unsigned long long* counts) {
  TBPTT_GRID_STRIDE(i, n) {
    bool bad = false;
    if (kind == static_cast<int>(ScanKind::kFinite)) {
      if (is_read(mask, mask_div, i)) {
        const double v = load_double(a, i);
        bad = to_float ? !isfinite(__double2float_rn(v)) : !isfinite(v);
      }
    } else if (kind == static_cast<int>(ScanKind::kFlag)) {
      const double v = load_double(a, i);
      bad = is_float_type(a.type) && !isfinite(v);
      if (row_len > 0 && v != 0.0) atomicAdd(counts + i / row_len, 1ULL);
    } else {
      if (is_read(mask, mask_div, i)) {
        const int64_t k = load_int(a, i);
        bad = k < 0 || k >= num_classes;
      }
    }
    if (bad) atomicMin(first_bad, static_cast<unsigned long long>(i));
  }
}

// The value of element i, for the error message: as a double, and for
// integer types as its 64 bits (uint64 unsaturated; the caller knows the type).
__global__ void read_element_kernel(View a, int64_t i, double* value, long long* ivalue) {
  *value = load_double(a, i);
  if (a.type == static_cast<int>(ElemType::kU64)) {
    const uint64_t u = *reinterpret_cast<const uint64_t*>(element(a, i));
    *ivalue = static_cast<long long>(u);  // modulo 2^64: read back by dtype in Python
  } else {
    *ivalue = is_float_type(a.type) ? 0 : static_cast<long long>(load_int(a, i));
  }
}

// How gather_kernel turns an element into its destination value.
enum class GatherKind : int {
  kValue,  // cast; 0 where the mask (if given) is not set (mse targets)
  kFlag,   // nonzero -> 1, else 0
  kLabel,  // integer; 0 where the mask (if given) is not set
};

// dst[j] = f(src element base + j) for j < n; dst contiguous.
template <typename D>
__global__ void gather_kernel(View src, int kind, View mask, int64_t mask_div, int64_t base,
                              int64_t n, D* dst) {
  TBPTT_GRID_STRIDE(j, n) {
    const int64_t i = base + j;
    D out;
    if (kind == static_cast<int>(GatherKind::kFlag)) {
      out = load_double(src, i) != 0.0 ? D(1) : D(0);
    } else if (!is_read(mask, mask_div, i)) {
      out = D(0);
    } else if (kind == static_cast<int>(GatherKind::kLabel)) {
      out = static_cast<D>(load_int(src, i));
    } else {
      out = static_cast<D>(load_double(src, i));
    }
    dst[j] = out;
  }
}

}  // namespace tbptt::cuda
