"""Count what a piece of work costs the host: numba CUDA kernel launches, array-module operations and
device→host transfers.

    with instrument.count() as counts:
        trainer.train_step()
    counts.launches, counts.array_ops, counts.transfers

- ``launches``: numba.cuda kernel launches (on ``cuda`` and ``cudasim``; none run on ``cpu``).
- ``array_ops``: calls of functions of the module ``tinyddpm.device.array_module`` returns (NumPy or
  CuPy: ``xp.add(...)``, ``xp.sum(...)``). Array operators and methods (``a + b``, ``a.sum()``) bypass
  the module and are not counted, so this measures code written against ``xp`` — the optimisers, the
  EMA and clipping are, entirely. On a GPU each is about one kernel launch.
- ``transfers``: calls of ``tinyddpm.device.to_host``, the one door from device to host.

The counters exist only inside the block: entering it patches those three entry points and leaving it
restores them, so outside a block nothing is counted and nothing costs.
"""
import contextlib
import dataclasses
import functools
import sys

from . import device as _dev


@dataclasses.dataclass
class Counts:
    launches: int = 0
    array_ops: int = 0
    transfers: int = 0


class _CountingModule:
    """numpy or cupy, with every call of one of its functions (ufuncs included) counted. Types
    (``xp.float32``) and submodules pass through uncounted."""

    def __init__(self, module, counts):
        self._module, self._counts = module, counts

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        @functools.wraps(attr)
        def counted(*args, **kwargs):
            self._counts.array_ops += 1
            return attr(*args, **kwargs)
        return counted


@contextlib.contextmanager
def _patched(owner, name, make_replacement):
    """``owner.name`` replaced by ``make_replacement(original)`` for the block."""
    original = getattr(owner, name)
    setattr(owner, name, make_replacement(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _launch_point():
    """(class, method) through which every numba.cuda kernel launch passes, and a predicate saying
    whether a call of it is a launch; None where no CUDA kernel can launch.

    numba.cuda is imported only if it already is or the device already chose between simulator and
    driver: importing it earlier would fix that choice before ``set_device``."""
    if "numba.cuda" not in sys.modules and _dev.get_device() == "cpu":
        return None  # CUDA kernels are imported with numba.cuda, and cpu runs none of them
    import numba
    if numba.config.ENABLE_CUDASIM:
        from numba.cuda.simulator import kernel as simulator
        # a simulated kernel object also serves device functions and calls from inside a kernel
        return simulator.FakeCUDAKernel, "__call__", lambda k: not (k._device or simulator._kernel_context)
    from numba.cuda import dispatcher
    return dispatcher._LaunchConfiguration, "__call__", lambda config: True


@contextlib.contextmanager
def count():
    """Count launches, array-module operations and device→host transfers inside the block (yields
    a ``Counts`` that fills as the block runs)."""
    counts = Counts()

    def counting_launches(launch):
        def call(self, *args):
            counts.launches += is_launch(self)
            return launch(self, *args)
        return call

    def counting_transfers(to_host):
        def read(a):
            counts.transfers += 1
            return to_host(a)
        return read

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(_dev, "array_module", lambda array_module: (
            lambda a: _CountingModule(array_module(a), counts))))
        stack.enter_context(_patched(_dev, "to_host", counting_transfers))
        point = _launch_point()
        if point is not None:
            owner, method, is_launch = point
            stack.enter_context(_patched(owner, method, counting_launches))
        yield counts
