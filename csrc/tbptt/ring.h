// The ring of stored history's slot arithmetic: ALL of it lives here.
//
// Step s (counted from 1 since the last trainer-level reset) lives in slot
// (s - 1) mod K. With k2 bounded, K = max(k1, k2) (or Config::capacity) and
// never changes: an update at step t needs steps > t - max(k1, k2) only (its
// block has <= k1 steps, its window <= k2). With k2 unbounded the ring grows
// before it would wrap (slot = s - 1), so growing keeps every slot in place.
// A run of consecutive steps is at most two runs of consecutive slots.
#pragma once

#include <algorithm>
#include <cstdint>

namespace tbptt {

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

// A matrix operand of a product over steps [first, first + n): `n * B` rows
// of `width` elements. In the ring (step s at slot(s), so the run may wrap),
// or a window workspace where row block j holds step first + j (contiguous).
template <typename T>
struct Rows {
  T* base;
  int64_t width;
  bool ring;
};
template <typename T>
Rows<T> ring_rows(T* base, int64_t width) {
  return {base, width, true};
}
template <typename T>
Rows<T> window_rows(T* base, int64_t width) {
  return {base, width, false};
}

}  // namespace tbptt
