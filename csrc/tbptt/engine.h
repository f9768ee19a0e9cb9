// The TBPTT(k1, k2) engine skeleton: the only code with a time loop, written
// once for every device and every cell.
//
//   Engine<T, Device, Cell> : EngineBase
//     T       float or double (the model dtype)
//     Device  a device policy (cpu/device.h, cuda/device_policy.cuh): buffers,
//             copies and fills, the products over a range of ring steps, the
//             per-step recurrent products, the cell's pointwise passes over a
//             step, the loss, the gradient check and the optimizer. A policy
//             has no schedule, no ring indexing and no error messages of the
//             contract.
//     Cell    a cell of cells/registry.h (its per-element math and traits)
//
// What the skeleton owns: the schedule (schedule.h), the ring indexing and the
// stored history, the batch and the forward state, reset/run/flush/state and
// every message, the order forward chunk -> update -> (recompute) -> backward
// -> gradient check -> clipping -> optimizer, and the non-finite rules.
//
// Schedule. run() cuts the data into chunks that end at update points (k1
// steps after the previous update) and processes each chunk layer-major:
// layer l's input projection for the whole chunk is one product over the
// chunk's steps written into the ring's gate slots, then a per-step loop does
// the entering state (resets applied), h W_hh^T and one pointwise pass (the
// cell); the readout of the chunk is one product and the loss + dL/dy one
// pass. An update at step t runs the backward over its window (w, t] layer by
// layer from the top: a per-step reverse loop (pointwise pass + dG W_hh, the
// carry cut where the next step reset), then each weight gradient over the
// window is one product-reduction and the gradient sent to the layer below
// one product. Memory is O(K) in steps (ring + window workspace), independent
// of T. The window workspace (dg_, dgu_, dh_) is indexed by window position:
// row block j holds step w + 1 + j.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "cells/cell.h"
#include "tbptt/engine_api.h"
#include "tbptt/errors.h"
#include "tbptt/ring.h"
#include "tbptt/schedule.h"

namespace tbptt {

// Per-layer cache arrays, each [K, B, width] (cells/cell.h for meaning).
template <typename Buf>
struct LayerStore {
  Buf gates;  // [K, B, G*H] post-activation gates
  Buf h_in;   // [K, B, H] state entering the step (after resets)
  Buf c_in;   // [K, B, H] kStates == 2 only
  Buf aux;    // [K, B, H] kAux cells only
  Buf h_out;  // [K, B, H] G > 1 cells only (G == 1: the output is gates)
};

// Everything a backward pass reads, per slot. The engine keeps one Store for
// the real forward pass and, for overlap="recompute", a second one (layer
// arrays and dy only) for the re-run window, addressed by the same slots.
template <typename T, typename Dev>
struct Store {
  template <typename U>
  using Buf = typename Dev::template Buffer<U>;
  std::vector<LayerStore<Buf<T>>> layers;
  Buf<T> x;              // [K, B, D] layer-0 input (real store only)
  Buf<T> mask;           // [K, B] 0/1 (real store only)
  Buf<uint8_t> resets;   // [K, B] 0/1 (real store only)
  Buf<T> target;         // [K, B, O] mse targets (real store only)
  Buf<int64_t> label;    // [K, B] cross_entropy classes (real store only)
  Buf<int64_t> ids;      // [K, B] token ids (with an embedding; stores that hold x)
  Buf<double> row_loss;  // [K, B] mask * l of each row (real store only; devices that keep it)
  Buf<T> dy;             // [K, B, O] y, then the unnormalised dLoss/dy of the step

  bool has_x = false;  // holds its own layer-0 input x (else it reads the real store's)

  // with_inputs: x, mask, resets, targets (the real store, and the forward-only
  // one without targets); with_x: only x and ids (a recompute with an embedding
  // re-gathers x with the current weights).
  // f(mine, theirs) for every buffer of this store and the same one of `other`.
  template <typename F>
  void zip(Store& other, F&& f) {
    for (size_t l = 0; l < layers.size() && l < other.layers.size(); ++l) {
      auto &a = layers[l], &b = other.layers[l];
      f(a.gates, b.gates);
      f(a.h_in, b.h_in);
      f(a.c_in, b.c_in);
      f(a.aux, b.aux);
      f(a.h_out, b.h_out);
    }
    f(x, other.x);
    f(mask, other.mask);
    f(resets, other.resets);
    f(target, other.target);
    f(label, other.label);
    f(ids, other.ids);
    f(row_loss, other.row_loss);
    f(dy, other.dy);
  }

  template <typename Cell>
  void allocate(Dev& dev, const Config& cfg, int64_t k, int64_t b, bool with_inputs, bool keep,
                bool with_x = false, bool with_targets = true) {
    const int64_t h = cfg.hidden_size, gh = Cell::kGates * h;
    layers.resize(static_cast<size_t>(cfg.num_layers));
    const auto n = [&](int64_t w) { return static_cast<size_t>(k * b * w); };
    for (auto& ls : layers) {
      dev.resize(ls.gates, n(gh), keep);
      dev.resize(ls.h_in, n(h), keep);
      dev.resize(ls.c_in, Cell::kStates == 2 ? n(h) : 0, keep);
      dev.resize(ls.aux, Cell::kAux ? n(h) : 0, keep);
      dev.resize(ls.h_out, Cell::kGates == 1 ? 0 : n(h), keep);
    }
    dev.resize(dy, n(cfg.output_size), keep);
    has_x = with_inputs || with_x;
    if (has_x) {
      dev.resize(x, n(cfg.input_size), keep);
      dev.resize(ids, cfg.vocab_size > 0 ? n(1) : 0, keep);
    }
    if (with_inputs) {
      const bool ce = cfg.loss == LossKind::kCrossEntropy, t = with_targets;
      dev.resize(mask, t ? n(1) : 0, keep);
      dev.resize(resets, n(1), keep);
      dev.resize(target, t && !ce ? n(cfg.output_size) : 0, keep);
      dev.resize(label, t && ce ? n(1) : 0, keep);
      dev.resize(row_loss, t && Dev::kRowLoss ? n(1) : 0, keep);
    }
  }
};

// Identifies a per-step launch sequence (a device may record and replay it,
// e.g. as a CUDA graph): the store and running state it works on, the layer,
// the first slot, the step count and the direction.
struct StepKey {
  const void* store;
  const void* state;
  int64_t layer, slot0, steps;
  bool backward;
};

// What a policy's optimizer_step gets: the clip coefficient applied to the
// gradient, and Adam's step number (1 for the first step).
struct OptimizerStep {
  double coef;
  int64_t adam_step;
};

template <typename T, typename Dev, typename Cell>
class Engine final : public EngineBase {
  template <typename U>
  using Buf = typename Dev::template Buffer<U>;
  using St = Store<T, Dev>;
  static constexpr bool kCellState = Cell::kStates == 2;
  // Steps per chunk of a forward-only pass (its own small ring).
  static constexpr int64_t kForwardChunk = 64;

 public:
  Engine(const Config& cfg, const std::vector<void*>& params)
      : cfg_(validated(cfg)),
        L_(cfg.num_layers),
        H_(cfg.hidden_size),
        D_(cfg.input_size),
        O_(cfg.output_size),
        GH_(Cell::kGates * cfg.hidden_size),
        S_(Cell::kStates),
        offsets_(cfg_.param_offsets()),
        dev_(cfg_, params, offsets_) {
    [[maybe_unused]] const auto guard = dev_.guard();
    const size_t n = static_cast<size_t>(offsets_.back());
    dev_.resize(grad_, n, false);
    dev_.fill(grad_.data(), static_cast<int64_t>(n), T(0));
    allocate_optimizer_state();
    ring_.set_capacity(cfg_.ring_capacity());
    dev_.sync();
  }

  const Config& config() const override { return cfg_; }
  Dev& device() { return dev_; }

  void reset(const std::vector<const void*>* initial_state, int64_t batch) override {
    [[maybe_unused]] const auto guard = dev_.guard();
    if (initial_state != nullptr) {
      TBPTT_CHECK_ARG(static_cast<int64_t>(initial_state->size()) == L_ * S_,
                      "initial_state needs ", L_ * S_, " arrays, got ", initial_state->size());
      TBPTT_CHECK_ARG(batch >= 1, "initial_state batch must be >= 1, got ", batch);
      ensure_batch(batch);  // may fail (memory), changing nothing
    }
    sched_.reset();
    dev_.clear_block_loss();
    if (initial_state == nullptr) {
      has_state_ = has_init_ = false;
      return;
    }
    const int64_t bh = B_ * H_;
    for (int64_t i = 0; i < L_ * S_; ++i) {
      dev_.upload(init_.data() + i * bh,
                  static_cast<const T*>((*initial_state)[static_cast<size_t>(i)]), bh);
    }
    dev_.copy(state_.data(), init_.data(), L_ * S_ * bh);
    dev_.sync();  // the caller's arrays may go away after return
    has_state_ = has_init_ = true;
  }

  RunResult run(const RunInputs& in) override {
    [[maybe_unused]] const auto guard = dev_.guard();
    TBPTT_CHECK_ARG(in.steps >= 1, "x must have at least one step, got ", in.steps);
    TBPTT_CHECK_ARG(in.batch >= 1, "batch must be >= 1, got ", in.batch);
    dev_.check_inputs(in);
    // k2=None: the history this call will need, refused before anything runs.
    if (cfg_.unbounded()) check_ring_size(sched_.count() + in.steps, in.batch);
    if (has_state_) {
      TBPTT_CHECK_ARG(in.batch == B_, "batch size changed from ", B_, " to ", in.batch,
                      "; a trainer-level reset (reset_state() or initial_state) is needed first");
    } else {
      ensure_batch(in.batch);
      if (!has_init_) dev_.fill(init_.data(), L_ * S_ * B_ * H_, T(0));
      dev_.copy(state_.data(), init_.data(), L_ * S_ * B_ * H_);
      has_state_ = true;
    }
    dev_.begin_run(in.steps, B_);
    RunResult res;
    sched_.run(
        in.steps, in.flush,
        [&](int64_t pos, int64_t n) {
          if (in.poll) in.poll();
          if (cfg_.unbounded()) ensure_capacity(sched_.count() + n);
          forward_chunk(in, pos, n);
        },
        [&](const Block& b) {
          update(b, in.return_grads, res, in.reduce);
          if (!in.on_update) return true;
          const size_t u = res.losses.size() - 1;
          const bool go_on =
              in.on_update(static_cast<int64_t>(u), res.update_steps[u], res.losses[u]);
          dev_.params_changed();  // the callback may have changed the parameters
          return go_on;
        });
    dev_.sync();
    return res;
  }

  RunResult flush(bool return_grads, const Reducer& reduce) override {
    [[maybe_unused]] const auto guard = dev_.guard();
    dev_.params_changed();  // the caller may have changed the parameters since the last run
    RunResult res;
    sched_.run(
        0, true, [](int64_t, int64_t) {},
        [&](const Block& b) {
          update(b, return_grads, res, reduce);
          return true;
        });
    dev_.sync();
    return res;
  }

  void forward(const ForwardInputs& in) override {
    [[maybe_unused]] const auto guard = dev_.guard();
    TBPTT_CHECK_ARG(in.steps >= 1, "x must have at least one step, got ", in.steps);
    TBPTT_CHECK_ARG(in.batch >= 1, "batch must be >= 1, got ", in.batch);
    TBPTT_CHECK_ARG(in.outputs != nullptr, "forward needs an outputs array");
    TBPTT_CHECK_ARG(static_cast<int64_t>(in.state_out.size()) == L_ * S_, "state needs ", L_ * S_,
                    " output arrays, got ", in.state_out.size());
    for (const auto* st : {in.state, in.reset_state}) {
      TBPTT_CHECK_ARG(st == nullptr || static_cast<int64_t>(st->size()) == L_ * S_, "state needs ",
                      L_ * S_, " arrays, got ", st == nullptr ? 0 : st->size());
    }
    const int64_t b = in.batch, bh = b * H_, k = std::min(in.steps, kForwardChunk);
    if (fw_batch_ != b || fw_ring_.capacity() < k) {
      // Allocated aside and swapped in: a failure changes nothing.
      const int64_t cap = std::max(k, fw_batch_ == b ? fw_ring_.capacity() : int64_t{0});
      check_ring_size(cap, b);
      try {
        St fw;
        Buf<T> fw_init, fw_state, fw_u;
        fw.template allocate<Cell>(dev_, cfg_, cap, b, true, false, true, false);
        dev_.resize(fw_init, static_cast<size_t>(L_ * S_ * bh), false);
        dev_.resize(fw_state, static_cast<size_t>(L_ * S_ * bh), false);
        dev_.resize(fw_u, Cell::kSplitU ? static_cast<size_t>(b * GH_) : 0, false);
        using std::swap;
        swap(fw_, fw);
        swap(fw_init_, fw_init);
        swap(fw_state_, fw_state);
        swap(fw_u_, fw_u);
        fw_ring_.set_capacity(cap);
        fw_batch_ = b;
      } catch (const std::bad_alloc&) {
        throw MemoryLimitError(str_cat("out of memory allocating a forward pass at batch ", b));
      }
    }
    // fw_init_: what a reset restores; fw_state_: the state entering step 1.
    const auto* restored = in.reset_state != nullptr ? in.reset_state : in.state;
    const auto load = [&](Buf<T>& dst, const std::vector<const void*>* src) {
      if (src == nullptr) {
        dev_.fill(dst.data(), L_ * S_ * bh, T(0));
        return;
      }
      for (int64_t i = 0; i < L_ * S_; ++i)
        dev_.upload(dst.data() + i * bh, static_cast<const T*>((*src)[static_cast<size_t>(i)]), bh);
    };
    load(fw_init_, restored);
    if (in.state == restored) {
      dev_.copy(fw_state_.data(), fw_init_.data(), L_ * S_ * bh);
    } else {
      load(fw_state_, in.state);
    }
    dev_.begin_run(in.steps, b);
    const int64_t chunk = fw_ring_.capacity();
    for (int64_t pos = 0; pos < in.steps; pos += chunk) {
      const int64_t n = std::min(chunk, in.steps - pos);
      // Each chunk starts at slot 0 (first = 1): its steps are contiguous.
      dev_.load_forward_inputs(in, pos, n, fw_, b);
      for (int64_t l = 0; l < L_; ++l)
        forward_layer(fw_, fw_, fw_ring_, fw_init_, fw_u_, b, l, 1, n, state_h(fw_state_, l, b),
                      state_c(fw_state_, l, b));
      readout_forward(fw_, fw_ring_, b, 1, n);
      dev_.download(static_cast<T*>(in.outputs) + pos * b * O_, fw_.dy.data(), n * b * O_);
    }
    for (int64_t i = 0; i < L_ * S_; ++i)
      dev_.download(static_cast<T*>(in.state_out[static_cast<size_t>(i)]),
                    fw_state_.data() + i * bh, bh);
    dev_.sync();
  }

  void set_hyperparams(const Hyperparams& hp, bool fresh_state) override {
    [[maybe_unused]] const auto guard = dev_.guard();
    Config next = cfg_;
    next.set_hyperparams(hp);
    next.validate();
    const bool fresh = fresh_state || next.optimizer != cfg_.optimizer;
    cfg_ = next;
    if (fresh) {
      adam_step_ = 0;
      dev_.resize(m_, 0, false);
      dev_.resize(v_, 0, false);
    }
    allocate_optimizer_state();
    dev_.sync();
  }

  EngineSnapshot snapshot() const override {
    [[maybe_unused]] const auto guard = dev_.guard();
    EngineSnapshot s;
    s.step_count = sched_.count();
    s.pending = sched_.pending();
    s.last_update = sched_.last_update();
    s.batch = has_state_ || has_init_ ? B_ : 0;
    s.has_state = has_state_;
    s.has_init = has_init_;
    s.adam_step = adam_step_;
    const auto [loss, count] =
        dev_.peek_block_loss(ring_, real_, sched_.last_update() + 1, sched_.pending(), B_);
    s.pending_loss = loss;
    s.pending_count = count;
    const int64_t bh = B_ * H_, np = offsets_.back();
    for (int64_t i = 0; i < L_ * S_; ++i) {
      if (has_state_)
        s.arrays["state_" + std::to_string(i)] = get<T>({B_, H_}, state_.data() + i * bh);
      if (has_init_)
        s.arrays["init_" + std::to_string(i)] = get<T>({B_, H_}, init_.data() + i * bh);
    }
    if (m_.size() > 0) s.arrays["opt_m"] = get<T>({np}, m_.data());
    if (v_.size() > 0) s.arrays["opt_v"] = get<T>({np}, v_.data());
    const int64_t n = sched_.stored_steps();
    s.history_steps = n;
    if (n > 0) {
      const int64_t first = sched_.count() - n + 1;
      auto& st = const_cast<St&>(real_);
      const bool ce = cfg_.loss == LossKind::kCrossEntropy;
      s.arrays["x"] = history<T>(st.x, D_, first, n);
      if (cfg_.vocab_size > 0)
        s.arrays["ids"] = history<int64_t>(st.ids, 1, first, n, HostArray::kInt64, true);
      s.arrays["mask"] = history<T>(st.mask, 1, first, n, HostArray::kEngine, true);
      s.arrays["resets"] = history<uint8_t>(st.resets, 1, first, n, HostArray::kUint8, true);
      if (ce) {
        s.arrays["label"] = history<int64_t>(st.label, 1, first, n, HostArray::kInt64, true);
      } else {
        s.arrays["target"] = history<T>(st.target, O_, first, n);
      }
      s.arrays["dy"] = history<T>(st.dy, O_, first, n);
      for (int64_t l = 0; l < L_; ++l) {
        auto& ls = st.layers[static_cast<size_t>(l)];
        const std::string sfx = "_" + std::to_string(l);
        s.arrays["gates" + sfx] = history<T>(ls.gates, GH_, first, n);
        s.arrays["h_in" + sfx] = history<T>(ls.h_in, H_, first, n);
        if (kCellState) s.arrays["c_in" + sfx] = history<T>(ls.c_in, H_, first, n);
        if (Cell::kAux) s.arrays["aux" + sfx] = history<T>(ls.aux, H_, first, n);
        if (Cell::kGates > 1) s.arrays["h_out" + sfx] = history<T>(ls.h_out, H_, first, n);
      }
    }
    dev_.sync();
    return s;
  }

  void restore(const EngineSnapshot& s) override {
    [[maybe_unused]] const auto guard = dev_.guard();
    const int64_t n = s.history_steps;
    TBPTT_CHECK_ARG(s.step_count >= 0 && s.last_update >= 0 && s.last_update <= s.step_count &&
                        s.pending == s.step_count - s.last_update,
                    "checkpoint: inconsistent step count ", s.step_count, ", previous update ",
                    s.last_update, ", pending ", s.pending);
    TBPTT_CHECK_ARG(s.pending <= cfg_.k1, "checkpoint: pending block of ", s.pending,
                    " steps exceeds k1 = ", cfg_.k1);
    TBPTT_CHECK_ARG(n == cfg_.history_steps(s.step_count), "checkpoint: history of ", n,
                    " steps, expected ", cfg_.history_steps(s.step_count));
    TBPTT_CHECK_ARG(s.batch >= 0, "checkpoint: negative batch size");
    TBPTT_CHECK_ARG(!(s.has_state || s.has_init || n > 0) || s.batch >= 1,
                    "checkpoint: a state or history needs a batch size >= 1");
    const int64_t np = offsets_.back();
    const bool adam = cfg_.optimizer == OptimizerKind::kAdam;
    const bool wants_m = adam || cfg_.momentum != 0.0;
    TBPTT_CHECK_ARG(s.adam_step >= 0, "checkpoint: negative Adam step count");
    // Everything is checked before anything changes.
    const auto need = [&](const std::string& name, std::vector<int64_t> shape, int dtype) {
      const auto it = s.arrays.find(name);
      TBPTT_CHECK_ARG(it != s.arrays.end(), "checkpoint: missing array '", name, "'");
      TBPTT_CHECK_ARG(it->second.shape == shape && it->second.dtype == dtype, "checkpoint: array '",
                      name, "' has the wrong shape or dtype");
      int64_t count = 1;
      for (int64_t d : shape) count *= d;
      const size_t item = dtype == HostArray::kEngine  ? sizeof(T)
                          : dtype == HostArray::kInt64 ? 8
                                                       : 1;
      TBPTT_CHECK_ARG(it->second.bytes.size() == static_cast<size_t>(count) * item,
                      "checkpoint: array '", name, "' has the wrong size");
      return &it->second;
    };
    const int64_t b = s.batch;
    std::vector<const HostArray*> st_arrays, init_arrays;
    for (int64_t i = 0; i < L_ * S_; ++i) {
      if (s.has_state) st_arrays.push_back(need("state_" + std::to_string(i), {b, H_}, 0));
      if (s.has_init) init_arrays.push_back(need("init_" + std::to_string(i), {b, H_}, 0));
    }
    const HostArray* m = wants_m ? need("opt_m", {np}, 0) : nullptr;
    const HostArray* v = adam ? need("opt_v", {np}, 0) : nullptr;
    const bool ce = cfg_.loss == LossKind::kCrossEntropy;
    std::vector<std::pair<const HostArray*, int>> hist;  // in the order written below
    if (n > 0) {
      hist.push_back({need("x", {n, b, D_}, 0), 0});
      if (cfg_.vocab_size > 0) hist.push_back({need("ids", {n, b}, HostArray::kInt64), 0});
      hist.push_back({need("mask", {n, b}, 0), 0});
      hist.push_back({need("resets", {n, b}, HostArray::kUint8), 0});
      hist.push_back(
          {ce ? need("label", {n, b}, HostArray::kInt64) : need("target", {n, b, O_}, 0), 0});
      hist.push_back({need("dy", {n, b, O_}, 0), 0});
      for (int64_t l = 0; l < L_; ++l) {
        const std::string sfx = "_" + std::to_string(l);
        hist.push_back({need("gates" + sfx, {n, b, GH_}, 0), 0});
        hist.push_back({need("h_in" + sfx, {n, b, H_}, 0), 0});
        if (kCellState) hist.push_back({need("c_in" + sfx, {n, b, H_}, 0), 0});
        if (Cell::kAux) hist.push_back({need("aux" + sfx, {n, b, H_}, 0), 0});
        if (Cell::kGates > 1) hist.push_back({need("h_out" + sfx, {n, b, H_}, 0), 0});
      }
    }
    // The only step that can fail (memory) comes first; it changes nothing if it does.
    if (b >= 1) {
      const int64_t cap = cfg_.unbounded() ? std::max(n, ring_.capacity()) : ring_.capacity();
      if (b != B_ || cap != ring_.capacity()) reallocate(cap, b, false);
    }
    // Commit.
    sched_.reset();
    dev_.clear_block_loss();
    has_state_ = has_init_ = false;
    sched_.restore(s.step_count, s.last_update);
    const int64_t bh = B_ * H_;
    for (size_t i = 0; i < st_arrays.size(); ++i)
      dev_.upload(state_.data() + static_cast<int64_t>(i) * bh,
                  reinterpret_cast<const T*>(st_arrays[i]->bytes.data()), bh);
    for (size_t i = 0; i < init_arrays.size(); ++i)
      dev_.upload(init_.data() + static_cast<int64_t>(i) * bh,
                  reinterpret_cast<const T*>(init_arrays[i]->bytes.data()), bh);
    if (!s.has_init && b >= 1) dev_.fill(init_.data(), L_ * S_ * bh, T(0));
    has_state_ = s.has_state;
    has_init_ = s.has_init;
    adam_step_ = s.adam_step;
    if (m != nullptr) dev_.upload(m_.data(), reinterpret_cast<const T*>(m->bytes.data()), np);
    if (v != nullptr) dev_.upload(v_.data(), reinterpret_cast<const T*>(v->bytes.data()), np);
    if (n > 0) {
      const int64_t first = s.step_count - n + 1;
      size_t k = 0;
      put<T>(real_.x, D_, first, n, *hist[k++].first);
      if (cfg_.vocab_size > 0) put<int64_t>(real_.ids, 1, first, n, *hist[k++].first);
      put<T>(real_.mask, 1, first, n, *hist[k++].first);
      put<uint8_t>(real_.resets, 1, first, n, *hist[k++].first);
      if (ce) {
        put<int64_t>(real_.label, 1, first, n, *hist[k++].first);
      } else {
        put<T>(real_.target, O_, first, n, *hist[k++].first);
      }
      put<T>(real_.dy, O_, first, n, *hist[k++].first);
      for (int64_t l = 0; l < L_; ++l) {
        auto& ls = real_.layers[static_cast<size_t>(l)];
        put<T>(ls.gates, GH_, first, n, *hist[k++].first);
        put<T>(ls.h_in, H_, first, n, *hist[k++].first);
        if (kCellState) put<T>(ls.c_in, H_, first, n, *hist[k++].first);
        if (Cell::kAux) put<T>(ls.aux, H_, first, n, *hist[k++].first);
        if (Cell::kGates > 1) put<T>(ls.h_out, H_, first, n, *hist[k++].first);
      }
    }
    dev_.restore_block_loss(ring_, real_, s.last_update + 1, s.pending, B_, s.pending_loss,
                            s.pending_count);
    dev_.sync();
  }

  int64_t state_batch() const override { return has_state_ ? B_ : 0; }

  void state(const std::vector<void*>& out) const override {
    [[maybe_unused]] const auto guard = dev_.guard();
    TBPTT_CHECK_RT(has_state_, "no state: no step has run since the last reset");
    TBPTT_CHECK_ARG(static_cast<int64_t>(out.size()) == L_ * S_, "state needs ", L_ * S_,
                    " output arrays, got ", out.size());
    const int64_t bh = B_ * H_;
    for (int64_t i = 0; i < L_ * S_; ++i)
      dev_.download(static_cast<T*>(out[static_cast<size_t>(i)]), state_.data() + i * bh, bh);
    dev_.sync();
  }

  void* grad_data() override { return Dev::kHostMemory ? grad_.data() : nullptr; }

  int64_t step_count() const override { return sched_.count(); }
  int64_t pending() const override { return sched_.pending(); }
  int64_t stored_steps() const override { return sched_.stored_steps(); }
  void pull_params() override {
    [[maybe_unused]] const auto guard = dev_.guard();
    dev_.pull_params();
  }
  void push_params() override {
    [[maybe_unused]] const auto guard = dev_.guard();
    dev_.push_params();
  }
  std::vector<int64_t> graph_stats(std::string* first_failure) const override {
    return dev_.graph_stats(first_failure);
  }
  ScanResult scan_device(const ScanRequest& req) override {
    [[maybe_unused]] const auto guard = dev_.guard();
    return dev_.scan_device(req);
  }

 private:
  static const Config& validated(const Config& cfg) {
    cfg.validate();
    return cfg;
  }

  void allocate_optimizer_state() {
    const size_t n = static_cast<size_t>(offsets_.back());
    const bool adam = cfg_.optimizer == OptimizerKind::kAdam;
    if ((adam || cfg_.momentum != 0.0) && m_.size() != n) {
      dev_.resize(m_, n, false);
      dev_.fill(m_.data(), static_cast<int64_t>(n), T(0));
    }
    if (adam && v_.size() != n) {
      dev_.resize(v_, n, false);
      dev_.fill(v_.data(), static_cast<int64_t>(n), T(0));
    }
  }

  // ---- parameters and views -----------------------------------------------
  const T* param(int64_t i) const { return dev_.param(i); }
  const T* w_ih(int64_t l) const { return param(cfg_.layer_param(l, 0)); }
  const T* b_ih(int64_t l) const { return param(cfg_.layer_param(l, 2)); }
  const T* b_hh(int64_t l) const { return param(cfg_.layer_param(l, 3)); }
  const T* w_out() const { return param(cfg_.readout_param(0)); }
  const T* b_out() const { return param(cfg_.readout_param(1)); }
  T* grad(int64_t i) { return grad_.data() + offsets_[static_cast<size_t>(i)]; }
  T* layer_grad(int64_t l, int64_t k) { return grad(cfg_.layer_param(l, k)); }
  int64_t d_in(int64_t l) const { return l == 0 ? D_ : H_; }

  T* state_h(Buf<T>& st, int64_t l, int64_t b) { return st.data() + (l * S_) * b * H_; }
  T* state_c(Buf<T>& st, int64_t l, int64_t b) {
    return kCellState ? st.data() + (l * S_ + 1) * b * H_ : nullptr;
  }
  T* state_h(Buf<T>& st, int64_t l) { return state_h(st, l, B_); }
  T* state_c(Buf<T>& st, int64_t l) { return state_c(st, l, B_); }
  // Output h' of layer l, [K, B, H] (G == 1 cells: the gates array itself).
  T* layer_out(St& st, int64_t l) {
    auto& ls = st.layers[static_cast<size_t>(l)];
    return Cell::kGates == 1 ? ls.gates.data() : ls.h_out.data();
  }
  // Layer 0's input: the store's own x, or the real forward's.
  T* input_x(St& st) { return st.has_x ? st.x.data() : real_.x.data(); }
  T* c_in(St& st, int64_t l, int64_t slot, int64_t b) {
    return kCellState ? st.layers[static_cast<size_t>(l)].c_in.data() + slot * b * H_ : nullptr;
  }

  // The cache pointers of layer l at `slot`, as a forward step over the batch.
  cells::StepFwd<T> step_fwd(St& st, int64_t b, int64_t l, int64_t slot, const T* u, T* c_out) {
    auto& ls = st.layers[static_cast<size_t>(l)];
    const int64_t bh = b * H_;
    T* g = ls.gates.data() + slot * b * GH_;
    return {b,
            H_,
            GH_,
            g,
            u,
            b_ih(l),
            b_hh(l),
            ls.h_in.data() + slot * bh,
            c_in(st, l, slot, b),
            Cell::kAux ? ls.aux.data() + slot * bh : nullptr,
            Cell::kGates == 1 ? g : ls.h_out.data() + slot * bh,
            c_out};
  }

  // A [n, B, width] history array of the real store, oldest step first.
  // per_row: one value per (step, row) -> [n, B]; else [n, B, width] (width may be 1).
  template <typename U>
  HostArray history(Buf<U>& buf, int64_t width, int64_t first, int64_t n,
                    int dtype = HostArray::kEngine, bool per_row = false) const {
    HostArray a;
    a.shape = per_row ? std::vector<int64_t>{n, B_} : std::vector<int64_t>{n, B_, width};
    a.dtype = dtype;
    a.bytes.resize(static_cast<size_t>(n * B_ * width) * sizeof(U));
    U* out = reinterpret_cast<U*>(a.bytes.data());
    Segment seg[2];
    const int ns = ring_.segments(first, n, seg);
    const int64_t len = B_ * width;
    for (int i = 0; i < ns; ++i)
      dev_.download_raw(out + seg[i].offset * len, buf.data() + seg[i].slot * len,
                        seg[i].count * len);
    return a;
  }
  template <typename U>
  HostArray get(std::vector<int64_t> shape, const U* src) const {
    HostArray a;
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    a.shape = std::move(shape);
    a.bytes.resize(static_cast<size_t>(count) * sizeof(U));
    dev_.download_raw(reinterpret_cast<U*>(a.bytes.data()), src, count);
    return a;
  }
  template <typename U>
  void put(Buf<U>& buf, int64_t width, int64_t first, int64_t n, const HostArray& a) {
    const U* src = reinterpret_cast<const U*>(a.bytes.data());
    Segment seg[2];
    const int ns = ring_.segments(first, n, seg);
    const int64_t len = B_ * width;
    for (int i = 0; i < ns; ++i)
      dev_.upload_raw(buf.data() + seg[i].slot * len, src + seg[i].offset * len,
                      seg[i].count * len);
  }

  // ---- buffers ----------------------------------------------------------
  // Elements of T per (slot, batch row) that the ring buffers hold (an upper
  // bound, both stores and the window workspace): for the size checks.
  double ring_elems_per_row() const {
    const double h = static_cast<double>(H_), gh = static_cast<double>(GH_);
    const double layer = gh + 4.0 * h;
    return 2.0 * (static_cast<double>(L_) * layer + static_cast<double>(D_) +
                  2.0 * static_cast<double>(O_) + 4.0) +
           2.0 * gh + h + static_cast<double>(D_);
  }

  // Refuses, before anything is allocated, a ring of k steps of batch b that
  // cannot exist: a size that overflows, or more bytes than the device has.
  void check_ring_size(int64_t k, int64_t b) const {
    const double bytes = static_cast<double>(k) * static_cast<double>(b) * ring_elems_per_row() *
                         static_cast<double>(sizeof(T));
    const char* what = cfg_.unbounded() ? "the history of k2=None" : "the ring of max(k1, k2)";
    if (!(bytes < 9.0e18)) {
      throw std::invalid_argument(str_cat(what, " steps (", k, " steps, k1=", cfg_.k1,
                                          ", k2=", cfg_.unbounded() ? 0 : cfg_.k2, ") at batch ", b,
                                          " needs about ", bytes, " bytes: the size overflows"));
    }
    const double limit = dev_.memory_limit();
    if (limit > 0.0 && bytes > limit) {
      throw MemoryLimitError(str_cat(
          what, " steps (", k, " steps, k1=", cfg_.k1, ", k2=", cfg_.unbounded() ? 0 : cfg_.k2,
          ") at batch ", b, " needs about ", static_cast<int64_t>(bytes), " bytes, more than the ",
          static_cast<int64_t>(limit), " bytes of memory of this ", Dev::kName));
    }
  }

  // (Re)allocates the ring for k steps of batch b: everything is allocated
  // first and swapped in only when all allocations succeeded, so a failure
  // (MemoryLimitError / std::bad_alloc) leaves the engine as it was. keep
  // (growth, same batch) copies the slots held now into the new ring.
  void reallocate(int64_t k, int64_t b, bool keep) {
    check_ring_size(k, b);
    try {
      St real, rc;
      Buf<T> dg, dgu, dh, dx;
      real.template allocate<Cell>(dev_, cfg_, k, b, true, false);
      if (cfg_.overlap == OverlapKind::kRecompute)
        rc.template allocate<Cell>(dev_, cfg_, k, b, false, false, cfg_.vocab_size > 0);
      dev_.resize(dg, static_cast<size_t>(k * b * GH_), false);
      dev_.resize(dgu, Cell::kSplitU ? static_cast<size_t>(k * b * GH_) : 0, false);
      dev_.resize(dh, static_cast<size_t>(k * b * H_), false);
      dev_.resize(dx, cfg_.vocab_size > 0 ? static_cast<size_t>(k * b * D_) : 0, false);
      const bool new_batch = b != B_;
      Buf<T> init, state, rc_state, dh_carry, dc_carry, u;
      if (new_batch) {
        const size_t bh = static_cast<size_t>(b * H_), n = static_cast<size_t>(L_ * S_) * bh;
        dev_.resize(init, n, false);
        dev_.fill(init.data(), static_cast<int64_t>(n), T(0));
        dev_.resize(state, n, false);
        dev_.fill(state.data(), static_cast<int64_t>(n), T(0));
        dev_.resize(rc_state, n, false);
        dev_.resize(dh_carry, bh, false);
        dev_.resize(dc_carry, bh, false);
        dev_.resize(u, Cell::kSplitU ? static_cast<size_t>(b * GH_) : 0, false);
      }
      if (keep && !new_batch) {
        real.zip(real_, [&](auto& mine, auto& old) {
          dev_.copy_raw(mine.data(), old.data(), old.size());
        });
      }
      // Commit: nothing below allocates.
      using std::swap;
      swap(real_, real);
      swap(rc_, rc);
      swap(dg_, dg);
      swap(dgu_, dgu);
      swap(dh_, dh);
      swap(dx_, dx);
      if (new_batch) {
        swap(init_, init);
        swap(state_, state);
        swap(rc_state_, rc_state);
        swap(dh_carry_, dh_carry);
        swap(dc_carry_, dc_carry);
        swap(u_, u);
      }
      ring_.set_capacity(k);
      B_ = b;
      dev_.ring_resized(k, b);
    } catch (const std::bad_alloc&) {
      throw MemoryLimitError(str_cat("out of memory allocating the ring of ", k, " steps at batch ",
                                     b, " (k1=", cfg_.k1, ", k2=", cfg_.unbounded() ? 0 : cfg_.k2,
                                     "); the engine is unchanged"));
    }
  }

  void ensure_batch(int64_t b) {
    if (b == B_) return;  // B_ is 0 until the first allocation; b >= 1
    reallocate(ring_.capacity(), b, false);
  }

  // Unbounded k2 only: the ring never wraps, it grows (keeping every slot).
  void ensure_capacity(int64_t steps) {
    if (steps <= ring_.capacity()) return;
    reallocate(std::max(steps, 2 * ring_.capacity()), B_, true);
  }

  // ---- forward ----------------------------------------------------------
  void forward_chunk(const RunInputs& in, int64_t pos, int64_t n) {
    const int64_t first = sched_.count() + 1;
    dev_.load_inputs(in, pos, first, n, ring_, real_, B_);
    for (int64_t l = 0; l < L_; ++l)
      forward_layer(real_, real_, ring_, init_, u_, B_, l, first, n, state_h(state_, l),
                    state_c(state_, l));
    readout_forward(real_, ring_, B_, first, n);
    T* out = in.outputs == nullptr ? nullptr : static_cast<T*>(in.outputs) + pos * B_ * O_;
    dev_.loss_pass(ring_, real_, real_, first, n, B_, b_out(), out, true);
  }

  // Runs layer l over steps [first, first + n) of `ring` into store st, from
  // the state (h_state, c_state) entering step `first` (before its resets);
  // leaves the state after the last step there. Layer input: input_x(st)
  // (l == 0) or st's output of layer l - 1 for the same steps; resets from
  // `in`, the store that holds the inputs; a reset restores `init`.
  void forward_layer(St& st, St& in, const RingIndex& ring, Buf<T>& init, Buf<T>& u, int64_t b,
                     int64_t l, int64_t first, int64_t n, T* h_state, T* c_state) {
    const int64_t d = d_in(l);
    T* xin = l == 0 ? input_x(st) : layer_out(st, l - 1);
    dev_.product(ring, first, n, b, ring_rows(xin, d), true, w_ih(l), d,
                 ring_rows(st.layers[static_cast<size_t>(l)].gates.data(), GH_), T(1), T(0));
    // The batch rows are independent through the whole step sequence: the
    // device runs it per group of rows (cpu: groups on the thread pool).
    dev_.step_sequence(StepKey{&st, h_state, l, ring.slot(first), n, false}, [&] {
      dev_.batch_groups(b, [&](int64_t b0, int64_t nb) {
        const int64_t rh = b0 * H_;
        const T* h_init = state_h(init, l, b) + rh;
        const T* c_init = kCellState ? state_c(init, l, b) + rh : nullptr;
        T* u_rows = Cell::kSplitU ? u.data() + b0 * GH_ : nullptr;
        const T* h_prev = h_state + rh;
        for (int64_t s = first; s < first + n; ++s) {
          const int64_t slot = ring.slot(s);
          // c_out is the running cell state: c_prev of this step, c' after it.
          const cells::StepFwd<T> c =
              step_fwd(st, b, l, slot, Cell::kSplitU ? u.data() : nullptr, c_state).rows(b0, nb);
          dev_.enter_state(nb, H_, h_prev, c.c_out, h_init, c_init,
                           in.resets.data() + slot * b + b0, const_cast<T*>(c.h_in),
                           const_cast<T*>(c.c_in));
          if constexpr (Cell::kSplitU) {
            dev_.recurrent(l, nb, c.h_in, T(0), u_rows);
          } else {
            dev_.recurrent(l, nb, c.h_in, T(1), c.g);
          }
          dev_.template cell_forward<Cell>(c);
          h_prev = c.h_out;
        }
        dev_.copy(h_state + rh, h_prev, nb * H_);
      });
    });
  }

  // y = h_top W_out^T + b_out for steps [first, first + n), into st.dy.
  void readout_forward(St& st, const RingIndex& ring, int64_t b, int64_t first, int64_t n) {
    const Rows<T> y = ring_rows(st.dy.data(), O_);
    dev_.fill_rows(ring, first, n, b, y, b_out());
    dev_.product(ring, first, n, b, ring_rows(layer_out(st, L_ - 1), H_), true, w_out(), H_, y,
                 T(1), T(1));
  }

  // ---- update -----------------------------------------------------------
  // The update of block b (already consumed by the schedule). With a
  // reducer (several processes) the loss sum and count, then the gradient,
  // are replaced by their sums over all processes before they are used.
  void update(const Block& b, bool return_grads, RunResult& res, const Reducer& reduce) {
    const int64_t t = b.t, tp = b.prev, w = b.w;
    auto [loss_sum, count] = dev_.take_block_loss(ring_, real_, tp + 1, t - tp, B_);
    if (reduce.block) {
      double sums[2] = {loss_sum, count};
      reduce.block(sums);
      loss_sum = sums[0];
      count = sums[1];
    }
    const double denom = std::max(1.0, count);
    const double loss = loss_sum / denom;
    if (!std::isfinite(static_cast<T>(loss))) {
      throw NonFiniteError(str_cat("non-finite loss in the update at step ", t,
                                   "; parameters and optimizer state are as before that update"));
    }
    St* act = &real_;
    if (cfg_.overlap == OverlapKind::kRecompute && w < tp) {
      recompute(w, t, tp);
      act = &rc_;
    }
    backward(t, tp, w, *act, static_cast<T>(1.0 / denom));
    if (reduce.grad) reduce_grad(reduce);

    const auto [sumsq, finite] = dev_.grad_status(grad_.data(), offsets_.back());
    if (!finite) {
      throw NonFiniteError(str_cat("non-finite gradient in the update at step ", t,
                                   "; parameters and optimizer state are as before that update"));
    }
    if (return_grads) {
      std::vector<HostArray> gs;
      for (int64_t i = 0; i < cfg_.num_params(); ++i) {
        HostArray a;
        a.shape = cfg_.param_shape(i);
        a.bytes.resize(static_cast<size_t>(cfg_.param_size(i)) * sizeof(T));
        dev_.download(reinterpret_cast<T*>(a.bytes.data()), grad(i), cfg_.param_size(i));
        gs.push_back(std::move(a));
      }
      dev_.sync();
      res.grads.push_back(std::move(gs));
    }
    double coef = 1.0;
    if (cfg_.clip > 0.0) {
      const double c = cfg_.clip / (std::sqrt(sumsq) + 1e-6);
      if (c < 1.0) coef = c;
    }
    if (cfg_.optimizer == OptimizerKind::kAdam) ++adam_step_;
    if (cfg_.optimizer != OptimizerKind::kExternal) {
      dev_.optimizer_step(OptimizerStep{coef, adam_step_}, grad_.data(), m_.data(), v_.data());
      dev_.params_changed();
    }
    res.losses.push_back(static_cast<double>(static_cast<T>(loss)));
    res.update_steps.push_back(t);
  }

  // grad_ <- the sum of every process's grad_ (Reducer::grad), through host
  // memory on a device engine.
  void reduce_grad(const Reducer& reduce) {
    const int64_t n = offsets_.back();
    if constexpr (Dev::kHostMemory) {
      reduce.grad(grad_.data(), n);
    } else {
      std::vector<T> host(static_cast<size_t>(n));
      dev_.download(host.data(), grad_.data(), n);
      dev_.sync();
      reduce.grad(host.data(), n);
      dev_.upload(grad_.data(), host.data(), n);
      dev_.sync();  // `host` goes away on return
    }
  }

  // overlap="recompute": re-runs (w, t] from the stored state entering w + 1
  // with the current weights into rc_, then dL/dy of the block (tp, t].
  void recompute(int64_t w, int64_t t, int64_t tp) {
    const int64_t slot0 = ring_.slot(w + 1), bh = B_ * H_;
    for (int64_t l = 0; l < L_; ++l) {
      const auto& ls = real_.layers[static_cast<size_t>(l)];
      dev_.copy(state_h(rc_state_, l), ls.h_in.data() + slot0 * bh, bh);
      if (kCellState) dev_.copy(state_c(rc_state_, l), ls.c_in.data() + slot0 * bh, bh);
    }
    // With an embedding the layer-0 input is looked up again with the current weights.
    if (cfg_.vocab_size > 0) {
      Segment seg[2];
      const int ns = ring_.segments(w + 1, t - w, seg);
      for (int i = 0; i < ns; ++i) {
        const int64_t r0 = seg[i].slot * B_;
        dev_.copy_raw(rc_.ids.data() + r0, real_.ids.data() + r0,
                      static_cast<size_t>(seg[i].count * B_));
      }
      dev_.embed_rows(ring_, w + 1, t - w, B_, rc_);
    }
    for (int64_t l = 0; l < L_; ++l)
      forward_layer(rc_, real_, ring_, init_, u_, B_, l, w + 1, t - w, state_h(rc_state_, l),
                    state_c(rc_state_, l));
    readout_forward(rc_, ring_, B_, tp + 1, t - tp);
    dev_.loss_pass(ring_, rc_, real_, tp + 1, t - tp, B_, b_out(), nullptr, false);
  }

  // grad_ = dLoss_P/dtheta over window (w, t] with activations from act.
  void backward(int64_t t, int64_t tp, int64_t w, St& act, T scale) {
    dev_.fill(grad_.data(), offsets_.back(), T(0));
    const int64_t nw = t - w, bh = B_ * H_;
    // Readout: every step of the block (tp, t].
    {
      const Rows<T> dy = ring_rows(act.dy.data(), O_);
      dev_.reduce(ring_, tp + 1, t - tp, B_, dy, ring_rows(layer_out(act, L_ - 1), H_), scale,
                  grad(cfg_.readout_param(0)));
      dev_.colsum(ring_, tp + 1, t - tp, B_, dy, scale, grad(cfg_.readout_param(1)));
    }
    // dLoss/dh_top over the window: from the readout for block steps, 0 before.
    const int64_t lo = std::max(w, tp);
    dev_.fill(dh_.data(), (lo - w) * bh, T(0));
    dev_.product(ring_, lo + 1, t - lo, B_, ring_rows(act.dy.data(), O_), false, w_out(), H_,
                 window_rows(dh_.data() + (lo - w) * bh, H_), scale, T(0));
    T* dgu = Cell::kSplitU ? dgu_.data() : dg_.data();
    for (int64_t l = L_ - 1; l >= 0; --l) {
      dev_.step_sequence(StepKey{&act, nullptr, l, ring_.slot(t), nw, true},
                         [&] { backward_steps(act, l, t, w); });
      const int64_t d = d_in(l);
      T* xin = l == 0 ? input_x(act) : layer_out(act, l - 1);
      const Rows<T> dg = window_rows(dg_.data(), GH_);
      dev_.reduce(ring_, w + 1, nw, B_, dg, ring_rows(xin, d), T(1), layer_grad(l, 0));
      dev_.reduce(ring_, w + 1, nw, B_, window_rows(dgu, GH_),
                  ring_rows(act.layers[static_cast<size_t>(l)].h_in.data(), H_), T(1),
                  layer_grad(l, 1));
      dev_.colsum(ring_, w + 1, nw, B_, dg, T(1), layer_grad(l, 2));
      if constexpr (Cell::kSplitU) {
        dev_.colsum(ring_, w + 1, nw, B_, window_rows(dgu, GH_), T(1), layer_grad(l, 3));
      } else {  // u and a enter the gates alike, so d b_hh = d b_ih
        dev_.copy(layer_grad(l, 3), layer_grad(l, 2), GH_);
      }
      if (l > 0) {
        dev_.product(ring_, w + 1, nw, B_, dg, false, w_ih(l), H_, window_rows(dh_.data(), H_),
                     T(1), T(0));
      } else if (cfg_.vocab_size > 0) {
        // The embedding's gradient: the layer-0 input gradient, summed into
        // the rows of the ids used, in window order (deterministic).
        dev_.product(ring_, w + 1, nw, B_, dg, false, w_ih(0), D_, window_rows(dx_.data(), D_),
                     T(1), T(0));
        dev_.scatter_add_rows(ring_, w + 1, nw, B_, real_.ids.data(), dx_.data(), D_, grad(0));
      }
    }
  }

  // The per-step part of layer l's backward over the window (w, t]: per step
  // the cell's pointwise pass, then the carry dG W_hh into the step before,
  // cut where the step reset (no gradient crosses a reset).
  void backward_steps(St& act, int64_t l, int64_t t, int64_t w) {
    const int64_t bh = B_ * H_, bg = B_ * GH_;
    dev_.batch_groups(B_, [&](int64_t b0, int64_t nb) {
      T* dh_carry = dh_carry_.data() + b0 * H_;
      T* dc_carry = dc_carry_.data() + b0 * H_;  // [B, H] allocated for every cell
      for (int64_t s = t; s > w; --s) {
        const int64_t slot = ring_.slot(s), j = s - w - 1;
        const cells::StepFwd<T> c = step_fwd(act, B_, l, slot, nullptr, nullptr);
        T* dg = dg_.data() + j * bg;
        T* dgu = Cell::kSplitU ? dgu_.data() + j * bg : dg;
        const cells::StepBwd<T> g = cells::StepBwd<T>{B_,
                                                      H_,
                                                      GH_,
                                                      c.g,
                                                      c.aux,
                                                      c.h_in,
                                                      c.c_in,
                                                      dh_.data() + j * bh,
                                                      dh_carry_.data(),
                                                      kCellState ? dc_carry_.data() : nullptr,
                                                      dg,
                                                      dgu}
                                        .rows(b0, nb);
        dev_.template cell_backward<Cell>(g, s < t);
        if (s == w + 1) continue;
        dev_.recurrent_grad(l, nb, g.dgu, Cell::kSplitU ? T(1) : T(0), dh_carry);
        dev_.cut_carry(nb, H_, real_.resets.data() + slot * B_ + b0, dh_carry, dc_carry);
      }
    });
  }

  // ---- data -------------------------------------------------------------
  Config cfg_;
  const int64_t L_, H_, D_, O_, GH_, S_;
  const std::vector<int64_t> offsets_;  // [P + 1] Config::param_offsets()
  mutable Dev dev_;
  int64_t B_ = 0;
  bool has_state_ = false, has_init_ = false;
  Buf<T> init_;   // [L*S, B, H] initial state (zeros unless given); flat layer-major
  Buf<T> state_;  // [L*S, B, H] current forward state
  Schedule sched_{cfg_};
  RingIndex ring_;
  St real_, rc_;          // real forward history; recomputed window (recompute only)
  Buf<T> dg_, dgu_, dh_;  // [K, B, G*H], [K, B, G*H] (kSplitU), [K, B, H]; window-indexed
  Buf<T> dx_;             // [K, B, D] with an embedding: layer-0 input gradient; window-indexed
  Buf<T> dh_carry_, dc_carry_;  // [B, H]
  Buf<T> u_;                    // [B, G*H] kSplitU: u = h W_hh^T of the step
  Buf<T> rc_state_;             // [L*S, B, H] running state of a recompute
  Buf<T> grad_, m_, v_;         // flat [sum of param sizes], canonical order
  int64_t adam_step_ = 0;
  // Forward only (forward()): its own ring of chunks, store and state.
  RingIndex fw_ring_;
  St fw_;
  int64_t fw_batch_ = 0;
  Buf<T> fw_init_, fw_state_, fw_u_;
};

}  // namespace tbptt
