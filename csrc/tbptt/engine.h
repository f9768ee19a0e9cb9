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
  Buf<double> row_loss;  // [K, B] mask * l of each row (real store only; devices that keep it)
  Buf<T> dy;             // [K, B, O] y, then the unnormalised dLoss/dy of the step

  template <typename Cell>
  void allocate(Dev& dev, const Config& cfg, int64_t k, int64_t b, bool with_inputs, bool keep) {
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
    if (with_inputs) {
      const bool ce = cfg.loss == LossKind::kCrossEntropy;
      dev.resize(x, n(cfg.input_size), keep);
      dev.resize(mask, n(1), keep);
      dev.resize(resets, n(1), keep);
      dev.resize(target, ce ? 0 : n(cfg.output_size), keep);
      dev.resize(label, ce ? n(1) : 0, keep);
      dev.resize(row_loss, Dev::kRowLoss ? n(1) : 0, keep);
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
    const bool adam = cfg_.optimizer == OptimizerKind::kAdam;
    if (adam || cfg_.momentum != 0.0) {
      dev_.resize(m_, n, false);
      dev_.fill(m_.data(), static_cast<int64_t>(n), T(0));
    }
    if (adam) {
      dev_.resize(v_, n, false);
      dev_.fill(v_.data(), static_cast<int64_t>(n), T(0));
    }
    ring_.set_capacity(cfg_.ring_capacity());
    dev_.sync();
  }

  const Config& config() const override { return cfg_; }
  Dev& device() { return dev_; }

  void reset(const std::vector<const void*>* initial_state, int64_t batch) override {
    [[maybe_unused]] const auto guard = dev_.guard();
    sched_.reset();
    dev_.clear_block_loss();
    if (initial_state == nullptr) {
      has_state_ = has_init_ = false;
      return;
    }
    TBPTT_CHECK_ARG(static_cast<int64_t>(initial_state->size()) == L_ * S_, "initial_state needs ",
                    L_ * S_, " arrays, got ", initial_state->size());
    TBPTT_CHECK_ARG(batch >= 1, "initial_state batch must be >= 1, got ", batch);
    ensure_batch(batch);
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
          if (cfg_.unbounded()) ensure_capacity(sched_.count() + n);
          forward_chunk(in, pos, n);
        },
        [&](const Block& b) { update(b, in.return_grads, res); });
    dev_.sync();
    return res;
  }

  RunResult flush(bool return_grads) override {
    [[maybe_unused]] const auto guard = dev_.guard();
    RunResult res;
    sched_.run(
        0, true, [](int64_t, int64_t) {}, [&](const Block& b) { update(b, return_grads, res); });
    dev_.sync();
    return res;
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

  // ---- parameters and views -----------------------------------------------
  const T* param(int64_t i) const { return dev_.param(i); }
  const T* w_ih(int64_t l) const { return param(4 * l); }
  const T* w_hh(int64_t l) const { return param(4 * l + 1); }
  const T* b_ih(int64_t l) const { return param(4 * l + 2); }
  const T* b_hh(int64_t l) const { return param(4 * l + 3); }
  const T* w_out() const { return param(4 * L_); }
  const T* b_out() const { return param(4 * L_ + 1); }
  T* grad(int64_t i) { return grad_.data() + offsets_[static_cast<size_t>(i)]; }
  int64_t d_in(int64_t l) const { return l == 0 ? D_ : H_; }

  T* state_h(Buf<T>& st, int64_t l) { return st.data() + (l * S_) * B_ * H_; }
  T* state_c(Buf<T>& st, int64_t l) {
    return kCellState ? st.data() + (l * S_ + 1) * B_ * H_ : nullptr;
  }
  // Output h' of layer l, [K, B, H] (G == 1 cells: the gates array itself).
  T* layer_out(St& st, int64_t l) {
    auto& ls = st.layers[static_cast<size_t>(l)];
    return Cell::kGates == 1 ? ls.gates.data() : ls.h_out.data();
  }
  const uint8_t* resets(int64_t slot) { return real_.resets.data() + slot * B_; }
  T* c_in(St& st, int64_t l, int64_t slot) {
    return kCellState ? st.layers[static_cast<size_t>(l)].c_in.data() + slot * B_ * H_ : nullptr;
  }

  // The cache pointers of layer l at `slot`, as a forward step over the batch.
  cells::StepFwd<T> step_fwd(St& st, int64_t l, int64_t slot, const T* u, T* c_out) {
    auto& ls = st.layers[static_cast<size_t>(l)];
    const int64_t bh = B_ * H_;
    T* g = ls.gates.data() + slot * B_ * GH_;
    return {B_,
            H_,
            GH_,
            g,
            u,
            b_ih(l),
            b_hh(l),
            ls.h_in.data() + slot * bh,
            c_in(st, l, slot),
            Cell::kAux ? ls.aux.data() + slot * bh : nullptr,
            Cell::kGates == 1 ? g : ls.h_out.data() + slot * bh,
            c_out};
  }

  // ---- buffers ----------------------------------------------------------
  void allocate_ring(int64_t k, bool keep) {
    ring_.set_capacity(k);
    real_.template allocate<Cell>(dev_, cfg_, k, B_, true, keep);
    if (cfg_.overlap == OverlapKind::kRecompute)
      rc_.template allocate<Cell>(dev_, cfg_, k, B_, false, false);
    dev_.resize(dg_, static_cast<size_t>(k * B_ * GH_), false);
    dev_.resize(dgu_, Cell::kSplitU ? static_cast<size_t>(k * B_ * GH_) : 0, false);
    dev_.resize(dh_, static_cast<size_t>(k * B_ * H_), false);
    dev_.ring_resized(k, B_);
  }

  void ensure_batch(int64_t b) {
    if (b == B_) return;  // B_ is 0 until the first allocation; b >= 1
    B_ = b;
    allocate_ring(ring_.capacity(), false);
    const size_t bh = static_cast<size_t>(B_ * H_), n = static_cast<size_t>(L_ * S_) * bh;
    dev_.resize(init_, n, false);
    dev_.fill(init_.data(), static_cast<int64_t>(n), T(0));
    dev_.resize(state_, n, false);
    dev_.fill(state_.data(), static_cast<int64_t>(n), T(0));
    dev_.resize(rc_state_, n, false);
    dev_.resize(dh_carry_, bh, false);
    dev_.resize(dc_carry_, bh, false);
    dev_.resize(u_, Cell::kSplitU ? static_cast<size_t>(B_ * GH_) : 0, false);
  }

  // Unbounded k2 only: the ring never wraps, it grows (keeping every slot).
  void ensure_capacity(int64_t steps) {
    if (steps <= ring_.capacity()) return;
    allocate_ring(std::max(steps, 2 * ring_.capacity()), true);
  }

  // ---- forward ----------------------------------------------------------
  void forward_chunk(const RunInputs& in, int64_t pos, int64_t n) {
    const int64_t first = sched_.count() + 1;
    dev_.load_inputs(in, pos, first, n, ring_, real_, B_);
    for (int64_t l = 0; l < L_; ++l)
      forward_layer(real_, l, first, n, state_h(state_, l), state_c(state_, l));
    readout_forward(real_, first, n);
    T* out = in.outputs == nullptr ? nullptr : static_cast<T*>(in.outputs) + pos * B_ * O_;
    dev_.loss_pass(ring_, real_, real_, first, n, B_, b_out(), out, true);
  }

  // Runs layer l over steps [first, first + n) into store st, from the state
  // (h_state, c_state) entering step `first` (before its resets); leaves the
  // state after the last step there. Layer input: real_.x (l == 0) or st's
  // output of layer l - 1 for the same steps.
  void forward_layer(St& st, int64_t l, int64_t first, int64_t n, T* h_state, T* c_state) {
    const int64_t d = d_in(l);
    T* xin = l == 0 ? real_.x.data() : layer_out(st, l - 1);
    dev_.product(ring_, first, n, B_, ring_rows(xin, d), true, w_ih(l), d,
                 ring_rows(st.layers[static_cast<size_t>(l)].gates.data(), GH_), T(1), T(0));
    dev_.step_sequence(StepKey{&st, h_state, l, ring_.slot(first), n, false},
                       [&] { forward_steps(st, l, first, n, h_state, c_state); });
  }

  // The per-step part of forward_layer.
  void forward_steps(St& st, int64_t l, int64_t first, int64_t n, T* h_state, T* c_state) {
    const int64_t bh = B_ * H_;
    const T* h_init = state_h(init_, l);
    const T* c_init = state_c(init_, l);
    const T* h_prev = h_state;
    for (int64_t s = first; s < first + n; ++s) {
      const int64_t slot = ring_.slot(s);
      const cells::StepFwd<T> c =
          step_fwd(st, l, slot, Cell::kSplitU ? u_.data() : nullptr, c_state);
      T* h_in = st.layers[static_cast<size_t>(l)].h_in.data() + slot * B_ * H_;
      dev_.enter_state(B_, H_, h_prev, c_state, h_init, c_init, resets(slot), h_in,
                       c_in(st, l, slot));
      if constexpr (Cell::kSplitU) {
        dev_.recurrent(l, B_, c.h_in, T(0), u_.data());
      } else {
        dev_.recurrent(l, B_, c.h_in, T(1), c.g);
      }
      dev_.template cell_forward<Cell>(c);
      h_prev = c.h_out;
    }
    dev_.copy(h_state, h_prev, bh);
  }

  // y = h_top W_out^T + b_out for steps [first, first + n), into st.dy.
  void readout_forward(St& st, int64_t first, int64_t n) {
    const Rows<T> y = ring_rows(st.dy.data(), O_);
    dev_.fill_rows(ring_, first, n, B_, y, b_out());
    dev_.product(ring_, first, n, B_, ring_rows(layer_out(st, L_ - 1), H_), true, w_out(), H_, y,
                 T(1), T(1));
  }

  // ---- update -----------------------------------------------------------
  // The update of block b (already consumed by the schedule).
  void update(const Block& b, bool return_grads, RunResult& res) {
    const int64_t t = b.t, tp = b.prev, w = b.w;
    const auto [loss_sum, count] = dev_.take_block_loss(ring_, real_, tp + 1, t - tp, B_);
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
    dev_.optimizer_step(OptimizerStep{coef, adam_step_}, grad_.data(), m_.data(), v_.data());
    dev_.params_changed();
    res.losses.push_back(static_cast<double>(static_cast<T>(loss)));
    res.update_steps.push_back(t);
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
    for (int64_t l = 0; l < L_; ++l)
      forward_layer(rc_, l, w + 1, t - w, state_h(rc_state_, l), state_c(rc_state_, l));
    readout_forward(rc_, tp + 1, t - tp);
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
                  grad(4 * L_));
      dev_.colsum(ring_, tp + 1, t - tp, B_, dy, scale, grad(4 * L_ + 1));
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
      T* xin = l == 0 ? real_.x.data() : layer_out(act, l - 1);
      const Rows<T> dg = window_rows(dg_.data(), GH_);
      dev_.reduce(ring_, w + 1, nw, B_, dg, ring_rows(xin, d), T(1), grad(4 * l));
      dev_.reduce(ring_, w + 1, nw, B_, window_rows(dgu, GH_),
                  ring_rows(act.layers[static_cast<size_t>(l)].h_in.data(), H_), T(1),
                  grad(4 * l + 1));
      dev_.colsum(ring_, w + 1, nw, B_, dg, T(1), grad(4 * l + 2));
      if constexpr (Cell::kSplitU) {
        dev_.colsum(ring_, w + 1, nw, B_, window_rows(dgu, GH_), T(1), grad(4 * l + 3));
      } else {  // u and a enter the gates alike, so d b_hh = d b_ih
        dev_.copy(grad(4 * l + 3), grad(4 * l + 2), GH_);
      }
      if (l > 0) {
        dev_.product(ring_, w + 1, nw, B_, dg, false, w_ih(l), H_, window_rows(dh_.data(), H_),
                     T(1), T(0));
      }
    }
  }

  // The per-step part of layer l's backward over the window (w, t]: per step
  // the cell's pointwise pass, then the carry dG W_hh into the step before,
  // cut where the step reset (no gradient crosses a reset).
  void backward_steps(St& act, int64_t l, int64_t t, int64_t w) {
    const int64_t bh = B_ * H_, bg = B_ * GH_;
    for (int64_t s = t; s > w; --s) {
      const int64_t slot = ring_.slot(s), j = s - w - 1;
      const cells::StepFwd<T> c = step_fwd(act, l, slot, nullptr, nullptr);
      T* dg = dg_.data() + j * bg;
      T* dgu = Cell::kSplitU ? dgu_.data() + j * bg : dg;
      const cells::StepBwd<T> g{B_,
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
                                dgu};
      dev_.template cell_backward<Cell>(g, s < t);
      if (s == w + 1) continue;
      dev_.recurrent_grad(l, B_, dgu, Cell::kSplitU ? T(1) : T(0), dh_carry_.data());
      dev_.cut_carry(B_, H_, resets(slot), dh_carry_.data(), dc_carry_.data());
    }
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
  St real_, rc_;                // real forward history; recomputed window (recompute only)
  Buf<T> dg_, dgu_, dh_;        // [K, B, G*H], [K, B, G*H] (kSplitU), [K, B, H]; window-indexed
  Buf<T> dh_carry_, dc_carry_;  // [B, H]
  Buf<T> u_;                    // [B, G*H] kSplitU: u = h W_hh^T of the step
  Buf<T> rc_state_;             // [L*S, B, H] running state of a recompute
  Buf<T> grad_, m_, v_;         // flat [sum of param sizes], canonical order
  int64_t adam_step_ = 0;
};

}  // namespace tbptt
