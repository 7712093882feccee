"""The random generators behind parameter initialisation and dropout.

- The host generator, an explicit NumPy ``Generator``, draws every parameter initialisation (then
  moved to the device) and the dropout masks on ``cpu`` and ``cudasim``.
- The device generator draws the dropout masks of GPU arrays on the GPU, so no mask crosses from
  the host each step: cuRAND's Philox4x32-10 through CuPy, addressed by (seed, offset).

``manual_seed`` seeds both; their states go into checkpoints so a resume is bit-exact.
``use_rank_stream`` moves both to a data-parallel rank's own stream (tinyddpm.distributed).
"""
import functools

import numpy as np

from . import device as _dev


class DeviceGenerator:
    """Uniform float32 draws in (0, 1] (cuRAND's convention) on the GPU from cuRAND's counter-based
    Philox4x32-10 generator, through CuPy.

    Philox computes the number at position k of seed s's stream directly from (s, k), so the whole
    state is two integers: each draw starts at the absolute position ``offset`` and moves it past
    the numbers drawn. Restoring (seed, offset) continues the stream exactly — PyTorch's CUDA
    generator keeps the same pair."""

    # Philox yields 4 numbers per counter: starting every draw on a multiple of 4 keeps draws of
    # any size from sharing a counter, whatever cuRAND does with a partial one.
    ALIGN = 4

    def __init__(self, seed, offset=0):
        self.seed, self.offset = int(seed), int(offset)

    def random(self, shape):
        import cupy
        from cupy.cuda import curand
        handle = _curand_handle()
        out = cupy.empty(shape, dtype=np.float32)
        curand.setPseudoRandomGeneratorSeed(handle, self.seed)
        curand.setGeneratorOffset(handle, self.offset)
        curand.generateUniform(handle, out.data.ptr, out.size)  # on CuPy's current stream, as our kernels
        self.offset += -(-out.size // self.ALIGN) * self.ALIGN
        return out


@functools.cache
def _curand_handle():
    """One cuRAND Philox handle for the process: every draw sets its seed and offset, so the
    generators share it (and a ``cpu`` run, which never draws on the GPU, never imports CuPy)."""
    from cupy.cuda import curand
    return curand.createGenerator(curand.CURAND_RNG_PSEUDO_PHILOX4_32_10)


_generator = np.random.default_rng(0)
_device_generator = DeviceGenerator(0)


def manual_seed(seed):
    global _generator, _device_generator
    _generator = np.random.default_rng(seed)
    _device_generator = DeviceGenerator(seed)


# Rank r's device stream starts r·2⁵⁰ numbers into the seed's Philox stream: Philox computes any
# position directly, so this costs nothing, and no rank draws 2⁵⁰ numbers in a run (the base preset's
# dropout draws ~10¹² in 40,000 steps).
RANK_STREAM_STRIDE = 1 << 50


def use_rank_stream(rank):
    """Move both generators to rank ``rank``'s stream, after every rank drew the same parameter
    initialisation: the host generator jumped ahead rank·(φ − 1)·2¹²⁸ draws (PCG64's ``jumped``,
    numbers far enough apart in its 2¹²⁸-long cycle that no two ranks' streams overlap), the device
    one rank·2⁵⁰. Rank 0 keeps the streams unchanged, so one process draws
    the dropout masks it always did. Dropout is the only thing these streams draw during training,
    and the ranks' masks need not agree (each rank masks its own images)."""
    global _generator, _device_generator
    if rank:
        _generator = np.random.Generator(_generator.bit_generator.jumped(rank))
        _device_generator = DeviceGenerator(_device_generator.seed,
                                            _device_generator.offset + rank * RANK_STREAM_STRIDE)


def generator():
    return _generator


def uniform(shape, like):
    """Uniform draws of ``shape`` where array ``like`` lives: the device generator's float32 in (0, 1]
    for a GPU array, the host generator's float64 in [0, 1) otherwise (either way P(u ≥ p) = 1 − p)."""
    return _device_generator.random(shape) if _dev.is_cupy(like) else _generator.random(shape)


def get_state():
    """The host generator's state (what checkpoints store as ``init_rng``)."""
    return _generator.bit_generator.state


def set_state(state):
    _generator.bit_generator.state = state


def get_device_state():
    """The device generator's state, {"seed": s, "offset": k} (checkpoints store it as ``device_rng``)."""
    return {"seed": _device_generator.seed, "offset": _device_generator.offset}


def set_device_state(state):
    global _device_generator
    _device_generator = DeviceGenerator(state["seed"], state["offset"])
