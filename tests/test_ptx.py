"""Every CUDA kernel compiles to PTX for sm_80 and sm_90 (no GPU needed), and ptxas reports its resources."""
import os
import re
import subprocess
import sys


def test_every_kernel_compiles_to_ptx_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}  # the simulator has no compiler
    run = subprocess.run([sys.executable, "-m", "tinyddpm.kernels.ptx", "--cc", "80", "90", "--resources"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    compiled = int(re.search(r"compiled (\d+) kernel/arch pairs", run.stdout).group(1))
    for op in ("conv2d", "group_norm", "attention"):
        kernels = {line.split()[0] for line in lines if line.startswith(op + ".")}
        assert len(kernels) >= 3, f"{op}: only {kernels}"
    rows = [line for line in lines if re.match(r"\w+\.\w+\s+sm_", line)]
    assert len(rows) == compiled and compiled % 2 == 0
    assert not any("no ptxas" in row for row in rows), "ptxas (nvidia-cuda-nvcc, dev extra) rejected the PTX"
