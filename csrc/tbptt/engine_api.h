// The engine interface every native backend implements (engine.h's skeleton
// on a cpu or cuda device policy). bindings.cpp converts NumPy <-> the plain
// views below once, then drives any EngineBase. No pybind11, no BLAS, no CUDA
// headers here. Engines trust their inputs: validation of types, shapes and
// values is done by the caller (the Python layer and the bindings).
// Shapes: the legend in tbptt/config.h.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "tbptt/config.h"
#include "tbptt/device_views.h"
#include "tbptt/errors.h"

namespace tbptt {

// Data-parallel training over several processes (tbptt_fast.distributed):
// each process runs its own streams, and at every update the engine hands
// its per-block sums to these callbacks, which replace them by the sums over
// all processes, so every process takes the same optimizer step. Both are
// called at every update, block first, from the thread running the engine;
// either may throw to stop the run there (the block is consumed, parameters
// and optimizer state are as before the update). Empty: one process.
struct Reducer {
  // [2]: in, this process's masked loss sum and mask count of the block;
  // out, their sums over all processes. The block mean, the loss check and
  // the gradient's scale then use the summed count.
  std::function<void(double* loss_and_count)> block;
  // [n] model dtype, host memory (a device engine stages its gradient through
  // host memory), canonical order. In: this process's gradient, already
  // divided by the summed count; out: its sum over all processes. Called
  // before the gradient check, clipping and the optimizer step.
  std::function<void(void* grad, int64_t n)> grad;
};

// Inputs of one run() call. Every pointer is borrowed from the caller for the
// duration of the call only; none may alias another or the parameters.
struct RunInputs {
  int64_t steps = 0;                // T >= 1
  int64_t batch = 0;                // B >= 1
  const void* x = nullptr;          // [T, B, D] dtype; with an embedding: [T, B] int64 ids
  const void* target = nullptr;     // mse: [T, B, O] dtype; cross_entropy: [T, B] int64
  const void* mask = nullptr;       // [T, B] dtype, values 0 or 1; nullptr = all ones
  const uint8_t* resets = nullptr;  // [T, B] 0/1; nullptr = no resets
  bool flush = false;               // update on the partial block at the end
  bool return_grads = false;        // fill RunResult::grads
  void* outputs = nullptr;          // [T, B, O] dtype written by run(); nullptr = not wanted
  // Set (CUDA engine only): the inputs are device arrays and x, target, mask
  // and resets above are unused. outputs stays a host array.
  const DeviceInputs* device = nullptr;
  // Called after each update with (update index in this call, step t, loss);
  // returning false stops the run right after that update (the stream is then
  // positioned after step t; step_count() says how far it got). Called
  // without any lock the engine needs; may be empty.
  std::function<bool(int64_t, int64_t, double)> on_update;
  // Called between chunks (at most Schedule::kMaxChunk steps apart), where the
  // engine is consistent: completed updates kept, the stream positioned after
  // the last completed chunk. May throw to stop the run there (interrupts).
  std::function<void()> poll;
  // Data parallel: see Reducer (empty: this process's streams are the batch).
  Reducer reduce;
};

// Forward only (predict / evaluate): no schedule, no history, no update; the
// engine's training state (forward state, step count, pending block, ring)
// is untouched. Pointers are borrowed for the call.
struct ForwardInputs {
  int64_t steps = 0;                // T >= 1
  int64_t batch = 0;                // B >= 1
  const void* x = nullptr;          // [T, B, D] dtype; with an embedding: [T, B] int64 ids
  const uint8_t* resets = nullptr;  // [T, B] 0/1; nullptr = no resets
  // nullptr: zeros; else L * state_per_layer() arrays [B, H] (flat layer-major),
  // the state entering step 1.
  const std::vector<const void*>* state = nullptr;
  // What a reset restores, in the same form; nullptr: `state` (zeros if that
  // is nullptr too), as training's initial state.
  const std::vector<const void*>* reset_state = nullptr;
  void* outputs = nullptr;       // [T, B, O] dtype, written
  std::vector<void*> state_out;  // L * state_per_layer() arrays [B, H], written
};

// Owning host array (bytes hold shape-product elements of `dtype`).
struct HostArray {
  enum DTypeCode { kEngine = 0, kInt64 = 1, kUint8 = 2 };
  std::vector<int64_t> shape;
  std::vector<unsigned char> bytes;
  int dtype = kEngine;
};

// Everything an engine needs to continue exactly (checkpoints), in a layout
// that does not depend on the backend: scalars, and named host arrays:
//   state_{i}, init_{i} [B, H] (i < L * S; present with has_state / has_init),
//   opt_m, opt_v [sum of parameter sizes] (canonical order; when the optimizer keeps them),
//   and the stored history of the last `history_steps` steps (oldest first):
//   x [n, B, D] (and ids [n, B] int64 with an embedding), mask [n, B], resets [n, B] uint8,
//   target [n, B, O] (mse) or label [n, B] int64 (cross_entropy), dy [n, B, O]
//   (dLoss/dy of the step, unnormalised, as the forward left it),
//   gates_{l} [n, B, G*H], h_in_{l} [n, B, H], c_in_{l} (cells with c),
//   aux_{l} (cells with a cached value), h_out_{l} (G > 1).
struct EngineSnapshot {
  int64_t step_count = 0, pending = 0, last_update = 0, batch = 0, history_steps = 0;
  bool has_state = false, has_init = false;
  double pending_loss = 0.0, pending_count = 0.0;  // masked loss sum and mask count of the block
  int64_t adam_step = 0;
  std::map<std::string, HostArray> arrays;
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

  // Forward only; see ForwardInputs.
  virtual void forward(const ForwardInputs& in) = 0;

  // New optimizer hyperparameters from the next update on. The same kind keeps
  // the optimizer's state (momentum buffers, Adam moments and step count);
  // fresh_state = true (or another kind) starts it afresh.
  virtual void set_hyperparams(const Hyperparams& hp, bool fresh_state) = 0;

  // Checkpoints: the complete training state, and its restoration (throws
  // std::invalid_argument naming what does not fit this engine's configuration).
  virtual EngineSnapshot snapshot() const = 0;
  virtual void restore(const EngineSnapshot& snap) = 0;

  // Update on the pending partial block; nothing pending -> empty result.
  // reduce: as RunInputs::reduce.
  virtual RunResult flush(bool return_grads, const Reducer& reduce) = 0;

  // Batch size of the current forward state; 0 when there is none (no step
  // since the last reset and no initial state given).
  virtual int64_t state_batch() const = 0;
  // Copies the forward state into L * state_per_layer() caller-owned
  // [state_batch(), H] buffers (same flat order as reset). Requires state_batch() > 0.
  virtual void state(const std::vector<void*>& out) const = 0;

  // The flat gradient of the last update ([sum of parameter sizes], canonical
  // order, Config::param_offsets()), valid until the next update starts;
  // host engines only (nullptr elsewhere).
  virtual void* grad_data() = 0;

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
