"""kernels/vector_math.py: the vectorisable float32 exp and sigmoid against NumPy's float64 ones."""
import numpy as np
from numba import njit

from tinyddpm.kernels.vector_math import exp32, sigmoid32


@njit
def _map_exp(x, out):
    for i in range(x.size):
        out[i] = exp32(x[i])


@njit
def _map_sigmoid(x, out):
    for i in range(x.size):
        out[i] = sigmoid32(x[i])


def test_exp32_is_within_a_few_ulp_of_exp_over_its_whole_range():
    x = np.concatenate([np.linspace(-87, 88, 200_001), np.random.default_rng(0).standard_normal(10_000) * 5]).astype(np.float32)
    got = np.empty_like(x)
    _map_exp(x, got)
    want = np.exp(x.astype(np.float64))
    ulps = np.abs(got - want) / np.spacing(want.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 3, f"worst {ulps.max():.1f} ulp at x = {x[ulps.argmax()]}"


def test_sigmoid32_saturates_without_overflow_or_nan():
    x = np.array([-1e30, -200, -88, -20, -1, 0, 1, 20, 88, 200, 1e30], np.float32)
    got = np.empty_like(x)
    _map_sigmoid(x, got)
    assert np.isfinite(got).all() and (got >= 0).all() and (got <= 1).all()
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-np.clip(x.astype(np.float64), -87, 88))), rtol=3e-7, atol=1e-37)  # saturated ends: ~1e−38 either way
    assert got[5] == 0.5
