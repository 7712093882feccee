"""Finite differences shared by the test modules: the numeric gradient of a scalar function of one
array, and the check of every input gradient of an engine function against it."""
import numpy as np

import tinyddpm as td


def numeric_gradient(objective, array, eps=1e-6):
    """∂objective()/∂array by central differences (objective() − at array ± eps·e_i), perturbing
    `array` in place and restoring it."""
    grad = np.zeros_like(array)
    for idx in np.ndindex(array.shape):
        original = array[idx]
        array[idx] = original + eps
        plus = objective()
        array[idx] = original - eps
        minus = objective()
        array[idx] = original
        grad[idx] = (plus - minus) / (2 * eps)
    return grad


def gradcheck(fn, *arrays, seed=0, eps=1e-6, rtol=1e-5, atol=1e-8):
    """Check every analytic input gradient of ``fn(*tensors) -> Tensor`` against central differences
    of ⟨fn(x), G⟩ for a random (not all-ones) upstream gradient G, in float64."""
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    tensors = [td.Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    upstream = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(upstream)

    def objective():
        with td.no_grad():
            return float((fn(*tensors).data * upstream).sum())

    for i, t in enumerate(tensors):
        numeric = numeric_gradient(objective, t.data, eps)
        analytic = np.zeros_like(numeric) if t.grad is None else t.grad
        np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol, err_msg=f"input {i}")
