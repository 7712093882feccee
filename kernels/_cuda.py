"""CUDA plumbing shared by the kernel files: kernel registration, launch helpers and the device code
more than one op uses (block reductions, the column sum of two-stage reductions).

numba decides when ``numba.cuda`` is first imported whether it is the real driver or the CPU
simulator (``NUMBA_ENABLE_CUDASIM=1``), so the choice must be made before this module loads.
Kernels run on whatever array they are given: NumPy arrays under the simulator, CuPy arrays
(through ``__cuda_array_interface__``) on a real GPU.
"""
import sys
import threading

import numba
import numpy as np
from numba import cuda, float32

SIMULATED = bool(numba.config.ENABLE_CUDASIM)

# float32 constants: a Python float literal in a kernel would promote its arithmetic to float64.
ZERO, HALF, ONE = float32(0), float32(0.5), float32(1)


def _make_simulated_shared_arrays_thread_safe():
    """The simulator runs each CUDA thread as a Python thread, and its ``cuda.shared.array`` (numba-cuda
    0.30, FakeCUDAShared.array) looks the block's array up by the caller's source line in a dict and,
    if absent, creates and stores it, with no lock. A thread switch between the lookup and the store
    lets two threads of a block create two arrays: one of them then computes on a private,
    uninitialised "shared" tile. We saw this as rare wrong results and exp() overflows in the
    simulator tests (about one full test run in three). This is the same lookup under a lock."""
    from numba.core import types
    from numba.cuda.simulator.kernelapi import FakeCUDAShared
    from numba.np import numpy_support
    unsafe_array, lock = FakeCUDAShared.array, threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory (no lookup), or the simulator's error
            return unsafe_array(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            if key not in self._allocations:
                np_dtype = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                self._allocations[key] = np.empty(shape, np_dtype)
            return self._allocations[key]
    FakeCUDAShared.array = array


def _pin_this_module_during_simulated_launches():
    """The simulator resolves ``cuda.threadIdx`` in Python by swapping a fake ``cuda`` module into the
    globals of the function it runs, counted per module: swapped on the first entry, the real module
    restored when the count drops back to 0. The device functions below live in this module, not in
    the kernels' modules (whose swap lasts the whole launch), so this module is swapped and restored
    over and over within a launch, and once in a while a thread saw the real module here
    (``module 'numba.cuda' has no attribute 'threadIdx'`` in block_reduce). Swapping this module too
    for the whole launch keeps the count above 0 until every thread is done."""
    from contextlib import contextmanager

    from numba.cuda.simulator import kernel as simulated
    swap = simulated.swapped_cuda_module

    @contextmanager
    def swap_with_this_module(fn, fake_cuda_module):
        with swap(fn, fake_cuda_module), swap(ceil_div, fake_cuda_module):  # any function of this module
            yield
    simulated.swapped_cuda_module = swap_with_this_module


if SIMULATED:
    _make_simulated_shared_arrays_thread_safe()
    _pin_this_module_during_simulated_launches()
    # Every syncthreads() waits for all of a block's Python threads, and with the default 5 ms thread
    # switch interval that wait dominates: switching every 0.1 ms makes a simulated U-Net step ~2.5x
    # faster (0.01 ms is slower again).
    sys.setswitchinterval(1e-4)

# (qualified name, python function, signature) of every kernel, for compile_ptx in CI.
PTX_KERNELS = []
# (dispatcher, signature) of every kernel, for compile_all on a GPU.
DISPATCHERS = []


def kernel(signature):
    """``cuda.jit`` a kernel and register it, with the signature it is compiled to PTX for and by
    ``compile_all``. The kernel still specialises on the first launch's argument types if they differ;
    cache=True keeps every compiled kernel on disk, so only a machine's first process compiles it."""
    def wrap(fn):
        PTX_KERNELS.append((f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}", fn, signature))
        dispatcher = cuda.jit(cache=True)(fn)
        DISPATCHERS.append((dispatcher, signature))
        # the simulator's kernel[grid, block] sets the dims on the kernel object itself and returns it,
        # so a cached one would launch with whatever dims the latest subscript set
        return dispatcher if SIMULATED else Kernel(dispatcher)
    return wrap


class Kernel:
    """A kernel whose launch configurations ``kernel[grid, block]`` are built once per (grid, block) and
    reused: numba builds a new one on every subscript (and checks the grid size for its low-occupancy
    warning each time), and a training step launches the same few shapes hundreds of times. Anything
    else is the numba dispatcher's."""

    def __init__(self, dispatcher):
        self.dispatcher, self._configurations = dispatcher, {}

    def __getitem__(self, dims):
        configured = self._configurations.get(dims)
        if configured is None:
            configured = self._configurations[dims] = self.dispatcher[dims]
        return configured

    def __getattr__(self, name):
        return getattr(self.dispatcher, name)


def device_function(fn):
    """``cuda.jit(device=True)``, inlined into the kernels that call it. ``inline="always"`` also
    lets compile_ptx run without a GPU: numba-cuda 0.30 asks the driver for the compute capability
    when it compiles a separately linked device function."""
    return cuda.jit(device=True, inline="always")(fn)


# ---- launch plumbing (host side) -------------------------------------------------------------
def array_module(a):
    """NumPy for NumPy arrays (the simulator), CuPy for CuPy arrays (a real GPU)."""
    if isinstance(a, np.ndarray):
        return np
    import cupy
    return cupy


def ceil_div(a, b):
    return -(-a // b)


def require_float32(op, **arrays):
    """Raise one ValueError naming every argument that is not a C-contiguous float32 array."""
    bad = [name for name, a in arrays.items() if a.dtype != np.float32 or not a.flags.c_contiguous]
    if bad:
        raise ValueError(f"{op} CUDA kernels need C-contiguous float32 arrays: {', '.join(bad)} "
                         f"{'is' if len(bad) == 1 else 'are'} not")


# ---- shared device code ----------------------------------------------------------------------
@device_function
def unravel(idx, a):
    """(i0, i1, i2, i3) such that a[i0, i1, i2, i3] is element idx of the C-ordered 4-D array a."""
    i3 = idx % a.shape[3]
    idx //= a.shape[3]
    i2 = idx % a.shape[2]
    idx //= a.shape[2]
    return idx // a.shape[1], idx % a.shape[1], i2, i3


@device_function
def block_reduce(buf, value, take_max):
    """max (take_max) or Σ of `value` over the block's threads, returned to every thread: a
    shared-memory tree of log2(blockDim) halving steps (blockDim a power of two, buf that long).
    take_max is a constant at each call site, so the inlined branch folds away."""
    tid = cuda.threadIdx.x
    buf[tid] = value
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if tid < half:
            buf[tid] = max(buf[tid], buf[tid + half]) if take_max else buf[tid] + buf[tid + half]
        cuda.syncthreads()
        half //= 2
    total = buf[0]
    cuda.syncthreads()  # every thread has read buf[0] before the next call overwrites it
    return total


@device_function
def block_sum(buf, value):
    return block_reduce(buf, value, False)


@device_function
def block_max(buf, value):
    return block_reduce(buf, value, True)


@device_function
def block_sum3(buf3, a, b, c):
    """(Σa, Σb, Σc) over the block's threads: block_sum's tree for three values at once in a (3, blockDim)
    buf3, so the same sums in the same order with one syncthreads per level instead of three."""
    tid = cuda.threadIdx.x
    buf3[0, tid], buf3[1, tid], buf3[2, tid] = a, b, c
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if tid < half:
            buf3[0, tid] += buf3[0, tid + half]
            buf3[1, tid] += buf3[1, tid + half]
            buf3[2, tid] += buf3[2, tid + half]
        cuda.syncthreads()
        half //= 2
    totals = buf3[0, 0], buf3[1, 0], buf3[2, 0]
    cuda.syncthreads()  # every thread has read the totals before the next call overwrites them
    return totals


@kernel("void(float32[:,::1], float32[::1])")
def column_sum(part, out):
    """out[e] = Σ_z part[z, e]: the second stage of a two-stage reduction, one thread per column
    (consecutive threads read consecutive e, so the loads coalesce; no atomics, deterministic)."""
    e = cuda.grid(1)
    if e < out.shape[0]:
        acc = ZERO
        for z in range(part.shape[0]):
            acc += part[z, e]
        out[e] = acc


COLUMN_SUM_THREADS = 128


def sum_columns(part):
    """Σ over axis 0 of the (Z, E) float32 array part, by column_sum."""
    out = array_module(part).empty(part.shape[1], np.float32)
    column_sum[ceil_div(part.shape[1], COLUMN_SUM_THREADS), COLUMN_SUM_THREADS](part, out)
    return out
