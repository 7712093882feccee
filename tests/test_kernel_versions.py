"""Every row of every op's version table (tinyddpm.kernels.OPS, each module's BENCH.versions) against
the op's float64 reference, in numba's CUDA simulator on the tiny BENCH.sim_shapes; and the tables."""
import re

import numpy as np
import pytest

from tinyddpm.kernels import OPS, load_bench
from tinyddpm.kernels._bench import DIRECTIONS, Version, validate


def every_version_and_pass():
    for op in OPS:
        bench = load_bench(op)
        for version in bench.versions:
            for direction in version.directions:
                yield pytest.param(bench, version, direction, id=f"{op}-{version.name}-{direction}")


@pytest.mark.parametrize("bench, version, direction", list(every_version_and_pass()))
def test_version_matches_reference(bench, version, direction):
    for seed, shape in enumerate(bench.sim_shapes):
        validate(bench, version, direction, bench.make_case(shape, np, seed))


@pytest.mark.parametrize("op", OPS)
def test_version_table_names_reference_cpu_then_cuda_v1_to_vn(op):
    bench = load_bench(op)
    assert bench.name == op
    names = [v.name for v in bench.versions]
    cpu_variants = [name for name in names if name.startswith("cpu_")]  # alternatives the `cpu` row picks from
    assert names == ["reference", "cpu"] + cpu_variants + [f"cuda_v{n}" for n in range(1, len(names) - 1 - len(cpu_variants))]
    assert all(v.idea for v in bench.versions)
    assert all(v.directions == DIRECTIONS for v in bench.versions[:3])  # v2+ may reuse v1's backward
    for shape in bench.shapes + bench.sim_shapes:
        for direction in DIRECTIONS:
            assert bench.flops(shape, direction) > 0 and bench.bytes(shape, direction) > 0


def test_every_version_has_a_command_that_runs_it_alone():
    for op in OPS:
        for version in load_bench(op).versions:
            command = version.command(op)
            assert re.match(rf"python benchmarks/bench_kernels.py {op} --version {version.name} --device "
                            f"{version.backend}", command), command


def test_validate_rejects_a_wrong_version():
    bench = load_bench("conv2d")
    cpu = bench.version("cpu")
    wrong = Version("cpu", "off by one", lambda case: (cpu.forward(case)[0] + 1, None))
    with pytest.raises(AssertionError, match="conv2d cpu forward output 0"):
        validate(bench, wrong, "forward", bench.make_case(bench.sim_shapes[0], np, 0))


def test_load_bench_rejects_an_unknown_op():
    with pytest.raises(ValueError, match="no kernel op"):
        load_bench("conv3d")
