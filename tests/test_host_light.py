"""The training step is light on the host, the way a GPU needs it: the optimiser, the EMA and clipping
issue a fixed number of array operations whatever the number of parameter tensors, a step reads the
device at most twice, and index gradients are summed without atomics. Counted with
``tinyddpm.instrument``. (That a resumed `cudasim` run equals an uninterrupted one bit for bit is
checked by tests/test_gpu_check.py, whose simulator run trains, resumes and compares.)"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinyddpm as td
from tinyddpm import instrument, nn, optim
from tinyddpm.functional import _segment_sum
from tinyddpm.train import Trainer, TrainConfig


class ManyParameters(nn.Module):
    def __init__(self, n, rng):
        self.weights = [Holder(rng.standard_normal((3, 5)) + 2.0) for _ in range(n)]  # offset: not centred on 0


class Holder(nn.Module):
    def __init__(self, value):
        self.w = nn.Parameter(value)


def update_costs(n, make_optimiser):
    """Counts of one clip + optimiser step + EMA update over a model of n parameter tensors."""
    rng = np.random.default_rng(n)
    model = ManyParameters(n, rng)
    ema, opt = optim.EMA(model, 0.9), make_optimiser(model.parameters())
    # gradients by backward, as in training: each lands in its parameter's slot of the flat gradient buffer
    loss = sum((p * rng.standard_normal(p.shape).astype(np.float32)).sum() for p in model.parameters())
    loss.backward()
    with instrument.count() as counts:
        optim.clip_grad_norm(opt.params, 1.0)
        opt.step()
        ema.update(model)
    return counts


@pytest.mark.parametrize("make_optimiser", [
    lambda ps: optim.Adam(ps, lr=1e-3),
    lambda ps: optim.Adam(ps, lr=1e-3, weight_decay=0.1),
    lambda ps: optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
], ids=["adam", "adam-l2", "adamw"])
def test_update_costs_do_not_grow_with_the_number_of_parameter_tensors(make_optimiser):
    few, many = update_costs(3, make_optimiser), update_costs(40, make_optimiser)
    assert few.array_ops == many.array_ops and 0 < few.array_ops < 40
    assert few.transfers == many.transfers == 0  # the clip scale is applied on the device, never read


def test_flat_update_equals_the_per_tensor_formula():
    """Adam + clipping + EMA over flat buffers = the textbook per-tensor update (float64 reference)."""
    rng = np.random.default_rng(1)
    model = ManyParameters(4, rng)
    before = [p.data.astype(np.float64) for p in model.parameters()]
    grads = [rng.standard_normal(p.shape) * 3.0 for p in model.parameters()]
    ema, opt = optim.EMA(model, 0.9), optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.astype(np.float32)
    norm = float(optim.clip_grad_norm(opt.params, 1.0))
    opt.step()
    ema.update(model)
    assert norm == pytest.approx(np.sqrt(sum((g ** 2).sum() for g in grads)), rel=1e-6)
    for (name, p), w, g in zip(model.named_parameters(), before, grads):
        g = g / (norm + 1e-6)                     # clipped to norm 1
        m, v = 0.1 * g, 0.001 * g ** 2            # first step, β = (0.9, 0.999)
        expected = w * (1 - 0.01 * 0.1) - 0.01 * (m / 0.1) / (np.sqrt(v / 0.001) + 1e-8)
        np.testing.assert_allclose(p.data, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(ema.shadow[name], 0.9 * w + 0.1 * expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_parameters_in_a_flat_buffer_share_it_with_optimiser_and_ema():
    rng = np.random.default_rng(2)
    model = ManyParameters(3, rng)
    ema, opt = optim.EMA(model, 0.5), optim.Adam(model.parameters())
    assert ema.flats[0] is opt.flats[0]
    for p in model.parameters():
        assert np.shares_memory(p.data, opt.flats[0].data)
    with pytest.raises(ValueError, match="same parameter list"):
        optim.Adam(model.parameters()[::-1])


@pytest.mark.parametrize("device, preset", [("cpu", "tiny"), ("cudasim", "sim")])
def test_a_training_step_reads_the_device_at_most_twice(offline, tmp_path, device, preset):
    # a device→host read counts on every device (tinyddpm.device.to_host), so cpu counts what cuda would
    td.set_device(device)
    try:
        trainer = Trainer(TrainConfig.for_preset(preset, batch_size=2), str(tmp_path / "run"), log=lambda *a: None)
        with instrument.count() as counts:
            loss = trainer.train_step()
    finally:
        td.set_device("cpu")
    assert np.isfinite(loss)
    assert counts.transfers <= 2, f"{counts.transfers} device→host transfers in one step"
    assert (counts.launches > 0) == (device == "cudasim")  # the kernels ran, and were counted


@given(st.lists(st.integers(0, 6), max_size=40), st.integers(7, 9), st.integers(0, 2 ** 32 - 1))
def test_segment_sum_equals_add_at(keys, n, seed):
    values = np.random.default_rng(seed).standard_normal((len(keys), 3)) + 5.0
    keys = np.asarray(keys, dtype=np.int64)
    expected = np.zeros((n, 3))
    np.add.at(expected, keys, values)
    got = _segment_sum(keys, values.copy(), n)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)  # float64: only the summation order differs
    np.testing.assert_array_equal(got, _segment_sum(keys, values.copy(), n))  # and the same bits every time
