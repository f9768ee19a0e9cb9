// CPU TBPTT(k1, k2) engine; see engine.h for the schedule and
// tbptt/engine_api.h for the shape legend and the contract.
#include "cpu/engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "cpu/blas.h"
#include "cpu/cells/gru.h"
#include "cpu/cells/lstm.h"
#include "cpu/cells/rnn.h"
#include "cpu/ring_buffer.h"
#include "cpu/vmath.h"
#include "tbptt/errors.h"
#include "tbptt/schedule.h"

namespace tbptt::cpu {
namespace {

// out[j] += alpha * sum_r a[r, j] for a [rows, cols].
template <typename T>
void add_colsum(const T* a, int64_t rows, int64_t cols, T alpha, T* out) {
  if (alpha == T(1)) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = a + r * cols;
      for (int64_t j = 0; j < cols; ++j) out[j] += row[j];
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = a + r * cols;
    for (int64_t j = 0; j < cols; ++j) out[j] += alpha * row[j];
  }
}

// out[cols, rows] = a[rows, cols]^T through a 16 x 16 tile held in a local
// buffer: reads and writes are both row runs. A plain loop (which GCC's loop
// interchange may reorder anyway) stores at a stride of rows * sizeof(T) =
// 4 KB for LSTM H = 256, so every store of a column hits one L1 set: ~5 ns
// per element, 8% of the whole run.
template <typename T>
void transpose(const T* a, int64_t rows, int64_t cols, T* out) {
  constexpr int64_t kBlk = 16;
  T tile[kBlk][kBlk];
  for (int64_t r0 = 0; r0 < rows; r0 += kBlk) {
    const int64_t nr = std::min(kBlk, rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += kBlk) {
      const int64_t nc = std::min(kBlk, cols - c0);
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t c = 0; c < nc; ++c) tile[c][r] = a[(r0 + r) * cols + c0 + c];
      for (int64_t c = 0; c < nc; ++c) std::copy_n(tile[c], nr, out + (c0 + c) * rows + r0);
    }
  }
}

template <typename T>
void copy_n(const T* src, int64_t n, T* dst) {
  if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
}

template <typename T, typename Cell>
class CpuEngine final : public EngineBase {
 public:
  CpuEngine(const Config& cfg, const std::vector<void*>& params)
      : cfg_(cfg),
        L_(cfg.num_layers),
        H_(cfg.hidden_size),
        D_(cfg.input_size),
        O_(cfg.output_size),
        GH_(cfg.gates() * cfg.hidden_size),
        S_(cfg.state_per_layer()) {
    cfg_.validate();
    params_ = typed_params<T>(cfg_, params);
    offsets_ = cfg_.param_offsets();
    const int64_t off = offsets_.back();
    grad_.assign(static_cast<size_t>(off), T(0));
    exps_.assign(static_cast<size_t>(O_), 0.0);
    if (cfg_.optimizer == OptimizerKind::kAdam) {
      m_.assign(static_cast<size_t>(off), T(0));
      v_.assign(static_cast<size_t>(off), T(0));
    } else if (cfg_.momentum != 0.0) {
      m_.assign(static_cast<size_t>(off), T(0));
    }
    ring_.set_capacity(cfg_.ring_capacity());
  }

  const Config& config() const override { return cfg_; }

  void reset(const std::vector<const void*>* initial_state, int64_t batch) override {
    sched_.reset();
    pend_loss_ = pend_mask_ = 0.0;
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
      copy_n(static_cast<const T*>((*initial_state)[static_cast<size_t>(i)]), bh,
             init_.data() + i * bh);
    }
    state_ = init_;
    has_state_ = has_init_ = true;
  }

  RunResult run(const RunInputs& in) override {
    TBPTT_CHECK_ARG(in.device == nullptr, "the CPU engine takes host arrays only");
    TBPTT_CHECK_ARG(in.steps >= 1, "x must have at least one step, got ", in.steps);
    TBPTT_CHECK_ARG(in.batch >= 1, "batch must be >= 1, got ", in.batch);
    if (has_state_) {
      TBPTT_CHECK_ARG(in.batch == B_, "batch size changed from ", B_, " to ", in.batch,
                      "; a trainer-level reset (reset_state() or initial_state) is needed first");
    } else {
      ensure_batch(in.batch);
      if (!has_init_) std::fill(init_.begin(), init_.end(), T(0));
      state_ = init_;
      has_state_ = true;
    }
    // A transposed copy costs G*H*H copies per refresh (one per update); it
    // pays off from about 8 steps per update (H = 256, B = 32: 0.4 ms per
    // copy vs 70 us saved per step), so short runs and k1 < 8 keep NT.
    // Packing (float) costs about the same and serves both per-step products.
    const bool amortised = cfg_.k1 >= 8 && in.steps >= 8;
    use_packed_ = amortised && std::is_same_v<T, float> && packed_available(B_, GH_, H_) &&
                  packed_available(B_, H_, GH_);
    use_whh_t_ = amortised && !use_packed_ &&
                 small_product_prefers_nn(B_, GH_, H_, std::is_same_v<T, float>);
    refresh_whh_t();
    RunResult res;
    sched_.run(
        in.steps, in.flush,
        [&](int64_t pos, int64_t n) {
          if (cfg_.unbounded()) ensure_capacity(sched_.count() + n);
          forward_chunk(in, pos, n);
        },
        [&](const Block& b) { update(b, in.return_grads, res); });
    return res;
  }

  RunResult flush(bool return_grads) override {
    RunResult res;
    sched_.run(
        0, true, [](int64_t, int64_t) {}, [&](const Block& b) { update(b, return_grads, res); });
    return res;
  }

  int64_t state_batch() const override { return has_state_ ? B_ : 0; }

  void state(const std::vector<void*>& out) const override {
    TBPTT_CHECK_RT(has_state_, "no state: no step has run since the last reset");
    TBPTT_CHECK_ARG(static_cast<int64_t>(out.size()) == L_ * S_, "state needs ", L_ * S_,
                    " output arrays, got ", out.size());
    const int64_t bh = B_ * H_;
    for (int64_t i = 0; i < L_ * S_; ++i)
      copy_n(state_.data() + i * bh, bh, static_cast<T*>(out[static_cast<size_t>(i)]));
  }

  int64_t step_count() const override { return sched_.count(); }
  int64_t pending() const override { return sched_.pending(); }
  int64_t stored_steps() const override { return sched_.stored_steps(); }
  void pull_params() override {}
  void push_params() override {}

 private:
  // ---- parameters -------------------------------------------------------
  LayerParams<T> layer_params(int64_t l) const {
    const size_t i = static_cast<size_t>(4 * l);
    const T* wt = whh_t_.empty() ? nullptr : whh_t_.data() + l * H_ * GH_;
    const float* fp = packed_t_.empty() ? nullptr : packed_t_.data() + l * H_ * GH_;
    const float* bp = packed_.empty() ? nullptr : packed_.data() + l * H_ * GH_;
    return {params_[i], params_[i + 1], params_[i + 2], params_[i + 3], l == 0 ? D_ : H_, wt, fp,
            bp};
  }

  // Refreshes the transposed W_hh copies (recurrent_product) whenever the
  // parameters may have changed (the caller may write them between calls):
  // at the start of every run() and after each optimizer step.
  void refresh_whh_t() {
    if constexpr (std::is_same_v<T, float>) {
      if (use_packed_) {
        packed_t_.resize(static_cast<size_t>(L_ * H_ * GH_));
        packed_.resize(static_cast<size_t>(L_ * H_ * GH_));
        for (int64_t l = 0; l < L_; ++l) {
          const float* w = params_[static_cast<size_t>(4 * l + 1)];  // [GH, H]
          pack_panels(H_, GH_, w, H_, true, packed_t_.data() + l * H_ * GH_);
          pack_panels(GH_, H_, w, H_, false, packed_.data() + l * H_ * GH_);
        }
      } else {
        packed_t_.clear();
        packed_.clear();
      }
    }
    if (!use_whh_t_) {
      whh_t_.clear();
      return;
    }
    whh_t_.resize(static_cast<size_t>(L_ * H_ * GH_));
    for (int64_t l = 0; l < L_; ++l)  // W_hh [GH, H] -> [H, GH]
      transpose(params_[static_cast<size_t>(4 * l + 1)], GH_, H_, whh_t_.data() + l * H_ * GH_);
  }
  const T* w_out() const { return params_[static_cast<size_t>(4 * L_)]; }
  const T* b_out() const { return params_[static_cast<size_t>(4 * L_ + 1)]; }
  T* grad(int64_t i) { return grad_.data() + offsets_[static_cast<size_t>(i)]; }

  // ---- buffers ----------------------------------------------------------
  // Output h' of layer l, [K, B, H] (rnn: the gates array itself).
  T* layer_out(Store<T>& st, int64_t l) {
    auto& ls = st.layers[static_cast<size_t>(l)];
    return Cell::kGates == 1 ? ls.gates.data() : ls.h_out.data();
  }

  StepCache<T> step_cache(Store<T>& st, int64_t l, int64_t slot) {
    auto& ls = st.layers[static_cast<size_t>(l)];
    const int64_t bh = B_ * H_;
    const bool lstm = cfg_.cell == CellKind::kLstm;
    T* gates = ls.gates.data() + slot * B_ * GH_;
    return {gates, ls.h_in.data() + slot * bh, lstm ? ls.c_in.data() + slot * bh : nullptr,
            Cell::kGates == 1 ? nullptr : ls.aux.data() + slot * bh,
            Cell::kGates == 1 ? gates : ls.h_out.data() + slot * bh};
  }

  void allocate_ring(int64_t k, bool keep) {
    ring_.set_capacity(k);
    real_.allocate(cfg_, k, B_, true, keep);
    if (cfg_.overlap == OverlapKind::kRecompute) rc_.allocate(cfg_, k, B_, false, false);
    fresh(dg_, static_cast<size_t>(k * B_ * GH_));
    fresh(dgu_, cfg_.cell == CellKind::kGru ? static_cast<size_t>(k * B_ * GH_) : 0);
    fresh(dh_, static_cast<size_t>(k * B_ * H_));
  }

  void ensure_batch(int64_t b) {
    if (b == B_) return;  // B_ is 0 until the first allocation; b >= 1
    B_ = b;
    allocate_ring(ring_.capacity(), false);
    const size_t bh = static_cast<size_t>(B_ * H_);
    init_.assign(static_cast<size_t>(L_ * S_) * bh, T(0));
    state_ = init_;
    fresh(rc_state_, static_cast<size_t>(L_ * S_) * bh);
    fresh(dh_carry_, bh);
    fresh(dc_carry_, bh);
    fresh(scratch_, static_cast<size_t>(B_ * GH_));
  }

  // Unbounded k2 only: the ring never wraps, it grows (keeping every slot).
  void ensure_capacity(int64_t steps) {
    if (steps <= ring_.capacity()) return;
    allocate_ring(std::max(steps, 2 * ring_.capacity()), true);
  }

  // ---- forward ----------------------------------------------------------
  void forward_chunk(const RunInputs& in, int64_t pos, int64_t n) {
    const int64_t first = sched_.count() + 1;
    Segment seg[2];
    const int ns = ring_.segments(first, n, seg);
    const T* x = static_cast<const T*>(in.x);
    const T* mask = static_cast<const T*>(in.mask);
    for (int i = 0; i < ns; ++i) {
      const int64_t rows = seg[i].count * B_, r0 = seg[i].slot * B_,
                    src = (pos + seg[i].offset) * B_;
      copy_n(x + src * D_, rows * D_, real_.x.data() + r0 * D_);
      if (mask != nullptr) {
        copy_n(mask + src, rows, real_.mask.data() + r0);
      } else {
        std::fill_n(real_.mask.data() + r0, rows, T(1));
      }
      if (in.resets != nullptr) {
        copy_n(in.resets + src, rows, real_.resets.data() + r0);
      } else {
        std::fill_n(real_.resets.data() + r0, rows, uint8_t(0));
      }
      if (cfg_.loss == LossKind::kCrossEntropy) {
        copy_n(static_cast<const int64_t*>(in.target) + src, rows, real_.label.data() + r0);
      } else {
        copy_n(static_cast<const T*>(in.target) + src * O_, rows * O_,
               real_.target.data() + r0 * O_);
      }
    }
    const int64_t bh = B_ * H_;
    for (int64_t l = 0; l < L_; ++l) {
      T* h = state_.data() + (l * S_) * bh;
      T* c = S_ == 2 ? h + bh : nullptr;
      forward_layer(real_, l, first, n, h, c);
    }
    readout_forward(real_, first, n);
    T* out = in.outputs == nullptr ? nullptr : static_cast<T*>(in.outputs) + pos * B_ * O_;
    loss_pass(real_, first, n, out, true);
  }

  // Runs layer l over steps [first, first + n) into store st, from the state
  // (h_state, c_state) entering step `first` (before its resets); leaves the
  // state after the last step there. Layer input: real_.x (l == 0) or st's
  // output of layer l - 1 for the same steps.
  void forward_layer(Store<T>& st, int64_t l, int64_t first, int64_t n, T* h_state, T* c_state) {
    const LayerParams<T> p = layer_params(l);
    const int64_t d = p.d_in, bh = B_ * H_;
    const T* xin =
        gather(ring_, l == 0 ? real_.x.data() : layer_out(st, l - 1), B_ * d, first, n, sa_);
    T* gates = st.layers[static_cast<size_t>(l)].gates.data();
    T* g = scatter_target(ring_, gates, B_ * GH_, first, n, sb_);
    gemm<T>(false, true, n * B_, GH_, d, T(1), xin, d, p.w_ih, d, T(0), g, GH_);
    scatter(ring_, gates, B_ * GH_, first, n, g);
    const T* h_prev = h_state;
    for (int64_t s = first; s < first + n; ++s) {
      const int64_t slot = ring_.slot(s);
      const StepCache<T> c = step_cache(st, l, slot);
      copy_n(h_prev, bh, c.h_in);
      if (c_state != nullptr) copy_n(c_state, bh, c.c_in);
      const uint8_t* rs = real_.resets.data() + slot * B_;
      const T* init = init_.data() + (l * S_) * bh;
      for (int64_t b = 0; b < B_; ++b) {
        if (rs[b] == 0) continue;
        copy_n(init + b * H_, H_, c.h_in + b * H_);
        if (c_state != nullptr) copy_n(init + bh + b * H_, H_, c.c_in + b * H_);
      }
      Cell::forward(p, B_, H_, c, c_state, scratch_.data());
      h_prev = c.h_out;
    }
    copy_n(h_prev, bh, h_state);
  }

  // y = h_top W_out^T + b_out for steps [first, first + n), into st.dy.
  void readout_forward(Store<T>& st, int64_t first, int64_t n) {
    const T* h = gather(ring_, layer_out(st, L_ - 1), B_ * H_, first, n, sa_);
    T* y = scatter_target(ring_, st.dy.data(), B_ * O_, first, n, sb_);
    for (int64_t r = 0; r < n * B_; ++r) copy_n(b_out(), O_, y + r * O_);
    gemm<T>(false, true, n * B_, O_, H_, T(1), h, H_, w_out(), H_, T(1), y, O_);
    scatter(ring_, st.dy.data(), B_ * O_, first, n, y);
  }

  // Turns y (in st.dy) into the unnormalised dLoss/dy in place, for steps
  // [first, first + n); copies y to `outputs` ([n, B, O]) first if given;
  // with accumulate, adds the masked loss and mask count to the pending block.
  void loss_pass(Store<T>& st, int64_t first, int64_t n, T* outputs, bool accumulate) {
    const bool ce = cfg_.loss == LossKind::kCrossEntropy;
    double loss = 0.0, count = 0.0;
    for (int64_t s = first; s < first + n; ++s) {
      const int64_t slot = ring_.slot(s);
      T* y = st.dy.data() + slot * B_ * O_;
      if (outputs != nullptr) copy_n(y, B_ * O_, outputs + (s - first) * B_ * O_);
      const T* mask = real_.mask.data() + slot * B_;
      for (int64_t b = 0; b < B_; ++b) {
        T* yb = y + b * O_;
        if (mask[b] == T(0)) {
          std::fill_n(yb, O_, T(0));
          continue;
        }
        count += 1.0;
        if (ce) {
          const int64_t k = real_.label[static_cast<size_t>(slot * B_ + b)];
          double mx = static_cast<double>(yb[0]);
          for (int64_t j = 1; j < O_; ++j) mx = std::max(mx, static_cast<double>(yb[j]));
          // softmax from one exp per logit: e_j = exp(y_j - max), p_j = e_j / sum e
          double se = 0.0;
          for (int64_t j = 0; j < O_; ++j) {
            exps_[static_cast<size_t>(j)] = std::exp(static_cast<double>(yb[j]) - mx);
            se += exps_[static_cast<size_t>(j)];
          }
          loss += mx + std::log(se) - static_cast<double>(yb[k]);
          for (int64_t j = 0; j < O_; ++j)
            yb[j] = static_cast<T>(exps_[static_cast<size_t>(j)] / se);
          yb[k] -= T(1);
        } else {
          const T* tg = real_.target.data() + (slot * B_ + b) * O_;
          double l = 0.0;
          const T two_over_o = T(2) / static_cast<T>(O_);
          for (int64_t j = 0; j < O_; ++j) {
            const T diff = yb[j] - tg[j];
            l += static_cast<double>(diff) * static_cast<double>(diff);
            yb[j] = two_over_o * diff;
          }
          loss += l / static_cast<double>(O_);
        }
      }
    }
    if (accumulate) {
      pend_loss_ += loss;
      pend_mask_ += count;
    }
  }

  // ---- update -----------------------------------------------------------
  // The update of block b (already consumed by the schedule).
  void update(const Block& b, bool return_grads, RunResult& res) {
    const int64_t t = b.t, tp = b.prev, w = b.w;
    const double denom = std::max(1.0, pend_mask_);
    const double loss = pend_loss_ / denom;
    pend_loss_ = pend_mask_ = 0.0;
    if (!std::isfinite(static_cast<T>(loss)))
      throw std::runtime_error(str_cat("non-finite loss in the update at step ", t));

    Store<T>* act = &real_;
    if (cfg_.overlap == OverlapKind::kRecompute && w < tp) {
      recompute(w, t, tp);
      act = &rc_;
    }
    backward(t, tp, w, *act, static_cast<T>(1.0 / denom));

    const double sumsq = vmath::sum_squares(grad_.data(), static_cast<int64_t>(grad_.size()));
    bool finite = std::isfinite(sumsq);
    if (!finite) {
      finite = std::all_of(grad_.begin(), grad_.end(), [](T g) { return std::isfinite(g); });
    }
    if (!finite) throw std::runtime_error(str_cat("non-finite gradient in the update at step ", t));

    if (return_grads) {
      std::vector<HostArray> gs;
      for (int64_t i = 0; i < cfg_.num_params(); ++i) {
        HostArray a;
        a.shape = cfg_.param_shape(i);
        a.bytes.resize(static_cast<size_t>(cfg_.param_size(i)) * sizeof(T));
        std::memcpy(a.bytes.data(), grad(i), a.bytes.size());
        gs.push_back(std::move(a));
      }
      res.grads.push_back(std::move(gs));
    }
    T coef = T(1);
    if (cfg_.clip > 0.0) {
      const double c = cfg_.clip / (std::sqrt(sumsq) + 1e-6);
      if (c < 1.0) coef = static_cast<T>(c);
    }
    optimizer_step(coef);
    refresh_whh_t();
    res.losses.push_back(static_cast<double>(static_cast<T>(loss)));
    res.update_steps.push_back(t);
  }

  // overlap="recompute": re-runs (w, t] from the stored state entering w + 1
  // with the current weights into rc_, then dL/dy of the block (tp, t].
  void recompute(int64_t w, int64_t t, int64_t tp) {
    const int64_t slot0 = ring_.slot(w + 1), bh = B_ * H_;
    for (int64_t l = 0; l < L_; ++l) {
      const auto& ls = real_.layers[static_cast<size_t>(l)];
      T* h = rc_state_.data() + (l * S_) * bh;
      copy_n(ls.h_in.data() + slot0 * bh, bh, h);
      if (S_ == 2) copy_n(ls.c_in.data() + slot0 * bh, bh, h + bh);
    }
    for (int64_t l = 0; l < L_; ++l) {
      T* h = rc_state_.data() + (l * S_) * bh;
      forward_layer(rc_, l, w + 1, t - w, h, S_ == 2 ? h + bh : nullptr);
    }
    readout_forward(rc_, tp + 1, t - tp);
    loss_pass(rc_, tp + 1, t - tp, nullptr, false);
  }

  // grad_ = dLoss_P/dtheta over window (w, t] with activations from act.
  // dg_, dgu_, dh_ are window-indexed: position j holds step w + 1 + j.
  void backward(int64_t t, int64_t tp, int64_t w, Store<T>& act, T scale) {
    std::fill(grad_.begin(), grad_.end(), T(0));
    const int64_t nw = t - w, bh = B_ * H_, bg = B_ * GH_;
    // Readout: every step of the block (tp, t].
    {
      const T* dy = gather(ring_, act.dy.data(), B_ * O_, tp + 1, t - tp, sa_);
      const T* h = gather(ring_, layer_out(act, L_ - 1), bh, tp + 1, t - tp, sb_);
      const int64_t rows = (t - tp) * B_;
      gemm<T>(true, false, O_, H_, rows, scale, dy, O_, h, H_, T(1), grad(4 * L_), H_);
      add_colsum(dy, rows, O_, scale, grad(4 * L_ + 1));
    }
    // dLoss/dh_top over the window: from the readout for block steps, 0 before.
    const int64_t lo = std::max(w, tp);
    std::fill_n(dh_.data(), (lo - w) * bh, T(0));
    const T* dy = gather(ring_, act.dy.data(), B_ * O_, lo + 1, t - lo, sa_);
    gemm<T>(false, false, (t - lo) * B_, H_, O_, scale, dy, O_, w_out(), H_, T(0),
            dh_.data() + (lo - w) * bh, H_);
    const bool gru = cfg_.cell == CellKind::kGru;
    T* dgu_base = gru ? dgu_.data() : dg_.data();
    for (int64_t l = L_ - 1; l >= 0; --l) {
      const LayerParams<T> p = layer_params(l);
      for (int64_t s = t; s > w; --s) {
        const int64_t slot = ring_.slot(s), j = s - w - 1;
        const StepCache<T> c = step_cache(act, l, slot);
        const StepGrad<T> g{dh_.data() + j * bh, dh_carry_.data(), dc_carry_.data(),
                            dg_.data() + j * bg, dgu_base + j * bg};
        const bool want_carry = s > w + 1;
        Cell::backward(p, B_, H_, c, g, s < t, want_carry);
        if (!want_carry) continue;
        const uint8_t* rs = real_.resets.data() + slot * B_;
        for (int64_t b = 0; b < B_; ++b) {
          if (rs[b] == 0) continue;
          std::fill_n(dh_carry_.data() + b * H_, H_, T(0));
          std::fill_n(dc_carry_.data() + b * H_, H_, T(0));
        }
      }
      const int64_t d = p.d_in, rows = nw * B_;
      const T* xin =
          gather(ring_, l == 0 ? real_.x.data() : layer_out(act, l - 1), B_ * d, w + 1, nw, sa_);
      const T* hin =
          gather(ring_, act.layers[static_cast<size_t>(l)].h_in.data(), bh, w + 1, nw, sb_);
      gemm<T>(true, false, GH_, d, rows, T(1), dg_.data(), GH_, xin, d, T(1), grad(4 * l), d);
      gemm<T>(true, false, GH_, H_, rows, T(1), dgu_base, GH_, hin, H_, T(1), grad(4 * l + 1), H_);
      add_colsum(dg_.data(), rows, GH_, T(1), grad(4 * l + 2));
      if (gru) {
        add_colsum(static_cast<const T*>(dgu_base), rows, GH_, T(1), grad(4 * l + 3));
      } else {  // rnn, lstm: u and a enter the gates alike, so d b_hh = d b_ih
        copy_n(static_cast<const T*>(grad(4 * l + 2)), GH_, grad(4 * l + 3));
      }
      if (l > 0) {
        gemm<T>(false, false, rows, H_, GH_, T(1), dg_.data(), GH_, p.w_ih, H_, T(0), dh_.data(),
                H_);
      }
    }
  }

  // Clip coefficient applied, then one fused pass per parameter array:
  // torch.optim.SGD / Adam (default flags) semantics.
  void optimizer_step(T coef) {
    const T lr = static_cast<T>(cfg_.lr), wd = static_cast<T>(cfg_.weight_decay);
    if (cfg_.optimizer == OptimizerKind::kAdam) {
      ++adam_step_;
      const double bc1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(adam_step_));
      const double bc2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(adam_step_));
      const T step_size = static_cast<T>(cfg_.lr / bc1);
      const T bc2_sqrt = static_cast<T>(std::sqrt(bc2));
      const T b1 = static_cast<T>(cfg_.beta1), b2 = static_cast<T>(cfg_.beta2);
      const T eps = static_cast<T>(cfg_.eps);
      for (int64_t i = 0; i < cfg_.num_params(); ++i) {
        T* p = params_[static_cast<size_t>(i)];
        const T* g = grad(i);
        T* m = m_.data() + offsets_[static_cast<size_t>(i)];
        T* v = v_.data() + offsets_[static_cast<size_t>(i)];
        const int64_t n = cfg_.param_size(i);
        for (int64_t j = 0; j < n; ++j) {
          const T gj = g[j] * coef + wd * p[j];
          m[j] += (T(1) - b1) * (gj - m[j]);
          v[j] = b2 * v[j] + (T(1) - b2) * gj * gj;
          p[j] -= step_size * m[j] / (std::sqrt(v[j]) / bc2_sqrt + eps);
        }
      }
      return;
    }
    const T mom = static_cast<T>(cfg_.momentum);
    const bool nesterov = cfg_.nesterov;
    for (int64_t i = 0; i < cfg_.num_params(); ++i) {
      T* p = params_[static_cast<size_t>(i)];
      const T* g = grad(i);
      const int64_t n = cfg_.param_size(i);
      if (mom == T(0)) {
        for (int64_t j = 0; j < n; ++j) p[j] -= lr * (g[j] * coef + wd * p[j]);
        continue;
      }
      T* buf = m_.data() + offsets_[static_cast<size_t>(i)];
      for (int64_t j = 0; j < n; ++j) {
        const T dp = g[j] * coef + wd * p[j];
        buf[j] = mom * buf[j] + dp;  // first step: buf = 0 -> dp, as torch
        p[j] -= lr * (nesterov ? dp + mom * buf[j] : buf[j]);
      }
    }
  }

  // ---- data -------------------------------------------------------------
  Config cfg_;
  const int64_t L_, H_, D_, O_, GH_, S_;
  std::vector<T*> params_;        // P borrowed arrays, updated in place by optimizer_step
  std::vector<int64_t> offsets_;  // [P + 1] offsets of each parameter in grad_/m_/v_
  int64_t B_ = 0;
  bool has_state_ = false, has_init_ = false;
  std::vector<T> init_;   // [L*S, B, H] initial state (zeros unless given); flat layer-major
  std::vector<T> state_;  // [L*S, B, H] current forward state
  Schedule sched_{cfg_};
  double pend_loss_ = 0.0, pend_mask_ = 0.0;  // masked loss sum and mask count of the block
  RingIndex ring_;
  Store<T> real_, rc_;                  // real forward history; recomputed window (recompute only)
  std::vector<T> dg_, dgu_, dh_;        // [K, B, G*H], [K, B, G*H] (gru), [K, B, H]; window-indexed
  std::vector<T> sa_, sb_;              // gather/scatter scratch for runs that wrap the ring
  std::vector<T> dh_carry_, dc_carry_;  // [B, H]
  std::vector<T> scratch_;              // [B, G*H] cell scratch (gru: u)
  std::vector<double> exps_;            // [O] cross-entropy: exp(y - max) of one row
  std::vector<T> rc_state_;             // [L*S, B, H] running state of a recompute
  std::vector<T> grad_, m_, v_;         // flat [sum of param sizes], canonical order
  std::vector<T> whh_t_;                // [L, H, G*H] transposed W_hh (or empty), refresh_whh_t
  bool use_whh_t_ = false;              // per run(): NN per-step products (see run())
  std::vector<float> packed_t_, packed_;  // float: [L] W_hh^T, W_hh in panels (pack_panels)
  bool use_packed_ = false;               // per run(): packed per-step products (see run())
  int64_t adam_step_ = 0;
};

template <typename T>
std::unique_ptr<EngineBase> make_typed(const Config& cfg, const std::vector<void*>& params) {
  switch (cfg.cell) {
    case CellKind::kRnnTanh:
      return std::make_unique<CpuEngine<T, RnnCell<T, false>>>(cfg, params);
    case CellKind::kRnnRelu:
      return std::make_unique<CpuEngine<T, RnnCell<T, true>>>(cfg, params);
    case CellKind::kLstm:
      return std::make_unique<CpuEngine<T, LstmCell<T>>>(cfg, params);
    case CellKind::kGru:
      return std::make_unique<CpuEngine<T, GruCell<T>>>(cfg, params);
  }
  throw std::invalid_argument("unknown cell");
}

}  // namespace

std::unique_ptr<EngineBase> make_engine(const Config& cfg, const std::vector<void*>& params) {
  if (cfg.dtype == DType::kFloat64) return make_typed<double>(cfg, params);
  return make_typed<float>(cfg, params);
}

}  // namespace tbptt::cpu

std::unique_ptr<tbptt::EngineBase> tbptt::make_cpu_engine(const Config& cfg,
                                                          const std::vector<void*>& params) {
  return cpu::make_engine(cfg, params);
}
