"""Every CUDA kernel compiles to PTX for sm_80 and sm_90 (no GPU needed), ptxas reports its resources,
and the kernels of each op in kernels.OPS are named <op>_<pass>_v<N> for exactly its CUDA versions."""
import os
import re
import subprocess
import sys

from tinyddpm.kernels import OPS, load_bench


def test_every_kernel_compiles_to_ptx_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}  # the simulator has no compiler
    run = subprocess.run([sys.executable, "-m", "tinyddpm.kernels.ptx", "--cc", "80", "90", "--resources"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = int(re.search(r"compiled (\d+) kernel/arch pairs", run.stdout).group(1))
    rows = [line for line in run.stdout.splitlines() if re.match(r"\w+\.\w+\s+sm_", line)]
    assert len(rows) == compiled and compiled % 2 == 0
    assert not any("no ptxas" in row for row in rows), "ptxas (nvidia-cuda-nvcc, dev extra) rejected the PTX"
    kernels = {row.split()[0] for row in rows}
    for op in OPS:
        names = {k.split(".")[1] for k in kernels if k.startswith(op + ".")}
        assert all(re.fullmatch(rf"{op}_[a-z_]+_v\d+", name) for name in names), names
        assert {int(name.rsplit("_v", 1)[1]) for name in names} == set(load_bench(op).cuda_versions), names
    assert all(k.split(".")[0] in OPS + ("_cuda",) for k in kernels), kernels  # shared kernels: kernels/_cuda.py
