// The CPU device policy of the engine skeleton (tbptt/engine.h): host
// buffers, products through cpu/blas.h (a run of steps that wraps the ring is
// gathered into one contiguous scratch copy, so every product over a block or
// window is ONE call with the same operands whatever the ring capacity:
// results are bit-identical for any capacity >= max(k1, k2)), the per-step
// recurrent products on packed or transposed copies of W_hh, the cells'
// pointwise passes compiled per ISA level (cpu/pointwise.h), the loss, the
// gradient check and the optimizers. It works on the caller's parameter
// arrays in place.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cells/cell.h"
#include "cpu/blas.h"
#include "cpu/pointwise.h"
#include "cpu/pool.h"
#include "cpu/vmath.h"
#include "tbptt/engine_api.h"
#include "tbptt/ring.h"

namespace tbptt {
struct OptimizerStep;
struct StepKey;
}  // namespace tbptt

namespace tbptt::cpu {

// Resizes v to n elements. Fresh buffers are NaN-filled in sanitizer/debug
// builds so a read of never-written memory fails a test instead of passing
// by luck. keep = true preserves the prefix (ring growth).
template <typename T>
void fresh(std::vector<T>& v, size_t n, bool keep = false) {
#if defined(TBPTT_NAN_FILL)
  const size_t old = keep ? std::min(v.size(), n) : 0;
  v.resize(n);
  if constexpr (std::numeric_limits<T>::has_quiet_NaN) {
    std::fill(v.begin() + static_cast<std::ptrdiff_t>(old), v.end(),
              std::numeric_limits<T>::quiet_NaN());
  }
#else
  if (!keep) v.clear();
  v.resize(n);
#endif
}

template <typename T>
void copy_n(const T* src, int64_t n, T* dst) {
  if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
}

// out[j0 + j] += alpha * sum_r a[r, j0 + j] for j < nj, a [rows, cols].
template <typename T>
void add_colsum_cols(const T* a, int64_t rows, int64_t cols, int64_t j0, int64_t nj, T alpha,
                     T* out) {
  T* o = out + j0;
  if (alpha == T(1)) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = a + r * cols + j0;
      for (int64_t j = 0; j < nj; ++j) o[j] += row[j];
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = a + r * cols + j0;
    for (int64_t j = 0; j < nj; ++j) o[j] += alpha * row[j];
  }
}

// out[cols, rows] = a[rows, cols]^T through a 16 x 16 tile held in a local
// buffer: reads and writes are both row runs. A plain loop stores at a stride
// of rows * sizeof(T) = 4 KB for LSTM H = 256, so every store of a column hits
// one L1 set: ~5 ns per element, 8% of the whole run.
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
class Device {
 public:
  template <typename U>
  using Buffer = std::vector<U>;
  static constexpr bool kRowLoss = false;    // the loss is summed on the host as computed
  static constexpr bool kHostMemory = true;  // buffers are host memory
  static constexpr const char* kName = "machine";
  // Held by every engine call: OpenBLAS single-threaded, and the thread
  // count this call runs with (blas.h).
  class Guard {
   public:
    explicit Guard(int& threads) { threads = pin_.threads(); }

   private:
    BlasPin pin_;
  };

  Device(const Config& cfg, const std::vector<void*>& params, const std::vector<int64_t>& offsets)
      : cfg_(cfg),
        L_(cfg.num_layers),
        H_(cfg.hidden_size),
        O_(cfg.output_size),
        GH_(cfg.gates() * cfg.hidden_size),
        params_(typed_params<T>(cfg, params)),
        offsets_(offsets) {
    exps_.assign(static_cast<size_t>(O_), 0.0);
  }

  Guard guard() const { return Guard(threads_); }
  void sync() const {}
  T* param(int64_t i) const { return params_[static_cast<size_t>(i)]; }
  void pull_params() {}
  void push_params() {}
  std::vector<int64_t> graph_stats(std::string* first_failure) const {
    if (first_failure != nullptr) first_failure->clear();
    return {};
  }
  ScanResult scan_device(const ScanRequest& req) {
    throw std::invalid_argument(
        str_cat(req.array.name, " is a CUDA array; this backend takes host arrays"));
  }

  // ---- memory -----------------------------------------------------------
  template <typename U>
  void resize(std::vector<U>& v, size_t n, bool keep) {
    fresh(v, n, keep);
  }
  void copy(T* dst, const T* src, int64_t n) const { copy_n(src, n, dst); }
  void upload(T* dst, const T* src, int64_t n) const { copy_n(src, n, dst); }
  void download(T* dst, const T* src, int64_t n) const { copy_n(src, n, dst); }
  void fill(T* dst, int64_t n, T value) const {
    if (n > 0) std::fill_n(dst, n, value);
  }
  template <typename U>
  void copy_raw(U* dst, const U* src, size_t n) const {
    if (n > 0) std::memcpy(dst, src, n * sizeof(U));
  }
  // Bytes of physical memory (0: unknown): larger rings are refused up front.
  double memory_limit() const {
    const long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && size > 0 ? static_cast<double>(pages) * static_cast<double>(size) : 0.0;
  }
  template <typename U>
  void upload_raw(U* dst, const U* src, int64_t n) const {
    copy_n(src, n, dst);
  }
  template <typename U>
  void download_raw(U* dst, const U* src, int64_t n) const {
    copy_n(src, n, dst);
  }
  void ring_resized(int64_t, int64_t) {}

  // ---- run ----------------------------------------------------------------
  void check_inputs(const RunInputs& in) const {
    TBPTT_CHECK_ARG(in.device == nullptr, "the CPU engine takes host arrays only");
  }

  // Chooses the per-step product forms for this run and refreshes the copies.
  // A transposed copy costs G*H*H copies per refresh (one per update); it
  // pays off from about 8 steps per update (H = 256, B = 32: 0.4 ms per
  // copy vs 70 us saved per step), so short runs and k1 < 8 keep NT.
  // Packing (float) costs about the same and serves both per-step products.
  void begin_run(int64_t steps, int64_t batch) {
    const bool amortised = cfg_.k1 >= 8 && steps >= 8;
    const int64_t rows = group_rows(batch);  // rows of each per-step product
    use_packed_ = amortised && std::is_same_v<T, float> && packed_available(rows, GH_, H_) &&
                  packed_available(rows, H_, GH_);
    use_whh_t_ = amortised && !use_packed_ &&
                 small_product_prefers_nn(rows, GH_, H_, std::is_same_v<T, float>);
    packed_batch_ = rows;
    params_changed();
  }

  // Refreshes the transposed / packed W_hh copies whenever the parameters
  // may have changed (the caller may write them between calls): at the start
  // of every run() and after each optimizer step.
  void params_changed() {
    if constexpr (std::is_same_v<T, float>) {
      if (use_packed_) {
        packed_t_.resize(static_cast<size_t>(L_ * H_ * GH_));
        packed_.resize(static_cast<size_t>(L_ * H_ * GH_));
        for (int64_t l = 0; l < L_; ++l) {
          const float* w = w_hh(l);  // [GH, H]
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
      transpose(w_hh(l), GH_, H_, whh_t_.data() + l * H_ * GH_);
  }

  template <typename Store>
  void load_inputs(const RunInputs& in, int64_t pos, int64_t first, int64_t n,
                   const RingIndex& ring, Store& st, int64_t batch) {
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    const T* mask = static_cast<const T*>(in.mask);
    for (int i = 0; i < ns; ++i) {
      const int64_t rows = seg[i].count * batch, r0 = seg[i].slot * batch,
                    src = (pos + seg[i].offset) * batch;
      load_x(in.x, src, rows, st, r0);
      if (mask != nullptr) {
        copy_n(mask + src, rows, st.mask.data() + r0);
      } else {
        std::fill_n(st.mask.data() + r0, rows, T(1));
      }
      if (in.resets != nullptr) {
        copy_n(in.resets + src, rows, st.resets.data() + r0);
      } else {
        std::fill_n(st.resets.data() + r0, rows, uint8_t(0));
      }
      if (cfg_.loss == LossKind::kCrossEntropy) {
        copy_n(static_cast<const int64_t*>(in.target) + src, rows, st.label.data() + r0);
      } else {
        copy_n(static_cast<const T*>(in.target) + src * O_, rows * O_, st.target.data() + r0 * O_);
      }
    }
  }

  // Forward only: steps [pos, pos + n) of x (and resets) into slots [0, n).
  template <typename Store>
  void load_forward_inputs(const ForwardInputs& in, int64_t pos, int64_t n, Store& st,
                           int64_t batch) {
    const int64_t rows = n * batch, src = pos * batch;
    load_x(in.x, src, rows, st, 0);
    if (in.resets != nullptr) {
      copy_n(in.resets + src, rows, st.resets.data());
    } else {
      std::fill_n(st.resets.data(), rows, uint8_t(0));
    }
  }

  // With an embedding: x of steps [first, first + n) = embedding rows of their ids.
  template <typename Store>
  void embed_rows(const RingIndex& ring, int64_t first, int64_t n, int64_t batch, Store& st) {
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    const int64_t D = cfg_.input_size;
    const T* emb = params_[0];
    for (int i = 0; i < ns; ++i) {
      const int64_t r0 = seg[i].slot * batch;
      for (int64_t r = r0; r < r0 + seg[i].count * batch; ++r)
        copy_n(emb + st.ids[static_cast<size_t>(r)] * D, D, st.x.data() + r * D);
    }
  }
  // grad_emb[ids[r]] += dx[r] for the n * batch rows of steps [first, first + n)
  // (ids in the ring, dx window-indexed), in row order: the same result for
  // any thread count.
  void scatter_add_rows(const RingIndex& ring, int64_t first, int64_t n, int64_t batch,
                        const int64_t* ids, const T* dx, int64_t width, T* grad_emb) {
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    for (int i = 0; i < ns; ++i) {
      const int64_t r0 = seg[i].slot * batch, w0 = seg[i].offset * batch;
      for (int64_t r = 0; r < seg[i].count * batch; ++r) {
        T* out = grad_emb + ids[r0 + r] * width;
        const T* in = dx + (w0 + r) * width;
        for (int64_t j = 0; j < width; ++j) out[j] += in[j];
      }
    }
  }

  // f() runs the per-step launches of one layer (no recording on the CPU).
  template <typename F>
  void step_sequence(const StepKey&, F&& f) {
    f();
  }

  // f(b0, nb) for groups of rows [b0, b0 + nb) covering the batch, on the
  // thread pool. The rows of a batch are independent through the whole step
  // sequence, so the groups need no synchronisation. The group size comes
  // from the shapes alone (group_rows), so results do not depend on the
  // thread count.
  template <typename F>
  void batch_groups(int64_t batch, const F& f) {
    const int64_t rows = group_rows(batch);
    const int64_t groups = (batch + rows - 1) / rows;
    if (groups <= 1) {
      f(int64_t{0}, batch);
      return;
    }
    parallel_for(threads_, groups, [&](int64_t i) {
      const int64_t b0 = i * rows;
      f(b0, std::min(rows, batch - b0));
    });
  }

  // Rows per batch group. Groups of 8 rows while one layer's W_hh fits a
  // core's L2 cache (each group streams all of W_hh every step); beyond that
  // one group, and each per-step product is cut into column parts that run
  // on the pool instead (each core then keeps its columns of W_hh in cache).
  // TBPTT_GROUP_ROWS=n overrides it (benchmarks; 0 = automatic).
  int64_t group_rows(int64_t batch) const {
    static const int64_t forced = [] {
      const char* env = std::getenv("TBPTT_GROUP_ROWS");
      return env == nullptr ? int64_t{0} : std::max<int64_t>(0, std::atoll(env));
    }();
    if (forced > 0) return std::min(forced, batch);
    const double whh_bytes = static_cast<double>(GH_) * static_cast<double>(H_) * sizeof(T);
    if (batch < 16 || whh_bytes > kGroupMaxWeightBytes) return batch;
    return 8;
  }

  // ---- products over steps [first, first + n) ------------------------------
  // c = alpha * a op(w) + beta * c over n * batch rows; op(w) = w^T ([cols, kdim]
  // stored, trans_w) or w ([kdim, cols] stored, row stride ldw).
  void product(const RingIndex& ring, int64_t first, int64_t n, int64_t batch, Rows<T> a,
               bool trans_w, const T* w, int64_t ldw, Rows<T> c, T alpha, T beta) {
    if (n <= 0) return;
    const T* ap = rows_in(ring, a, batch, first, n, sa_);
    T* cp = c.ring ? (beta == T(0) ? scatter_target(ring, c, batch, first, n, sb_)
                                   : const_cast<T*>(rows_in(ring, c, batch, first, n, sb_)))
                   : c.base;
    const int64_t kdim = a.width;
    gemm_parallel<T>(threads_, false, trans_w, n * batch, c.width, kdim, alpha, ap, kdim, w, ldw,
                     beta, cp, c.width);
    if (c.ring) scatter(ring, c, batch, first, n, cp);
  }

  // out[a.width, b.width] += alpha * a^T b over n * batch rows.
  void reduce(const RingIndex& ring, int64_t first, int64_t n, int64_t batch, Rows<T> a, Rows<T> b,
              T alpha, T* out) {
    if (n <= 0) return;
    const T* ap = rows_in(ring, a, batch, first, n, sa_);
    const T* bp = rows_in(ring, b, batch, first, n, sb_);
    gemm_parallel<T>(threads_, true, false, a.width, b.width, n * batch, alpha, ap, a.width, bp,
                     b.width, T(1), out, b.width);
  }

  // out[a.width] += alpha * column sums of a over n * batch rows.
  void colsum(const RingIndex& ring, int64_t first, int64_t n, int64_t batch, Rows<T> a, T alpha,
              T* out) {
    if (n <= 0) return;
    const T* ap = rows_in(ring, a, batch, first, n, sa_);
    // Column blocks: each column's sum runs over the rows in order, so any
    // split gives the same result.
    const int64_t rows = n * batch, blk = 256;
    const int64_t parts = rows * a.width >= (1 << 16) ? (a.width + blk - 1) / blk : 1;
    parallel_for(threads_, parts, [&](int64_t i) {
      const int64_t j0 = i * blk, nj = parts == 1 ? a.width : std::min(blk, a.width - j0);
      add_colsum_cols(ap, rows, a.width, j0, nj, alpha, out);
    });
  }

  // Every row of c (n * batch rows) = row [c.width].
  void fill_rows(const RingIndex& ring, int64_t first, int64_t n, int64_t batch, Rows<T> c,
                 const T* row) {
    Segment seg[2];
    const int ns = c.ring ? ring.segments(first, n, seg) : 0;
    if (!c.ring) {
      for (int64_t r = 0; r < n * batch; ++r) copy_n(row, c.width, c.base + r * c.width);
      return;
    }
    for (int i = 0; i < ns; ++i) {
      T* base = c.base + seg[i].slot * batch * c.width;
      for (int64_t r = 0; r < seg[i].count * batch; ++r) copy_n(row, c.width, base + r * c.width);
    }
  }

  // ---- per step -----------------------------------------------------------
  // out[B, G*H] = h_in W_hh^T + beta * out. Fastest first: W_hh^T packed into
  // panels for the own kernel; the transposed copy as a plain NN product (the
  // own kernel, or OpenBLAS's no-packing small-matrix kernels: H = 64, B = 8:
  // 2.3 us instead of 10.9 us for the NT form); else NT against W_hh.
  void recurrent(int64_t l, int64_t batch, const T* h_in, T beta, T* out) {
    if constexpr (std::is_same_v<T, float>) {
      if (!packed_t_.empty() && batch <= packed_batch_) {
        gemm_packed(threads_, batch, GH_, H_, h_in, H_, packed_t_.data() + l * H_ * GH_, beta, out,
                    GH_);
        return;
      }
    }
    if (!whh_t_.empty()) {
      gemm_parallel<T>(threads_, false, false, batch, GH_, H_, T(1), h_in, H_,
                       whh_t_.data() + l * H_ * GH_, GH_, beta, out, GH_);
    } else {
      gemm_parallel<T>(threads_, false, true, batch, GH_, H_, T(1), h_in, H_, w_hh(l), H_, beta,
                       out, GH_);
    }
  }

  // out[B, H] = dG W_hh + beta * out (dG [B, G*H]).
  void recurrent_grad(int64_t l, int64_t batch, const T* dg, T beta, T* out) {
    if constexpr (std::is_same_v<T, float>) {
      if (!packed_.empty() && batch <= packed_batch_) {
        gemm_packed(threads_, batch, H_, GH_, dg, GH_, packed_.data() + l * H_ * GH_, beta, out,
                    H_);
        return;
      }
    }
    gemm_parallel<T>(threads_, false, false, batch, H_, GH_, T(1), dg, GH_, w_hh(l), H_, beta, out,
                     H_);
  }

  // The state entering a step: h_prev (and c_prev) copied into the step's
  // cache slot, the initial state in the rows that reset.
  void enter_state(int64_t batch, int64_t hidden, const T* h_prev, const T* c_prev, const T* h_init,
                   const T* c_init, const uint8_t* resets, T* h_in, T* c_in) {
    const int64_t bh = batch * hidden;
    copy_n(h_prev, bh, h_in);
    if (c_in != nullptr && c_prev != nullptr) copy_n(c_prev, bh, c_in);
    for (int64_t b = 0; b < batch; ++b) {
      if (resets[b] == 0) continue;
      copy_n(h_init + b * hidden, hidden, h_in + b * hidden);
      if (c_in != nullptr) copy_n(c_init + b * hidden, hidden, c_in + b * hidden);
    }
  }

  // No gradient crosses a reset: the carry into the step before is zero in
  // the rows where this step reset.
  void cut_carry(int64_t batch, int64_t hidden, const uint8_t* resets, T* dh_carry, T* dc_carry) {
    for (int64_t b = 0; b < batch; ++b) {
      if (resets[b] == 0) continue;
      std::fill_n(dh_carry + b * hidden, hidden, T(0));
      std::fill_n(dc_carry + b * hidden, hidden, T(0));
    }
  }

  // The cells' pointwise passes. Outside a batch group (one group: large
  // W_hh) a large step is cut into row blocks on the pool; every row is
  // computed the same way whatever the blocks, so the cut may follow the
  // thread count.
  template <typename Cell>
  void cell_forward(const cells::StepFwd<T>& s) {
    in_row_blocks(s.batch, s.gh,
                  [&](int64_t b0, int64_t nb) { forward_pass(Cell{}, s.rows(b0, nb)); });
  }
  template <typename Cell>
  void cell_backward(const cells::StepBwd<T>& s, bool has_carry) {
    in_row_blocks(s.batch, s.gh, [&](int64_t b0, int64_t nb) {
      backward_pass(Cell{}, s.rows(b0, nb), has_carry);
    });
  }
  // f(b0, nb) over rows [0, batch) of a step of `width` gate values per row:
  // one call, or row blocks on the pool when the step is large and not
  // already inside a batch group's task.
  template <typename F>
  void in_row_blocks(int64_t batch, int64_t width, const F& f) {
    const int64_t blocks = threads_ <= 1 || in_task() || batch * width < kPointwiseMinElems
                               ? 1
                               : std::min<int64_t>(batch, threads_);
    if (blocks <= 1) {
      f(int64_t{0}, batch);
      return;
    }
    const int64_t rows = (batch + blocks - 1) / blocks;
    parallel_for(threads_, blocks, [&](int64_t i) {
      const int64_t b0 = i * rows;
      if (b0 < batch) f(b0, std::min(rows, batch - b0));
    });
  }

  // ---- loss ---------------------------------------------------------------
  // Turns y (in st.dy) into the unnormalised dLoss/dy in place, for steps
  // [first, first + n); copies y to `outputs` ([n, B, O] host) first if
  // given; with accumulate, adds the masked loss and mask count to the
  // pending block. Mask, targets and labels come from `in`, the real store.
  template <typename Store>
  void loss_pass(const RingIndex& ring, Store& st, const Store& in, int64_t first, int64_t n,
                 int64_t batch, const T* /*b_out: already in y*/, T* outputs, bool accumulate) {
    const bool ce = cfg_.loss == LossKind::kCrossEntropy;
    double loss = 0.0, count = 0.0;
    for (int64_t s = first; s < first + n; ++s) {
      const int64_t slot = ring.slot(s);
      T* y = st.dy.data() + slot * batch * O_;
      if (outputs != nullptr) copy_n(y, batch * O_, outputs + (s - first) * batch * O_);
      const T* mask = in.mask.data() + slot * batch;
      for (int64_t b = 0; b < batch; ++b) {
        T* yb = y + b * O_;
        if (mask[b] == T(0)) {
          std::fill_n(yb, O_, T(0));
          continue;
        }
        count += 1.0;
        if (ce) {
          const int64_t k = in.label[static_cast<size_t>(slot * batch + b)];
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
          const T* tg = in.target.data() + (slot * batch + b) * O_;
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

  template <typename Store>
  std::pair<double, double> peek_block_loss(const RingIndex&, const Store&, int64_t, int64_t,
                                            int64_t) const {
    return {pend_loss_, pend_mask_};
  }
  template <typename Store>
  void restore_block_loss(const RingIndex&, Store&, int64_t, int64_t, int64_t, double loss,
                          double count) {
    pend_loss_ = loss;
    pend_mask_ = count;
  }

  // The masked loss sum and the mask count of the block now ending; clears them.
  template <typename Store>
  std::pair<double, double> take_block_loss(const RingIndex&, const Store&, int64_t, int64_t,
                                            int64_t) {
    const std::pair<double, double> r{pend_loss_, pend_mask_};
    pend_loss_ = pend_mask_ = 0.0;
    return r;
  }
  void clear_block_loss() { pend_loss_ = pend_mask_ = 0.0; }

  // ---- gradient and optimizer ----------------------------------------------
  struct GradStatus {
    double sumsq;
    bool finite;
  };
  GradStatus grad_status(const T* g, int64_t n) const {
    // Fixed chunks, their sums added in order: the same for any thread count.
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> part(static_cast<size_t>(std::max<int64_t>(chunks, 1)), 0.0);
    parallel_for(threads_, chunks, [&](int64_t i) {
      part[static_cast<size_t>(i)] =
          vmath::sum_squares(g + i * kChunk, std::min(kChunk, n - i * kChunk));
    });
    double sumsq = 0.0;
    for (const double v : part) sumsq += v;
    bool finite = std::isfinite(sumsq);
    if (!finite) finite = std::all_of(g, g + n, [](T v) { return std::isfinite(v); });
    return {sumsq, finite};
  }

  // The clip coefficient applied, then one fused pass per parameter array:
  // torch.optim.SGD / Adam (default flags) semantics.
  template <typename Step>
  void optimizer_step(const Step& step, const T* grad, T* m_all, T* v_all) {
    const T coef = static_cast<T>(step.coef);
    const T lr = static_cast<T>(cfg_.lr), wd = static_cast<T>(cfg_.weight_decay);
    if (cfg_.optimizer == OptimizerKind::kAdam) {
      const double bc1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(step.adam_step));
      const double bc2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(step.adam_step));
      const T step_size = static_cast<T>(cfg_.lr / bc1);
      const T bc2_sqrt = static_cast<T>(std::sqrt(bc2));
      const T b1 = static_cast<T>(cfg_.beta1), b2 = static_cast<T>(cfg_.beta2);
      const T eps = static_cast<T>(cfg_.eps);
      for (int64_t i = 0; i < cfg_.num_params(); ++i) {
        T* p = params_[static_cast<size_t>(i)];
        const size_t off = static_cast<size_t>(offsets_[static_cast<size_t>(i)]);
        const T* g = grad + off;
        T* m = m_all + off;
        T* v = v_all + off;
        chunked(cfg_.param_size(i), [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) {
            const T gj = g[j] * coef + wd * p[j];
            m[j] += (T(1) - b1) * (gj - m[j]);
            v[j] = b2 * v[j] + (T(1) - b2) * gj * gj;
            p[j] -= step_size * m[j] / (std::sqrt(v[j]) / bc2_sqrt + eps);
          }
        });
      }
      return;
    }
    const T mom = static_cast<T>(cfg_.momentum);
    const bool nesterov = cfg_.nesterov;
    for (int64_t i = 0; i < cfg_.num_params(); ++i) {
      T* p = params_[static_cast<size_t>(i)];
      const size_t off = static_cast<size_t>(offsets_[static_cast<size_t>(i)]);
      const T* g = grad + off;
      if (mom == T(0)) {
        chunked(cfg_.param_size(i), [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) p[j] -= lr * (g[j] * coef + wd * p[j]);
        });
        continue;
      }
      T* buf = m_all + off;
      chunked(cfg_.param_size(i), [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const T dp = g[j] * coef + wd * p[j];
          buf[j] = mom * buf[j] + dp;  // first step: buf = 0 -> dp, as torch
          p[j] -= lr * (nesterov ? dp + mom * buf[j] : buf[j]);
        }
      });
    }
  }

 private:
  static constexpr int64_t kChunk = 65536;              // elements per task of elementwise passes
  static constexpr int64_t kPointwiseMinElems = 16384;  // gate values of a step worth splitting

  // f(j0, j1) over [0, n) in chunks of kChunk on the pool (elementwise work:
  // any split gives the same result).
  template <typename F>
  void chunked(int64_t n, const F& f) const {
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    parallel_for(threads_, chunks,
                 [&](int64_t i) { f(i * kChunk, std::min(n, (i + 1) * kChunk)); });
  }

  const T* w_hh(int64_t l) const { return params_[static_cast<size_t>(cfg_.layer_param(l, 1))]; }

  // x rows [r0, r0 + rows) of st from rows [src, src + rows) of the caller's
  // x: copied, or with an embedding looked up from the ids.
  template <typename Store>
  void load_x(const void* x, int64_t src, int64_t rows, Store& st, int64_t r0) {
    const int64_t D = cfg_.input_size;
    if (cfg_.vocab_size > 0) {
      const int64_t* ids = static_cast<const int64_t*>(x) + src;
      copy_n(ids, rows, st.ids.data() + r0);
      const T* emb = params_[0];
      for (int64_t r = 0; r < rows; ++r) copy_n(emb + ids[r] * D, D, st.x.data() + (r0 + r) * D);
      return;
    }
    copy_n(static_cast<const T*>(x) + src * D, rows * D, st.x.data() + r0 * D);
  }

  // Contiguous [n*B, width] view of steps [first, first + n) of r: r itself
  // when it is a window or the run does not wrap, else a copy in `scratch`.
  const T* rows_in(const RingIndex& ring, Rows<T> r, int64_t batch, int64_t first, int64_t n,
                   std::vector<T>& scratch) {
    if (!r.ring) return r.base;
    const int64_t len = batch * r.width;
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    if (ns <= 1) return r.base + (ns == 1 ? seg[0].slot * len : 0);
    grow(scratch, n * len);
    for (int i = 0; i < ns; ++i)
      std::copy_n(r.base + seg[i].slot * len, seg[i].count * len,
                  scratch.data() + seg[i].offset * len);
    return scratch.data();
  }
  // Where to write steps [first, first + n) of ring rows r contiguously: r
  // itself, or `scratch` when the run wraps (then scatter() after writing).
  T* scatter_target(const RingIndex& ring, Rows<T> r, int64_t batch, int64_t first, int64_t n,
                    std::vector<T>& scratch) {
    const int64_t len = batch * r.width;
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    if (ns <= 1) return r.base + (ns == 1 ? seg[0].slot * len : 0);
    return grow(scratch, n * len);
  }
  void scatter(const RingIndex& ring, Rows<T> r, int64_t batch, int64_t first, int64_t n,
               const T* written) {
    const int64_t len = batch * r.width;
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    if (ns <= 1) return;
    for (int i = 0; i < ns; ++i)
      std::copy_n(written + seg[i].offset * len, seg[i].count * len, r.base + seg[i].slot * len);
  }
  static T* grow(std::vector<T>& scratch, int64_t n) {
    if (scratch.size() < static_cast<size_t>(n)) scratch.resize(static_cast<size_t>(n));
    return scratch.data();
  }

  const Config& cfg_;
  const int64_t L_, H_, O_, GH_;
  std::vector<T*> params_;                    // P borrowed arrays, updated in place
  const std::vector<int64_t>& offsets_;       // [P + 1] offsets of each parameter in grad/m/v
  double pend_loss_ = 0.0, pend_mask_ = 0.0;  // masked loss sum and mask count of the block
  std::vector<double> exps_;                  // [O] cross-entropy: exp(y - max) of one row
  std::vector<T> sa_, sb_;                    // gather/scatter scratch for runs that wrap the ring
  std::vector<T> whh_t_;                      // [L, H, G*H] transposed W_hh (or empty)
  bool use_whh_t_ = false;                    // per run(): NN per-step products (see begin_run)
  std::vector<float> packed_t_, packed_;      // float: [L] W_hh^T, W_hh in panels (pack_panels)
  bool use_packed_ = false;                   // per run(): packed per-step products
  mutable int threads_ = 1;                   // this call's thread count (Guard)
  static constexpr double kGroupMaxWeightBytes = 512.0 * 1024.0;  // group_rows()
  int64_t packed_batch_ = 0;  // the batch the product forms were chosen for
};

}  // namespace tbptt::cpu
