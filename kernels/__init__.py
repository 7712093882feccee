"""Hand-written kernels, one module per heavy op (imported as ``tinyddpm.kernels``).

Each module reads top to bottom: the math and the NumPy reference (ground truth), the CPU
implementation the engine uses, CUDA versions 1..N (numba.cuda), then the launchers and its
``BENCH`` description for ``benchmarks/bench_kernels.py``.
"""
