"""kernels/attention.py: the NumPy reference against naive loops and finite differences, the CPU
implementation against the reference, and every CUDA version in numba's simulator. Every row of the
version table also runs in tests/test_kernel_versions.py."""
import math

import numpy as np
import pytest
from gradcheck import numeric_gradient
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tinyddpm.kernels import attention
from tinyddpm.kernels.attention import (
    BENCH, MAX_HEAD_SIZE, TILE, attention_backward_batched, attention_backward_cpu, attention_backward_cuda,
    attention_backward_reference, attention_forward_batched, attention_forward_cpu, attention_forward_cuda,
    attention_forward_reference)


# ---- helpers ---------------------------------------------------------------------------------------
def random_inputs(shape, dtype=np.float64, seed=0, magnitude=1.0, offset=0.0):
    """q (B, H, Lq, d), k and v (B, H, Lk, d), dO (B, H, Lq, d); q and k scaled by `magnitude` (score
    size), k and v shifted by `offset`."""
    b, h, lq, lk, d = shape
    rng = np.random.default_rng(seed)
    q = magnitude * rng.standard_normal((b, h, lq, d))
    k = magnitude * rng.standard_normal((b, h, lk, d)) + offset
    v = rng.standard_normal((b, h, lk, d)) + offset
    do = rng.standard_normal((b, h, lq, d))
    return tuple(a.astype(dtype) for a in (q, k, v, do))


def naive_softmax_row(q, k, b, h, i, scale):
    """p_j = softmax_j(scale·q_i·k_j) for query i of (b, h), one scalar at a time."""
    scores = [scale * sum(q[b, h, i, c] * k[b, h, j, c] for c in range(q.shape[3])) for j in range(k.shape[2])]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    return [w / sum(weights) for w in weights]


def naive_attention(q, k, v, scale):
    """O[b,h,i,:] = Σ_j softmax_j(scale·q_i·k_j) v_j, one scalar at a time."""
    b_size, h_size, lq, d = q.shape
    o = np.zeros_like(q)
    for b in range(b_size):
        for h in range(h_size):
            for i in range(lq):
                p = naive_softmax_row(q, k, b, h, i, scale)
                for j in range(k.shape[2]):
                    for c in range(d):
                        o[b, h, i, c] += p[j] * v[b, h, j, c]
    return o


def naive_attention_backward(q, k, v, do, scale):
    """The chain rule through one query row at a time: o_i = Σ_j p_ij v_j with p_i = softmax(s_i)."""
    b_size, h_size, lq, d = q.shape
    lk = k.shape[2]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(b_size):
        for h in range(h_size):
            for i in range(lq):
                p = naive_softmax_row(q, k, b, h, i, scale)
                dp = [sum(do[b, h, i, c] * v[b, h, j, c] for c in range(d)) for j in range(lk)]
                expected_dp = sum(p[j] * dp[j] for j in range(lk))
                for j in range(lk):
                    ds = p[j] * (dp[j] - expected_dp)  # ∂p_j/∂s_l = p_j (δ_jl − p_l)
                    for c in range(d):
                        dv[b, h, j, c] += p[j] * do[b, h, i, c]
                        dq[b, h, i, c] += scale * ds * k[b, h, j, c]
                        dk[b, h, j, c] += scale * ds * q[b, h, i, c]
    return dq, dk, dv


def assert_all_close(actual, expected, rtol, atol):
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def float64_reference(q, k, v, do, scale=None):
    """The reference in float64 on the same (possibly float32) inputs: the ground truth."""
    q, k, v, do = (a.astype(np.float64) for a in (q, k, v, do))
    return attention_forward_reference(q, k, v, scale), attention_backward_reference(q, k, v, do, scale)


def shapes(max_batch, max_length, max_head_size):
    """(B, H, Lq, Lk, d): odd, non-square, Lq ≠ Lk, batch and head counts down to 1."""
    return st.tuples(st.integers(1, max_batch), st.integers(1, 2), st.integers(1, max_length),
                     st.integers(1, max_length), st.integers(1, max_head_size))


scales = st.one_of(st.none(), st.floats(0.05, 2.0))


# ---- the reference --------------------------------------------------------------------------------
@settings(max_examples=10)
@given(shape=shapes(max_batch=2, max_length=4, max_head_size=3), scale=scales,
       offset=st.floats(-2.0, 2.0), seed=st.integers(0, 2**16))
def test_reference_matches_naive_loops(shape, scale, offset, seed):
    q, k, v, do = random_inputs(shape, seed=seed, offset=offset)
    used_scale = 1 / math.sqrt(shape[-1]) if scale is None else scale
    # float64, summed in another order: 1e-9, not 1e-12
    assert_all_close([attention_forward_reference(q, k, v, scale)], [naive_attention(q, k, v, used_scale)], 1e-9, 1e-9)
    assert_all_close(attention_backward_reference(q, k, v, do, scale),
                     naive_attention_backward(q, k, v, do, used_scale), 1e-9, 1e-9)


@pytest.mark.parametrize("shape, scale", [((1, 2, 3, 4, 2), None), ((2, 1, 4, 3, 3), 0.7), ((1, 1, 1, 2, 1), None)])
def test_reference_backward_matches_finite_differences(shape, scale):
    q, k, v, do = random_inputs(shape, seed=sum(shape), offset=0.5)
    objective = lambda: np.sum(attention_forward_reference(q, k, v, scale=scale) * do)  # noqa: E731
    numeric = [numeric_gradient(objective, a) for a in (q, k, v)]
    assert_all_close(attention_backward_reference(q, k, v, do, scale), numeric, 1e-6, 1e-8)


# ---- the CPU implementation -----------------------------------------------------------------------
TOLERANCES = {np.float32: (1e-4, 1e-5), np.float64: (1e-9, 1e-9)}  # (rtol, atol): another summation order


@given(shape=shapes(max_batch=3, max_length=20, max_head_size=20), scale=scales,
       dtype=st.sampled_from([np.float32, np.float64]), offset=st.floats(-3.0, 3.0), seed=st.integers(0, 2**16))
@example(shape=(1, 1, 1, 1, 1), scale=None, dtype=np.float32, offset=0.0, seed=0)
@example(shape=(2, 1, 5, 6, 3), scale=-0.8, dtype=np.float32, offset=1.0, seed=1)  # the max of scale·s is at min s
def test_cpu_matches_reference(shape, scale, dtype, offset, seed):
    q, k, v, do = random_inputs(shape, dtype, seed, offset=offset)
    o, saved = attention_forward_cpu(q, k, v, scale)
    grads = attention_backward_cpu(saved, do)
    expected_o, expected_grads = float64_reference(q, k, v, do, scale)
    assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_all_close([o, *grads], [expected_o, *expected_grads], *TOLERANCES[dtype])


@pytest.mark.parametrize("block_bytes, blocks", [
    (1, "one query row per block: each head's dK and dV add up over its 7 blocks"),
    (3 * 11 * 4, "three rows (of 11 float32 scores): blocks of 2, 2 and 3 rows"),
    (2 * 7 * 11 * 4, "at most two heads: an image's 3 heads as 1 + 2"),
    (6 * 7 * 11 * 4, "two whole images (3 heads each) per block"),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_matches_reference_whatever_the_blocks(block_bytes, blocks, dtype, monkeypatch):
    monkeypatch.setattr(attention, "SCORE_BLOCK_BYTES", block_bytes * np.dtype(dtype).itemsize // 4)
    q, k, v, do = random_inputs((17, 3, 7, 11, 3), dtype, seed=5, offset=0.5)
    o, saved = attention_forward_cpu(q, k, v)
    grads = attention_backward_cpu(saved, do)
    expected_o, expected_grads = float64_reference(q, k, v, do)
    assert_all_close([o, *grads], [expected_o, *expected_grads], *TOLERANCES[dtype])


def test_cpu_forward_keeps_the_log_sum_exp_not_the_probabilities():
    q, k, v, _ = random_inputs((2, 3, 5, 4, 2), np.float32, seed=6)
    _, saved = attention_forward_cpu(q, k, v)
    scores = np.einsum("bhic,bhjc->bhij", q.astype(np.float64), k) / math.sqrt(2)
    top = scores.max(axis=-1)
    np.testing.assert_allclose(saved["lse"], top + np.log(np.exp(scores - top[..., None]).sum(axis=-1)), rtol=1e-6)
    assert all(a.size <= q.size for a in saved.values() if isinstance(a, np.ndarray))  # no (B, H, Lq, Lk) array


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("forward, backward", [(attention_forward_cpu, attention_backward_cpu),
                                               (attention_forward_batched, attention_backward_batched)])
def test_cpu_is_stable_for_large_scores(dtype, forward, backward):
    q, k, v, do = random_inputs((2, 2, 7, 11, 5), dtype, seed=3, magnitude=30.0)
    assert np.abs(np.einsum("bhic,bhjc->bhij", q, k)).max() / math.sqrt(5) > 200  # exp overflows past 88
    o, saved = forward(q, k, v)
    grads = backward(saved, do)
    expected_o, expected_grads = float64_reference(q, k, v, do)
    rtol, atol = (1e-3, 1e-3) if dtype == np.float32 else (1e-9, 1e-9)
    assert_all_close([o, *grads], [expected_o, *expected_grads], rtol, atol)


# ---- every CUDA version, in the simulator ---------------------------------------------------------
@pytest.mark.parametrize("version", BENCH.cuda_versions)
@settings(max_examples=4)
@given(shape=shapes(max_batch=2, max_length=TILE + 4, max_head_size=TILE + 4), scale=scales,
       offset=st.floats(-3.0, 3.0), seed=st.integers(0, 2**16))
@example(shape=(1, 1, TILE + 1, TILE + 3, TILE + 1), scale=None, offset=1.0, seed=1)  # 2 tiles each way
@example(shape=(1, 1, 1, 1, 1), scale=None, offset=0.0, seed=2)
def test_cuda_matches_reference(version, shape, scale, offset, seed):
    q, k, v, do = random_inputs(shape, np.float32, seed, offset=offset)
    o, saved = attention_forward_cuda(q, k, v, scale, version=version)
    grads = attention_backward_cuda(saved, do)
    expected_o, expected_grads = float64_reference(q, k, v, do, scale)
    assert o.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    assert_all_close([o, *grads], [expected_o, *expected_grads], *TOLERANCES[np.float32])


@pytest.mark.parametrize("version", BENCH.cuda_versions)
def test_cuda_is_stable_for_large_scores(version):
    q, k, v, do = random_inputs((1, 1, 5, TILE + 3, 4), np.float32, seed=4, magnitude=30.0)
    o, saved = attention_forward_cuda(q, k, v, version=version)
    grads = attention_backward_cuda(saved, do)
    expected_o, expected_grads = float64_reference(q, k, v, do)
    assert_all_close([o, *grads], [expected_o, *expected_grads], 1e-3, 1e-3)


@pytest.mark.parametrize("change, version", [
    (lambda q, k, v: (q.astype(np.float64), k, v), 2),          # float64 input
    (lambda q, k, v: (q, k[:, :, :-1], v), 1),                  # k and v of different lengths
    (lambda q, k, v: (q[:, :1], k, v), 2),                      # different head counts
    (lambda q, k, v: (q, k, v), 3),                             # no such version
])
def test_cuda_rejects_bad_inputs(change, version):
    q, k, v, _ = random_inputs((1, 2, 3, 4, 2), np.float32)
    with pytest.raises(ValueError):
        attention_forward_cuda(*change(q, k, v), version=version)


def test_cuda_v2_rejects_head_size_above_its_limit():
    q, k, v, _ = random_inputs((1, 1, 1, 1, MAX_HEAD_SIZE + 1), np.float32)
    with pytest.raises(ValueError, match="head size"):
        attention_forward_cuda(q, k, v, version=2)


def test_cuda_backward_rejects_a_mismatched_gradient():
    q, k, v, do = random_inputs((1, 1, 2, 3, 2), np.float32)
    _, saved = attention_forward_cuda(q, k, v, version=1)
    with pytest.raises(ValueError):
        attention_backward_cuda(saved, do[:, :, :1])
