"""CUDA plumbing shared by the kernel files.

numba decides when ``numba.cuda`` is first imported whether it is the real driver or the CPU
simulator (``NUMBA_ENABLE_CUDASIM=1``), so the choice must be made before this module loads.
Kernels run on whatever array they are given: NumPy arrays under the simulator, CuPy arrays
(through ``__cuda_array_interface__``) on a real GPU.
"""
import sys
import threading

import numba
import numpy as np
from numba import cuda

SIMULATED = bool(numba.config.ENABLE_CUDASIM)


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


if SIMULATED:
    _make_simulated_shared_arrays_thread_safe()

# (qualified name, python function, signature) of every kernel, for compile_ptx in CI.
PTX_KERNELS = []


def kernel(signature):
    """``cuda.jit`` a kernel and register it, with the signature it is compiled to PTX for."""
    def wrap(fn):
        PTX_KERNELS.append((f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}", fn, signature))
        return cuda.jit(fn)  # lazily specialised on the first launch's argument types
    return wrap


def device_function(fn):
    """``cuda.jit(device=True)``, inlined into the kernels that call it. ``inline="always"`` also
    lets compile_ptx run without a GPU: numba-cuda 0.30 asks the driver for the compute capability
    when it compiles a separately linked device function."""
    return cuda.jit(device=True, inline="always")(fn)


def array_module(a):
    """NumPy for NumPy arrays (the simulator), CuPy for CuPy arrays (a real GPU)."""
    if isinstance(a, np.ndarray):
        return np
    import cupy
    return cupy


def ceil_div(a, b):
    return -(-a // b)
