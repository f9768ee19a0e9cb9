// Optional CUDA graphs for the per-step launch sequences (TBPTT_CUDA_GRAPHS=1).
//
// A chunk's forward over one layer is, per step, one cuBLAS product and one
// cell kernel; the backward over a window is the same in reverse. At small H
// those launches, not the arithmetic, set the time per step. GraphCache
// records such a sequence once into a CUDA graph and replays it with one
// launch whenever the same sequence comes again: same store, layer, first ring
// slot, step count and state buffer (with a bounded k2 the ring's slots
// repeat, so every chunk after the first few replays a graph). Everything a
// sequence bakes in (device pointers, sizes) follows from that key as long as
// no buffer is reallocated; the engine clears the cache whenever one is.
//
// Off by default: it has not run on a GPU yet (see README.md). Capture
// failures fall back to launching the sequence directly.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>
#include <utility>

#include "cuda/check.h"

namespace tbptt::cuda {

struct GraphKey {
  const void* store;  // which activations (real forward or recompute)
  const void* state;  // running state buffer (forward) or nullptr (backward)
  int64_t layer, slot, steps;
  bool backward;
  bool operator<(const GraphKey& o) const {
    return std::tie(store, state, layer, slot, steps, backward) <
           std::tie(o.store, o.state, o.layer, o.slot, o.steps, o.backward);
  }
};

// An instantiated graph; move-only, destroyed with its owner.
class GraphExec {
 public:
  GraphExec() = default;
  explicit GraphExec(cudaGraphExec_t e) : exec_(e) {}
  ~GraphExec() {
    if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
  }
  GraphExec(const GraphExec&) = delete;
  GraphExec& operator=(const GraphExec&) = delete;
  GraphExec(GraphExec&& o) noexcept : exec_(std::exchange(o.exec_, nullptr)) {}
  GraphExec& operator=(GraphExec&&) = delete;
  cudaGraphExec_t get() const { return exec_; }

 private:
  cudaGraphExec_t exec_ = nullptr;
};

class GraphCache {
 public:
  static constexpr int64_t kMinSteps = 4;    // shorter sequences launch directly
  static constexpr size_t kMaxGraphs = 512;  // then new sequences launch directly

  // TBPTT_CUDA_GRAPHS=1 (and a ring that never grows, i.e. k2 bounded).
  static bool requested() {
    const char* v = std::getenv("TBPTT_CUDA_GRAPHS");
    return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
  }

  void enable(bool on) { enabled_ = on; }
  bool enabled() const { return enabled_; }
  void clear() { graphs_.clear(); }

  // Runs `body` (which only enqueues kernels and cuBLAS calls on `stream` and
  // changes nothing on the host, so it may run twice) through the graph of
  // `key`, recording it first if needed.
  template <typename F>
  void run(const GraphKey& key, cudaStream_t stream, F&& body) {
    if (!enabled_ || key.steps < kMinSteps) {
      body();
      return;
    }
    auto it = graphs_.find(key);
    if (it == graphs_.end()) {
      if (graphs_.size() >= kMaxGraphs) {
        body();
        return;
      }
      cudaGraphExec_t exec = record(stream, body);
      if (exec == nullptr) {  // capture unsupported here: launch directly from now on
        enabled_ = false;
        graphs_.clear();
        body();
        return;
      }
      it = graphs_.emplace(key, GraphExec(exec)).first;
    }
    TBPTT_CUDA_CHECK(cudaGraphLaunch(it->second.get(), stream));
  }

 private:
  // The instantiated graph of body's launches, or nullptr if capture failed
  // (nothing of body has run then).
  template <typename F>
  static cudaGraphExec_t record(cudaStream_t stream, F& body) {
    if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    bool ok = true;
    try {
      body();
    } catch (...) {
      ok = false;  // an operation refused under capture; body runs again directly
    }
    cudaGraph_t graph = nullptr;
    ok = cudaStreamEndCapture(stream, &graph) == cudaSuccess && ok;
    cudaGraphExec_t exec = nullptr;
    if (ok) ok = cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
    if (!ok) {
      (void)cudaGetLastError();
      if (exec != nullptr) (void)cudaGraphExecDestroy(exec);
      return nullptr;
    }
    return exec;
  }

  bool enabled_ = false;
  std::map<GraphKey, GraphExec> graphs_;
};

}  // namespace tbptt::cuda
