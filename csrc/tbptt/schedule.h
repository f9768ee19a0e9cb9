// The TBPTT(k1, k2) schedule every engine follows (the window rule of tbptt/config.h): the step
// count since the last trainer-level reset, the pending block, the previous
// update, and the cut of a run into chunks that end at update points. The
// engines supply what a chunk's forward and an update compute.
#pragma once

#include <algorithm>
#include <cstdint>

#include "tbptt/config.h"

namespace tbptt {

// One update: its step t, the previous update's step, and the window start w
// (the gradient flows back through steps (w, t]).
struct Block {
  int64_t t, prev, w;
};

class Schedule {
 public:
  static constexpr int64_t kMaxChunk = 1024;

  explicit Schedule(const Config& cfg) : cfg_(cfg) {}

  int64_t count() const { return count_; }      // steps since the last trainer-level reset
  int64_t pending() const { return pending_; }  // steps since the previous update
  int64_t stored_steps() const { return cfg_.history_steps(count_); }

  int64_t last_update() const { return last_update_; }  // step of the previous update (0: none)

  // Trainer-level reset: count 0, the pending block dropped.
  void reset() { count_ = pending_ = last_update_ = 0; }
  // A checkpoint's position (validated by the caller).
  void restore(int64_t count, int64_t last_update) {
    count_ = count;
    last_update_ = last_update;
    pending_ = count - last_update;
  }

  // Runs `steps` steps: forward(pos, n) for each chunk [pos, pos + n) of the
  // run (its first step is count() + 1 when called), update(block) whenever
  // k1 steps have run since the previous update, and once more at the end
  // with `flush` if a block is pending. A block is consumed before update()
  // runs, whatever happens in it. update() returns false to stop the run
  // right after it (the remaining steps are not run).
  template <typename Forward, typename Update>
  void run(int64_t steps, bool flush, Forward&& forward, Update&& update) {
    int64_t pos = 0;
    while (pos < steps) {
      // Chunks end at update points, and hold at most kMaxChunk steps so that
      // the caller regains control (interrupts) at least that often.
      const int64_t n = std::min({steps - pos, cfg_.k1 - pending_, kMaxChunk});
      forward(pos, n);
      count_ += n;
      pending_ += n;
      pos += n;
      if (pending_ == cfg_.k1 && !update(consume())) return;
    }
    if (flush && pending_ > 0) update(consume());
  }

 private:
  Block consume() {
    const Block b{count_, last_update_, cfg_.window_start(count_, last_update_)};
    last_update_ = count_;
    pending_ = 0;
    return b;
  }

  const Config& cfg_;
  int64_t count_ = 0, pending_ = 0, last_update_ = 0;
};

}  // namespace tbptt
