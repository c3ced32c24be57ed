// A persistent pool of worker threads for the core's own parallel loops (no OpenMP: a second
// OpenMP runtime beside torch's, or oversubscription with NumPy's BLAS, are common failures).
// The calling thread works too. One job runs on the pool at a time; a caller that finds the
// pool busy (another Python thread inside a forward) runs its job on its own thread instead of
// waiting, which keeps concurrent callers independent and deadlock-free. After fork() the
// child starts with no workers and builds them again on first use.
#pragma once

#include <cstdint>
#include <functional>

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

}  // namespace qlora
