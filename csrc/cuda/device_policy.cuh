// The CUDA device policy of the engine skeleton (tbptt/engine.h), the twin of
// cpu/device.h: the same members with the same meaning, on one GPU. It has no
// time loop, no schedule, no ring arithmetic (RingIndex::segments splits a
// run of steps, nothing more) and no message of the contract.
//
// Where things live. Parameters (one flat buffer, canonical order), the
// engine's gradient and optimizer state, the ring of stored history and the
// forward state are device memory (Buffer = DeviceBuffer). Everything runs on
// the policy's own stream; the host copies a chunk's inputs in (<= 2 copies
// per array, one per ring segment; device inputs: a gather kernel instead),
// outputs out when asked, and reads two small results per update (the
// block's loss, the gradient's norm and finiteness): nothing per step.
//
// Products over a run of steps are one cuBLAS call per ring segment (<= 2).
// A window operand (Rows with ring == false: row block j holds step first + j)
// pairs with a ring segment through the segment's offset: its rows start at
// offset * B. Per step: the recurrent products are cuBLAS calls on W_hh, the
// cells one generic kernel (cell_kernels.cuh). A step sequence (a layer's
// chunk forward or window backward) may be recorded and replayed as a CUDA
// graph (graphs.h, TBPTT_CUDA_GRAPHS).
//
// Token inputs (Config::vocab_size > 0): embedding.weight is parameter 0 (the
// others through Config::layer_param / readout_param); the host ids of a
// chunk are copied into the store's ids and their rows gathered into its x
// on the device; the embedding's gradient is a deterministic scatter-add of
// the layer-0 input gradient (kernels.cuh).
//
// The forward-only store (Engine::forward) has no mask, targets or row_loss:
// only load_forward_inputs, the products, fill_rows and the per-step members
// touch it. Its step sequences are keyed by its own store and state buffers,
// so they never meet a training sequence in the graph cache.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cells/cell.h"
#include "cuda/cell_kernels.cuh"
#include "cuda/check.h"
#include "cuda/context.h"
#include "cuda/cublas.h"
#include "cuda/device.h"
#include "cuda/graphs.h"
#include "cuda/inputs.cuh"
#include "cuda/kernels.cuh"
#include "tbptt/engine.h"
#include "tbptt/engine_api.h"
#include "tbptt/ring.h"

namespace tbptt::cuda {

template <typename T>
class Device {
 public:
  template <typename U>
  using Buffer = DeviceBuffer<U>;
  // Each row's loss is kept on the device and summed per chunk.
  static constexpr bool kRowLoss = true;
  static constexpr bool kHostMemory = false;  // buffers are device memory
  static constexpr const char* kName = "GPU";
  using Guard = DeviceGuard;

  // require_device() comes first (the member order says so): without a
  // usable GPU or cuBLAS the error is the clear RuntimeError, before any
  // other CUDA call.
  Device(const Config& cfg, const std::vector<void*>& params, const std::vector<int64_t>& offsets)
      : device_(require_device()),
        cfg_(cfg),
        H_(cfg.hidden_size),
        D_(cfg.input_size),
        O_(cfg.output_size),
        GH_(cfg.gates() * cfg.hidden_size),
        host_params_(typed_params<T>(cfg, params)),
        offsets_(offsets),
        blas_(stream_.get()),
        words_host_(kWords) {
    params_.allocate(static_cast<size_t>(offsets_.back()));
    partial_sumsq_.allocate(kReduceBlocks);
    partial_bad_.allocate(kReduceBlocks);
    words_.allocate(kWords);
    fill_any(words_.data(), kWords, 0.0);  // kLoss: no pending block loss
    graphs_.set_mode(cfg_.unbounded() ? GraphCache::Mode::kOff : GraphCache::requested());
    push_params();
  }

  Guard guard() const { return Guard(device_); }
  void sync() const { stream_.sync(); }
  // Device pointer to parameter i inside the flat buffer.
  T* param(int64_t i) const {
    return const_cast<T*>(params_.data()) + offsets_[static_cast<size_t>(i)];
  }
  // Device parameters -> the caller's host arrays given at construction.
  void pull_params() {
    for (int64_t i = 0; i < cfg_.num_params(); ++i)
      download(host_params_[static_cast<size_t>(i)], param(i), cfg_.param_size(i));
    sync();
  }
  // The caller's host arrays -> device parameters.
  void push_params() {
    for (int64_t i = 0; i < cfg_.num_params(); ++i)
      upload(param(i), host_params_[static_cast<size_t>(i)], cfg_.param_size(i));
    sync();
  }
  std::vector<int64_t> graph_stats(std::string* first_failure) const {
    const GraphStats& g = graphs_.stats();
    if (first_failure != nullptr) *first_failure = g.first_failure;
    return {g.recorded, g.replayed, g.direct, g.failed};
  }
  // Waits for all work on the device first: the producer's writes, on any stream.
  ScanResult scan_device(const ScanRequest& req) {
    check_on_device(req.array);
    if (req.mask != nullptr) check_on_device(*req.mask);
    TBPTT_CUDA_CHECK(cudaDeviceSynchronize());
    return scan(req);
  }

  // ---- memory -----------------------------------------------------------
  // keep = true preserves the prefix (ring growth); else the contents are
  // fresh (NaN bytes in TBPTT_NAN_FILL builds). Any (re)allocation drops the
  // recorded graphs, which hold pointers into buffers.
  template <typename U>
  void resize(DeviceBuffer<U>& buf, size_t n, bool keep) {
    graphs_.clear();
    if (keep) {
      buf.grow_keep(n, stream());
    } else if (buf.size() != n) {
      buf.allocate(n);
    } else {
#if defined(TBPTT_NAN_FILL)
      if (n > 0) TBPTT_CUDA_CHECK(cudaMemsetAsync(buf.data(), 0xFF, buf.bytes(), stream()));
#endif
    }
  }
  template <typename U>
  void copy_raw(U* dst, const U* src, size_t n) const {
    if (n > 0)
      TBPTT_CUDA_CHECK(
          cudaMemcpyAsync(dst, src, n * sizeof(U), cudaMemcpyDeviceToDevice, stream()));
  }
  // Bytes of device memory: larger rings are refused up front.
  double memory_limit() const {
    size_t free_bytes = 0, total = 0;
    if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) return 0.0;
    return static_cast<double>(total);
  }
  void copy(T* dst, const T* src, int64_t n) const {
    transfer(dst, src, n, cudaMemcpyDeviceToDevice);
  }
  void upload(T* dst, const T* src, int64_t n) const {
    transfer(dst, src, n, cudaMemcpyHostToDevice);
  }
  void download(T* dst, const T* src, int64_t n) const {
    transfer(dst, src, n, cudaMemcpyDeviceToHost);
  }
  void fill(T* dst, int64_t n, T value) const { fill_any(dst, n, value); }
  // Typed host <-> device copies of any element type (ids, flags, labels).
  template <typename U>
  void upload_raw(U* dst, const U* src, int64_t n) const {
    transfer_any(dst, src, n, cudaMemcpyHostToDevice);
  }
  template <typename U>
  void download_raw(U* dst, const U* src, int64_t n) const {
    transfer_any(dst, src, n, cudaMemcpyDeviceToHost);
  }
  // The ring now holds k steps of batch B: the all-ones vector of colsum
  // covers its k * B rows.
  void ring_resized(int64_t k, int64_t batch) {
    resize(ones_, static_cast<size_t>(k * batch), false);
    fill(ones_.data(), k * batch, T(1));
  }

  // ---- run ----------------------------------------------------------------
  // Device inputs: every pointer is device memory of this device, the
  // producer's writes are complete, labels are in range where read and the
  // mask is finite; the mask's nonzero count per step is kept for
  // load_inputs. Host inputs: nothing to check here.
  void check_inputs(const RunInputs& in) {
    mask_counts_.clear();
    if (in.device == nullptr) return;
    // bindings.cpp refuses these first; token ids come as host arrays only
    TBPTT_CHECK_ARG(cfg_.vocab_size == 0, "token inputs (an embedding) take host arrays of ids");
    const DeviceInputs& dv = *in.device;
    check_on_device(dv.x);
    check_on_device(dv.target);
    if (dv.has_mask) check_on_device(dv.mask);
    if (dv.has_resets) check_on_device(dv.resets);
    TBPTT_CUDA_CHECK(cudaDeviceSynchronize());  // the producer may have written on any stream
    check_device_values(dv, in.batch);
  }
  void begin_run(int64_t, int64_t) {}
  void params_changed() {}  // nothing derived from the parameters is cached

  // Steps [pos, pos + n) of the run's inputs into the ring slots of steps
  // [first, first + n) of st (the real store), and the chunk's mask count
  // into the pending block's.
  template <typename Store>
  void load_inputs(const RunInputs& in, int64_t pos, int64_t first, int64_t n,
                   const RingIndex& ring, Store& st, int64_t batch) {
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    if (in.device != nullptr) {
      load_device_inputs(*in.device, pos, seg, ns, st, batch);
    } else {
      load_host_inputs(in, pos, seg, ns, st, batch);
    }
  }

  // Forward only: steps [pos, pos + n) of x (or the ids and their embedding
  // rows) and resets into slots [0, n) of st (the forward-only store: no
  // mask, targets or row_loss; nothing is counted).
  template <typename Store>
  void load_forward_inputs(const ForwardInputs& in, int64_t pos, int64_t n, Store& st,
                           int64_t batch) {
    const int64_t rows = n * batch, src = pos * batch;
    load_x(in.x, src, rows, st, 0);
    load_resets(in.resets, src, rows, st, 0);
  }

  // With an embedding: x of steps [first, first + n) = the embedding rows of
  // their ids (st's own ids), one lookup kernel per ring segment.
  template <typename Store>
  void embed_rows(const RingIndex& ring, int64_t first, int64_t n, int64_t batch, Store& st) {
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    for (int i = 0; i < ns; ++i) {
      const int64_t r0 = seg[i].slot * batch;
      embed(st.ids.data() + r0, seg[i].count * batch, st.x.data() + r0 * D_);
    }
  }
  // grad_emb[ids[r]] += dx[r] for the n * batch rows of steps [first, first + n)
  // (ids in the ring, dx window-indexed: row block j holds step first + j),
  // in row order: one kernel per ring segment, the segments in step order,
  // each summing its rows in order (kernels.cuh): deterministic, no atomics.
  void scatter_add_rows(const RingIndex& ring, int64_t first, int64_t n, int64_t batch,
                        const int64_t* ids, const T* dx, int64_t width, T* grad_emb) {
    if (width <= 0) return;
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    const dim3 grid(static_cast<unsigned>(grid_for(width)), kScatterParts);
    for (int i = 0; i < ns; ++i) {
      scatter_add_rows_kernel<T>
          <<<grid, kThreads, 0, stream()>>>(seg[i].count * batch, width, ids + seg[i].slot * batch,
                                            dx + seg[i].offset * batch * width, grad_emb);
      TBPTT_CUDA_CHECK(cudaGetLastError());
    }
  }

  // f() enqueues one per-step launch sequence; replayed from a CUDA graph when
  // graphs are on and the same sequence (key) has come before.
  template <typename F>
  void step_sequence(const StepKey& key, F&& f) {
    const GraphKey g{reinterpret_cast<uintptr_t>(key.store),
                     reinterpret_cast<uintptr_t>(key.state),
                     key.layer,
                     key.slot0,
                     key.steps,
                     key.backward};
    graphs_.run(g, stream(), f);
  }
  // The whole batch is one group: every kernel spans all rows.
  template <typename F>
  void batch_groups(int64_t batch, F&& f) {
    f(int64_t{0}, batch);
  }

  // ---- products over steps [first, first + n) ------------------------------
  // c = alpha * a op(w) + beta * c over n * batch rows; op(w) = w^T ([cols, kdim]
  // stored, trans_w) or w ([kdim, cols] stored, row stride ldw).
  void product(const RingIndex& ring, int64_t first, int64_t n, int64_t batch, Rows<T> a,
               bool trans_w, const T* w, int64_t ldw, Rows<T> c, T alpha, T beta) {
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    for (int i = 0; i < ns; ++i) {
      blas_.gemm<T>(false, trans_w, seg[i].count * batch, c.width, a.width, alpha,
                    rows_at(a, seg[i], batch), a.width, w, ldw, beta, rows_at(c, seg[i], batch),
                    c.width);
    }
  }

  // out[a.width, b.width] += alpha * a^T b over n * batch rows.
  void reduce(const RingIndex& ring, int64_t first, int64_t n, int64_t batch, Rows<T> a, Rows<T> b,
              T alpha, T* out) {
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    for (int i = 0; i < ns; ++i) {
      blas_.gemm<T>(true, false, a.width, b.width, seg[i].count * batch, alpha,
                    rows_at(a, seg[i], batch), a.width, rows_at(b, seg[i], batch), b.width, T(1),
                    out, b.width);
    }
  }

  // out[a.width] += alpha * column sums of a over n * batch rows (a^T ones).
  void colsum(const RingIndex& ring, int64_t first, int64_t n, int64_t batch, Rows<T> a, T alpha,
              T* out) {
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    for (int i = 0; i < ns; ++i) {
      blas_.gemv_t<T>(seg[i].count * batch, a.width, alpha, rows_at(a, seg[i], batch), a.width,
                      ones_.data(), T(1), out);
    }
  }

  // Every row of c (n * batch rows) = row [c.width].
  void fill_rows(const RingIndex& ring, int64_t first, int64_t n, int64_t batch, Rows<T> c,
                 const T* row) {
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    for (int i = 0; i < ns; ++i) {
      const int64_t rows = seg[i].count * batch;
      fill_rows_kernel<T><<<grid_for(rows * c.width), kThreads, 0, stream()>>>(
          rows, c.width, row, rows_at(c, seg[i], batch));
      TBPTT_CUDA_CHECK(cudaGetLastError());
    }
  }

  // ---- per step -----------------------------------------------------------
  // out[B, G*H] = h_in W_hh^T + beta * out.
  void recurrent(int64_t l, int64_t batch, const T* h_in, T beta, T* out) {
    blas_.gemm<T>(false, true, batch, GH_, H_, T(1), h_in, H_, w_hh(l), H_, beta, out, GH_);
  }

  // out[B, H] = dG W_hh + beta * out (dG [B, G*H]).
  void recurrent_grad(int64_t l, int64_t batch, const T* dg, T beta, T* out) {
    blas_.gemm<T>(false, false, batch, H_, GH_, T(1), dg, GH_, w_hh(l), H_, beta, out, H_);
  }

  // The state entering a step (cpu/device.h): h_in = resets ? h_init : h_prev,
  // and c_in likewise when it is set.
  void enter_state(int64_t batch, int64_t hidden, const T* h_prev, const T* c_prev, const T* h_init,
                   const T* c_init, const uint8_t* resets, T* h_in, T* c_in) {
    const int64_t bh = batch * hidden;
    enter_state_kernel<T><<<grid_for(bh), kThreads, 0, stream()>>>(
        batch, hidden, h_prev, c_prev, h_init, c_init, resets, h_in, c_in);
    TBPTT_CUDA_CHECK(cudaGetLastError());
  }

  // No gradient crosses a reset: the carry rows where this step reset are 0.
  void cut_carry(int64_t batch, int64_t hidden, const uint8_t* resets, T* dh_carry, T* dc_carry) {
    const int64_t bh = batch * hidden;
    cut_carry_kernel<T>
        <<<grid_for(bh), kThreads, 0, stream()>>>(batch, hidden, resets, dh_carry, dc_carry);
    TBPTT_CUDA_CHECK(cudaGetLastError());
  }

  template <typename Cell>
  void cell_forward(const cells::StepFwd<T>& s) {
    cell_forward_kernel<Cell, T><<<grid_for(s.batch * s.hidden), kThreads, 0, stream()>>>(s);
    TBPTT_CUDA_CHECK(cudaGetLastError());
  }
  template <typename Cell>
  void cell_backward(const cells::StepBwd<T>& s, bool has_carry) {
    const int grid = grid_for(s.batch * s.hidden);
    if (has_carry) {
      cell_backward_kernel<Cell, true, T><<<grid, kThreads, 0, stream()>>>(s);
    } else {
      cell_backward_kernel<Cell, false, T><<<grid, kThreads, 0, stream()>>>(s);
    }
    TBPTT_CUDA_CHECK(cudaGetLastError());
  }

  // ---- loss ---------------------------------------------------------------
  // Turns y (in st.dy, b_out already added) into the unnormalised dLoss/dy in
  // place for steps [first, first + n), one loss kernel per ring segment;
  // copies y to `outputs` ([n, B, O] host) if given, through a device staging
  // buffer and one copy; with accumulate, writes each row's mask * l to
  // in.row_loss and adds the chunk's sum of them (fixed order) to the pending
  // block's running loss sum (the device word kLoss). Mask, targets and
  // labels come from `in`, the real store. (`in` is not const here, unlike
  // cpu/device.h, because row_loss is written.)
  template <typename Store>
  void loss_pass(const RingIndex& ring, Store& st, Store& in, int64_t first, int64_t n,
                 int64_t batch, const T* /*b_out: already in y*/, T* outputs, bool accumulate) {
    Segment seg[2];
    const int ns = ring.segments(first, n, seg);
    const bool ce = cfg_.loss == LossKind::kCrossEntropy;
    T* staging = nullptr;
    if (outputs != nullptr) {
      const size_t need = static_cast<size_t>(n * batch * O_);
      if (outputs_.size() < need) outputs_.allocate(need);  // graphs never hold it
      staging = outputs_.data();
    }
    for (int i = 0; i < ns; ++i) {
      const int64_t r0 = seg[i].slot * batch, rows = seg[i].count * batch;
      LossArgs<T> a{};
      a.rows = rows;
      a.out_size = O_;
      a.cross_entropy = ce;
      a.y = st.dy.data() + r0 * O_;
      a.mask = in.mask.data() + r0;
      a.target = ce ? nullptr : in.target.data() + r0 * O_;
      a.label = ce ? in.label.data() + r0 : nullptr;
      a.outputs = staging == nullptr ? nullptr : staging + seg[i].offset * batch * O_;
      a.row_loss = accumulate ? in.row_loss.data() + r0 : nullptr;
      constexpr int64_t kRowsPerBlock = kThreads / 32;
      const int grid = static_cast<int>(std::max<int64_t>(
          1, std::min<int64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock, 8192)));
      loss_kernel<T><<<grid, kThreads, 0, stream()>>>(a);
      TBPTT_CUDA_CHECK(cudaGetLastError());
    }
    if (accumulate && ns > 0) {
      const Segment s1 = ns > 1 ? seg[1] : Segment{0, 0, 0};
      add_sum_ranges_kernel<<<1, kThreads, 0, stream()>>>(in.row_loss.data(), seg[0].slot * batch,
                                                          seg[0].count * batch, s1.slot * batch,
                                                          s1.count * batch, words_.data() + kLoss);
      TBPTT_CUDA_CHECK(cudaGetLastError());
    }
    if (staging != nullptr) download(outputs, staging, n * batch * O_);
  }

  // The pending block's masked loss sum (the device word kLoss: each chunk's
  // rows summed in a fixed order and added by loss_pass, so the running sum
  // is taken chunk by chunk as on the CPU; one sync) and its mask count
  // (counted on the host as the inputs came in). Clears nothing.
  template <typename Store>
  std::pair<double, double> peek_block_loss(const RingIndex&, const Store&, int64_t, int64_t,
                                            int64_t) const {
    return {read_words(kLoss, 1)[0], pend_mask_};
  }
  // A checkpoint's pending block: its loss sum and mask count become these
  // (exactly: a resumed run adds its chunks to the same running sum).
  template <typename Store>
  void restore_block_loss(const RingIndex&, Store&, int64_t, int64_t, int64_t, double loss,
                          double count) {
    fill_any(words_.data() + kLoss, 1, loss);
    pend_mask_ = count;
  }
  // The block now ending: peek_block_loss, then both cleared.
  template <typename Store>
  std::pair<double, double> take_block_loss(const RingIndex& ring, const Store& st, int64_t first,
                                            int64_t n, int64_t batch) {
    const std::pair<double, double> r = peek_block_loss(ring, st, first, n, batch);
    clear_block_loss();
    return r;
  }
  void clear_block_loss() {
    fill_any(words_.data() + kLoss, 1, 0.0);
    pend_mask_ = 0.0;
  }

  // ---- gradient and optimizer ----------------------------------------------
  struct GradStatus {
    double sumsq;
    bool finite;
  };
  // Sum of squares (double) and finiteness of g[n]: a fixed-grid partial
  // reduction and one finishing thread (deterministic), one sync.
  GradStatus grad_status(const T* g, int64_t n) {
    grad_norm_partial_kernel<T><<<kReduceBlocks, kThreads, 0, stream()>>>(
        n, g, partial_sumsq_.data(), partial_bad_.data());
    TBPTT_CUDA_CHECK(cudaGetLastError());
    finish_norm_kernel<<<1, 1, 0, stream()>>>(partial_sumsq_.data(), partial_bad_.data(),
                                              kReduceBlocks, words_.data() + kSumSq);
    TBPTT_CUDA_CHECK(cudaGetLastError());
    const double* w = read_words(kSumSq, 2);
    return {w[0], w[1] == 0.0};
  }

  // One optimizer kernel over the flat parameter buffer: the clip
  // coefficient applied, then torch.optim.SGD / Adam (default flags).
  template <typename Step>
  void optimizer_step(const Step& step, const T* grad, T* m, T* v) {
    OptArgs o{};
    o.adam = cfg_.optimizer == OptimizerKind::kAdam;
    o.nesterov = cfg_.nesterov;
    o.coef = step.coef;
    o.lr = cfg_.lr;
    o.momentum = cfg_.momentum;
    o.weight_decay = cfg_.weight_decay;
    o.beta1 = cfg_.beta1;
    o.beta2 = cfg_.beta2;
    o.eps = cfg_.eps;
    if (o.adam) {
      const double s = static_cast<double>(step.adam_step);
      o.step_size = cfg_.lr / (1.0 - std::pow(cfg_.beta1, s));
      o.bc2_sqrt = std::sqrt(1.0 - std::pow(cfg_.beta2, s));
    }
    const int64_t n = offsets_.back();
    optimizer_kernel<T><<<grid_for(n), kThreads, 0, stream()>>>(n, o, params_.data(), grad, m, v);
    TBPTT_CUDA_CHECK(cudaGetLastError());
  }

 private:
  // Slots of words_ / words_host_.
  static constexpr int kLoss = 0;   // the pending block's masked loss sum (running)
  static constexpr int kSumSq = 1;  // gradient sum of squares, then the non-finite flag
  static constexpr int kWords = 4;
  // scatter_add_rows: grid rows the ids are spread over (id % kScatterParts).
  static constexpr unsigned kScatterParts = 16;

  cudaStream_t stream() const { return stream_.get(); }
  const T* w_hh(int64_t l) const { return param(cfg_.layer_param(l, 1)); }
  const T* embedding() const { return param(0); }  // [V, D], with an embedding only

  // Rows of segment s of r: ring rows at the segment's slot, window rows at
  // its offset (row block j of a window holds step first + j).
  static T* rows_at(Rows<T> r, const Segment& s, int64_t batch) {
    return r.base + (r.ring ? s.slot : s.offset) * batch * r.width;
  }

  void transfer(T* dst, const T* src, int64_t n, cudaMemcpyKind kind) const {
    transfer_any(dst, src, n, kind);
  }
  // n elements of U, stream-ordered. A copy to pageable host memory returns
  // once it is done; one from pageable host memory once the source is read.
  template <typename U>
  void transfer_any(U* dst, const U* src, int64_t n, cudaMemcpyKind kind) const {
    if (n <= 0) return;
    TBPTT_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(U), kind, stream()));
  }
  template <typename U>
  void fill_any(U* dst, int64_t n, U value) const {
    if (n <= 0) return;
    fill_kernel<U><<<grid_for(n), kThreads, 0, stream()>>>(n, value, dst);
    TBPTT_CUDA_CHECK(cudaGetLastError());
  }

  // words_[at, at + count) to the pinned host words; waits for the stream.
  const double* read_words(int at, int count) const {
    TBPTT_CUDA_CHECK(cudaMemcpyAsync(words_host_.data() + at, words_.data() + at,
                                     static_cast<size_t>(count) * sizeof(double),
                                     cudaMemcpyDeviceToHost, stream()));
    sync();
    return words_host_.data() + at;
  }

  // ---- inputs -------------------------------------------------------------
  // Host arrays already in the engine's types (bindings.cpp): one copy per
  // array and segment; the mask is counted here.
  template <typename Store>
  void load_host_inputs(const RunInputs& in, int64_t pos, const Segment* seg, int ns, Store& st,
                        int64_t batch) {
    const T* mask = static_cast<const T*>(in.mask);
    for (int i = 0; i < ns; ++i) {
      const int64_t rows = seg[i].count * batch, r0 = seg[i].slot * batch,
                    src = (pos + seg[i].offset) * batch;
      load_x(in.x, src, rows, st, r0);
      if (mask != nullptr) {
        upload(st.mask.data() + r0, mask + src, rows);
        for (int64_t r = 0; r < rows; ++r) pend_mask_ += mask[src + r] != T(0) ? 1.0 : 0.0;
      } else {
        fill(st.mask.data() + r0, rows, T(1));
        pend_mask_ += static_cast<double>(rows);
      }
      load_resets(in.resets, src, rows, st, r0);
      if (cfg_.loss == LossKind::kCrossEntropy) {
        upload_raw(st.label.data() + r0, static_cast<const int64_t*>(in.target) + src, rows);
      } else {
        upload(st.target.data() + r0 * O_, static_cast<const T*>(in.target) + src * O_, rows * O_);
      }
    }
  }

  // Rows [r0, r0 + rows) of st.x from rows [src, src + rows) of the caller's
  // host x: one copy, or with an embedding the ids copied into st.ids and
  // their embedding rows looked up on the device (embed_rows_kernel).
  template <typename Store>
  void load_x(const void* x, int64_t src, int64_t rows, Store& st, int64_t r0) {
    if (cfg_.vocab_size > 0) {
      upload_raw(st.ids.data() + r0, static_cast<const int64_t*>(x) + src, rows);
      embed(st.ids.data() + r0, rows, st.x.data() + r0 * D_);
      return;
    }
    upload(st.x.data() + r0 * D_, static_cast<const T*>(x) + src * D_, rows * D_);
  }
  // Rows [r0, r0 + rows) of st.resets from the caller's host resets (nullptr: zeros).
  template <typename Store>
  void load_resets(const uint8_t* resets, int64_t src, int64_t rows, Store& st, int64_t r0) {
    if (resets != nullptr) {
      upload_raw(st.resets.data() + r0, resets + src, rows);
    } else if (rows > 0) {
      TBPTT_CUDA_CHECK(
          cudaMemsetAsync(st.resets.data() + r0, 0, static_cast<size_t>(rows), stream()));
    }
  }
  // x [rows, D] = the embedding rows of ids [rows] (device arrays).
  void embed(const int64_t* ids, int64_t rows, T* x) {
    if (rows <= 0 || D_ <= 0) return;
    embed_rows_kernel<T>
        <<<grid_for(rows * D_), kThreads, 0, stream()>>>(rows, D_, ids, embedding(), x);
    TBPTT_CUDA_CHECK(cudaGetLastError());
  }

  // Device arrays read in place (inputs.cuh's gather_kernel): cast, strided
  // reads, flags to 0/1, unread labels and targets to 0; the mask count from
  // check_inputs' scan.
  template <typename Store>
  void load_device_inputs(const DeviceInputs& dv, int64_t pos, const Segment* seg, int ns,
                          Store& st, int64_t batch) {
    const View x = make_view(dv.x), target = make_view(dv.target);
    const View mask = dv.has_mask ? make_view(dv.mask) : no_view();
    const View none = no_view();
    for (int i = 0; i < ns; ++i) {
      const int64_t rows = seg[i].count * batch, r0 = seg[i].slot * batch,
                    src = (pos + seg[i].offset) * batch;
      gather<T>(x, GatherKind::kValue, none, 1, src * D_, rows * D_, st.x.data() + r0 * D_);
      if (dv.has_mask) {
        gather<T>(mask, GatherKind::kFlag, none, 1, src, rows, st.mask.data() + r0);
        for (int64_t s = 0; s < seg[i].count; ++s)
          pend_mask_ +=
              static_cast<double>(mask_counts_[static_cast<size_t>(pos + seg[i].offset + s)]);
      } else {
        fill(st.mask.data() + r0, rows, T(1));
        pend_mask_ += static_cast<double>(rows);
      }
      if (dv.has_resets) {
        gather<uint8_t>(make_view(dv.resets), GatherKind::kFlag, none, 1, src, rows,
                        st.resets.data() + r0);
      } else {
        TBPTT_CUDA_CHECK(
            cudaMemsetAsync(st.resets.data() + r0, 0, static_cast<size_t>(rows), stream()));
      }
      if (cfg_.loss == LossKind::kCrossEntropy) {
        gather<int64_t>(target, GatherKind::kLabel, mask, 1, src, rows, st.label.data() + r0);
      } else {
        gather<T>(target, GatherKind::kValue, mask, O_, src * O_, rows * O_,
                  st.target.data() + r0 * O_);
      }
    }
  }

  template <typename D>
  void gather(const View& src, GatherKind kind, const View& mask, int64_t mask_div, int64_t base,
              int64_t n, D* dst) {
    if (n <= 0) return;
    gather_kernel<D><<<grid_for(n), kThreads, 0, stream()>>>(src, static_cast<int>(kind), mask,
                                                             mask_div, base, n, dst);
    TBPTT_CUDA_CHECK(cudaGetLastError());
  }

  // A caller's device array must be device (or managed) memory of our device.
  void check_on_device(const DeviceView& v) const {
    cudaPointerAttributes attr{};
    const cudaError_t e = cudaPointerGetAttributes(&attr, v.data);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      throw std::invalid_argument(
          str_cat(v.name, " is not a CUDA device array (", cudaGetErrorString(e), ")"));
    }
    TBPTT_CHECK_ARG(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged, v.name,
                    " does not point to CUDA device memory");
    TBPTT_CHECK_ARG(attr.device == device_, v.name, " is on CUDA device ", attr.device,
                    " but this trainer runs on device ", device_);
  }

  // What load_device_inputs relies on, checked on the device as bindings.cpp
  // checks host labels: labels in range where read, a mask without NaN/Inf;
  // and the mask's nonzero count per step (the loss normalisation).
  void check_device_values(const DeviceInputs& dv, int64_t batch) {
    if (cfg_.loss == LossKind::kCrossEntropy) {
      ScanRequest req;
      req.array = dv.target;
      req.kind = ScanKind::kClass;
      req.mask = dv.has_mask ? &dv.mask : nullptr;
      req.num_classes = O_;
      const ScanResult r = scan(req);
      TBPTT_CHECK_ARG(r.first_bad < 0, "target must hold class indices in [0, ", O_, "), got ",
                      r.ivalue);
    }
    if (dv.has_mask) {
      ScanRequest req;
      req.array = dv.mask;
      req.kind = ScanKind::kFlag;
      req.row_len = batch;
      ScanResult r = scan(req);
      TBPTT_CHECK_ARG(r.first_bad < 0, "mask must not contain NaN or Inf");
      mask_counts_ = std::move(r.row_counts);
    }
  }

  // One scan_kernel pass over a device array and its result (one sync; two
  // when a bad element is found).
  ScanResult scan(const ScanRequest& req) {
    ScanResult r;
    const int64_t n = req.array.size();
    if (n == 0) return r;
    const int64_t rows = req.kind == ScanKind::kFlag && req.row_len > 0 ? n / req.row_len : 0;
    // words[0]: first bad index (~0 = none); words[1 + r]: nonzero count of row r
    if (scan_words_.size() < static_cast<size_t>(1 + rows)) {
      scan_words_.allocate(static_cast<size_t>(1 + rows));
    }
    unsigned long long* words = scan_words_.data();
    TBPTT_CUDA_CHECK(cudaMemsetAsync(words, 0xFF, sizeof(unsigned long long), stream()));
    if (rows > 0) {
      TBPTT_CUDA_CHECK(cudaMemsetAsync(
          words + 1, 0, static_cast<size_t>(rows) * sizeof(unsigned long long), stream()));
    }
    const View a = make_view(req.array);
    scan_kernel<<<grid_for(n), kThreads, 0, stream()>>>(
        a, static_cast<int>(req.kind), req.mask != nullptr ? make_view(*req.mask) : no_view(),
        std::max<int64_t>(1, req.mask_div), req.row_len, req.num_classes, n,
        std::is_same<T, float>::value, words, rows > 0 ? words + 1 : nullptr);
    TBPTT_CUDA_CHECK(cudaGetLastError());
    std::vector<unsigned long long> host(static_cast<size_t>(1 + rows));
    TBPTT_CUDA_CHECK(cudaMemcpyAsync(host.data(), words, host.size() * sizeof(unsigned long long),
                                     cudaMemcpyDeviceToHost, stream()));
    sync();
    r.row_counts.assign(host.begin() + 1, host.end());
    if (host[0] != ~0ULL) {
      r.first_bad = static_cast<int64_t>(host[0]);
      if (scan_value_.size() == 0) scan_value_.allocate(2);
      double* value = scan_value_.data();
      read_element_kernel<<<1, 1, 0, stream()>>>(a, r.first_bad, value,
                                                 reinterpret_cast<long long*>(value + 1));
      TBPTT_CUDA_CHECK(cudaGetLastError());
      double both[2] = {0.0, 0.0};
      TBPTT_CUDA_CHECK(
          cudaMemcpyAsync(both, value, sizeof(both), cudaMemcpyDeviceToHost, stream()));
      sync();
      r.value = both[0];
      std::memcpy(&r.ivalue, &both[1], sizeof(r.ivalue));
    }
    return r;
  }

  // ---- data -------------------------------------------------------------
  const int device_;  // first: require_device() before any other CUDA call
  // The engine's configuration, by reference: set_hyperparams changes its
  // optimizer fields, which optimizer_step reads at every update.
  const Config& cfg_;
  const int64_t H_, D_, O_, GH_;
  const std::vector<T*> host_params_;   // P borrowed host arrays (pull/push)
  const std::vector<int64_t> offsets_;  // [P + 1] Config::param_offsets() of the flat buffers
  Stream stream_;
  Blas blas_;                           // bound to stream_
  mutable HostStatus words_host_;       // [kWords] pinned: the per-update results read back
  DeviceBuffer<T> params_;              // flat [offsets_.back()], canonical order
  mutable DeviceBuffer<double> words_;  // [kWords]
  DeviceBuffer<double> partial_sumsq_;  // [kReduceBlocks]
  DeviceBuffer<int> partial_bad_;       // [kReduceBlocks]
  DeviceBuffer<T> ones_;                // [K * B] all ones: colsum as gemv
  DeviceBuffer<T> outputs_;             // [>= n * B * O] staging of a chunk's outputs
  DeviceBuffer<unsigned long long> scan_words_;  // scan(): first bad index, row counts
  DeviceBuffer<double> scan_value_;              // scan(): the bad element (double, int64 bits)
  std::vector<int64_t> mask_counts_;  // device inputs: nonzero mask entries per step of run()
  double pend_mask_ = 0.0;            // mask count of the pending block (counted on the host)
  GraphCache graphs_;                 // TBPTT_CUDA_GRAPHS: per-step sequences as CUDA graphs
};

}  // namespace tbptt::cuda
