"""Count what a piece of work costs the host: numba CUDA kernel launches, array-module operations and
device→host transfers; and where its time goes, op by op.

    with instrument.count() as counts:
        trainer.train_step()
    counts.launches, counts.array_ops, counts.transfers

- ``launches``: numba.cuda kernel launches (on ``cuda`` and ``cudasim``; none run on ``cpu``).
- ``array_ops``: calls of functions of the module ``tinyddpm.device.array_module`` returns (NumPy or
  CuPy: ``xp.add(...)``, ``xp.sum(...)``). Array operators and methods (``a + b``, ``a.sum()``) bypass
  the module and are not counted, so this measures code written against ``xp`` — the optimisers, the
  EMA and clipping are, entirely. On a GPU each is about one kernel launch.
- ``transfers``: calls of ``tinyddpm.device.to_host``, the one door from device to host.

``op_times()`` times every autograd ``Function`` (forward and, for those recorded, backward) by
class, wall clock: on a GPU it measures launches, not kernels, so it is a CPU profile
(benchmarks/profile_step.py prints it).

The counters exist only inside the block: entering it patches those three entry points and leaving it
restores them, so outside a block nothing is counted and nothing costs.
"""
import collections
import contextlib
import dataclasses
import functools
import sys
import time

from . import device as _dev
from . import tensor as _tensor


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


@dataclasses.dataclass
class OpTimes:
    """Seconds and calls per Function class name, forward and backward apart."""
    forward: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    backward: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@contextlib.contextmanager
def op_times():
    """Time every Function's forward (its whole ``apply``) and the backward of the recorded ones,
    inside the block; yields an ``OpTimes`` that fills as the block runs. A backward runs when
    ``loss.backward()`` does: call it inside the block to have it counted."""
    times = OpTimes()
    original = _tensor.Function.__dict__["apply"]  # the classmethod itself, not a method bound to Function
    apply = original.__func__

    def timed_apply(cls, *inputs, **params):
        t0 = time.perf_counter()
        out = apply(cls, *inputs, **params)
        times.forward[cls.__name__] += time.perf_counter() - t0
        times.calls[cls.__name__] += 1
        fn = out._fn
        if fn is not None:  # this instance's backward, timed when it runs
            backward = fn.backward

            def timed_backward(grad):
                t1 = time.perf_counter()
                grads = backward(grad)
                times.backward[cls.__name__] += time.perf_counter() - t1
                return grads
            fn.backward = timed_backward
        return out

    _tensor.Function.apply = classmethod(timed_apply)
    try:
        yield times
    finally:
        _tensor.Function.apply = original
