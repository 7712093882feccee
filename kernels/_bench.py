"""What a kernel module tells ``benchmarks/bench_kernels.py``: its versions, reference and cost."""
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Version:
    name: str        # "reference", "cpu", "cuda_v1", ...
    direction: str   # "forward" | "backward"
    backend: str     # "cpu" (NumPy arrays) | "cuda" (NumPy under the simulator, CuPy on a GPU)
    run: Callable    # run(case) -> tuple of arrays, compared with reference(case, direction)
    idea: str = ""   # one line: what changes from the previous version and why it is faster


@dataclass(frozen=True)
class OpBench:
    name: str
    make_case: Callable   # make_case(shape: dict, xp, seed) -> dict of input arrays (float32)
    reference: Callable   # reference(case, direction) -> tuple of NumPy arrays
    flops: Callable       # flops(shape, direction) -> float
    bytes: Callable       # bytes(shape, direction) -> minimum DRAM traffic in bytes
    versions: list
    shapes: list          # default shapes: those of the `tiny` U-Net preset
    sim_shapes: list      # tiny shapes for the simulator (not tile multiples)
    rtol: float = 1e-4
    atol: float = 1e-4
    extra: dict = field(default_factory=dict)
