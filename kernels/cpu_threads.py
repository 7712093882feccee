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

``TINYDDPM_NUM_THREADS`` sets the thread count (default: the cores this process may run on): the
calling thread and that many minus one helpers, which take items from a shared counter. The caller
works from the start instead of waiting for woken threads (a ThreadPoolExecutor map of 8 empty items
took 0.2 ms here, about one wake-up; ops call this ~40 times a forward).
"""
import itertools
import math
import os
import queue
import threading

import numpy  # (also loads NumPy's BLAS before threadpoolctl, which limits only libraries already loaded)
from threadpoolctl import threadpool_limits

threadpool_limits(1, user_api="blas")

# An op cuts its work into this many tasks, whatever the thread count (so its sums run in one order),
# enough that threads which finish early take more of it.
TASKS = 8
# Below this many elements a row-wise op runs as one task: waiting for a woken helper cost more than
# it saved (GroupNorm at N = 64, 7×7, C64, 200k elements: 0.20 ms with a helper, 0.11 ms without; at
# 28×28, C32: 0.44 against 0.57).
POOL_MIN_ELEMENTS = 1 << 19

_helpers = []               # the helper threads, started as the thread count asks
_scratch = threading.local()  # per thread: name -> (flat work buffer, its views by (shape, dtype)) of `scratch`
_jobs = queue.SimpleQueue()  # one entry per helper a map wants
_start_lock = threading.Lock()
_in_map = threading.local()  # set while a thread runs items: a map from inside one runs inline


def num_threads():
    """Threads that run a map: $TINYDDPM_NUM_THREADS, else the cores this process may run on."""
    value = os.environ.get("TINYDDPM_NUM_THREADS")
    if value is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"TINYDDPM_NUM_THREADS={value!r}: give a whole number of threads >= 1")
    return int(value)


class _Map:
    """One parallel_map: items handed out by a counter; `finished` is set when every item has run."""

    def __init__(self, fn, items):
        self.fn, self.items, self.results = fn, items, [None] * len(items)
        self.next_item, self.done_items = itertools.count(), itertools.count(1)  # next() is atomic under the GIL
        self.finished, self.error = threading.Event(), None

    def run_items(self):
        _in_map.active = True
        try:
            while (i := next(self.next_item)) < len(self.items):
                try:
                    self.results[i] = self.fn(self.items[i])
                except BaseException as error:  # re-raised in the caller
                    self.error = error
                if next(self.done_items) == len(self.items):
                    self.finished.set()
        finally:
            _in_map.active = False


def _helper():
    while True:
        _jobs.get().run_items()


def _ensure_helpers(count):
    with _start_lock:
        while len(_helpers) < count:
            _helpers.append(threading.Thread(target=_helper, name=f"tinyddpm-{len(_helpers)}", daemon=True))
            _helpers[-1].start()


def parallel_map(fn, items):
    """[fn(item) for item in items], run by the calling thread and num_threads() − 1 helpers, each
    taking the next item as it frees up (so a thread the OS deschedules holds back only its own
    items). Serial for one item, one thread, or a call from inside an item."""
    items = list(items)
    threads = num_threads()
    if len(items) < 2 or threads == 1 or getattr(_in_map, "active", False):
        return [fn(item) for item in items]
    job = _Map(fn, items)
    helpers = min(threads, len(items)) - 1
    _ensure_helpers(helpers)
    for _ in range(helpers):
        _jobs.put(job)
    job.run_items()
    job.finished.wait()
    if job.error is not None:
        raise job.error
    return job.results


def scratch(name, shape, dtype):
    """An uninitialised work array of this shape for the calling thread, from a buffer kept for the
    next call with this name on this thread (grown when too small): a conv's per-task buffers, a few
    MB each, were fresh pages to fault in on every call (3 ms of a 7 ms 7×7 C128 Winograd forward).
    Only one task runs on a thread at a time, so a name is never in use twice at once. The views are
    kept too (making one cost ~20 µs of NumPy calls, ~40 times a conv)."""
    buffer, views = _scratch.__dict__.get(name, (None, {}))
    key = (shape, dtype)
    if key not in views:
        size = math.prod(shape) * numpy.dtype(dtype).itemsize
        if buffer is None or buffer.size < size:
            buffer, views = numpy.empty(size, numpy.uint8), {}  # views of the old buffer go with it
        views[key] = buffer[:size].view(dtype).reshape(shape)
        _scratch.__dict__[name] = (buffer, views)
    return views[key]


def task_slices(count):
    """range(count) cut into TASKS (or fewer, if count is smaller) near-equal slices: the tasks of an op."""
    return even_slices(count, max(1, min(TASKS, count)))


def even_slices(count, parts):
    """range(count) cut into `parts` slices whose sizes differ by at most one."""
    bounds = [count * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def row_tasks(count, elements):
    """task_slices(count), or one task when the op has fewer than POOL_MIN_ELEMENTS elements. Only for
    ops whose rows are independent (each output element is computed the same way whatever the split)."""
    return task_slices(count) if elements >= POOL_MIN_ELEMENTS else [slice(0, count)]
