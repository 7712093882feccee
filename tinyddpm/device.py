"""Devices: where arrays live and which kernels run.

- ``cpu``: NumPy arrays and the CPU kernels (BLAS-backed).
- ``cuda``: CuPy arrays and the numba.cuda kernels (CuPy/cuBLAS for matmul and elementwise work).
- ``cudasim``: NumPy arrays and the same numba.cuda kernels, executed by numba's CUDA simulator.
  numba fixes simulator-or-driver when ``numba.cuda`` is first imported, so ``cudasim`` must be chosen
  before any kernel module loads (or ``NUMBA_ENABLE_CUDASIM=1`` set before Python starts).
"""
import ctypes
import ctypes.util
import os
import sys

import numpy as np

DEVICES = ("cpu", "cuda", "cudasim")
_device = os.environ.get("TINYDDPM_DEVICE", "cpu")


class DeviceError(RuntimeError):
    """The requested device cannot be used here (the message says why)."""


def set_device(name):
    """Select the device for new tensors and for kernel dispatch."""
    global _device
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    if name == "cudasim":
        _enable_simulator()
    elif name == "cuda":
        _require_gpu()
    _device = name


def get_device():
    return _device


def _numba_cuda_mode():
    """'simulator', 'driver', or None when numba.cuda is not imported yet."""
    if "numba.cuda" not in sys.modules:
        return None
    import numba
    return "simulator" if numba.config.ENABLE_CUDASIM else "driver"


def _enable_simulator():
    if _numba_cuda_mode() == "driver":
        raise DeviceError("device 'cudasim' must be chosen before numba.cuda is imported "
                          "(call set_device('cudasim') first, or set NUMBA_ENABLE_CUDASIM=1)")
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba" in sys.modules:  # numba read its config at import: update it in place
        import numba
        numba.config.ENABLE_CUDASIM = 1


def _require_gpu():
    if _numba_cuda_mode() == "simulator" or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        raise DeviceError("device 'cuda' is unavailable: numba's CUDA simulator is enabled "
                          "(unset NUMBA_ENABLE_CUDASIM)")
    try:
        import cupy
        available = cupy.is_available()
    except Exception as e:  # ImportError, or a CUDA runtime that fails to load
        raise DeviceError(f"device 'cuda' needs CuPy and a CUDA GPU: {e}") from None
    if not available:
        raise DeviceError("device 'cuda' needs a CUDA GPU, but CuPy finds none usable here")


def is_cupy(a):
    return type(a).__module__.startswith("cupy")


def array_module(a):
    """numpy or cupy: the module that owns array ``a``."""
    if is_cupy(a):
        import cupy
        return cupy
    return np


def kernel_backend(a):
    """Which kernel implementations serve array ``a``: 'cuda' (GPU or simulator) or 'cpu'."""
    return "cuda" if is_cupy(a) or _device == "cudasim" else "cpu"


def to_device(a, device=None):
    """Move an array to ``device`` (default: the current one); no copy when it is already there."""
    device = device or _device
    if device == "cuda":
        import cupy
        return cupy.asarray(a)
    return to_numpy(a)


def to_numpy(a):
    """``a`` as a NumPy array: read back through ``to_host`` when it lives on the GPU, as is otherwise."""
    return to_host(a) if is_cupy(a) else np.asarray(a)


def to_host(a):
    """The one door from the device to the host: every read of device data (``Tensor.item()``,
    ``Tensor.numpy()``, ``to_numpy`` of a GPU array) passes here. On a GPU each call waits for the
    queued work and copies, so a training step should pass here once (its loss);
    ``tinyddpm.instrument`` counts the calls. Tensor reads count on every device, so a count taken
    on ``cpu`` is the one a ``cuda`` run would see."""
    return a.get() if is_cupy(a) else np.asarray(a)


def retain_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the OS.

    A training step allocates and frees the same large arrays (im2col columns, activations) every
    iteration; returned pages must be faulted in again on first touch, which cost ~15% of a CPU
    step here. This is the trade PyTorch's caching allocators make. A no-op without glibc."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(libc_name)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)  # large arrays from the heap, not fresh mmaps
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 31)  # and keep the heap's free pages
