// The CPU engine's thread pool (pool.cpp). Work is cut into tasks by the
// caller from the shapes alone, never from the thread count, and each task
// writes its own outputs: which thread runs a task never changes a result,
// so results are bit-identical for any thread count (tested for 1, 2, 3, 5).
//
// Tasks are claimed one at a time, so the caller never waits for a task
// nobody has started: a worker that is asleep or descheduled (another
// process on its core) just leaves more tasks to the others. Idle workers
// spin for a few microseconds, then block on a condition variable (no
// spinning while the engine is not running).
#pragma once

#include <cstdint>

namespace tbptt::cpu {

struct Tasks {
  void (*fn)(const void* ctx, int64_t task);
  const void* ctx;
  int64_t count;
};

// Runs fn(ctx, i) for every i in [0, count) on the calling thread and up to
// threads - 1 pool workers, and returns when all are done; the first
// exception a task threw is rethrown after that. Runs every task on the
// calling thread, in order, when threads <= 1, count <= 1, the caller is
// itself a task, or another caller holds the pool.
void run_tasks(int threads, const Tasks& tasks);

// True on a thread that is running a task (nested work runs inline).
bool in_task();

template <typename F>
void parallel_for(int threads, int64_t count, const F& f) {
  run_tasks(threads,
            {[](const void* ctx, int64_t i) { (*static_cast<const F*>(ctx))(i); }, &f, count});
}

}  // namespace tbptt::cpu
