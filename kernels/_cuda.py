"""CUDA plumbing shared by the kernel files.

numba decides when ``numba.cuda`` is first imported whether it is the real driver or the CPU
simulator (``NUMBA_ENABLE_CUDASIM=1``), so the choice must be made before this module loads.
Kernels run on whatever array they are given: NumPy arrays under the simulator, CuPy arrays
(through ``__cuda_array_interface__``) on a real GPU.
"""
import numba
import numpy as np
from numba import cuda

SIMULATED = bool(numba.config.ENABLE_CUDASIM)

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
