// A persistent pool of worker threads for the core's own parallel loops (no OpenMP: a second
// OpenMP runtime beside torch's, or oversubscription with NumPy's BLAS, are common failures).
// The calling thread works too. One job runs on the pool at a time; a caller that finds the
// pool busy (another Python thread inside a forward) runs its job on its own thread instead of
// waiting, which keeps concurrent callers independent and deadlock-free. After fork() the
// child starts with no workers and builds them again on first use.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace qlora {

// Threads used by parallel_for (the caller counts as one). Default: QLORA_NUM_THREADS if set
// to a positive integer, else the number of CPUs in this process's affinity mask.
int get_num_threads();
// n >= 1; throws std::invalid_argument otherwise. Takes effect for the next parallel_for.
void set_num_threads(int n);
// The default described above, for reporting.
int default_num_threads();

// Runs fn(task) for every task in [0, n_tasks) across the pool and waits for all of them.
// Which thread runs a task is unspecified; the first exception thrown by any task is rethrown
// here after all tasks have finished or been skipped.
void parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& fn);

// What parallel_for runs on, for introspection.
struct PoolInfo {
  int requested = 1;  // get_num_threads()
  int threads = 1;    // threads parallel_for uses, the caller included; 1 when it runs serially
  // Why the pool could not start its workers (the OS refused a thread: process or memory
  // limits), empty when it did. After such a failure parallel_for runs every task on the
  // calling thread, with the same results, until set_num_threads is called again.
  std::string serial_fallback_reason;
};
// Starts the workers for the current thread count if they are not running (waiting for a job
// that is using the pool), so the answer is what the next parallel_for will use. Not to be
// called from inside a parallel_for task (it would wait for its own job).
PoolInfo pool_info();

namespace detail {
// Test hook: the nth worker thread started from now on (1-based) fails as std::thread does when
// the OS refuses one (std::system_error, EAGAIN). 0 turns it off.
void fail_thread_start_for_testing(int nth);
}  // namespace detail

}  // namespace qlora
