"""What a kernel module tells the harness (``benchmarks/bench_kernels.py``) and the tests: its version
table, reference and cost, and the one check that a version matches its reference."""
from dataclasses import dataclass
from typing import Callable

import numpy as np

DIRECTIONS = ("forward", "backward")


@dataclass(frozen=True)
class Version:
    """One row of an op's version table."""
    name: str                  # "reference", "cpu", "cuda_v1", "cuda_v2", ...
    idea: str                  # what it does; for cuda_vN (N > 1), what changes from v(N−1) and why
    forward: Callable          # forward(case) -> (output, saved)
    backward: Callable = None  # backward(case, saved) -> gradients; None: forward only

    @property
    def backend(self):
        """'cpu' (NumPy arrays) or 'cuda' (NumPy under the simulator, CuPy on a GPU)."""
        return "cuda" if self.name.startswith("cuda_v") else "cpu"

    @property
    def directions(self):
        return DIRECTIONS if self.backward else DIRECTIONS[:1]

    def command(self, op):
        """The line that validates and times this version alone."""
        device = "--device cuda   (no GPU: --sim)" if self.backend == "cuda" else "--device cpu"
        return f"python benchmarks/bench_kernels.py {op} --version {self.name} {device}"

    def run(self, direction, case):
        """This version's outputs for one direction, as a tuple. A backward reuses its forward's
        saved arrays, made on the first call and kept in the case, so a timed backward excludes
        the forward."""
        if direction == "forward":
            return (self.forward(case)[0],)
        key = f"{self.name}_saved"
        if key not in case:
            case[key] = self.forward(case)[1]
        return tuple(self.backward(case, case[key]))


@dataclass(frozen=True)
class OpBench:
    """An op's benchmark description: its cases, reference, cost model and version table."""
    name: str             # the op's name in kernels.OPS
    make_case: Callable   # make_case(shape: dict, xp, seed) -> dict of inputs (float32 arrays, options)
    reference: Callable   # reference(case, direction) -> tuple of float64 NumPy arrays: the ground truth
    flops: Callable       # flops(shape, direction) -> float
    bytes: Callable       # bytes(shape, direction) -> minimum DRAM traffic in bytes
    versions: tuple       # the version table: reference, cpu, cuda_v1, cuda_v2, ...
    shapes: list          # default shapes: those of the `tiny` U-Net preset at batch 64
    sim_shapes: list      # tiny shapes for the simulator (not tile multiples)
    rtol: float = 1e-4
    atol: float = 1e-4
    shapes_atol: float = None  # at `shapes`, where float32 sums run longer, if atol is too tight there

    @property
    def cuda_versions(self):
        """N of every cuda_vN in the table."""
        return tuple(int(v.name[len("cuda_v"):]) for v in self.versions if v.backend == "cuda")

    def version(self, name):
        return next(v for v in self.versions if v.name == name)

    def atol_at(self, shape):
        return self.shapes_atol if shape in self.shapes and self.shapes_atol else self.atol


def saved_backward(backward, upstream="dy"):
    """A Version.backward calling backward(saved, case[upstream]): a kernel module's backward on the
    forward's saved arrays and the case's upstream gradient."""
    return lambda case, saved: backward(saved, case[upstream])


def validate(bench, version, direction, case, atol=None):
    """Raise AssertionError unless ``version.run(direction, case)`` matches ``bench.reference``
    (float32 against the float64 ground truth, within bench.rtol and atol, default bench.atol)."""
    want = bench.reference(case, direction)
    got = version.run(direction, case)
    assert len(got) == len(want), f"{bench.name} {version.name} {direction}: {len(got)} outputs, not {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        label = f"{bench.name} {version.name} {direction} output {i}"
        if w is None:
            assert g is None, label
            continue
        assert g.shape == w.shape, label
        np.testing.assert_allclose(to_host(g), w, rtol=bench.rtol, atol=bench.atol if atol is None else atol,
                                   err_msg=label)


def to_host(a):
    """A NumPy array of a (a copy from the GPU for a CuPy array)."""
    return a.get() if hasattr(a, "get") else a


def host64(a):
    """A float64 NumPy copy: the references compute in float64, the ground truth for float32 runs."""
    return to_host(a).astype(np.float64)
