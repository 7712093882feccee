"""CPU parallelism of the kernels: BLAS single-threaded, the work split over images by a small pool.

OpenBLAS's own threads meet at a barrier inside every GEMM, and the CPU kernels make hundreds of
small GEMMs per conv. When another process keeps the cores busy, one descheduled BLAS thread stalls
each of them: the 14×14 C64 Winograd forward went from 10.8 ms to 3360 ms beside two busy loops
(with single-threaded BLAS: 19 ms), and a training step from 0.9 s to 29 s. So importing this module
limits BLAS to one thread for the process (threadpoolctl), and the heavy ops hand whole chunks of
images (transform, GEMM, epilogue) to ``parallel_map``'s threads, which release the GIL in numba
(``nogil=True``) and in BLAS: one join per op instead of one barrier per GEMM, and the numba loops,
single-threaded before, run on every core. Results do not depend on the thread count or on which
thread ran what: each item writes its own part, and partial sums are added in item order.

``TINYDDPM_NUM_THREADS`` sets the pool size (default: the cores this process may run on).
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy  # noqa: F401  (loads NumPy's BLAS: threadpoolctl limits only libraries already loaded)
from threadpoolctl import threadpool_limits

threadpool_limits(1, user_api="blas")

# An op cuts its work into this many tasks, whatever the thread count (so its sums run in one order),
# enough that threads which finish early take more of it.
TASKS = 8

_pool = None
_pool_lock = threading.Lock()
_in_worker = threading.local()


def num_threads():
    """Threads of the pool: $TINYDDPM_NUM_THREADS, else the cores this process may run on."""
    value = os.environ.get("TINYDDPM_NUM_THREADS")
    if value is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"TINYDDPM_NUM_THREADS={value!r}: give a whole number of threads >= 1")
    return int(value)


def _executor():
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(num_threads(), thread_name_prefix="tinyddpm",
                                       initializer=setattr, initargs=(_in_worker, "active", True))
        return _pool


def parallel_map(fn, items):
    """[fn(item) for item in items], the items spread over the pool's threads as each frees up (so a
    thread the OS deschedules holds back only its own items). Serial for one item, one thread, or a
    call from inside the pool (a nested map would wait on itself)."""
    items = list(items)
    if len(items) < 2 or num_threads() == 1 or getattr(_in_worker, "active", False):
        return [fn(item) for item in items]
    return list(_executor().map(fn, items))


def task_slices(count):
    """range(count) cut into TASKS (or fewer, if count is smaller) near-equal slices: the tasks of an op."""
    parts = max(1, min(TASKS, count))
    bounds = [count * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]
