"""tinyddpm: a minimal, from-scratch denoising diffusion library (see README.md for the file map)."""
from . import functional, random
from .kernels import cpu_threads  # noqa: F401  (BLAS single-threaded, the kernels' thread pool)
from .device import DeviceError, get_device, set_device
from .tensor import Tensor, is_grad_enabled, no_grad

__all__ = ["Tensor", "no_grad", "is_grad_enabled", "set_device", "get_device", "DeviceError",
           "functional", "random"]
__version__ = "0.1.0"
