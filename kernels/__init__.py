"""Hand-written kernels, one module per op (imported as ``tinyddpm.kernels``).

Each op module reads top to bottom: the math, the NumPy reference (ground truth), the CPU
implementation the engine uses, CUDA versions 1..N (numba.cuda kernels ``<op>_<pass>_v<N>``), their
launchers, and last its version table VERSIONS inside its ``BENCH`` (kernels/_bench.py), which the
harness benchmarks/bench_kernels.py, the PTX build (kernels/ptx.py) and the tests all read.
Shared code has one home: kernels/_cuda.py (launch plumbing, block reductions), kernels/_bench.py.
"""
import importlib

# Every op, named as its module here.
OPS = ("conv2d", "group_norm", "group_norm_silu", "attention")


def load_bench(op):
    """kernels/<op>.py's BENCH. Imported only when asked for: a kernel module imports numba.cuda, and
    numba chooses the simulator or the driver at that first import, so it must follow
    tinyddpm.set_device (or NUMBA_ENABLE_CUDASIM)."""
    if op not in OPS:
        raise ValueError(f"no kernel op {op!r}: the ops are {', '.join(OPS)}")
    return importlib.import_module(f"{__name__}.{op}").BENCH


def compile_all():
    """Compile every kernel of every op for its registered signature now — on a real GPU, once per
    process, from numba's on-disk cache after the machine's first run — so the first training step
    does not hide tens of seconds of compilation. Returns (kernels compiled, seconds); (0, 0.0) in the
    simulator, which has no compiler."""
    import time

    for op in OPS:
        importlib.import_module(f"{__name__}.{op}")
    from ._cuda import DISPATCHERS, SIMULATED
    if SIMULATED:
        return 0, 0.0
    t0 = time.perf_counter()
    for dispatcher, signature in DISPATCHERS:
        dispatcher.compile(signature)
    return len(DISPATCHERS), time.perf_counter() - t0
