"""tinyddpm.instrument.op_times and benchmarks/profile_step.py: every Function's forward and backward
timed by class inside the block, nothing patched outside it."""
import os
import subprocess
import sys

import numpy as np

import tinyddpm as td
from tinyddpm import functional as F
from tinyddpm import instrument, tensor

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "profile_step.py")


def test_op_times_counts_each_forward_and_the_recorded_backwards_and_restores_apply():
    original = tensor.Function.__dict__["apply"]
    rng = np.random.default_rng(0)
    x = td.Tensor(rng.standard_normal((2, 3, 5, 5)).astype(np.float32), requires_grad=True)
    w = td.Tensor(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), requires_grad=True)
    with instrument.op_times() as times:
        y = F.conv2d(x, w, padding=1)
        (y * y).sum().backward()
        with td.no_grad():
            F.conv2d(x, w, padding=1)
    assert times.calls["Conv2d"] == 2 and times.calls["Mul"] == 1 and times.calls["Sum"] == 1
    assert times.forward["Conv2d"] > 0 and times.backward["Conv2d"] > 0 and times.backward["Sum"] > 0
    assert tensor.Function.__dict__["apply"] is original
    with instrument.op_times() as later:
        pass
    F.conv2d(x, w, padding=1).sum().backward()  # outside any block: counted nowhere, gradients as before
    assert not later.calls and x.grad is not None


def test_profile_step_prints_a_table_per_phase():
    run = subprocess.run([sys.executable, SCRIPT, "--preset", "sim", "--batch-size", "2", "--rounds", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("| Conv2d |") == 2 and "training step (batch 2)" in run.stdout
    assert "no-grad forward" in run.stdout and "(outside the ops" in run.stdout
