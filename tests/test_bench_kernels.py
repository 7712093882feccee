"""benchmarks/bench_kernels.py: --list prints every version with the command that runs it alone, and
--version runs that one version (here in the simulator)."""
import os
import subprocess
import sys

import pytest

from tinyddpm.kernels import OPS, load_bench

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_kernels.py")


def bench_kernels(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)


def test_list_prints_every_version_and_its_command():
    run = bench_kernels("--list")
    assert run.returncode == 0, run.stderr
    for op in OPS:
        for version in load_bench(op).versions:
            assert version.idea in run.stdout and version.command(op) in run.stdout


def test_version_runs_only_that_version():
    run = bench_kernels("conv2d", "--version", "cuda_v1", "--sim")
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines()]
    shapes = len(load_bench("conv2d").sim_shapes)
    assert sorted(row[1:3] + [row[-1]] for row in rows) == [["cuda_v1", "backward", "(simulator)"]] * shapes + \
        [["cuda_v1", "forward", "(simulator)"]] * shapes


@pytest.mark.parametrize("args, message", [
    (("conv2d", "--version", "cuda_v9", "--sim"), "no version 'cuda_v9'"),
    (("conv2d", "--version", "cuda_v1"), "runs on --device cuda"),   # the default device is cpu
    (("conv3d",), "unknown op"),
])
def test_bad_arguments_are_refused(args, message):
    run = bench_kernels(*args)
    assert run.returncode == 2 and message in run.stderr
