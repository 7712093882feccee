"""The Tensor API, the backward pass and device selection."""
import numpy as np
import pytest

import tinyddpm as td
import tinyddpm.functional as F


def test_python_numbers_default_to_float32_and_arrays_keep_dtype():
    assert td.Tensor([1.0, 2.0]).dtype == np.float32
    assert td.Tensor(np.zeros(2)).dtype == np.float64
    assert td.Tensor(np.float64(1.5)).dtype == np.float64
    x = td.Tensor(np.ones(3, dtype=np.float32))
    assert (x + 1.5).dtype == np.float32 and (2 * x).dtype == np.float32


def test_operators_methods_and_reflected_arithmetic():
    a = np.arange(1.0, 7.0).reshape(2, 3)
    x = td.Tensor(a)
    np.testing.assert_allclose((1 - x).numpy(), 1 - a)
    np.testing.assert_allclose((6 / x).numpy(), 6 / a)
    np.testing.assert_allclose((-x ** 2).numpy(), -a ** 2)
    np.testing.assert_allclose((x @ x.transpose(0, 1)).numpy(), a @ a.T)
    np.testing.assert_allclose(x.mean(axis=1).numpy(), a.mean(axis=1))
    np.testing.assert_allclose(x.reshape(3, 2).permute(1, 0).numpy(), a.reshape(3, 2).T)
    np.testing.assert_allclose(x.softmax().numpy().sum(-1), 1.0)
    assert x.sum().item() == a.sum()


def test_gradient_accumulates_over_reuse_and_calls():
    x = td.Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    (x * x + x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 1)
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 4)
    x.zero_grad()
    assert x.grad is None


def test_backward_is_iterative_on_a_very_deep_graph():
    x = td.Tensor(np.ones(2), requires_grad=True)
    y = x
    for _ in range(20000):  # far past Python's recursion limit
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 1.0001 ** 20000)


def test_backward_needs_a_scalar_or_a_gradient():
    x = td.Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match="scalar"):
        (x * 2).backward()
    with pytest.raises(RuntimeError, match="does not require grad"):
        td.Tensor(np.ones(1)).backward()


def test_no_grad_records_no_graph_and_detach_cuts_it():
    x = td.Tensor(np.ones(3), requires_grad=True)
    with td.no_grad():
        y = x * 2
    assert not y.requires_grad and y._fn is None
    assert td.is_grad_enabled()
    z = (x * 2).detach()
    assert not z.requires_grad


def test_constants_get_no_gradient_but_the_other_input_does():
    x = td.Tensor(np.ones((2, 3)), requires_grad=True)
    c = td.Tensor(np.full((1, 3), 2.0))
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_allclose(x.grad, np.full((2, 3), 2.0))


def test_dropout_scales_kept_units_and_routes_gradient_through_them():
    td.random.manual_seed(3)
    x = td.Tensor(np.ones((200, 50)), requires_grad=True)
    y = F.dropout(x, 0.25)
    kept = y.data != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(y.data[kept], 1 / 0.75)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, y.data)
    assert F.dropout(x, 0.25, training=False) is x


def test_unknown_device_and_cuda_without_gpu_give_one_clear_error():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        td.set_device("tpu")
    with pytest.raises(td.DeviceError) as err:
        td.set_device("cuda")
    assert "\n" not in str(err.value)
    assert td.get_device() == "cpu"


def test_to_cpu_and_numpy_round_trip():
    a = np.arange(4.0)
    x = td.Tensor(a, requires_grad=True)
    y = x.to("cpu")
    assert y.requires_grad and y.device == "cpu"
    np.testing.assert_array_equal(y.numpy(), a)


def test_max_pool_sends_each_window_gradient_to_its_first_maximum_and_none_to_the_cropped_border():
    x = td.Tensor(np.array([[[[1, 3, 3, 0, 9], [2, 3, 0, 0, 9], [5, 5, 1, 1, 9], [5, 0, 1, 1, 9], [9, 9, 9, 9, 9]]]],
                        np.float32), requires_grad=True)
    y = F.max_pool2d(x, 2)
    np.testing.assert_array_equal(y.data, [[[[3, 3], [5, 1]]]])
    (y * td.Tensor(np.array([[[[1, 2], [3, 4]]]], np.float32))).sum().backward()
    want = np.zeros((5, 5), np.float32)
    want[0, 1], want[0, 2], want[2, 0], want[2, 2] = 1, 2, 3, 4  # ties: the first in row-major order
    np.testing.assert_array_equal(x.grad[0, 0], want)


def test_max_pool_under_no_grad_equals_the_recorded_forward_and_a_numpy_reference():
    """Under no_grad max-pool keeps nothing for backward: its values must not change."""
    x = np.random.default_rng(4).standard_normal((3, 2, 7, 9)).astype(np.float32)
    recorded = F.max_pool2d(td.Tensor(x, requires_grad=True), 2).data
    with td.no_grad():
        plain = F.max_pool2d(td.Tensor(x, requires_grad=True), 2).data
    reference = x[:, :, :6, :8].reshape(3, 2, 3, 2, 4, 2).max(axis=(3, 5))
    np.testing.assert_array_equal(plain, recorded)
    np.testing.assert_array_equal(plain, reference)


def test_nearest_upsample_repeats_each_pixel_into_an_s_by_s_block():
    x = np.random.default_rng(5).standard_normal((2, 3, 4, 5)).astype(np.float32)
    y = F.upsample_nearest2d(td.Tensor(x), 3).data
    np.testing.assert_array_equal(y, x.repeat(3, axis=2).repeat(3, axis=3))
