// CUDA TBPTT(k1, k2) engine: the GPU twin of cpu/engine.cpp, with the same
// schedule, ring (cpu/ring_buffer.h's RingIndex: all slot arithmetic in one
// place) and semantics; tbptt/engine_api.h has the contract and the shape
// legend, python/tbptt_fast/reference.py is the yardstick.
//
// Where things live. Parameters (one flat buffer, canonical order), gradient,
// optimizer state, the ring of stored history, the forward state and the
// steps of a chunk live on the device. The host copies a chunk's inputs in
// (<= 2 copies per array: the ring segments), outputs out when asked, and one
// 4-word status per update; nothing per step.
//
// Schedule. run() cuts the data into chunks that end at update points and
// processes each chunk layer-major: one GEMM per layer (and ring segment) for
// the input projection, then per step one GEMM (h W_hh^T) and ONE fused cell
// kernel that writes the gates, the cache and the next step's entering state
// with its resets applied; the readout is one GEMM and the loss + dLoss/dy
// one fused kernel. An update runs the backward over its window (w, t] layer
// by layer from the top: per step ONE fused cell kernel (which also applies
// the reset cut to the carry) and one GEMM (dG W_hh); then per layer and ring
// segment one GEMM per weight gradient, one gemv per bias gradient and one
// GEMM for the gradient sent below. Then a deterministic reduction (loss of
// the block, gradient norm, non-finite flag) and one optimizer kernel that
// does nothing when the update is non-finite; the host reads the status once
// and raises the exact engine_api.md error. Each run() ends with one stream
// synchronisation.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "cpu/ring_buffer.h"
#include "cuda/cells/gru.cuh"
#include "cuda/cells/lstm.cuh"
#include "cuda/cells/rnn.cuh"
#include "cuda/check.h"
#include "cuda/context.h"
#include "cuda/cublas.h"
#include "cuda/device.h"
#include "cuda/graphs.h"
#include "cuda/inputs.cuh"
#include "cuda/kernels.cuh"
#include "tbptt/engine_api.h"
#include "tbptt/errors.h"
#include "tbptt/schedule.h"

namespace tbptt::cuda {
namespace {

using cpu::RingIndex;
using cpu::Segment;

int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 8192)));
}

// (Re)sizes a buffer: keep preserves the prefix (ring growth), else fresh.
template <typename U>
void size_buffer(DeviceBuffer<U>& buf, size_t n, bool keep, cudaStream_t stream) {
  if (keep) {
    buf.grow_keep(n, stream);
  } else if (buf.size() != n) {
    buf.allocate(n);
  }
}

// Per-layer cache arrays, each [K, B, width]; meaning as in cells/cell.cuh.
template <typename T>
struct LayerStore {
  DeviceBuffer<T> gates;  // [K, B, G*H]
  DeviceBuffer<T> h_in;   // [K, B, H]
  DeviceBuffer<T> c_in;   // [K, B, H] lstm only
  DeviceBuffer<T> aux;    // [K, B, H] lstm, gru
  DeviceBuffer<T> h_out;  // [K, B, H] lstm, gru (rnn: h_out is gates)
};

// Device twin of cpu::Store: the real forward history, or (recompute) the
// re-run window, addressed by the same slots.
template <typename T>
struct Store {
  std::vector<LayerStore<T>> layers;
  DeviceBuffer<T> x;              // [K, B, D] layer-0 input (real store only)
  DeviceBuffer<T> mask;           // [K, B] 0/1 (real store only)
  DeviceBuffer<uint8_t> resets;   // [K, B] 0/1 (real store only)
  DeviceBuffer<T> target;         // [K, B, O] mse targets (real store only)
  DeviceBuffer<int64_t> label;    // [K, B] cross_entropy classes (real store only)
  DeviceBuffer<double> row_loss;  // [K, B] mask * l of each row (real store only)
  DeviceBuffer<T> dy;             // [K, B, O] y, then the unnormalised dLoss/dy

  void allocate(const Config& cfg, int64_t k, int64_t b, bool with_inputs, bool keep,
                cudaStream_t stream) {
    const int64_t h = cfg.hidden_size, gh = cfg.gates() * h;
    const bool lstm = cfg.cell == CellKind::kLstm, rnn = cfg.gates() == 1;
    layers.resize(static_cast<size_t>(cfg.num_layers));
    const auto n = [&](int64_t w) { return static_cast<size_t>(k * b * w); };
    for (auto& ls : layers) {
      size_buffer(ls.gates, n(gh), keep, stream);
      size_buffer(ls.h_in, n(h), keep, stream);
      size_buffer(ls.c_in, lstm ? n(h) : 0, keep, stream);
      size_buffer(ls.aux, rnn ? 0 : n(h), keep, stream);
      size_buffer(ls.h_out, rnn ? 0 : n(h), keep, stream);
    }
    size_buffer(dy, n(cfg.output_size), keep, stream);
    if (with_inputs) {
      const bool ce = cfg.loss == LossKind::kCrossEntropy;
      size_buffer(x, n(cfg.input_size), keep, stream);
      size_buffer(mask, n(1), keep, stream);
      size_buffer(resets, n(1), keep, stream);
      size_buffer(target, ce ? 0 : n(cfg.output_size), keep, stream);
      size_buffer(label, ce ? n(1) : 0, keep, stream);
      size_buffer(row_loss, n(1), keep, stream);
    }
  }
};

template <typename T, CellKind K>
class CudaEngine final : public EngineBase {
  static constexpr bool kLstm = K == CellKind::kLstm;
  static constexpr bool kGru = K == CellKind::kGru;
  static constexpr bool kRnn = K == CellKind::kRnnTanh || K == CellKind::kRnnRelu;

 public:
  CudaEngine(const Config& cfg, const std::vector<void*>& params)
      : cfg_(cfg),
        L_(cfg.num_layers),
        H_(cfg.hidden_size),
        D_(cfg.input_size),
        O_(cfg.output_size),
        GH_(cfg.gates() * cfg.hidden_size),
        S_(cfg.state_per_layer()),
        device_(require_device()),
        stream_(),
        blas_(stream_.get()),
        status_host_(kStatusWords) {
    cfg_.validate();
    host_params_ = typed_params<T>(cfg_, params);
    offsets_ = cfg_.param_offsets();
    const int64_t off = n_params();
    params_.allocate(static_cast<size_t>(off));
    grad_.allocate(static_cast<size_t>(off));
    if (cfg_.optimizer == OptimizerKind::kAdam) {
      m_.allocate(static_cast<size_t>(off));
      v_.allocate(static_cast<size_t>(off));
      TBPTT_CUDA_CHECK(cudaMemsetAsync(m_.data(), 0, m_.bytes(), stream_.get()));
      TBPTT_CUDA_CHECK(cudaMemsetAsync(v_.data(), 0, v_.bytes(), stream_.get()));
    } else if (cfg_.momentum != 0.0) {
      m_.allocate(static_cast<size_t>(off));
      TBPTT_CUDA_CHECK(cudaMemsetAsync(m_.data(), 0, m_.bytes(), stream_.get()));
    }
    partial_sumsq_.allocate(kReduceBlocks);
    partial_bad_.allocate(kReduceBlocks);
    status_.allocate(kStatusWords);
    ring_.set_capacity(cfg_.ring_capacity());
    graphs_.set_mode(cfg_.unbounded() ? GraphCache::Mode::kOff : GraphCache::requested());
    push_params();
  }

  const Config& config() const override { return cfg_; }

  void reset(const std::vector<const void*>* initial_state, int64_t batch) override {
    const DeviceGuard guard(device_);
    sched_.reset();
    pend_mask_ = 0.0;
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
      h2d(init_.data() + i * bh, static_cast<const T*>((*initial_state)[static_cast<size_t>(i)]),
          bh);
    }
    d2d(state_.data(), init_.data(), L_ * S_ * bh);
    stream_.sync();  // the caller's arrays may go away after return
    has_state_ = has_init_ = true;
  }

  RunResult run(const RunInputs& in) override {
    const DeviceGuard guard(device_);
    TBPTT_CHECK_ARG(in.steps >= 1, "x must have at least one step, got ", in.steps);
    TBPTT_CHECK_ARG(in.batch >= 1, "batch must be >= 1, got ", in.batch);
    if (in.device != nullptr) {
      const DeviceInputs& dv = *in.device;
      check_on_device(dv.x);
      check_on_device(dv.target);
      if (dv.has_mask) check_on_device(dv.mask);
      if (dv.has_resets) check_on_device(dv.resets);
      // The producer may have written the inputs on any stream.
      TBPTT_CUDA_CHECK(cudaDeviceSynchronize());
      check_device_values(dv, in.batch);
    }
    if (has_state_) {
      TBPTT_CHECK_ARG(in.batch == B_, "batch size changed from ", B_, " to ", in.batch,
                      "; a trainer-level reset (reset_state() or initial_state) is needed first");
    } else {
      ensure_batch(in.batch);
      if (!has_init_) TBPTT_CUDA_CHECK(cudaMemsetAsync(init_.data(), 0, init_.bytes(), stream()));
      d2d(state_.data(), init_.data(), static_cast<int64_t>(init_.size()));
      has_state_ = true;
    }
    RunResult res;
    sched_.run(
        in.steps, in.flush,
        [&](int64_t pos, int64_t n) {
          if (cfg_.unbounded()) ensure_capacity(sched_.count() + n);
          forward_chunk(in, pos, n);
        },
        [&](const Block& b) { update(b, in.return_grads, res); });
    stream_.sync();
    return res;
  }

  RunResult flush(bool return_grads) override {
    const DeviceGuard guard(device_);
    RunResult res;
    sched_.run(
        0, true, [](int64_t, int64_t) {}, [&](const Block& b) { update(b, return_grads, res); });
    stream_.sync();
    return res;
  }

  int64_t state_batch() const override { return has_state_ ? B_ : 0; }

  void state(const std::vector<void*>& out) const override {
    TBPTT_CHECK_RT(has_state_, "no state: no step has run since the last reset");
    TBPTT_CHECK_ARG(static_cast<int64_t>(out.size()) == L_ * S_, "state needs ", L_ * S_,
                    " output arrays, got ", out.size());
    const DeviceGuard guard(device_);
    const int64_t bh = B_ * H_;
    for (int64_t i = 0; i < L_ * S_; ++i) {
      TBPTT_CUDA_CHECK(cudaMemcpyAsync(out[static_cast<size_t>(i)], state_.data() + i * bh,
                                       static_cast<size_t>(bh) * sizeof(T), cudaMemcpyDeviceToHost,
                                       stream_.get()));
    }
    stream_.sync();
  }

  ScanResult scan_device(const ScanRequest& req) override {
    const DeviceGuard guard(device_);
    check_on_device(req.array);
    if (req.mask != nullptr) check_on_device(*req.mask);
    TBPTT_CUDA_CHECK(cudaDeviceSynchronize());  // the producer's writes, on any stream
    return scan(req);
  }

  std::vector<int64_t> graph_stats(std::string* first_failure) const override {
    const GraphStats& g = graphs_.stats();
    if (first_failure != nullptr) *first_failure = g.first_failure;
    return {g.recorded, g.replayed, g.direct, g.failed};
  }

  int64_t step_count() const override { return sched_.count(); }
  int64_t pending() const override { return sched_.pending(); }
  int64_t stored_steps() const override { return sched_.stored_steps(); }

  void pull_params() override {
    const DeviceGuard guard(device_);
    for (int64_t i = 0; i < cfg_.num_params(); ++i) {
      TBPTT_CUDA_CHECK(cudaMemcpyAsync(host_params_[static_cast<size_t>(i)], param(i),
                                       static_cast<size_t>(cfg_.param_size(i)) * sizeof(T),
                                       cudaMemcpyDeviceToHost, stream()));
    }
    stream_.sync();
  }

  void push_params() override {
    const DeviceGuard guard(device_);
    for (int64_t i = 0; i < cfg_.num_params(); ++i)
      h2d(param(i), host_params_[static_cast<size_t>(i)], cfg_.param_size(i));
    stream_.sync();
  }

 private:
  // ---- small helpers ----------------------------------------------------
  cudaStream_t stream() const { return stream_.get(); }

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

  // One scan_kernel pass over a device array and its result (one sync).
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
        std::max<int64_t>(1, req.mask_div), req.row_len, req.num_classes, n, words,
        rows > 0 ? words + 1 : nullptr);
    TBPTT_CUDA_CHECK(cudaGetLastError());
    std::vector<unsigned long long> host(static_cast<size_t>(1 + rows));
    TBPTT_CUDA_CHECK(cudaMemcpyAsync(host.data(), words, host.size() * sizeof(unsigned long long),
                                     cudaMemcpyDeviceToHost, stream()));
    stream_.sync();
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
      stream_.sync();
      r.value = both[0];
      std::memcpy(&r.ivalue, &both[1], sizeof(r.ivalue));
    }
    return r;
  }

  // What copy_device_inputs relies on, checked on the device as bindings.cpp
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
    mask_counts_.clear();
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

  template <typename D>
  void gather(const View& src, GatherKind kind, const View& mask, int64_t mask_div, int64_t base,
              int64_t n, D* dst) {
    if (n <= 0) return;
    gather_kernel<D><<<grid_for(n), kThreads, 0, stream()>>>(src, static_cast<int>(kind), mask,
                                                             mask_div, base, n, dst);
    TBPTT_CUDA_CHECK(cudaGetLastError());
  }

  void h2d(T* dst, const T* src, int64_t n) {
    if (n > 0)
      TBPTT_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(T),
                                       cudaMemcpyHostToDevice, stream()));
  }
  template <typename U>
  void h2d_raw(U* dst, const U* src, int64_t n) {
    if (n > 0)
      TBPTT_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(U),
                                       cudaMemcpyHostToDevice, stream()));
  }
  void d2d(T* dst, const T* src, int64_t n) {
    if (n > 0)
      TBPTT_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(T),
                                       cudaMemcpyDeviceToDevice, stream()));
  }
  void fill(T* dst, int64_t n, T value) {
    if (n <= 0) return;
    fill_kernel<T><<<grid_for(n), kThreads, 0, stream()>>>(n, value, dst);
    TBPTT_CUDA_CHECK(cudaGetLastError());
  }

  // ---- parameters -------------------------------------------------------
  int64_t n_params() const { return offsets_.back(); }  // all parameters together
  T* param(int64_t i) { return params_.data() + offsets_[static_cast<size_t>(i)]; }
  T* grad(int64_t i) { return grad_.data() + offsets_[static_cast<size_t>(i)]; }
  const T* w_ih(int64_t l) { return param(4 * l); }
  const T* w_hh(int64_t l) { return param(4 * l + 1); }
  const T* b_ih(int64_t l) { return param(4 * l + 2); }
  const T* b_hh(int64_t l) { return param(4 * l + 3); }
  const T* w_out() { return param(4 * L_); }
  int64_t d_in(int64_t l) const { return l == 0 ? D_ : H_; }

  // ---- state --------------------------------------------------------------
  T* state_h(DeviceBuffer<T>& st, int64_t l) { return st.data() + (l * S_) * B_ * H_; }
  T* state_c(DeviceBuffer<T>& st, int64_t l) {
    return kLstm ? st.data() + (l * S_ + 1) * B_ * H_ : nullptr;
  }

  // ---- buffers ----------------------------------------------------------
  // Output h' of layer l, [K, B, H] (rnn: the gates array itself).
  T* layer_out(Store<T>& st, int64_t l) {
    auto& ls = st.layers[static_cast<size_t>(l)];
    return kRnn ? ls.gates.data() : ls.h_out.data();
  }
  T* h_in(Store<T>& st, int64_t l, int64_t slot) {
    return st.layers[static_cast<size_t>(l)].h_in.data() + slot * B_ * H_;
  }
  T* c_in(Store<T>& st, int64_t l, int64_t slot) {
    return kLstm ? st.layers[static_cast<size_t>(l)].c_in.data() + slot * B_ * H_ : nullptr;
  }
  T* gates(Store<T>& st, int64_t l, int64_t slot) {
    return st.layers[static_cast<size_t>(l)].gates.data() + slot * B_ * GH_;
  }
  T* aux(Store<T>& st, int64_t l, int64_t slot) {
    return kRnn ? nullptr : st.layers[static_cast<size_t>(l)].aux.data() + slot * B_ * H_;
  }
  T* h_out(Store<T>& st, int64_t l, int64_t slot) { return layer_out(st, l) + slot * B_ * H_; }
  const uint8_t* resets(int64_t slot) { return real_.resets.data() + slot * B_; }

  void allocate_ring(int64_t k, bool keep) {
    graphs_.clear();  // they hold pointers into the buffers below
    ring_.set_capacity(k);
    real_.allocate(cfg_, k, B_, true, keep, stream());
    if (cfg_.overlap == OverlapKind::kRecompute) rc_.allocate(cfg_, k, B_, false, false, stream());
    dg_.allocate(static_cast<size_t>(k * B_ * GH_));
    dgu_.allocate(kGru ? static_cast<size_t>(k * B_ * GH_) : 0);
    dh_.allocate(static_cast<size_t>(k * B_ * H_));
    ones_.allocate(static_cast<size_t>(k * B_));
    fill(ones_.data(), k * B_, T(1));
  }

  void ensure_batch(int64_t b) {
    if (b == B_) return;  // B_ is 0 until the first allocation; b >= 1
    graphs_.clear();      // they hold pointers into the buffers below
    B_ = b;
    allocate_ring(ring_.capacity(), false);
    const size_t n = static_cast<size_t>(L_ * S_ * B_ * H_);
    init_.allocate(n);
    state_.allocate(n);
    TBPTT_CUDA_CHECK(cudaMemsetAsync(init_.data(), 0, init_.bytes(), stream()));
    TBPTT_CUDA_CHECK(cudaMemsetAsync(state_.data(), 0, state_.bytes(), stream()));
    rc_state_.allocate(n);
    dh_carry_.allocate(static_cast<size_t>(B_ * H_));
    dc_carry_.allocate(kLstm ? static_cast<size_t>(B_ * H_) : 0);
    scratch_.allocate(kGru ? static_cast<size_t>(B_ * GH_) : 0);
    outputs_.allocate(0);
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
    if (in.device != nullptr) {
      copy_device_inputs(*in.device, pos, seg, ns);
    } else {
      copy_host_inputs(in, pos, seg, ns);
    }
    for (int64_t l = 0; l < L_; ++l)
      forward_layer(real_, l, first, n, state_h(state_, l), state_c(state_, l));
    readout_forward(real_, first, n);
    T* out = nullptr;
    if (in.outputs != nullptr) {
      const size_t need = static_cast<size_t>(cfg_.k1 * B_ * O_);
      if (outputs_.size() < need) outputs_.allocate(need);
      out = outputs_.data();
    }
    loss_pass(real_, first, n, out, true);
    if (out != nullptr) {
      TBPTT_CUDA_CHECK(cudaMemcpyAsync(static_cast<T*>(in.outputs) + pos * B_ * O_, out,
                                       static_cast<size_t>(n * B_ * O_) * sizeof(T),
                                       cudaMemcpyDeviceToHost, stream()));
    }
  }

  // Steps [pos, pos + n) of the caller's device arrays into the ring slots of
  // the chunk's segments: cast, strided reads, flags to 0/1, unread targets 0.
  void copy_device_inputs(const DeviceInputs& dv, int64_t pos, const Segment* seg, int ns) {
    const View x = make_view(dv.x), target = make_view(dv.target);
    const View mask = dv.has_mask ? make_view(dv.mask) : no_view();
    const View none = no_view();
    for (int i = 0; i < ns; ++i) {
      const int64_t rows = seg[i].count * B_, r0 = seg[i].slot * B_,
                    src = (pos + seg[i].offset) * B_;
      gather<T>(x, GatherKind::kValue, none, 1, src * D_, rows * D_, real_.x.data() + r0 * D_);
      if (dv.has_mask) {
        gather<T>(mask, GatherKind::kFlag, none, 1, src, rows, real_.mask.data() + r0);
        for (int64_t s = 0; s < seg[i].count; ++s)
          pend_mask_ +=
              static_cast<double>(mask_counts_[static_cast<size_t>(pos + seg[i].offset + s)]);
      } else {
        fill(real_.mask.data() + r0, rows, T(1));
        pend_mask_ += static_cast<double>(rows);
      }
      if (dv.has_resets) {
        gather<uint8_t>(make_view(dv.resets), GatherKind::kFlag, none, 1, src, rows,
                        real_.resets.data() + r0);
      } else {
        TBPTT_CUDA_CHECK(
            cudaMemsetAsync(real_.resets.data() + r0, 0, static_cast<size_t>(rows), stream()));
      }
      if (cfg_.loss == LossKind::kCrossEntropy) {
        gather<int64_t>(target, GatherKind::kLabel, mask, 1, src, rows, real_.label.data() + r0);
      } else {
        gather<T>(target, GatherKind::kValue, mask, O_, src * O_, rows * O_,
                  real_.target.data() + r0 * O_);
      }
    }
  }

  // The same from host arrays already in the engine's types (bindings.cpp).
  void copy_host_inputs(const RunInputs& in, int64_t pos, const Segment* seg, int ns) {
    const T* x = static_cast<const T*>(in.x);
    const T* mask = static_cast<const T*>(in.mask);
    for (int i = 0; i < ns; ++i) {
      const int64_t rows = seg[i].count * B_, r0 = seg[i].slot * B_,
                    src = (pos + seg[i].offset) * B_;
      h2d(real_.x.data() + r0 * D_, x + src * D_, rows * D_);
      if (mask != nullptr) {
        h2d(real_.mask.data() + r0, mask + src, rows);
        for (int64_t r = 0; r < rows; ++r) pend_mask_ += mask[src + r] != T(0) ? 1.0 : 0.0;
      } else {
        fill(real_.mask.data() + r0, rows, T(1));
        pend_mask_ += static_cast<double>(rows);
      }
      if (in.resets != nullptr) {
        h2d_raw(real_.resets.data() + r0, in.resets + src, rows);
      } else {
        TBPTT_CUDA_CHECK(
            cudaMemsetAsync(real_.resets.data() + r0, 0, static_cast<size_t>(rows), stream()));
      }
      if (cfg_.loss == LossKind::kCrossEntropy) {
        h2d_raw(real_.label.data() + r0, static_cast<const int64_t*>(in.target) + src, rows);
      } else {
        h2d(real_.target.data() + r0 * O_, static_cast<const T*>(in.target) + src * O_, rows * O_);
      }
    }
  }

  // Runs layer l over steps [first, first + n) into store st, from the state
  // (h_state, c_state) entering step `first` (before its resets); leaves the
  // state after the last step there. Layer input: real_.x (l == 0) or st's
  // output of layer l - 1 for the same steps.
  void forward_layer(Store<T>& st, int64_t l, int64_t first, int64_t n, T* h_state, T* c_state) {
    const int64_t d = d_in(l), bh = B_ * H_;
    Segment seg[2];
    const int ns = ring_.segments(first, n, seg);
    const T* xin = l == 0 ? real_.x.data() : layer_out(st, l - 1);
    T* g_all = st.layers[static_cast<size_t>(l)].gates.data();
    for (int i = 0; i < ns; ++i) {
      const int64_t r0 = seg[i].slot * B_;
      blas_.gemm<T>(false, true, seg[i].count * B_, GH_, d, T(1), xin + r0 * d, d, w_ih(l), d, T(0),
                    g_all + r0 * GH_, GH_);
    }
    const T* h_init = state_h(init_, l);
    const T* c_init = state_c(init_, l);
    const int64_t slot0 = ring_.slot(first);
    enter_state_kernel<T><<<grid_for(bh), kThreads, 0, stream()>>>(
        B_, H_, h_state, h_init, resets(slot0), h_in(st, l, slot0));
    TBPTT_CUDA_CHECK(cudaGetLastError());
    if (kLstm) {
      enter_state_kernel<T><<<grid_for(bh), kThreads, 0, stream()>>>(
          B_, H_, c_state, c_init, resets(slot0), c_in(st, l, slot0));
      TBPTT_CUDA_CHECK(cudaGetLastError());
    }
    const GraphKey key{
        reinterpret_cast<uintptr_t>(&st), reinterpret_cast<uintptr_t>(h_state), l, slot0, n, false};
    graphs_.run(key, stream(), [&] { forward_steps(st, l, first, n, h_state, c_state); });
  }

  // The per-step part of forward_layer: per step h W_hh^T and one cell kernel.
  void forward_steps(Store<T>& st, int64_t l, int64_t first, int64_t n, T* h_state, T* c_state) {
    const T* h_init = state_h(init_, l);
    const T* c_init = state_c(init_, l);
    for (int64_t s = first; s < first + n; ++s) {
      const int64_t slot = ring_.slot(s);
      const bool last = s + 1 == first + n;
      const int64_t next = last ? 0 : ring_.slot(s + 1);
      CellFwd<T> a{};
      a.batch = B_;
      a.hidden = H_;
      a.gates = gates(st, l, slot);
      a.b_ih = b_ih(l);
      a.b_hh = b_hh(l);
      a.h_in = h_in(st, l, slot);
      a.c_in = c_in(st, l, slot);
      a.aux = aux(st, l, slot);
      a.h_out = h_out(st, l, slot);
      a.h_next = last ? h_state : h_in(st, l, next);
      a.c_next = last ? c_state : c_in(st, l, next);
      a.reset_next = last ? nullptr : resets(next);
      a.h_init = h_init;
      a.c_init = c_init;
      if (kGru) {
        blas_.gemm<T>(false, true, B_, GH_, H_, T(1), a.h_in, H_, w_hh(l), H_, T(0),
                      scratch_.data(), GH_);
        a.u = scratch_.data();
      } else {
        blas_.gemm<T>(false, true, B_, GH_, H_, T(1), a.h_in, H_, w_hh(l), H_, T(1), a.gates, GH_);
        a.u = nullptr;
      }
      launch_forward(a);
    }
  }

  void launch_forward(const CellFwd<T>& a) {
    const int grid = grid_for(a.batch * a.hidden);
    if constexpr (K == CellKind::kLstm) {
      lstm_forward_kernel<T><<<grid, kThreads, 0, stream()>>>(a);
    } else if constexpr (K == CellKind::kGru) {
      gru_forward_kernel<T><<<grid, kThreads, 0, stream()>>>(a);
    } else {
      rnn_forward_kernel<T, K == CellKind::kRnnRelu><<<grid, kThreads, 0, stream()>>>(a);
    }
    TBPTT_CUDA_CHECK(cudaGetLastError());
  }

  void launch_backward(const CellBwd<T>& a) {
    const int grid = grid_for(a.batch * a.hidden);
    if constexpr (K == CellKind::kLstm) {
      lstm_backward_kernel<T><<<grid, kThreads, 0, stream()>>>(a);
    } else if constexpr (K == CellKind::kGru) {
      gru_backward_kernel<T><<<grid, kThreads, 0, stream()>>>(a);
    } else {
      rnn_backward_kernel<T, K == CellKind::kRnnRelu><<<grid, kThreads, 0, stream()>>>(a);
    }
    TBPTT_CUDA_CHECK(cudaGetLastError());
  }

  // y = h_top W_out^T (the bias is added by the loss kernel) for steps
  // [first, first + n), into st.dy.
  void readout_forward(Store<T>& st, int64_t first, int64_t n) {
    Segment seg[2];
    const int ns = ring_.segments(first, n, seg);
    const T* htop = layer_out(st, L_ - 1);
    for (int i = 0; i < ns; ++i) {
      const int64_t r0 = seg[i].slot * B_, rows = seg[i].count * B_;
      blas_.gemm<T>(false, true, rows, O_, H_, T(1), htop + r0 * H_, H_, w_out(), H_, T(0),
                    st.dy.data() + r0 * O_, O_);
    }
  }

  // Turns y (in st.dy) into the unnormalised dLoss/dy in place for steps
  // [first, first + n); writes y + b_out to `outputs` ([n, B, O] device) if
  // given; with accumulate, writes each row's mask * l to real_.row_loss.
  void loss_pass(Store<T>& st, int64_t first, int64_t n, T* outputs, bool accumulate) {
    Segment seg[2];
    const int ns = ring_.segments(first, n, seg);
    const bool ce = cfg_.loss == LossKind::kCrossEntropy;
    for (int i = 0; i < ns; ++i) {
      const int64_t r0 = seg[i].slot * B_, rows = seg[i].count * B_;
      LossArgs<T> a{};
      a.rows = rows;
      a.out_size = O_;
      a.cross_entropy = ce;
      a.y = st.dy.data() + r0 * O_;
      a.b_out = param(4 * L_ + 1);
      a.mask = real_.mask.data() + r0;
      a.target = ce ? nullptr : real_.target.data() + r0 * O_;
      a.label = ce ? real_.label.data() + r0 : nullptr;
      a.outputs = outputs == nullptr ? nullptr : outputs + seg[i].offset * B_ * O_;
      a.row_loss = accumulate ? real_.row_loss.data() + r0 : nullptr;
      constexpr int64_t kRowsPerBlock = kThreads / 32;
      const int grid =
          static_cast<int>(std::min<int64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock, 8192));
      loss_kernel<T><<<grid, kThreads, 0, stream()>>>(a);
      TBPTT_CUDA_CHECK(cudaGetLastError());
    }
  }

  // ---- update -----------------------------------------------------------
  // The update of block b (already consumed by the schedule).
  void update(const Block& b, bool return_grads, RunResult& res) {
    const int64_t t = b.t, tp = b.prev, w = b.w;
    const double denom = std::max(1.0, pend_mask_);
    pend_mask_ = 0.0;

    Store<T>* act = &real_;
    if (cfg_.overlap == OverlapKind::kRecompute && w < tp) {
      recompute(w, t, tp);
      act = &rc_;
    }
    backward(t, tp, w, *act, static_cast<T>(1.0 / denom));

    // Status: loss of the block, gradient norm, non-finite flag.
    grad_norm_partial_kernel<T><<<kReduceBlocks, kThreads, 0, stream()>>>(
        n_params(), grad_.data(), partial_sumsq_.data(), partial_bad_.data());
    TBPTT_CUDA_CHECK(cudaGetLastError());
    Segment seg[2] = {{0, 0, 0}, {0, 0, 0}};
    ring_.segments(tp + 1, t - tp, seg);
    finish_status_kernel<<<1, kThreads, 0, stream()>>>(
        real_.row_loss.data(), seg[0].slot * B_, seg[0].count * B_, seg[1].slot * B_,
        seg[1].count * B_, partial_sumsq_.data(), partial_bad_.data(), kReduceBlocks,
        status_.data());
    TBPTT_CUDA_CHECK(cudaGetLastError());

    // Optimizer, skipped on the device when the update is non-finite.
    OptArgs o{};
    o.adam = cfg_.optimizer == OptimizerKind::kAdam;
    o.lr = cfg_.lr;
    o.momentum = cfg_.momentum;
    o.nesterov = cfg_.nesterov;
    o.weight_decay = cfg_.weight_decay;
    o.beta1 = cfg_.beta1;
    o.beta2 = cfg_.beta2;
    o.eps = cfg_.eps;
    o.clip = cfg_.clip;
    o.denom = denom;
    if (o.adam) {
      const double s = static_cast<double>(adam_step_ + 1);
      o.step_size = cfg_.lr / (1.0 - std::pow(cfg_.beta1, s));
      o.bc2_sqrt = std::sqrt(1.0 - std::pow(cfg_.beta2, s));
    }
    optimizer_kernel<T><<<grid_for(n_params()), kThreads, 0, stream()>>>(
        n_params(), o, status_.data(), params_.data(), grad_.data(), m_.data(), v_.data());
    TBPTT_CUDA_CHECK(cudaGetLastError());

    if (return_grads) {
      grads_host_.resize(static_cast<size_t>(n_params()));
      TBPTT_CUDA_CHECK(cudaMemcpyAsync(grads_host_.data(), grad_.data(), grad_.bytes(),
                                       cudaMemcpyDeviceToHost, stream()));
    }
    TBPTT_CUDA_CHECK(cudaMemcpyAsync(status_host_.data(), status_.data(),
                                     kStatusWords * sizeof(double), cudaMemcpyDeviceToHost,
                                     stream()));
    stream_.sync();
    const double* st = status_host_.data();
    const double loss = st[kStatusLoss] / denom;
    if (!std::isfinite(static_cast<T>(loss)))
      throw std::runtime_error(str_cat("non-finite loss in the update at step ", t));
    if (st[kStatusNonFinite] != 0.0)
      throw std::runtime_error(str_cat("non-finite gradient in the update at step ", t));
    if (o.adam) ++adam_step_;  // the kernel applied step adam_step_ + 1

    if (return_grads) {
      std::vector<HostArray> gs;
      for (int64_t i = 0; i < cfg_.num_params(); ++i) {
        HostArray a;
        a.shape = cfg_.param_shape(i);
        a.bytes.resize(static_cast<size_t>(cfg_.param_size(i)) * sizeof(T));
        std::memcpy(a.bytes.data(), grads_host_.data() + offsets_[static_cast<size_t>(i)],
                    a.bytes.size());
        gs.push_back(std::move(a));
      }
      res.grads.push_back(std::move(gs));
    }
    res.losses.push_back(static_cast<double>(static_cast<T>(loss)));
    res.update_steps.push_back(t);
  }

  // overlap="recompute": re-runs (w, t] from the stored state entering w + 1
  // with the current weights into rc_, then dL/dy of the block (tp, t].
  void recompute(int64_t w, int64_t t, int64_t tp) {
    const int64_t slot0 = ring_.slot(w + 1), bh = B_ * H_;
    for (int64_t l = 0; l < L_; ++l) {
      d2d(state_h(rc_state_, l), h_in(real_, l, slot0), bh);
      if (kLstm) d2d(state_c(rc_state_, l), c_in(real_, l, slot0), bh);
    }
    for (int64_t l = 0; l < L_; ++l)
      forward_layer(rc_, l, w + 1, t - w, state_h(rc_state_, l), state_c(rc_state_, l));
    readout_forward(rc_, tp + 1, t - tp);
    loss_pass(rc_, tp + 1, t - tp, nullptr, false);
  }

  // grad_ = dLoss_P/dtheta over window (w, t] with activations from act.
  void backward(int64_t t, int64_t tp, int64_t w, Store<T>& act, T scale) {
    TBPTT_CUDA_CHECK(cudaMemsetAsync(grad_.data(), 0, grad_.bytes(), stream()));
    Segment seg[2];
    // Readout: every step of the block (tp, t].
    const T* htop = layer_out(act, L_ - 1);
    int ns = ring_.segments(tp + 1, t - tp, seg);
    for (int i = 0; i < ns; ++i) {
      const int64_t r0 = seg[i].slot * B_, rows = seg[i].count * B_;
      const T* dy = act.dy.data() + r0 * O_;
      blas_.gemm<T>(true, false, O_, H_, rows, scale, dy, O_, htop + r0 * H_, H_, T(1),
                    grad(4 * L_), H_);
      blas_.gemv_t<T>(rows, O_, scale, dy, O_, ones_.data(), T(1), grad(4 * L_ + 1));
    }
    // dLoss/dh_top over the window: from the readout for block steps, 0 before.
    const int64_t lo = std::max(w, tp);
    ns = ring_.segments(lo + 1, t - lo, seg);
    for (int i = 0; i < ns; ++i) {
      const int64_t r0 = seg[i].slot * B_, rows = seg[i].count * B_;
      blas_.gemm<T>(false, false, rows, H_, O_, scale, act.dy.data() + r0 * O_, O_, w_out(), H_,
                    T(0), dh_.data() + r0 * H_, H_);
    }
    if (lo > w) {
      ns = ring_.segments(w + 1, lo - w, seg);
      for (int i = 0; i < ns; ++i) {
        TBPTT_CUDA_CHECK(cudaMemsetAsync(dh_.data() + seg[i].slot * B_ * H_, 0,
                                         static_cast<size_t>(seg[i].count * B_ * H_) * sizeof(T),
                                         stream()));
      }
    }
    T* dgu_all = kGru ? dgu_.data() : dg_.data();
    for (int64_t l = L_ - 1; l >= 0; --l) {
      const GraphKey key{reinterpret_cast<uintptr_t>(&act), 0, l, ring_.slot(t), t - w, true};
      graphs_.run(key, stream(), [&] { backward_steps(act, l, t, w); });
      const int64_t d = d_in(l);
      const T* xin = l == 0 ? real_.x.data() : layer_out(act, l - 1);
      const T* hin = act.layers[static_cast<size_t>(l)].h_in.data();
      ns = ring_.segments(w + 1, t - w, seg);
      for (int i = 0; i < ns; ++i) {
        const int64_t r0 = seg[i].slot * B_, rows = seg[i].count * B_;
        const T* dg = dg_.data() + r0 * GH_;
        const T* dgu = dgu_all + r0 * GH_;
        blas_.gemm<T>(true, false, GH_, d, rows, T(1), dg, GH_, xin + r0 * d, d, T(1), grad(4 * l),
                      d);
        blas_.gemm<T>(true, false, GH_, H_, rows, T(1), dgu, GH_, hin + r0 * H_, H_, T(1),
                      grad(4 * l + 1), H_);
        blas_.gemv_t<T>(rows, GH_, T(1), dg, GH_, ones_.data(), T(1), grad(4 * l + 2));
        if (kGru) blas_.gemv_t<T>(rows, GH_, T(1), dgu, GH_, ones_.data(), T(1), grad(4 * l + 3));
        if (l > 0) {
          blas_.gemm<T>(false, false, rows, H_, GH_, T(1), dg, GH_, w_ih(l), H_, T(0),
                        dh_.data() + r0 * H_, H_);
        }
      }
      // rnn, lstm: u and a enter the gates alike, so d b_hh = d b_ih
      if (!kGru) d2d(grad(4 * l + 3), grad(4 * l + 2), GH_);
    }
  }

  // The per-step part of layer l's backward over the window (w, t]: per step
  // one cell kernel and the carry dG W_hh into the step before.
  void backward_steps(Store<T>& act, int64_t l, int64_t t, int64_t w) {
    T* dgu_all = kGru ? dgu_.data() : dg_.data();
    for (int64_t s = t; s > w; --s) {
      const int64_t slot = ring_.slot(s);
      CellBwd<T> a{};
      a.batch = B_;
      a.hidden = H_;
      a.gates = gates(act, l, slot);
      a.h_in = h_in(act, l, slot);
      a.c_in = c_in(act, l, slot);
      a.aux = aux(act, l, slot);
      a.dh_in = dh_.data() + slot * B_ * H_;
      a.dh_carry = dh_carry_.data();
      a.dc_carry = dc_carry_.data();
      a.has_carry = s < t;
      a.carry_reset = s < t ? resets(ring_.slot(s + 1)) : nullptr;
      a.dg = dg_.data() + slot * B_ * GH_;
      a.dgu = dgu_all + slot * B_ * GH_;
      launch_backward(a);
      if (s > w + 1) {  // the carry into step s - 1, through W_hh
        blas_.gemm<T>(false, false, B_, H_, GH_, T(1), a.dgu, GH_, w_hh(l), H_, kGru ? T(1) : T(0),
                      dh_carry_.data(), H_);
      }
    }
  }

  // ---- data -------------------------------------------------------------
  Config cfg_;
  const int64_t L_, H_, D_, O_, GH_, S_;
  const int device_;  // first: fails with the clear "no GPU" error before any CUDA call
  Stream stream_;
  Blas blas_;
  HostStatus status_host_;                 // [kStatusWords] pinned
  std::vector<T*> host_params_;            // P borrowed host arrays (pull/push)
  std::vector<int64_t> offsets_;           // [P + 1] Config::param_offsets() of the flat buffers
  DeviceBuffer<T> params_, grad_, m_, v_;  // flat [n_params()], canonical order
  DeviceBuffer<double> partial_sumsq_, status_;
  DeviceBuffer<int> partial_bad_;
  int64_t B_ = 0;
  bool has_state_ = false, has_init_ = false;
  DeviceBuffer<T> init_;   // [L*S, B, H] initial state (zeros unless given); flat layer-major
  DeviceBuffer<T> state_;  // [L*S, B, H] current forward state
  Schedule sched_{cfg_};
  double pend_mask_ = 0.0;  // mask count of the pending block (counted on the host)
  RingIndex ring_;
  Store<T> real_, rc_;                   // real forward history; recomputed window (recompute only)
  DeviceBuffer<T> dg_, dgu_, dh_;        // [K, B, G*H], [K, B, G*H] (gru), [K, B, H]; slot-indexed
  DeviceBuffer<T> ones_;                 // [K * B] all ones: bias gradients as gemv
  DeviceBuffer<T> dh_carry_, dc_carry_;  // [B, H]
  DeviceBuffer<T> scratch_;              // [B, G*H] gru: u = h W_hh^T
  DeviceBuffer<T> rc_state_;             // [L*S, B, H] running state of a recompute
  DeviceBuffer<T> outputs_;              // [k1, B, O] y of a chunk (when outputs are wanted)
  std::vector<T> grads_host_;            // [n_params()] staging for return_grads
  DeviceBuffer<unsigned long long> scan_words_;  // scan(): first bad index, row counts
  DeviceBuffer<double> scan_value_;              // scan(): the bad element (double, int64 bits)
  std::vector<int64_t> mask_counts_;  // device inputs: nonzero mask entries per step of run()
  GraphCache graphs_;                 // TBPTT_CUDA_GRAPHS=1: per-step sequences as CUDA graphs
  int64_t adam_step_ = 0;
};

template <typename T>
std::unique_ptr<EngineBase> make_typed(const Config& cfg, const std::vector<void*>& params) {
  switch (cfg.cell) {
    case CellKind::kRnnTanh:
      return std::make_unique<CudaEngine<T, CellKind::kRnnTanh>>(cfg, params);
    case CellKind::kRnnRelu:
      return std::make_unique<CudaEngine<T, CellKind::kRnnRelu>>(cfg, params);
    case CellKind::kLstm:
      return std::make_unique<CudaEngine<T, CellKind::kLstm>>(cfg, params);
    case CellKind::kGru:
      return std::make_unique<CudaEngine<T, CellKind::kGru>>(cfg, params);
  }
  throw std::invalid_argument("unknown cell");
}

}  // namespace
}  // namespace tbptt::cuda

// Whether this build's kernels have an image (machine code or PTX) the
// current device can run; cudaFuncGetAttributes says so without a launch.
bool tbptt::cuda::kernels_run_here(std::string* why) {
  cudaFuncAttributes attr{};
  const cudaError_t e = cudaFuncGetAttributes(&attr, cuda::fill_kernel<float>);
  if (e == cudaSuccess) return true;
  (void)cudaGetLastError();
  if (why != nullptr) *why = str_cat(cudaGetErrorName(e), ": ", cudaGetErrorString(e));
  return false;
}

std::unique_ptr<tbptt::EngineBase> tbptt::make_cuda_engine(const Config& cfg,
                                                           const std::vector<void*>& params) {
  if (cfg.dtype == DType::kFloat64) return cuda::make_typed<double>(cfg, params);
  return cuda::make_typed<float>(cfg, params);
}
