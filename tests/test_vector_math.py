"""kernels/vector_math.py: the vectorisable float32 exp, sigmoid and max against NumPy's."""
import numpy as np
import pytest
from numba import njit

from tinyddpm.kernels.vector_math import exp32, max32, sigmoid32


@njit
def _map_exp(x, out):
    for i in range(x.size):
        out[i] = exp32(x[i])


@njit
def _map_sigmoid(x, out):
    for i in range(x.size):
        out[i] = sigmoid32(x[i])


@njit(fastmath=True, error_model="numpy")
def _map_exp_fastmath(x, out):
    for i in range(x.size):
        out[i] = exp32(x[i])


@pytest.mark.parametrize("mapper, most_ulps", [
    (_map_exp, 3),
    (_map_exp_fastmath, 5),  # as the kernels' loops compile it: fastmath may reorder (4.4 ulp at x = 87.3)
])
def test_exp32_is_within_a_few_ulp_of_exp_over_its_whole_range(mapper, most_ulps):
    x = np.concatenate([np.linspace(-87, 88, 200_001), np.random.default_rng(0).standard_normal(10_000) * 5]).astype(np.float32)
    got = np.empty_like(x)
    mapper(x, got)
    want = np.exp(x.astype(np.float64))
    ulps = np.abs(got - want) / np.spacing(want.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= most_ulps, f"worst {ulps.max():.1f} ulp at x = {x[ulps.argmax()]}"


def test_sigmoid32_saturates_without_overflow_or_nan():
    x = np.array([-1e30, -200, -88, -20, -1, 0, 1, 20, 88, 200, 1e30], np.float32)
    got = np.empty_like(x)
    _map_sigmoid(x, got)
    assert np.isfinite(got).all() and (got >= 0).all() and (got <= 1).all()
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-np.clip(x.astype(np.float64), -87, 88))), rtol=3e-7, atol=1e-37)  # saturated ends: ~1e−38 either way
    assert got[5] == 0.5


@njit(fastmath=True, error_model="numpy")
def _max_reduction(x):
    top = x[0]
    for i in range(x.size):
        top = max32(top, x[i])
    return top


@pytest.mark.parametrize("size", [1, 7, 8, 33, 196])  # vector bodies and scalar remainders
def test_max32_reduces_to_the_max(size):
    rng = np.random.default_rng(size)
    for x in (rng.standard_normal(size), -1e30 - rng.random(size) * 1e30, np.full(size, -3.5)):
        x = x.astype(np.float32)
        assert _max_reduction(x) == x.max()
