"""Float64 finite-difference gradchecks of every op in tinyddpm.functional, on hypothesis-drawn shapes."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tinyddpm.functional as F
from gradcheck import gradcheck

dims = st.integers(1, 4)
seeds = st.integers(0, 2**16)


def rand(seed, *shape, offset=0.0):
    return np.random.default_rng(seed).standard_normal(shape) + offset


@st.composite
def broadcast_pair(draw):
    shape = draw(st.lists(dims, min_size=1, max_size=3))
    other = [draw(st.sampled_from([n, 1])) for n in shape][draw(st.integers(0, len(shape) - 1)):]
    return tuple(shape), tuple(other)


@given(broadcast_pair(), seeds, st.sampled_from(["add", "sub", "mul", "div"]), st.booleans())
def test_binary_ops_broadcast(shapes, seed, op, swap):
    a_shape, b_shape = shapes[::-1] if swap else shapes
    a, b = rand(seed, *a_shape), rand(seed + 1, *b_shape)
    if op == "div":
        b = np.sign(b) * (np.abs(b) + 0.5)  # keep away from 0
    gradcheck(getattr(F, op), a, b, seed=seed)


@given(st.lists(dims, min_size=1, max_size=3), seeds, st.sampled_from([2, 3, 0.5, -1.5]))
def test_pow(shape, seed, exponent):
    gradcheck(lambda a: F.pow(a, exponent), np.abs(rand(seed, *shape)) + 0.5, seed=seed)


@given(dims, dims, dims, st.sampled_from([(), (2,), (3, 1)]), st.booleans(), seeds)
def test_matmul_batched(m, k, n, batch, broadcast_b, seed):
    a = rand(seed, *batch, m, k)
    b = rand(seed + 1, *((batch[-1:] if broadcast_b else batch)), k, n)
    gradcheck(F.matmul, a, b, seed=seed)


UNARY = {
    "exp": (F.exp, 0.0), "log": (F.log, None), "sqrt": (F.sqrt, None), "relu": (F.relu, 0.0),
    "sigmoid": (F.sigmoid, 0.0), "tanh": (F.tanh, 0.0), "silu": (F.silu, 0.0), "gelu": (F.gelu, 0.0),
}


@pytest.mark.parametrize("name", UNARY)
@given(shape=st.lists(dims, min_size=1, max_size=3), seed=seeds)
def test_unary(name, shape, seed):
    fn, _ = UNARY[name]
    x = rand(seed, *shape)
    if name in ("log", "sqrt"):
        x = np.abs(x) + 0.3
    if name == "relu":
        x = np.where(np.abs(x) < 1e-3, 0.5, x)  # no finite difference across the kink
    gradcheck(fn, x, seed=seed)


@given(st.lists(dims, min_size=1, max_size=3), seeds, st.data())
def test_softmax(shape, seed, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    gradcheck(lambda a: F.softmax(a, axis), rand(seed, *shape) * 3, seed=seed)


@given(st.lists(dims, min_size=1, max_size=3), seeds, st.booleans(), st.data())
def test_sum_mean(shape, seed, keepdims, data):
    axes = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1),
                               st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True).map(tuple)))
    x = rand(seed, *shape)
    gradcheck(lambda a: F.sum(a, axes, keepdims), x, seed=seed)
    gradcheck(lambda a: F.mean(a, axes, keepdims), x, seed=seed)


@given(st.lists(dims, min_size=2, max_size=4), seeds, st.randoms(use_true_random=False))
def test_reshape_permute_transpose(shape, seed, rnd):
    x = rand(seed, *shape)
    axes = list(range(len(shape)))
    rnd.shuffle(axes)
    gradcheck(lambda a: F.reshape(a, (-1,) + tuple(shape[2:])), x, seed=seed)
    gradcheck(lambda a: F.permute(a, axes), x, seed=seed)
    gradcheck(lambda a: F.transpose(a, 0, -1), x, seed=seed)


@given(st.integers(2, 6), st.integers(1, 4), seeds)
def test_getitem_basic_and_advanced(n, m, seed):
    x = rand(seed, n, m)
    gradcheck(lambda a: a[1:, ::2], x, seed=seed)
    gradcheck(lambda a: a[..., -1], x, seed=seed)
    repeated = np.array([0, n - 1, 0, 1])  # repeats must accumulate
    gradcheck(lambda a: a[repeated], x, seed=seed)


@given(st.lists(dims, min_size=1, max_size=3), st.lists(dims, min_size=2, max_size=3), seeds, st.data())
def test_concat(shape, sizes, seed, data):
    axis = data.draw(st.integers(0, len(shape) - 1))
    parts = []
    for i, size in enumerate(sizes):
        s = list(shape)
        s[axis] = size
        parts.append(rand(seed + i, *s))
    gradcheck(lambda *ts: F.concat(ts, axis), *parts, seed=seed)


@given(st.lists(dims, min_size=2, max_size=4), st.lists(st.integers(0, 2), min_size=2, max_size=4), seeds)
def test_pad(shape, widths, seed):
    widths = widths[: 2 * (len(widths) // 2)]
    gradcheck(lambda a: F.pad(a, widths), rand(seed, *shape), seed=seed)


@given(dims, dims, st.integers(2, 7), st.integers(2, 7), seeds)
def test_pooling_and_upsampling(n, c, h, w, seed):
    # no ties, and values in [0, 1) (not up to n·c·h·w/10): the central difference's rounding error grows
    # with the objective's size, and at 0.1·index it exceeded atol at a gradient near 0 (1 case in 180)
    x = np.random.default_rng(seed).permutation(n * c * h * w).reshape(n, c, h, w) / (n * c * h * w)
    gradcheck(lambda a: F.max_pool2d(a, 2), x, seed=seed)
    gradcheck(lambda a: F.avg_pool2d(a, 2), x, seed=seed)
    gradcheck(lambda a: F.upsample_nearest2d(a, 2), x, seed=seed)


@given(st.integers(1, 5), dims, st.lists(st.integers(0, 4), min_size=1, max_size=6), seeds)
def test_embedding_repeated_indices(dim, _, idx, seed):
    table = rand(seed, 5, dim)
    gradcheck(lambda t: F.embedding(np.array(idx), t), table, seed=seed)


@given(st.lists(dims, min_size=0, max_size=2), dims, dims, st.booleans(), seeds)
def test_linear(lead, fin, fout, bias, seed):
    x, w, b = rand(seed, *lead, fin), rand(seed + 1, fout, fin), rand(seed + 2, fout)
    if bias:
        gradcheck(F.linear, x, w, b, seed=seed)
    else:
        gradcheck(lambda x, w: F.linear(x, w), x, w, seed=seed)


@given(st.lists(dims, min_size=1, max_size=2), st.integers(2, 6), seeds)
def test_layer_norm_offset_input(lead, dim, seed):
    x = rand(seed, *lead, dim, offset=100.0)
    gradcheck(lambda x, w, b: F.layer_norm(x, w, b), x, rand(seed + 1, dim), rand(seed + 2, dim),
              seed=seed, rtol=1e-4, atol=1e-7)


@given(dims, st.integers(2, 5), seeds)
def test_losses(n, k, seed):
    rng = np.random.default_rng(seed)
    gradcheck(F.mse_loss, rand(seed, n, k), rand(seed + 1, n, k), seed=seed)
    target = rng.integers(0, k, size=n)
    gradcheck(lambda z: F.cross_entropy(z, target), rand(seed, n, k) * 5, seed=seed)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(3, 7), st.integers(3, 6),
       st.integers(1, 3), st.sampled_from([(1, 1), (3, 3), (1, 3), (2, 3)]),
       st.sampled_from([1, 2]), st.sampled_from([0, 1]), st.booleans(), seeds)
@settings(max_examples=20)
def test_conv2d(n, c, h, w, k, rs, stride, padding, bias, seed):
    x, wt, b = rand(seed, n, c, h, w), rand(seed + 1, k, c, *rs), rand(seed + 2, k)
    if bias:
        gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride, padding), x, wt, b, seed=seed)
    else:
        gradcheck(lambda x, w: F.conv2d(x, w, None, stride, padding), x, wt, seed=seed)


@given(st.integers(1, 2), st.sampled_from([(1, 2), (2, 4), (3, 3), (1, 1)]), st.integers(1, 4),
       st.integers(1, 3), st.booleans(), seeds)
@settings(max_examples=15)
def test_group_norm_and_fused(n, gc, h, w, with_emb, seed):
    g, c = gc
    x = rand(seed, n, c, h, w, offset=1e3)
    weight, bias = rand(seed + 1, c), rand(seed + 2, c)
    assume(h * w * (c // g) > 1)  # one element per group: the normalised value is identically 0
    gradcheck(lambda x, wt, b: F.group_norm(x, g, wt, b), x, weight, bias, seed=seed, rtol=1e-4, atol=1e-6)
    if with_emb:
        gradcheck(lambda x, wt, b, e: F.group_norm_silu(x, g, wt, b, e), x, weight, bias, rand(seed + 3, n, c),
                  seed=seed, rtol=1e-4, atol=1e-6)
    else:
        gradcheck(lambda x, wt, b: F.group_norm_silu(x, g, wt, b), x, weight, bias, seed=seed, rtol=1e-4, atol=1e-6)


@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 5), st.integers(1, 5), st.integers(1, 4), seeds)
@settings(max_examples=15)
def test_scaled_dot_product_attention(b, h, lq, lk, d, seed):
    q, k, v = rand(seed, b, h, lq, d), rand(seed + 1, b, h, lk, d), rand(seed + 2, b, h, lk, d)
    gradcheck(F.scaled_dot_product_attention, q, k, v, seed=seed)
