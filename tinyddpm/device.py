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
import re
import subprocess
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
        require_gpu()
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


def require_gpu():
    """Raise DeviceError, in one line that says what to do, unless device 'cuda' can run here."""
    if _numba_cuda_mode() == "simulator" or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        raise DeviceError("device 'cuda' is unavailable: numba's CUDA simulator is enabled "
                          "(unset NUMBA_ENABLE_CUDASIM)")
    try:
        import cupy
        available = cupy.is_available()
    except ModuleNotFoundError as e:
        if e.name.split(".")[0] != "cupy":
            raise DeviceError(f"device 'cuda' needs CuPy and a CUDA GPU: {e}") from None
        raise DeviceError(f"device 'cuda' needs CuPy, which is not installed: {cuda_install()}") from None
    except Exception as e:  # a CuPy that fails to load its CUDA runtime
        raise DeviceError(f"device 'cuda' needs CuPy and a CUDA GPU: {e}") from None
    if not available:
        raise DeviceError("device 'cuda' needs a CUDA GPU, but CuPy finds none usable here")


def driver_cuda_version():
    """The "CUDA Version" nvidia-smi prints (the newest CUDA the driver runs), e.g. "12.8"; None without
    nvidia-smi or a driver it can talk to."""
    try:
        run = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", run.stdout)
    return (int(found.group(1)), int(found.group(2))) if found else None


def cuda_install():
    """The pip command of the GPU extra for this machine's driver (setup.cfg: cuda12 or cuda13, by the
    CUDA version nvidia-smi prints), or why there is none to pick."""
    version = driver_cuda_version()
    if version is None:
        return ('nvidia-smi finds no NVIDIA driver here; on a GPU machine: pip install -e ".[cuda12]" or '
                '".[cuda13]", by the "CUDA Version" nvidia-smi prints')
    shown = f"CUDA {version[0]}.{version[1]}"
    if version[0] < 12:
        return f"nvidia-smi reports {shown}, and the GPU extras need a driver for CUDA 12 or newer"
    return f'pip install -e ".[cuda{min(version[0], 13)}]" (nvidia-smi reports {shown})'


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
