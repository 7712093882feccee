"""kernels/group_norm.py and kernels/group_norm_silu.py: reference vs naive loops and finite
differences, then the CPU implementation and every CUDA version (in the simulator) vs the reference.
Every row of the version tables also runs in tests/test_kernel_versions.py."""
import numpy as np
import pytest
from gradcheck import numeric_gradient
from hypothesis import example, given, settings
from hypothesis import strategies as st

import tinyddpm.kernels.group_norm as gn
import tinyddpm.kernels.group_norm_silu as gns

OFFSET = 1e3  # E[x²] − E[x]² in float32 loses every digit of σ² at this offset; two-pass/Welford do not


def unit_variance_groups(z, groups):
    """z with each (sample, group) of two or more values shifted and scaled to mean 0, variance 1:
    a nearly constant group would multiply float32's rounding of |x| by a huge rstd."""
    rows = z.reshape(z.shape[0], groups, -1)
    if rows.shape[2] > 1:
        rows = (rows - rows.mean(axis=2, keepdims=True)) / rows.std(axis=2, keepdims=True)
    return rows.reshape(z.shape)


def make_inputs(shape, groups, dtype=np.float64, offset=0.0, with_emb=False, seed=0):
    """x (+offset), weight γ, bias β, upstream gradient dy and (optionally) emb, all of `dtype`."""
    rng = np.random.default_rng(seed)
    n, c = shape[:2]
    x = unit_variance_groups(rng.standard_normal(shape), groups) + offset
    arrays = {"x": x, "weight": 1 + 0.5 * rng.standard_normal(c),
              "bias": 0.5 * rng.standard_normal(c), "dy": rng.standard_normal(shape),
              "emb": rng.standard_normal((n, c)) if with_emb else None}
    return {k: None if a is None else a.astype(dtype) for k, a in arrays.items()}, groups


def as64(a):
    return None if a is None else a.astype(np.float64)


def silu_reference(a, groups):
    """GroupNorm·SiLU(·emb) of the inputs `a` by the reference, in float64."""
    return gns.group_norm_silu_forward_reference(as64(a["x"]), groups, as64(a["weight"]), as64(a["bias"]),
                                                 as64(a["emb"]))


def silu_backward_reference(a, groups, with_emb):
    return gns.group_norm_silu_backward_reference(as64(a["x"]), groups, as64(a["weight"]), as64(a["bias"]),
                                                  as64(a["dy"]), with_emb)


def close(actual, expected, dtype, offset=0.0):
    """float32 against the float64 reference: x − μ carries the rounding of |x| ≈ offset. float64:
    another summation order, so 1e-9."""
    if dtype == np.float64:
        np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-9)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=2e-3 if offset else 1e-4)


def close_grads(grads, want, dtype, offset=0.0):
    """Every gradient close to the reference's, of the same dtype and shape; None where it is None."""
    assert len(grads) == len(want)
    for got, ref in zip(grads, want):
        if ref is None:
            assert got is None
        else:
            assert got.dtype == dtype and got.shape == ref.shape
            close(got, ref, dtype, offset)


# ---- naive loops: an independent implementation of the module docstring's equations ------------
def naive_group_norm(x, groups, weight, bias, eps=1e-5):
    n, c = x.shape[:2]
    flat, y = x.reshape(n, c, -1), np.empty(x.shape).reshape(n, c, -1)
    per_group = c // groups
    for i in range(n):
        for g in range(groups):
            channels = range(g * per_group, (g + 1) * per_group)
            values = [flat[i, ch, s] for ch in channels for s in range(flat.shape[2])]
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / len(values)
            for ch in channels:
                for s in range(flat.shape[2]):
                    y[i, ch, s] = (flat[i, ch, s] - mean) / np.sqrt(var + eps) * weight[ch] + bias[ch]
    return y.reshape(x.shape)


def naive_group_norm_backward(x, groups, weight, dy, eps=1e-5):
    """dx_i = rstd/M·(M·ĝ_i − Σ_j ĝ_j − x̂_i·Σ_j ĝ_j x̂_j) per group, element by element."""
    n, c = x.shape[:2]
    flat, dflat = x.reshape(n, c, -1), dy.reshape(n, c, -1)
    size = flat.shape[2]
    dx, dweight, dbias = np.empty(flat.shape), np.zeros(c), np.zeros(c)
    per_group = c // groups
    for i in range(n):
        for g in range(groups):
            idx = [(ch, s) for ch in range(g * per_group, (g + 1) * per_group) for s in range(size)]
            m = len(idx)
            mean = sum(flat[i, ch, s] for ch, s in idx) / m
            rstd = 1 / np.sqrt(sum((flat[i, ch, s] - mean) ** 2 for ch, s in idx) / m + eps)
            xhat = {(ch, s): (flat[i, ch, s] - mean) * rstd for ch, s in idx}
            ghat = {(ch, s): dflat[i, ch, s] * weight[ch] for ch, s in idx}
            sum_g = sum(ghat.values())
            sum_gx = sum(ghat[k] * xhat[k] for k in idx)
            for ch, s in idx:
                dx[i, ch, s] = rstd / m * (m * ghat[ch, s] - sum_g - xhat[ch, s] * sum_gx)
                dweight[ch] += dflat[i, ch, s] * xhat[ch, s]
                dbias[ch] += dflat[i, ch, s]
    return dx.reshape(x.shape), dweight, dbias


NAIVE_CASES = [((2, 6, 3, 5), 3), ((1, 4, 7), 1), ((3, 5, 2, 3), 5), ((2, 4, 3, 1, 2), 2), ((2, 3), 1)]


@pytest.mark.parametrize("shape, groups", NAIVE_CASES)
def test_reference_forward_matches_naive_loops(shape, groups):
    a, g = make_inputs(shape, groups, offset=3.0)
    np.testing.assert_allclose(gn.group_norm_forward_reference(a["x"], g, a["weight"], a["bias"]),
                               naive_group_norm(a["x"], g, a["weight"], a["bias"]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape, groups", NAIVE_CASES)
def test_reference_backward_matches_naive_loops(shape, groups):
    a, g = make_inputs(shape, groups, offset=3.0)
    for got, want in zip(gn.group_norm_backward_reference(a["x"], g, a["weight"], a["dy"]),
                         naive_group_norm_backward(a["x"], g, a["weight"], a["dy"])):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("with_emb", [False, True])
def test_silu_reference_forward_matches_naive_loops(with_emb):
    a, g = make_inputs((2, 6, 3, 5), 3, with_emb=with_emb)
    pre = naive_group_norm(a["x"], g, a["weight"], a["bias"])
    want = pre / (1 + np.exp(-pre)) + (a["emb"][:, :, None, None] if with_emb else 0)
    np.testing.assert_allclose(gns.group_norm_silu_forward_reference(a["x"], g, a["weight"], a["bias"], a["emb"]),
                               want, rtol=1e-9, atol=1e-9)


# ---- finite differences ------------------------------------------------------------------------
@pytest.mark.parametrize("shape, groups", [((2, 6, 3, 5), 3), ((1, 4, 3, 3), 1), ((2, 3, 5), 3)])
def test_reference_backward_matches_finite_differences(shape, groups):
    a, g = make_inputs(shape, groups, offset=2.0)
    loss = lambda: np.sum(gn.group_norm_forward_reference(a["x"], g, a["weight"], a["bias"]) * a["dy"])  # noqa: E731
    dx, dweight, dbias = gn.group_norm_backward_reference(a["x"], g, a["weight"], a["dy"])
    for name, analytic in (("x", dx), ("weight", dweight), ("bias", dbias)):
        np.testing.assert_allclose(analytic, numeric_gradient(loss, a[name]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_emb", [False, True])
def test_silu_reference_backward_matches_finite_differences(with_emb):
    a, g = make_inputs((2, 4, 3, 3), 2, with_emb=with_emb)
    loss = lambda: np.sum(  # noqa: E731
        gns.group_norm_silu_forward_reference(a["x"], g, a["weight"], a["bias"], a["emb"]) * a["dy"])
    grads = gns.group_norm_silu_backward_reference(a["x"], g, a["weight"], a["bias"], a["dy"], with_emb)
    names = ("x", "weight", "bias", "emb")
    for name, analytic in zip(names, grads):
        if name == "emb" and not with_emb:
            assert analytic is None
            continue
        np.testing.assert_allclose(analytic, numeric_gradient(loss, a[name]), rtol=1e-6, atol=1e-7)


# ---- CPU implementation vs reference -----------------------------------------------------------
@st.composite
def group_norm_shapes(draw, max_batch=3, max_groups=4, max_per_group=3, max_side=7):
    """(shape, groups): batch 1 included, one group .. one channel per group, 0-2 odd spatial dims."""
    groups = draw(st.integers(1, max_groups))
    channels = groups * draw(st.integers(1, max_per_group))
    spatial = draw(st.lists(st.integers(1, max_side), min_size=0, max_size=2))
    return (draw(st.integers(1, max_batch)), channels, *spatial), groups


@settings(max_examples=30)
@given(group_norm_shapes(), st.sampled_from([np.float32, np.float64]), st.sampled_from([0.0, OFFSET]),
       st.integers(0, 2 ** 16))
def test_cpu_matches_reference(case, dtype, offset, seed):
    a, g = make_inputs(*case, dtype=dtype, offset=offset, seed=seed)
    y, saved = gn.group_norm_forward_cpu(a["x"], g, a["weight"], a["bias"], 1e-5)
    assert y.dtype == dtype and y.shape == a["x"].shape
    close(y, gn.group_norm_forward_reference(as64(a["x"]), g, as64(a["weight"]), as64(a["bias"])), dtype, offset)
    want = gn.group_norm_backward_reference(as64(a["x"]), g, as64(a["weight"]), as64(a["dy"]))
    close_grads(gn.group_norm_backward_cpu(saved, a["dy"]), want, dtype, offset)


@settings(max_examples=30)
@given(group_norm_shapes(), st.sampled_from([np.float32, np.float64]), st.sampled_from([0.0, OFFSET]),
       st.booleans(), st.integers(0, 2 ** 16))
def test_cpu_silu_matches_reference(case, dtype, offset, with_emb, seed):
    a, g = make_inputs(*case, dtype=dtype, offset=offset, with_emb=with_emb, seed=seed)
    y, saved = gns.group_norm_silu_forward_cpu(a["x"], g, a["weight"], a["bias"], a["emb"], 1e-5)
    assert y.dtype == dtype
    close(y, silu_reference(a, g), dtype, offset)
    close_grads(gns.group_norm_silu_backward_cpu(saved, a["dy"]), silu_backward_reference(a, g, with_emb),
                dtype, offset)


def test_offset_tolerance_rejects_one_pass_variance():
    """The float32 offset tolerance has teeth: E[x²] − E[x]² fails it where group_norm_forward_cpu passes."""
    a, g = make_inputs((2, 4, 5, 5), 2, dtype=np.float32, offset=OFFSET)
    x = a["x"].reshape(2, g, -1)
    mean = x.mean(axis=2, keepdims=True)
    one_pass = (x - mean) / np.sqrt((x * x).mean(axis=2, keepdims=True) - mean * mean + np.float32(1e-5))
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    want = gn.group_norm_forward_reference(as64(a["x"]), g, as64(ones), as64(zeros))
    with pytest.raises(AssertionError):
        close(one_pass.reshape(want.shape), want, np.float32, OFFSET)
    close(gn.group_norm_forward_cpu(a["x"], g, ones, zeros, 1e-5)[0], want, np.float32, OFFSET)


# ---- CUDA versions in the simulator (tiny shapes: one Python thread per CUDA thread) -----------
SIM_SHAPES = group_norm_shapes(max_batch=2, max_groups=3, max_per_group=3, max_side=5)
SIM_EDGES = [(((1, 3, 5, 3), 1), OFFSET),  # one group, batch 1, a row (45) longer than the sim block
             (((2, 4, 3, 1), 4), 0.0)]     # one channel per group


def cuda_inputs(case, offset, with_emb=False, seed=0):
    return make_inputs(*case, dtype=np.float32, offset=offset, with_emb=with_emb, seed=seed)


@settings(max_examples=5)
@given(SIM_SHAPES, st.sampled_from([0.0, OFFSET]), st.sampled_from(gn.BENCH.cuda_versions))
@example(*SIM_EDGES[0], 1)
@example(*SIM_EDGES[0], 2)
@example(*SIM_EDGES[1], 2)
def test_cuda_forward_matches_reference(case, offset, version):
    a, g = cuda_inputs(case, offset)
    y, saved = gn.group_norm_forward_cuda(a["x"], g, a["weight"], a["bias"], 1e-5, version=version)
    assert y.dtype == np.float32 and y.shape == a["x"].shape
    close(y, gn.group_norm_forward_reference(as64(a["x"]), g, as64(a["weight"]), as64(a["bias"])), np.float32, offset)


@settings(max_examples=5)
@given(SIM_SHAPES, st.sampled_from([0.0, OFFSET]))
@example(*SIM_EDGES[0])
@example(*SIM_EDGES[1])
def test_cuda_backward_matches_reference(case, offset):
    a, g = cuda_inputs(case, offset)
    _, saved = gn.group_norm_forward_cuda(a["x"], g, a["weight"], a["bias"], 1e-5)
    want = gn.group_norm_backward_reference(as64(a["x"]), g, as64(a["weight"]), as64(a["dy"]))
    close_grads(gn.group_norm_backward_cuda(saved, a["dy"]), want, np.float32, offset)


@settings(max_examples=5)
@given(SIM_SHAPES, st.sampled_from([0.0, OFFSET]), st.booleans())
@example(*SIM_EDGES[0], True)
@example(*SIM_EDGES[1], False)
def test_cuda_silu_matches_reference(case, offset, with_emb):
    a, g = cuda_inputs(case, offset, with_emb)
    y, saved = gns.group_norm_silu_forward_cuda(a["x"], g, a["weight"], a["bias"], a["emb"], 1e-5)
    close(y, silu_reference(a, g), np.float32, offset)
    close_grads(gns.group_norm_silu_backward_cuda(saved, a["dy"]), silu_backward_reference(a, g, with_emb),
                np.float32, offset)


def test_cuda_launchers_reject_bad_arguments():
    a, g = cuda_inputs(((2, 4, 3, 3), 2), 0.0, with_emb=True)
    x, w, b = a["x"], a["weight"], a["bias"]
    with pytest.raises(ValueError, match="float32"):
        gn.group_norm_forward_cuda(x.astype(np.float64), g, w, b)
    with pytest.raises(ValueError, match="divide"):
        gn.group_norm_forward_cuda(x, 3, w, b)
    with pytest.raises(ValueError, match="weight"):
        gn.group_norm_forward_cuda(x, g, w[:3], b)
    with pytest.raises(ValueError, match="version"):
        gn.group_norm_forward_cuda(x, g, w, b, version=3)
    with pytest.raises(ValueError, match="emb"):
        gns.group_norm_silu_forward_cuda(x, g, w, b, a["emb"][:1])
    _, saved = gn.group_norm_forward_cuda(x, g, w, b)
    with pytest.raises(ValueError, match="dy"):
        gn.group_norm_backward_cuda(saved, a["dy"][:1])
