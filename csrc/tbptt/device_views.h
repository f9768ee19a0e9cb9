// Views of caller-owned CUDA device memory (the cuda backend reads inputs in
// place) and the value checks run on them. Plain structs: no CUDA headers,
// so the interface (engine_api.h) and the bindings can include it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tbptt {

// Element types of a caller's device array (CUDA engine inputs). The codes
// are shared with python/tbptt_fast/_device.py (ELEM_CODES).
enum class ElemType : int {
  kF16 = 0,
  kF32 = 1,
  kF64 = 2,
  kBool = 3,
  kI8 = 4,
  kI16 = 5,
  kI32 = 6,
  kI64 = 7,
  kU8 = 8,
  kU16 = 9,
  kU32 = 10,
  kU64 = 11,
};
inline bool is_float(ElemType t) {
  return t == ElemType::kF16 || t == ElemType::kF32 || t == ElemType::kF64;
}
inline size_t elem_size(ElemType t) {
  switch (t) {
    case ElemType::kF64:
    case ElemType::kI64:
    case ElemType::kU64:
      return 8;
    case ElemType::kF32:
    case ElemType::kI32:
    case ElemType::kU32:
      return 4;
    case ElemType::kF16:
    case ElemType::kI16:
    case ElemType::kU16:
      return 2;
    default:
      return 1;
  }
}
inline bool is_integer(ElemType t) {
  return static_cast<int>(t) >= static_cast<int>(ElemType::kI8);
}

// A strided view of caller-owned CUDA device memory (rank <= 3, any strides,
// any ElemType), borrowed for one call. `name` is used in error messages.
struct DeviceView {
  const void* data = nullptr;
  ElemType type = ElemType::kF32;
  int ndim = 0;
  int64_t shape[3] = {1, 1, 1};
  int64_t strides[3] = {0, 0, 0};  // in bytes
  std::string name;
  int64_t size() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
};

// run() inputs already on the device (CUDA engine only): x [T, B, D] float,
// target [T, B, O] float (mse) or [T, B] integer (cross_entropy), optional
// mask / resets [T, B] bool or numeric (nonzero = set). They are converted
// into the engine's ring chunk by chunk on the device (cast, strides, labels
// and targets zeroed where unread); nothing goes through the host. run()
// checks labels and the mask again on the device and counts the mask; the
// caller validates every value first with scan_device, for its messages.
struct DeviceInputs {
  DeviceView x, target, mask, resets;
  bool has_mask = false, has_resets = false;
};

// One value check of a device array, run on the device (the device twin of
// the NumPy validation in python/tbptt_fast/_validation.py).
enum class ScanKind {
  kFinite,  // float array: first NaN/Inf (only where the mask is set, if given)
  kFlag,    // bool/numeric flags: first NaN/Inf; with row_len, nonzero count per row
  kClass,   // integer class indices: first outside [0, num_classes) where the mask is set
};
struct ScanRequest {
  DeviceView array;
  ScanKind kind = ScanKind::kFinite;
  const DeviceView* mask = nullptr;  // element i of `array` is read where mask[i / mask_div] != 0
  int64_t mask_div = 1;
  int64_t row_len = 0;  // kFlag: count nonzero entries per run of row_len elements
  int64_t num_classes = 0;
};
struct ScanResult {
  int64_t first_bad = -1;           // flat C-order index of the first bad element; -1: none
  double value = 0.0;               // its value (floats and flags)
  int64_t ivalue = 0;               // its value (integers; uint64: the same 64 bits)
  std::vector<int64_t> row_counts;  // kFlag with row_len: [size / row_len]
};

}  // namespace tbptt
