"""On a real GPU only: every CUDA kernel version on CuPy arrays against the NumPy reference, and the
U-Net's loss and gradients on `cuda` against `cpu`.

Deselected by default (setup.cfg: -m "not cuda"); with a GPU run
    TINYDDPM_TEST_DEVICE=cuda python -m pytest -m cuda
"""
import numpy as np
import pytest

import tinyddpm as td
from tinyddpm.device import to_device, to_numpy
from tinyddpm.kernels import OPS, load_bench
from tinyddpm.kernels._bench import validate
from tinyddpm.train import PRESETS
from tinyddpm.unet import UNet

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", autouse=True)
def gpu():
    """Fail (not skip) when these tests were asked for on a machine that cannot run them."""
    td.set_device("cuda")  # one clear DeviceError without CuPy, a GPU, or with the simulator on
    td.set_device("cpu")
    import cupy
    return cupy


def every_cuda_version_and_pass():
    for op in OPS:
        bench = load_bench(op)
        for version in bench.versions:
            if version.backend == "cuda":
                for direction in version.directions:
                    yield pytest.param(bench, version, direction, id=f"{op}-{version.name}-{direction}")


@pytest.mark.parametrize("bench, version, direction", list(every_cuda_version_and_pass()))
def test_kernel_version_matches_reference_on_gpu(gpu, bench, version, direction):
    # the simulator's odd shapes (no tile multiples) and the tiny preset's real ones
    for shape in bench.sim_shapes + bench.shapes:
        validate(bench, version, direction, bench.make_case(shape, gpu, seed=1), bench.atol_at(shape))


def unet_loss_and_grads(device, state, x, t, y, upstream):
    td.set_device(device)
    try:
        model = UNet(PRESETS["smoke"].unet)
        model.load_state_dict(state)
        out = model(td.Tensor(to_device(x)), to_device(t), to_device(y))
        loss = (out * td.Tensor(to_device(upstream))).sum()
        loss.backward()
        return loss.item(), {n: to_numpy(p.grad) for n, p in model.named_parameters()}
    finally:
        td.set_device("cpu")


def test_unet_forward_and_backward_agree_between_cuda_and_cpu():
    td.random.manual_seed(0)
    state = UNet(PRESETS["smoke"].unet).state_dict()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    t, y = np.array([0, 57, 199]), np.array([3, 10, 7])
    upstream = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    cpu_loss, cpu_grads = unet_loss_and_grads("cpu", state, x, t, y, upstream)
    gpu_loss, gpu_grads = unet_loss_and_grads("cuda", state, x, t, y, upstream)
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-4)
    for name, g in cpu_grads.items():
        scale = np.abs(g).max() + 1e-6
        np.testing.assert_allclose(gpu_grads[name] / scale, g / scale, atol=1e-3, err_msg=name)


def test_device_dropout_generator_is_reproducible_and_resumable(gpu):
    from tinyddpm import random as tdrandom
    td.random.manual_seed(5)
    first, second = tdrandom.uniform((1000,), gpu.zeros(1)), tdrandom.uniform((3, 7), gpu.zeros(1))
    state_after_first = {"seed": 5, "offset": 1000}
    td.random.manual_seed(5)
    np.testing.assert_array_equal(to_numpy(tdrandom.uniform((1000,), gpu.zeros(1))), to_numpy(first))
    assert tdrandom.get_device_state() == state_after_first
    tdrandom.set_device_state(state_after_first)  # a resume continues the stream exactly
    np.testing.assert_array_equal(to_numpy(tdrandom.uniform((3, 7), gpu.zeros(1))), to_numpy(second))
    u = to_numpy(first)
    assert u.dtype == np.float32 and 0 < u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.05


def test_dropout_on_cuda_draws_its_mask_on_the_device():
    from tinyddpm import instrument
    td.set_device("cuda")
    try:
        td.random.manual_seed(0)
        x = td.Tensor(to_device(np.ones((4, 1000), np.float32)))
        with instrument.count() as counts:
            y = td.functional.dropout(x, 0.25)
        kept = to_numpy(y.data)
    finally:
        td.set_device("cpu")
    assert counts.transfers == 0
    assert set(np.unique(kept)) <= {0.0, np.float32(1 / 0.75)} and abs((kept > 0).mean() - 0.75) < 0.03
