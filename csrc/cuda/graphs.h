// Optional CUDA graphs for the per-step launch sequences (TBPTT_CUDA_GRAPHS=1).
//
// A chunk's forward over one layer is, per step, the entering-state kernel,
// one cuBLAS product and one cell kernel; the backward over a window is per
// step one cell kernel, one cuBLAS product and the carry cut. At small H
// those launches, not the arithmetic, set the time per step. GraphCache
// records such a sequence once into a CUDA graph and replays it with one
// launch whenever the same sequence comes again: same store, layer, first ring
// slot, step count and state buffer (with a bounded k2 the ring's slots
// repeat, so every chunk after the first few replays a graph). Everything a
// sequence bakes in (device pointers, sizes) follows from that key as long as
// no buffer is reallocated; the device policy (device_policy.cuh) clears the
// cache whenever one is. The sequences themselves are the skeleton's
// (tbptt/engine.h, step_sequence); the key is its StepKey.
//
// Off by default: it has not run on a GPU yet (see README.md). A failed
// capture falls back to launching that sequence directly (and is counted in
// GraphStats), or throws with TBPTT_CUDA_GRAPHS=strict.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "cuda/check.h"

namespace tbptt::cuda {

struct GraphKey {
  uintptr_t store;  // which activations (real forward or recompute)
  uintptr_t state;  // running state buffer (forward) or 0 (backward)
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

// What the cache did, for tests and benchmarks (a fallback is otherwise silent).
struct GraphStats {
  int64_t recorded = 0, replayed = 0, direct = 0, failed = 0;
  std::string first_failure;
};

class GraphCache {
 public:
  static constexpr int64_t kMinSteps = 4;    // shorter sequences launch directly
  static constexpr size_t kMaxGraphs = 512;  // then new sequences launch directly
  static constexpr size_t kMaxSeen = 4096;   // keys seen once, waiting for a second time

  enum class Mode { kOff, kOn, kStrict };
  // TBPTT_CUDA_GRAPHS: unset/0 off, 1 on, "strict" on and a failed capture throws.
  static Mode requested() {
    const char* v = std::getenv("TBPTT_CUDA_GRAPHS");
    if (v == nullptr || v[0] == '\0' || std::strcmp(v, "0") == 0) return Mode::kOff;
    return std::strcmp(v, "strict") == 0 ? Mode::kStrict : Mode::kOn;
  }

  void set_mode(Mode m) { mode_ = m; }
  const GraphStats& stats() const { return stats_; }
  void clear() {
    graphs_.clear();
    seen_.clear();
    failed_.clear();
  }

  // Runs `body` (which only enqueues kernels and cuBLAS calls on `stream` and
  // changes nothing on the host, so it may run twice) through the graph of
  // `key`. A key is recorded the second time it comes (a one-off sequence
  // would pay the recording for nothing); a key whose capture failed runs
  // directly from then on.
  template <typename F>
  void run(const GraphKey& key, cudaStream_t stream, F&& body) {
    if (mode_ == Mode::kOff || key.steps < kMinSteps) {
      body();
      return;
    }
    auto it = graphs_.find(key);
    if (it == graphs_.end()) {
      if (graphs_.size() >= kMaxGraphs || failed_.count(key) != 0 || !seen_before(key)) {
        ++stats_.direct;
        body();
        return;
      }
      std::string why;
      cudaGraphExec_t exec = record(stream, body, &why);
      if (exec == nullptr) {  // nothing of body has run
        ++stats_.failed;
        if (stats_.first_failure.empty()) stats_.first_failure = why;
        if (mode_ == Mode::kStrict) throw std::runtime_error("CUDA graph capture failed: " + why);
        failed_.insert(key);
        ++stats_.direct;
        body();
        return;
      }
      it = graphs_.emplace(key, GraphExec(exec)).first;
      ++stats_.recorded;
    }
    ++stats_.replayed;
    TBPTT_CUDA_CHECK(cudaGraphLaunch(it->second.get(), stream));
  }

 private:
  bool seen_before(const GraphKey& key) {
    if (seen_.count(key) != 0) return true;
    if (seen_.size() >= kMaxSeen) seen_.clear();
    seen_.insert(key);
    return false;
  }

  // The instantiated graph of body's launches, or nullptr and why if capture
  // failed (then nothing of body has run).
  template <typename F>
  static cudaGraphExec_t record(cudaStream_t stream, F& body, std::string* why) {
    cudaError_t e = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      *why = std::string("cudaStreamBeginCapture: ") + cudaGetErrorString(e);
      return nullptr;
    }
    try {
      body();
    } catch (const std::exception& ex) {  // an operation refused under capture
      *why = ex.what();
    }
    cudaGraph_t graph = nullptr;
    e = cudaStreamEndCapture(stream, &graph);  // always: the stream leaves capture mode
    if (e != cudaSuccess && why->empty()) {
      *why = std::string("cudaStreamEndCapture: ") + cudaGetErrorString(e);
    }
    cudaGraphExec_t exec = nullptr;
    if (why->empty()) {
      e = cudaGraphInstantiate(&exec, graph, 0);
      if (e != cudaSuccess) *why = std::string("cudaGraphInstantiate: ") + cudaGetErrorString(e);
    }
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
    if (!why->empty()) {
      (void)cudaGetLastError();
      if (exec != nullptr) (void)cudaGraphExecDestroy(exec);
      return nullptr;
    }
    return exec;
  }

  Mode mode_ = Mode::kOff;
  GraphStats stats_;
  std::map<GraphKey, GraphExec> graphs_;
  std::set<GraphKey> seen_, failed_;
};

}  // namespace tbptt::cuda
