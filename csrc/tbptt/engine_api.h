// tbptt_fast engine interface: the pure C++ contract every native backend
// (CPU now, CUDA later) implements. bindings.cpp converts NumPy <-> the plain
// views below once, then drives any EngineBase. No pybind11, no BLAS, no CUDA
// headers here, so every backend can include it.
//
// Shape legend (used by every header under csrc/):
//   T  steps in one run() call           B  batch size
//   D  input size (D_0 = D, D_l = H for l > 0)
//   H  hidden size                        O  readout (output) size
//   G  gates: 1 rnn_tanh/rnn_relu, 4 lstm (i,f,g,o), 3 gru (r,z,n)
//   L  number of layers                   K  ring capacity in steps
//   P  number of parameter arrays = 4L + 2
// All arrays are row-major (rightmost index fastest), C-contiguous, with no
// padding, in the engine's dtype unless stated otherwise.
//
// Semantics: /work/shared/SPEC.md and engine_api.md (TBPTT(k1, k2), losses,
// optimizers, error messages). Engines trust their inputs: validation of
// types, shapes and values is done by the caller (bindings / Python layer).
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "tbptt/errors.h"

namespace tbptt {

enum class CellKind { kRnnTanh, kRnnRelu, kLstm, kGru };
enum class LossKind { kMse, kCrossEntropy };
enum class OverlapKind { kStored, kRecompute };
enum class OptimizerKind { kSgd, kAdam };
enum class DType { kFloat32, kFloat64 };

// Engine configuration; mirrors the config dict of engine_api.md.
struct Config {
  CellKind cell = CellKind::kLstm;
  int64_t input_size = 0;   // D
  int64_t hidden_size = 0;  // H
  int64_t output_size = 0;  // O
  int64_t num_layers = 1;   // L
  DType dtype = DType::kFloat32;
  int64_t k1 = 1;
  int64_t k2 = 1;  // 0 = unbounded (window reaches back to the last reset)
  LossKind loss = LossKind::kMse;
  OverlapKind overlap = OverlapKind::kStored;
  OptimizerKind optimizer = OptimizerKind::kSgd;
  double lr = 0.01;
  double momentum = 0.0;
  bool nesterov = false;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double clip = 0.0;     // <= 0: no clipping
  int64_t capacity = 0;  // ring capacity override in steps; 0 = max(k1, k2)

  // SPEC section 3: the gradient of the update at step t (previous update at
  // t_prev, 0 if none) flows back through steps (w, t]. The one place this
  // rule is written in C++.
  int64_t window_start(int64_t t, int64_t t_prev) const {
    if (unbounded()) return 0;
    const int64_t overlap = k2 > k1 ? k2 - k1 : 0;
    int64_t w = t - k2 > t_prev - overlap ? t - k2 : t_prev - overlap;
    return w > 0 ? w : 0;
  }
  // Steps of history a ring holds: max(k1, k2), or the test override
  // `capacity` (never below k1, since a block must fit). Grows when unbounded.
  int64_t ring_capacity() const {
    const int64_t need = k1 > k2 ? k1 : k2;
    return capacity > 0 ? (capacity > k1 ? capacity : k1) : need;
  }
  // Steps of history held after `count` steps since the last reset.
  int64_t history_steps(int64_t count) const {
    if (unbounded()) return count;
    const int64_t need = k1 > k2 ? k1 : k2;
    return count < need ? count : need;
  }
  int64_t gates() const { return cell == CellKind::kLstm ? 4 : cell == CellKind::kGru ? 3 : 1; }
  bool unbounded() const { return k2 == 0; }
  // Number of parameter arrays, 4L + 2, in canonical order:
  // for l in 0..L-1: weight_ih_l{l} [G*H, D_l], weight_hh_l{l} [G*H, H],
  // bias_ih_l{l} [G*H], bias_hh_l{l} [G*H]; then readout.weight [O, H],
  // readout.bias [O].
  int64_t num_params() const { return 4 * num_layers + 2; }
  std::vector<int64_t> param_shape(int64_t i) const;
  int64_t param_size(int64_t i) const;  // product of param_shape(i)
  // [P + 1] start of each parameter in one flat buffer of all of them, in
  // canonical order; the last entry is the total size.
  std::vector<int64_t> param_offsets() const;
  std::string param_name(int64_t i) const;
  // State arrays per layer: 2 for lstm (h, c), else 1 (h); each [B, H].
  int64_t state_per_layer() const { return cell == CellKind::kLstm ? 2 : 1; }
  size_t dtype_size() const { return dtype == DType::kFloat32 ? 4 : 8; }
  // Throws std::invalid_argument naming the bad field.
  void validate() const;
};

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

// Inputs of one run() call. Every pointer is borrowed from the caller for the
// duration of the call only; none may alias another or the parameters.
struct RunInputs {
  int64_t steps = 0;                // T >= 1
  int64_t batch = 0;                // B >= 1
  const void* x = nullptr;          // [T, B, D] dtype
  const void* target = nullptr;     // mse: [T, B, O] dtype; cross_entropy: [T, B] int64
  const void* mask = nullptr;       // [T, B] dtype, values 0 or 1; nullptr = all ones
  const uint8_t* resets = nullptr;  // [T, B] 0/1; nullptr = no resets
  bool flush = false;               // update on the partial block at the end
  bool return_grads = false;        // fill RunResult::grads
  void* outputs = nullptr;          // [T, B, O] dtype written by run(); nullptr = not wanted
  // Set (CUDA engine only): the inputs are device arrays and x, target, mask
  // and resets above are unused. outputs stays a host array.
  const DeviceInputs* device = nullptr;
};

// Owning host array in the engine's dtype (bytes hold shape-product elements).
struct HostArray {
  std::vector<int64_t> shape;
  std::vector<unsigned char> bytes;
};

// What run() / flush() return; U = number of updates performed.
struct RunResult {
  std::vector<double> losses;         // [U] Loss_P of each update, from the forward pass
  std::vector<int64_t> update_steps;  // [U] step count t of each update
  // [U][P] gradients before clipping, canonical order; empty unless requested.
  std::vector<std::vector<HostArray>> grads;
};

// Abstract TBPTT engine. One instance owns the forward state, the ring of
// stored history, the pending block and the optimizer state. Not thread-safe:
// callers serialise calls on one instance (bindings hold the instance while
// the GIL is released for the duration of one call).
class EngineBase {
 public:
  virtual ~EngineBase() = default;

  virtual const Config& config() const = 0;

  // Trainer-level reset: step count -> 0, history and pending block dropped,
  // optimizer state kept. initial_state: nullptr (zeros; B taken from the next
  // run) or L * state_per_layer() borrowed pointers, flat layer-major
  // (h_0[, c_0], h_1[, c_1], ...), each [batch, H] dtype; copied before return.
  virtual void reset(const std::vector<const void*>* initial_state, int64_t batch) = 0;

  // Runs in.steps steps and every update they trigger (plus a flush update
  // if in.flush). Throws std::runtime_error("non-finite loss in the update at
  // step t") / ("non-finite gradient ...") after marking that block consumed
  // and without touching parameters or optimizer state.
  virtual RunResult run(const RunInputs& in) = 0;

  // Update on the pending partial block; nothing pending -> empty result.
  virtual RunResult flush(bool return_grads) = 0;

  // Batch size of the current forward state; 0 when there is none (no step
  // since the last reset and no initial state given).
  virtual int64_t state_batch() const = 0;
  // Copies the forward state into L * state_per_layer() caller-owned
  // [state_batch(), H] buffers (same flat order as reset). Requires state_batch() > 0.
  virtual void state(const std::vector<void*>& out) const = 0;

  virtual int64_t step_count() const = 0;    // steps since the last trainer-level reset
  virtual int64_t pending() const = 0;       // steps since the previous update
  virtual int64_t stored_steps() const = 0;  // steps of history held now

  // Host <-> engine parameter sync. CPU: no-ops (works on the caller's arrays
  // in place). CUDA: pull writes device params into the host arrays given at
  // construction; push re-reads them.
  virtual void pull_params() = 0;
  virtual void push_params() = 0;

  // Value check of a device array (CUDA engine only; others throw
  // std::invalid_argument). Waits for all work queued on the device first,
  // so the producer's writes are seen.
  // CUDA graphs (TBPTT_CUDA_GRAPHS, CUDA engine only): {recorded, replayed,
  // run directly, failed captures} and the first failure's message; other
  // engines: empty.
  virtual std::vector<int64_t> graph_stats(std::string* first_failure) const {
    if (first_failure != nullptr) first_failure->clear();
    return {};
  }

  virtual ScanResult scan_device(const ScanRequest& req) {
    throw std::invalid_argument(
        str_cat(req.array.name, " is a CUDA array; this backend takes host arrays"));
  }
};

// Factories. `params` are P borrowed host pointers in canonical order, shapes
// from Config::param_shape, dtype cfg.dtype. The CPU engine reads and UPDATES
// them in place and keeps the pointers: they must outlive the engine and must
// not be reallocated (bindings keep the NumPy arrays alive). A CUDA engine
// copies them to the device at construction and on push_params().
std::unique_ptr<EngineBase> make_cpu_engine(const Config& cfg, const std::vector<void*>& params);

// The factories' `params` checked (P of them, none null) and typed.
template <typename T>
std::vector<T*> typed_params(const Config& cfg, const std::vector<void*>& params) {
  TBPTT_CHECK_ARG(static_cast<int64_t>(params.size()) == cfg.num_params(), "expected ",
                  cfg.num_params(), " parameter arrays, got ", params.size());
  std::vector<T*> out;
  for (size_t i = 0; i < params.size(); ++i) {
    TBPTT_CHECK_ARG(params[i] != nullptr, "parameter ", i, " is null");
    out.push_back(static_cast<T*>(params[i]));
  }
  return out;
}

#ifdef TBPTT_WITH_CUDA
// Provided by csrc/cuda/ (the CUDA helper). Throws std::runtime_error when no
// usable GPU is present.
std::unique_ptr<EngineBase> make_cuda_engine(const Config& cfg, const std::vector<void*>& params);
// True when a usable CUDA device is visible (never throws).
bool cuda_device_available();
// Short description for build_info(), e.g. "cuda 13.0, cuBLAS 13.1".
std::string cuda_build_info();
#endif

}  // namespace tbptt
