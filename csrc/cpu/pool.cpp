// The CPU engine's thread pool: see pool.h for the contract.
//
// One job at a time. The caller publishes a job by tagging one claim word
// per task with the job's generation g (unclaimed: g << 1) and then opening
// word_ (g << 32). A thread claims task i with a compare-and-swap of its word
// from g << 1 to g << 1 | 1, so a worker that is late for generation g can
// never claim a task of generation g + 1 (its tag differs). Each of the T
// participants (the caller is 0, worker k is k + 1) first claims its own
// tasks i = id, id + T, ... (the same ones from job to job: a column part of
// W_hh or a batch group stays in the same core's cache), then any task still
// unclaimed (a descheduled thread's tasks are taken by the others). Workers
// are created on demand and live for the process (detached); after fork()
// the child has none and the caller runs every task itself. Claim arrays are
// never freed while the process lives (a late worker may still read one);
// they grow geometrically, so they hold at most twice the largest job.
#include "cpu/pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace tbptt::cpu {
namespace {

thread_local bool t_in_task = false;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: its workers are detached
    return *pool;
  }

  // False (nothing run) when another caller holds the pool.
  bool try_run(int threads, const Tasks& tasks) {
    if (busy_.exchange(true, std::memory_order_acquire)) return false;
    const int helpers = std::min(threads - 1, kMaxWorkers);
    ensure_workers(helpers);
    const uint64_t g = ++gen_;
    word_.store((g << 32) | kClosed, std::memory_order_seq_cst);
    job_ = tasks;
    error_ = nullptr;
    std::atomic<uint64_t>* claims = claims_for(tasks.count);
    for (int64_t i = 0; i < tasks.count; ++i) claims[i].store(g << 1, std::memory_order_relaxed);
    total_.store(tasks.count, std::memory_order_relaxed);
    helpers_.store(helpers, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    word_.store(g << 32, std::memory_order_seq_cst);  // open: tasks can be claimed
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      const std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    work(g, 0, helpers + 1);
    // Wait for the tasks still running on workers. Yield after a while so a
    // worker descheduled on this core gets it back.
    for (int spins = 0; done_.load(std::memory_order_acquire) != tasks.count; ++spins) {
      if (spins < 4000) {
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
    const std::exception_ptr error = error_;
    busy_.store(false, std::memory_order_release);
    if (error) std::rethrow_exception(error);
    return true;
  }

 private:
  Pool() = default;

  void ensure_workers(int n) {
    while (workers_ < n) {
      const int index = workers_++;
      std::thread([this, index] { loop(index); }).detach();
    }
  }

  // A claim array of at least n words (caller only, under busy_).
  std::atomic<uint64_t>* claims_for(int64_t n) {
    if (n > cap_) {
      cap_ = std::max<int64_t>(n, 2 * cap_);
      retired_.push_back(std::make_unique<std::atomic<uint64_t>[]>(static_cast<size_t>(cap_)));
      claims_.store(retired_.back().get(), std::memory_order_relaxed);
    }
    return claims_.load(std::memory_order_relaxed);
  }

  // Runs the tasks of generation g that participant `id` of `parts` claims:
  // its own first, then any left.
  void work(uint64_t g, int id, int parts) {
    std::atomic<uint64_t>* claims = claims_.load(std::memory_order_acquire);
    const int64_t n = total_.load(std::memory_order_relaxed);
    const uint64_t open = g << 1;
    auto take = [&](int64_t i) {
      uint64_t expect = open;
      if (claims[i].load(std::memory_order_relaxed) != open ||
          !claims[i].compare_exchange_strong(expect, open | 1, std::memory_order_acq_rel))
        return;
      t_in_task = true;
      try {
        job_.fn(job_.ctx, i);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(error_mu_);
        if (!error_) error_ = std::current_exception();
      }
      t_in_task = false;
      done_.fetch_add(1, std::memory_order_acq_rel);
    };
    for (int64_t i = id; i < n; i += parts) take(i);
    for (int64_t i = 0; i < n; ++i) take(i);
  }

  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t w = word_.load(std::memory_order_acquire);
      for (int spins = 0; (w >> 32) == seen || (w & 0xffffffffu) == kClosed; ++spins) {
        if (spins < kSpins) {
          cpu_relax();
        } else if (spins < kSpins + kYields) {
          std::this_thread::yield();  // oversubscribed cores: let the working threads run
        } else {
          std::unique_lock<std::mutex> lock(mu_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lock, [&] {
            const uint64_t now = word_.load(std::memory_order_seq_cst);
            return (now >> 32) != seen && (now & 0xffffffffu) != kClosed;
          });
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
          spins = 0;
        }
        w = word_.load(std::memory_order_acquire);
      }
      seen = w >> 32;
      const int helpers = helpers_.load(std::memory_order_relaxed);
      if (index < helpers) work(seen, index + 1, helpers + 1);
    }
  }

  static constexpr uint64_t kClosed = 0xffffffffu;  // task field of a job being set up
  static constexpr int kMaxWorkers = 255;
  static constexpr int kSpins = 2000;  // ~30 us of pause, then
  static constexpr int kYields = 200;  // yields, then blocking

  std::atomic<bool> busy_{false};  // one caller at a time
  std::atomic<uint64_t> word_{0};
  std::atomic<int64_t> total_{0}, done_{0};
  std::atomic<int> helpers_{0};   // workers that may join the current job
  std::atomic<int> sleepers_{0};  // workers blocked on cv_
  std::mutex mu_;
  std::condition_variable cv_;
  std::mutex error_mu_;
  std::exception_ptr error_;                             // first exception of the current job
  uint64_t gen_ = 0;                                     // caller only (under busy_)
  int workers_ = 0;                                      // caller only (under busy_)
  Tasks job_{};                                          // written by the caller before word_ opens
  std::atomic<std::atomic<uint64_t>*> claims_{nullptr};  // one claim word per task
  int64_t cap_ = 0;                                      // caller only
  std::vector<std::unique_ptr<std::atomic<uint64_t>[]>> retired_;  // every array (never freed)
};

}  // namespace

bool in_task() {
  return t_in_task;
}

void run_tasks(int threads, const Tasks& tasks) {
  if (tasks.count <= 0) return;
  if (threads > 1 && tasks.count > 1 && !t_in_task && Pool::get().try_run(threads, tasks)) return;
  for (int64_t i = 0; i < tasks.count; ++i) tasks.fn(tasks.ctx, i);
}

}  // namespace tbptt::cpu
