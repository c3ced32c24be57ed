// The persistent worker pool behind parallel_for: workers sleep on a condition variable, take
// task indices from an atomic counter, and the last one to finish wakes the caller. Starting the
// workers can fail (the OS refuses a thread); then the pool joins what started, parallel_for
// runs serially, and pool_info() says why.
#include "qlora/thread_pool.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

namespace qlora {
namespace {

int affinity_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned hc = std::thread::hardware_concurrency();
  return hc > 0 ? static_cast<int>(hc) : 1;
}

int env_threads() {
  const char* s = std::getenv("QLORA_NUM_THREADS");
  if (s == nullptr || *s == '\0') return 0;
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  if (end == s || *end != '\0' || v < 1 || v > 4096) return 0;  // ignored; Python warns
  return static_cast<int>(v);
}

// The test hook's countdown: 0 is off, n > 0 makes the nth thread start from now on fail.
std::atomic<int> g_fail_countdown{0};

void maybe_fail_thread_start() {
  if (g_fail_countdown.load() > 0 && g_fail_countdown.fetch_sub(1) == 1)
    throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                            "thread start refused (test hook)");
}

class Pool {
 public:
  // Starts `workers` threads. If the OS refuses one (std::system_error from std::thread under a
  // process or memory limit, or bad_alloc), the ones already running are stopped and joined,
  // since destroying a joinable std::thread calls std::terminate, and nullptr is returned with
  // the reason.
  static std::unique_ptr<Pool> start(int workers, std::string* reason) {
    std::unique_ptr<Pool> pool(new Pool());
    int started = 0;
    try {
      pool->threads_.reserve(static_cast<size_t>(workers));
      for (; started < workers; ++started) {
        maybe_fail_thread_start();
        pool->threads_.emplace_back([p = pool.get()] { p->work(); });
      }
      return pool;
    } catch (const std::exception& e) {
      *reason = "could not start worker thread " + std::to_string(started + 1) + " of " +
                std::to_string(workers) + ": " + e.what();
    } catch (...) {
      *reason = "could not start worker thread " + std::to_string(started + 1) + " of " +
                std::to_string(workers) + ": unknown exception";
    }
    pool->stop_and_join();
    return nullptr;
  }
  ~Pool() { stop_and_join(); }
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  int workers() const { return static_cast<int>(threads_.size()); }

  // Caller holds the job lock, so only one run() is active at a time.
  void run(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = &fn;
      n_tasks_ = n_tasks;
      next_.store(0, std::memory_order_relaxed);
      busy_ = static_cast<int>(threads_.size());
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    drain();
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [this] { return busy_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  Pool() = default;

  void stop_and_join() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

  void drain() {
    for (;;) {
      const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= n_tasks_) return;
      try {
        (*fn_)(t);
      } catch (...) {
        std::lock_guard<std::mutex> lk(m_);
        if (!error_) error_ = std::current_exception();
        next_.store(n_tasks_, std::memory_order_relaxed);  // skip what is left
      }
    }
  }

  void work() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain();
      std::lock_guard<std::mutex> lk(m_);
      if (--busy_ == 0) done_cv_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int busy_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

std::mutex g_job_mutex;        // held while a job runs on the pool
std::mutex g_config_mutex;     // guards g_pool, g_failed_threads and g_fallback_reason
Pool* g_pool = nullptr;        // leaked on purpose at exit and after fork (see below)
std::atomic<int> g_threads{0};
// The thread count whose pool could not start, and why. parallel_for runs serially for that
// count instead of paying a failing thread start on every call; set_num_threads clears it.
int g_failed_threads = 0;
std::string g_fallback_reason;

void after_fork_in_child() {
  // The workers did not survive fork(); forget them without joining (their objects leak, a
  // bounded, one-time cost) and reset the locks, which may have been held by another thread.
  g_pool = nullptr;
  new (&g_job_mutex) std::mutex();
  new (&g_config_mutex) std::mutex();
}

void install_fork_handler() {
#if defined(__linux__)
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(nullptr, nullptr, after_fork_in_child); });
#endif
}

// The pool for `want` threads (the caller counts as one), started if needed, or nullptr to run
// serially. Caller holds the job lock (no job is running) and the config lock.
Pool* ensure_pool(int want) {
  if (want <= 1) return nullptr;
  if (g_pool != nullptr && g_pool->workers() == want - 1) return g_pool;
  if (g_failed_threads == want) return nullptr;
  // Stop the old pool before starting the new one: under a process or memory limit its threads
  // are the ones the new pool needs. g_pool is null from here until a pool has fully started,
  // so a failure can never leave it pointing at a deleted pool.
  delete g_pool;
  g_pool = nullptr;
  std::string reason;
  std::unique_ptr<Pool> pool = Pool::start(want - 1, &reason);
  if (pool == nullptr) {
    g_failed_threads = want;
    g_fallback_reason = reason + "; running serially";
    return nullptr;
  }
  g_failed_threads = 0;
  g_fallback_reason.clear();
  g_pool = pool.release();
  return g_pool;
}

}  // namespace

int default_num_threads() {
  const int e = env_threads();
  return e > 0 ? e : affinity_cpus();
}

int get_num_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n == 0) {
    n = default_num_threads();
    int expected = 0;
    g_threads.compare_exchange_strong(expected, n);
    n = g_threads.load(std::memory_order_relaxed);
  }
  return n;
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(n));
  std::lock_guard<std::mutex> lk(g_config_mutex);
  g_threads.store(n, std::memory_order_relaxed);
  g_failed_threads = 0;  // the next parallel_for tries to start the workers again
  g_fallback_reason.clear();
}

void parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
  if (n_tasks <= 0) return;
  const int want = get_num_threads();
  std::unique_lock<std::mutex> job(g_job_mutex, std::defer_lock);
  if (n_tasks == 1 || want <= 1 || !job.try_lock()) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  Pool* pool = nullptr;
  {
    std::lock_guard<std::mutex> lk(g_config_mutex);
    install_fork_handler();
    pool = ensure_pool(want);
  }
  if (pool == nullptr) {
    job.unlock();
    for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  pool->run(n_tasks, fn);
}

PoolInfo pool_info() {
  PoolInfo info;
  std::lock_guard<std::mutex> job(g_job_mutex);  // waits for a job using the pool to finish
  std::lock_guard<std::mutex> lk(g_config_mutex);
  install_fork_handler();
  const int want = get_num_threads();
  const Pool* pool = ensure_pool(want);
  info.requested = want;
  info.threads = pool != nullptr ? pool->workers() + 1 : 1;
  if (pool == nullptr && g_failed_threads == want) info.serial_fallback_reason = g_fallback_reason;
  return info;
}

namespace detail {
void fail_thread_start_for_testing(int nth) { g_fail_countdown.store(nth); }
}  // namespace detail

}  // namespace qlora
