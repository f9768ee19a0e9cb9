// The ring of stored history: ALL slot arithmetic lives here.
//
// Step s (counted from 1 since the last trainer-level reset) lives in slot
// (s - 1) mod K. With k2 bounded, K = max(k1, k2) (or Config::capacity) and
// never changes: an update at step t needs steps > t - max(k1, k2) only (its
// block has <= k1 steps, its window <= k2). With k2 unbounded the ring grows
// before it would wrap (slot = s - 1), so growing keeps every slot in place.
//
// A Store holds, per slot, everything a backward pass reads: per layer the
// state entering the step (after resets), the post-activation gates, aux
// values and the layer output; per step the layer-0 input, mask, resets,
// targets and dL/dy. Arrays are [K, B, ...] so a run of consecutive slots is
// one contiguous [n*B, ...] matrix. A run that wraps (two segments) is
// gathered into / scattered from a contiguous scratch copy, so every GEMM over
// a block or window is ONE call with the same operands whatever the ring
// capacity: results are bit-identical for any capacity >= max(k1, k2).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "tbptt/engine_api.h"

namespace tbptt::cpu {

// A run of consecutive slots: steps [first + offset, first + offset + count)
// live in slots [slot, slot + count).
struct Segment {
  int64_t slot;
  int64_t count;
  int64_t offset;
};

class RingIndex {
 public:
  int64_t capacity() const { return capacity_; }
  void set_capacity(int64_t k) { capacity_ = k; }
  int64_t slot(int64_t step) const { return (step - 1) % capacity_; }

  // Splits steps [first, first + n) (n <= capacity) into <= 2 segments;
  // returns how many were written to out.
  int segments(int64_t first, int64_t n, Segment out[2]) const {
    if (n <= 0) return 0;
    const int64_t s0 = slot(first);
    const int64_t c0 = std::min(n, capacity_ - s0);
    out[0] = {s0, c0, 0};
    if (c0 == n) return 1;
    out[1] = {0, n - c0, c0};
    return 2;
  }

 private:
  int64_t capacity_ = 1;
};

// scratch with room for at least n elements (never shrinks); its data.
template <typename T>
T* grow(std::vector<T>& scratch, int64_t n) {
  if (scratch.size() < static_cast<size_t>(n)) scratch.resize(static_cast<size_t>(n));
  return scratch.data();
}

// Contiguous [n*B, width] view of steps [first, first + n) of a ring array
// `arr` ([K, B, width], slot_len = B * width elements per slot): arr itself
// when the run does not wrap, else a copy in `scratch` (grown as needed).
template <typename T>
const T* gather(const RingIndex& ring, const T* arr, int64_t slot_len, int64_t first, int64_t n,
                std::vector<T>& scratch) {
  Segment seg[2];
  const int ns = ring.segments(first, n, seg);
  if (ns <= 1) return arr + (ns == 1 ? seg[0].slot * slot_len : 0);
  grow(scratch, n * slot_len);
  for (int i = 0; i < ns; ++i)
    std::copy_n(arr + seg[i].slot * slot_len, seg[i].count * slot_len,
                scratch.data() + seg[i].offset * slot_len);
  return scratch.data();
}

// Where to write steps [first, first + n) of `arr` contiguously: arr itself,
// or `scratch` when the run wraps (then call scatter() after writing).
template <typename T>
T* scatter_target(const RingIndex& ring, T* arr, int64_t slot_len, int64_t first, int64_t n,
                  std::vector<T>& scratch) {
  Segment seg[2];
  const int ns = ring.segments(first, n, seg);
  if (ns <= 1) return arr + (ns == 1 ? seg[0].slot * slot_len : 0);
  return grow(scratch, n * slot_len);
}

// Copies what was written at `written` (from scatter_target) into the ring
// slots when the run wraps; a no-op otherwise.
template <typename T>
void scatter(const RingIndex& ring, T* arr, int64_t slot_len, int64_t first, int64_t n,
             const T* written) {
  Segment seg[2];
  const int ns = ring.segments(first, n, seg);
  if (ns <= 1) return;
  for (int i = 0; i < ns; ++i)
    std::copy_n(written + seg[i].offset * slot_len, seg[i].count * slot_len,
                arr + seg[i].slot * slot_len);
}

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

// Per-layer cache arrays, each [K, B, width]; see cells/cell.h for meaning.
template <typename T>
struct LayerStore {
  std::vector<T> gates;  // [K, B, G*H]
  std::vector<T> h_in;   // [K, B, H]
  std::vector<T> c_in;   // [K, B, H] lstm only
  std::vector<T> aux;    // [K, B, H] lstm, gru
  std::vector<T> h_out;  // [K, B, H] lstm, gru (rnn: h_out is gates)
};

// One full set of per-slot arrays. The engine keeps one Store for the real
// forward pass and, for overlap="recompute", a second one (layer arrays and
// dy only) for the re-run forward of a window, addressed by the same slots.
template <typename T>
struct Store {
  std::vector<LayerStore<T>> layers;
  std::vector<T> x;             // [K, B, D] layer-0 input (real store only)
  std::vector<T> mask;          // [K, B] 0/1 (real store only)
  std::vector<uint8_t> resets;  // [K, B] 0/1 (real store only)
  std::vector<T> target;        // [K, B, O] mse targets (real store only)
  std::vector<int64_t> label;   // [K, B] cross_entropy classes (real store only)
  std::vector<T> dy;            // [K, B, O] unnormalised dLoss/dy of the step

  // (Re)sizes every array to k slots of batch b; keep preserves slots < old k.
  void allocate(const Config& cfg, int64_t k, int64_t b, bool with_inputs, bool keep) {
    const int64_t h = cfg.hidden_size, gh = cfg.gates() * h;
    const bool lstm = cfg.cell == CellKind::kLstm, rnn = cfg.gates() == 1;
    layers.resize(static_cast<size_t>(cfg.num_layers));
    const auto n = [&](int64_t w) { return static_cast<size_t>(k * b * w); };
    for (auto& ls : layers) {
      fresh(ls.gates, n(gh), keep);
      fresh(ls.h_in, n(h), keep);
      fresh(ls.c_in, lstm ? n(h) : 0, keep);
      fresh(ls.aux, rnn ? 0 : n(h), keep);
      fresh(ls.h_out, rnn ? 0 : n(h), keep);
    }
    fresh(dy, n(cfg.output_size), keep);
    if (with_inputs) {
      fresh(x, n(cfg.input_size), keep);
      fresh(mask, n(1), keep);
      fresh(resets, n(1), keep);
      const bool ce = cfg.loss == LossKind::kCrossEntropy;
      fresh(target, ce ? 0 : n(cfg.output_size), keep);
      fresh(label, ce ? n(1) : 0, keep);
    }
  }
};

}  // namespace tbptt::cpu
