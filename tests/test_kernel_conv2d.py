"""kernels/conv2d.py: the reference against naive loops and finite differences, the CPU
implementation and every CUDA version (numba's simulator, tiny shapes) against the reference.
Every row of the version table also runs in tests/test_kernel_versions.py."""
import itertools

import numpy as np
import pytest
from gradcheck import numeric_gradient
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tinyddpm.kernels import conv2d as conv

KERNEL_SIZES = [(1, 1), (1, 3), (3, 1), (2, 3), (3, 3)]


def output_size(size, kernel_size, stride, padding):
    return (size + 2 * padding - kernel_size) // stride + 1


# ---- independent naive loops (the definition, one multiply-add at a time) ----------------------
def taps(x_shape, w_shape, stride, padding):
    """Every (n, k, i, j, c, r, s, h, v) with y[n, k, i, j] += w[k, c, r, s]·x[n, c, h, v]."""
    n_, c_, h_, w_ = x_shape
    k_, _, r_, s_ = w_shape
    out_h, out_w = output_size(h_, r_, stride, padding), output_size(w_, s_, stride, padding)
    for n, k, i, j, c, r, s in itertools.product(range(n_), range(k_), range(out_h), range(out_w),
                                                 range(c_), range(r_), range(s_)):
        h, v = i * stride + r - padding, j * stride + s - padding
        if 0 <= h < h_ and 0 <= v < w_:
            yield n, k, i, j, c, r, s, h, v


def naive_conv2d(x, w, b, stride, padding):
    out_h = output_size(x.shape[2], w.shape[2], stride, padding)
    out_w = output_size(x.shape[3], w.shape[3], stride, padding)
    y = np.zeros((x.shape[0], w.shape[0], out_h, out_w))
    y += b[None, :, None, None]
    for n, k, i, j, c, r, s, h, v in taps(x.shape, w.shape, stride, padding):
        y[n, k, i, j] += w[k, c, r, s] * x[n, c, h, v]
    return y


def naive_conv2d_backward(x, w, dy, stride, padding):
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    for n, k, i, j, c, r, s, h, v in taps(x.shape, w.shape, stride, padding):
        dx[n, c, h, v] += w[k, c, r, s] * dy[n, k, i, j]
        dw[k, c, r, s] += dy[n, k, i, j] * x[n, c, h, v]
    return dx, dw, dy.sum(axis=(0, 2, 3))


# ---- problem generators ------------------------------------------------------------------------
@st.composite
def conv_shapes(draw, max_batch=3, max_channels=5, max_extra=5):
    """(N, C, H, W, K, R, S, stride, padding) with the kernel fitting the padded input."""
    r, s = draw(st.sampled_from(KERNEL_SIZES))
    stride, padding = draw(st.sampled_from([1, 2])), draw(st.sampled_from([0, 1]))
    h = draw(st.integers(max(1, r - 2 * padding), max(1, r - 2 * padding) + max_extra))
    w = draw(st.integers(max(1, s - 2 * padding), max(1, s - 2 * padding) + max_extra))
    n = draw(st.integers(1, max_batch))
    c, k = draw(st.integers(1, max_channels)), draw(st.integers(1, max_channels))
    return n, c, h, w, k, r, s, stride, padding


def make_problem(shape, dtype, seed, offset=0.0):
    """x (offset by `offset`), w, b and a random upstream gradient dy for `shape`."""
    n, c, h, w, k, r, s, stride, padding = shape
    rng = np.random.default_rng(seed)
    x = offset + rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((k, c, r, s))
    b = rng.standard_normal(k)
    dy = rng.standard_normal((n, k, output_size(h, r, stride, padding), output_size(w, s, stride, padding)))
    return tuple(a.astype(dtype) for a in (x, wt, b, dy))


# ---- the reference -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 2, 3, 3, 1, 1), (1, 2, 5, 4, 3, 1, 3, 2, 0),
                                   (2, 1, 5, 5, 2, 3, 2, 2, 1), (1, 3, 3, 3, 2, 1, 1, 1, 0)])
def test_reference_matches_naive_loops(shape):
    x, w, b, dy = make_problem(shape, np.float64, seed=1, offset=0.5)
    stride, padding = shape[-2:]
    # float64, summed in another order: 1e-9, not 1e-12
    np.testing.assert_allclose(conv.conv2d_forward_reference(x, w, b, stride, padding),
                               naive_conv2d(x, w, b, stride, padding), rtol=1e-9, atol=1e-9)
    for got, want in zip(conv.conv2d_backward_reference(x, w, dy, stride, padding),
                         naive_conv2d_backward(x, w, dy, stride, padding)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(2, 2, 4, 3, 3, 3, 3, 1, 1), (1, 3, 5, 4, 2, 2, 3, 2, 1)])
def test_reference_backward_matches_finite_differences(shape):
    x, w, b, dy = make_problem(shape, np.float64, seed=2, offset=-0.3)
    stride, padding = shape[-2:]
    objective = lambda: float((conv.conv2d_forward_reference(x, w, b, stride, padding) * dy).sum())  # noqa: E731
    dx, dw, db = conv.conv2d_backward_reference(x, w, dy, stride, padding)
    for analytic, wrt in ((dx, x), (dw, w), (db, b)):
        np.testing.assert_allclose(analytic, numeric_gradient(objective, wrt), rtol=1e-6, atol=1e-8)


# ---- the CPU implementation --------------------------------------------------------------------
@given(shape=conv_shapes(), dtype=st.sampled_from([np.float32, np.float64]), with_bias=st.booleans(),
       seed=st.integers(0, 2**16), method=st.sampled_from(["auto", "im2col", "shifted", "winograd", "winograd4", "direct"]))
@example(shape=(2, 3, 4, 5, 4, 1, 1, 1, 1), dtype=np.float32, with_bias=True, seed=0, method="auto")  # 1×1, padded
@example(shape=(3, 2, 7, 6, 5, 1, 1, 2, 0), dtype=np.float64, with_bias=False, seed=0, method="auto")  # 1×1, strided
@example(shape=(2, 3, 9, 8, 4, 3, 3, 1, 1), dtype=np.float32, with_bias=True, seed=0, method="shifted")
@example(shape=(1, 2, 5, 6, 3, 2, 3, 1, 0), dtype=np.float64, with_bias=False, seed=0, method="shifted")  # unpadded
@example(shape=(3, 1, 9, 8, 4, 3, 3, 1, 1), dtype=np.float32, with_bias=True, seed=0, method="auto")  # direct, C = 1
@example(shape=(1, 3, 5, 6, 2, 2, 3, 1, 0), dtype=np.float64, with_bias=False, seed=0, method="direct")  # unpadded
def test_cpu_matches_reference(shape, dtype, with_bias, seed, method):
    x, w, b, dy = make_problem(shape, dtype, seed, offset=1.5)
    b = b if with_bias else None
    stride, padding = shape[-2:]
    tol = 1e-4 if dtype == np.float32 else 1e-9
    y, saved = conv.conv2d_forward_cpu(x, w, b, stride, padding, method)
    want = conv.conv2d_forward_reference(*(a.astype(np.float64) if a is not None else None for a in (x, w, b)),
                                 stride, padding)
    assert y.dtype == dtype and y.flags.c_contiguous
    np.testing.assert_allclose(y, want, rtol=tol, atol=tol)
    grads = conv.conv2d_backward_cpu(saved, dy)
    wants = conv.conv2d_backward_reference(*(a.astype(np.float64) for a in (x, w, dy)), stride, padding)
    for name, got, want in zip(("dx", "dw", "db"), grads, wants):
        assert got.dtype == dtype and got.shape == want.shape and got.flags.c_contiguous, name
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("method", ["im2col", "shifted", "winograd", "winograd4", "direct"])
@pytest.mark.parametrize("shape", [(2, 2, 4, 3, 3, 3, 3, 1, 1), (1, 3, 5, 4, 2, 2, 3, 1, 0), (2, 2, 5, 5, 2, 3, 3, 2, 1),
                                   (1, 2, 5, 6, 2, 3, 3, 1, 2)])
def test_cpu_backward_matches_finite_differences(method, shape):
    """float64 gradcheck of each CPU method with a random upstream gradient (where a method cannot run the
    shape, e.g. stride 2, it falls back to im2col)."""
    x, w, b, dy = make_problem(shape, np.float64, seed=5, offset=0.7)
    stride, padding = shape[-2:]
    objective = lambda: float((conv.conv2d_forward_cpu(x, w, b, stride, padding, method)[0] * dy).sum())  # noqa: E731
    _, saved = conv.conv2d_forward_cpu(x, w, b, stride, padding, method)
    for analytic, wrt in zip(conv.conv2d_backward_cpu(saved, dy), (x, w, b)):
        np.testing.assert_allclose(analytic, numeric_gradient(objective, wrt), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["auto", "im2col", "shifted", "winograd", "winograd4", "direct"])
def test_cpu_backward_without_dx_gives_the_same_dw_and_db(method):
    """need_dx=False (x needs no gradient, as the U-Net's first conv) skips dx and changes nothing else."""
    for shape in [(2, 9, 6, 5, 3, 3, 3, 1, 1), (2, 3, 5, 4, 2, 1, 1, 1, 0)]:
        x, w, b, dy = make_problem(shape, np.float32, seed=8, offset=0.3)
        _, saved = conv.conv2d_forward_cpu(x, w, b, 1, shape[-1], method)
        _, dw, db = conv.conv2d_backward_cpu(saved, dy)
        no_dx, dw_only, db_only = conv.conv2d_backward_cpu(saved, dy, need_dx=False)
        assert no_dx is None
        np.testing.assert_array_equal(dw_only, dw)
        np.testing.assert_array_equal(db_only, db)


def test_winograd_gives_the_same_result_in_chunks_of_one_image(monkeypatch):
    """Winograd's chunks (V and dM kept in cache) change no value beyond the order of dW's sums."""
    from tinyddpm.kernels import winograd
    x, w, b, dy = make_problem((5, 9, 7, 6, 4, 3, 3, 1, 1), np.float64, seed=9, offset=0.6)
    whole_y, saved = conv.conv2d_forward_cpu(x, w, b, 1, 1, "winograd")
    whole = conv.conv2d_backward_cpu(saved, dy)
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 1)
    assert winograd._tiling(x, 4, 1, x.dtype)[-1] == 1
    y, saved = conv.conv2d_forward_cpu(x, w, b, 1, 1, "winograd")
    np.testing.assert_allclose(y, whole_y, rtol=1e-12, atol=1e-12)
    for got, want in zip(conv.conv2d_backward_cpu(saved, dy), whole):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "im2col", "shifted", "winograd", "winograd4", "direct"])
def test_cpu_takes_strided_views(method):
    """x and dy as non-contiguous views (a channel slice, a transposed batch) give what their contiguous
    copies give: the channels-last copies read whole images, so the kernels must make them flat first."""
    x_big, w, b, _ = make_problem((3, 20, 9, 7, 4, 3, 3, 1, 1), np.float32, seed=10, offset=0.8)
    x = x_big[:, ::2]  # 10 channels, every other one
    y, saved = conv.conv2d_forward_cpu(x, w[:, :10], b, 1, 1, method)
    want_y, want_saved = conv.conv2d_forward_cpu(np.ascontiguousarray(x), w[:, :10], b, 1, 1, method)
    np.testing.assert_array_equal(y, want_y)
    dy = np.random.default_rng(11).standard_normal(y.shape[::-1]).astype(np.float32).T  # a transposed view
    wants = conv.conv2d_backward_cpu(want_saved, np.ascontiguousarray(dy))
    for got, want in zip(conv.conv2d_backward_cpu(saved, dy), wants):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_winograd4_gives_the_same_result_in_chunks_of_one_image(monkeypatch):
    """F(4×4)'s chunks (V and M kept in cache, per-thread scratch buffers reused from chunk to chunk)
    change no value: each tile's sums are the same whatever else is in its chunk."""
    from tinyddpm.kernels import winograd4
    x, w, b, dy = make_problem((5, 9, 7, 6, 4, 3, 3, 1, 1), np.float64, seed=9, offset=0.6)
    whole_y, saved = conv.conv2d_forward_cpu(x, w, b, 1, 1, "winograd4")
    whole_dx = conv.conv2d_backward_cpu(saved, dy)[0]
    monkeypatch.setattr(winograd4, "CHUNK_BYTES", 1)  # one image per chunk
    y, saved = conv.conv2d_forward_cpu(x, w, b, 1, 1, "winograd4")
    np.testing.assert_allclose(y, whole_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv.conv2d_backward_cpu(saved, dy)[0], whole_dx, rtol=1e-12, atol=1e-12)


def test_shifted_gemm_gives_the_same_result_in_chunks_of_one_image(monkeypatch):
    """Chunking the batch (to keep the GEMM output in cache) changes no value: one image per chunk."""
    from tinyddpm.kernels import shifted_gemm
    x, w, b, dy = make_problem((3, 4, 6, 5, 3, 3, 3, 1, 1), np.float64, seed=6, offset=-0.4)
    whole_y, saved = conv.conv2d_forward_cpu(x, w, b, 1, 1, "shifted")
    whole = conv.conv2d_backward_cpu(saved, dy)
    monkeypatch.setattr(shifted_gemm, "CHUNK_BYTES", 1)
    y, saved = conv.conv2d_forward_cpu(x, w, b, 1, 1, "shifted")
    assert len(shifted_gemm._chunks(3, 8 * 7, 8 * 9)) == 3
    np.testing.assert_allclose(y, whole_y, rtol=1e-12, atol=1e-12)  # same sums, same order per output
    for got, want in zip(conv.conv2d_backward_cpu(saved, dy), whole):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)  # dW sums chunk by chunk: another order


def test_auto_picks_direct_then_winograd4_then_the_shifted_gemm_then_im2col():
    w = np.zeros((4, 8, 3, 3), np.float32)
    x28, x7 = np.zeros((1, 8, 28, 28), np.float32), np.zeros((1, 8, 7, 7), np.float32)
    assert conv._method(x28, w, 1, 1, 28, 28, "auto") == "winograd4"
    assert conv._method(x7, w, 1, 1, 7, 7, "auto") == "winograd4"
    assert conv._method(x7, w, 1, 1, 7, 7, "winograd") == "winograd"  # F(2×2) when asked for
    assert conv._method(x28[:, :1], w[:, :1], 1, 1, 28, 28, "auto") == "direct"  # the first conv: 9 products
    assert conv._method(x28[:, :4], w[:, :4], 1, 1, 28, 28, "auto") == "direct"  # 36
    assert conv._method(x28[:, :5], w[:, :5], 1, 1, 28, 28, "auto") == "shifted"  # 45; 900/784 = 1.15
    assert conv._method(x7[:, :5], w[:, :5], 1, 1, 7, 7, "auto") == "im2col"  # 81/49 = 1.65
    assert conv._method(x28[:, :1], w[:, :1], 2, 1, 14, 14, "auto") == "im2col"  # direct: stride 1 only
    assert conv._method(x28, w, 2, 1, 14, 14, "direct") == "im2col"
    with pytest.raises(ValueError, match="unknown method"):
        conv._method(x28, w, 1, 1, 28, 28, "fft")
    assert conv._method(x28, w, 2, 1, 14, 14, "shifted") == "im2col"  # stride 2
    assert conv._method(x28, w, 2, 1, 14, 14, "winograd") == "im2col"
    assert conv._method(x28, w, 2, 1, 14, 14, "winograd4") == "im2col"
    assert conv._method(x28, w[:, :, :1, :1], 1, 0, 28, 28, "winograd") == "pointwise"


@given(shape=conv_shapes(), with_bias=st.booleans(), seed=st.integers(0, 2**16))
@example(shape=(2, 3, 9, 8, 4, 3, 3, 1, 1), with_bias=True, seed=0)  # odd Wo: a tile hangs over
@example(shape=(1, 2, 3, 3, 3, 3, 3, 1, 0), with_bias=False, seed=0)  # one output pixel
@example(shape=(3, 9, 7, 7, 5, 3, 3, 1, 1), with_bias=True, seed=1)  # several images per chunk
def test_winograd_matches_reference_in_float32(shape, with_bias, seed):
    """float32 Winograd against the float64 reference (3×3 stride 1; other convs fall back to im2col),
    beside test_cpu_matches_reference's default shapes: more 3×3 kernels, offset inputs."""
    x, w, b, dy = make_problem(shape, np.float32, seed, offset=1.5)
    b = b if with_bias else None
    stride, padding = shape[-2:]
    y, saved = conv.conv2d_forward_cpu(x, w, b, stride, padding, "winograd")
    as64 = [None if a is None else a.astype(np.float64) for a in (x, w, b, dy)]
    np.testing.assert_allclose(y, conv.conv2d_forward_reference(*as64[:3], stride, padding), rtol=1e-4, atol=2e-4)
    for name, got, want in zip(("dx", "dw", "db"), conv.conv2d_backward_cpu(saved, dy),
                               conv.conv2d_backward_reference(as64[0], as64[1], as64[3], stride, padding)):
        assert got.dtype == np.float32 and got.shape == want.shape and got.flags.c_contiguous, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4, err_msg=name)


@given(shape=conv_shapes(max_extra=9), with_bias=st.booleans(), seed=st.integers(0, 2**16))
@example(shape=(2, 3, 9, 8, 4, 3, 3, 1, 1), with_bias=True, seed=0)  # Ho, Wo not multiples of 4: tiles hang over
@example(shape=(1, 2, 3, 3, 3, 3, 3, 1, 0), with_bias=False, seed=0)  # one output pixel
@example(shape=(3, 9, 11, 13, 5, 3, 3, 1, 1), with_bias=True, seed=1)  # several tiles per row and column
@example(shape=(2, 4, 5, 6, 3, 3, 3, 1, 2), with_bias=True, seed=2)  # padding 2
def test_winograd4_matches_reference_in_float32(shape, with_bias, seed):
    """float32 F(4×4) against the float64 reference, offset inputs and a random upstream gradient. Its
    transforms amplify float32 rounding ~10x F(2×2)'s, so the tolerance is float32-sized relative to the
    largest output (4e-6 of it measured at the U-Net's shapes)."""
    x, w, b, dy = make_problem(shape, np.float32, seed, offset=1.5)
    b = b if with_bias else None
    stride, padding = shape[-2:]
    y, saved = conv.conv2d_forward_cpu(x, w, b, stride, padding, "winograd4")
    as64 = [None if a is None else a.astype(np.float64) for a in (x, w, b, dy)]
    want = conv.conv2d_forward_reference(*as64[:3], stride, padding)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=2e-5 * np.abs(want).max())
    for name, got, want in zip(("dx", "dw", "db"), conv.conv2d_backward_cpu(saved, dy),
                               conv.conv2d_backward_reference(as64[0], as64[1], as64[3], stride, padding)):
        assert got.dtype == np.float32 and got.shape == want.shape and got.flags.c_contiguous, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * np.abs(want).max(), err_msg=name)


# ---- the CUDA versions, in numba's simulator ---------------------------------------------------
# Tiny shapes: the simulator runs ~1k threads/s. Hypothesis's first draws are the smallest, so the
# examples add shapes that span partial 16×16 tiles (C·R·S = 27; 40 and 84 pixels) and split
# backward-weight v2 over several pixel chunks.
SIM_SHAPES = conv_shapes(max_batch=2, max_channels=3, max_extra=3)
SEVERAL_TILES = (2, 3, 5, 4, 3, 3, 3, 1, 1)
SEVERAL_TILES_STRIDED = (2, 3, 6, 7, 3, 3, 3, 2, 1)


def cuda_problem(shape, seed, with_bias=True):
    x, w, b, dy = make_problem(shape, np.float32, seed, offset=0.5)
    return x, w, (b if with_bias else None), dy


def assert_close_to_reference_forward(y, x, w, b, stride, padding):
    want = conv.conv2d_forward_reference(x.astype(np.float64), w.astype(np.float64),
                                 None if b is None else b.astype(np.float64), stride, padding)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def assert_close_to_reference_backward(grads, x, w, dy, stride, padding):
    wants = conv.conv2d_backward_reference(*(a.astype(np.float64) for a in (x, w, dy)), stride, padding)
    for name, got, want in zip(("dx", "dw", "db"), grads, wants):
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("version", conv.BENCH.cuda_versions)
@settings(max_examples=6)
@given(shape=SIM_SHAPES, with_bias=st.booleans(), seed=st.integers(0, 2**16))
@example(shape=SEVERAL_TILES, with_bias=True, seed=0)
@example(shape=SEVERAL_TILES_STRIDED, with_bias=False, seed=0)
def test_cuda_forward_matches_reference(version, shape, with_bias, seed):
    x, w, b, _ = cuda_problem(shape, seed, with_bias)
    stride, padding = shape[-2:]
    y, _ = conv.conv2d_forward_cuda(x, w, b, stride, padding, version=version)
    assert_close_to_reference_forward(y, x, w, b, stride, padding)


@pytest.mark.parametrize("version", conv.BENCH.cuda_versions)
@settings(max_examples=4)
@given(shape=SIM_SHAPES, seed=st.integers(0, 2**16))
@example(shape=SEVERAL_TILES, seed=0)
@example(shape=SEVERAL_TILES_STRIDED, seed=0)
def test_cuda_backward_matches_reference(version, shape, seed):
    x, w, b, dy = cuda_problem(shape, seed)
    stride, padding = shape[-2:]
    _, saved = conv.conv2d_forward_cuda(x, w, b, stride, padding, version=version)
    grads = conv.conv2d_backward_cuda(saved, dy)
    assert_close_to_reference_backward(grads, x, w, dy, stride, padding)


def test_cuda_v2_spans_several_tiles_of_channels():
    """K = C = 17: two 16-row tiles of output channels (forward, dW) and of input channels (dx)."""
    shape = (1, 17, 3, 4, 17, 1, 1, 1, 0)
    x, w, b, dy = cuda_problem(shape, seed=3)
    y, saved = conv.conv2d_forward_cuda(x, w, b, 1, 0, version=2)
    assert_close_to_reference_forward(y, x, w, b, 1, 0)
    assert_close_to_reference_backward(conv.conv2d_backward_cuda(saved, dy), x, w, dy, 1, 0)


def test_bad_arguments_raise_one_clear_value_error():
    x, w, b, dy = cuda_problem((1, 2, 4, 4, 3, 3, 3, 1, 1), seed=4)
    with pytest.raises(ValueError, match="does not fit"):
        conv.conv2d_forward_cpu(x[:, :, :2], w, b, 1, 0)
    with pytest.raises(ValueError, match="stride"):
        conv.conv2d_forward_cpu(x, w, b, 0, 1)
    with pytest.raises(ValueError, match="float32"):
        conv.conv2d_forward_cuda(x.astype(np.float64), w, b, 1, 1)
    with pytest.raises(ValueError, match="same C"):
        conv.conv2d_forward_cuda(x, w[:, :1], b, 1, 1)
    with pytest.raises(ValueError, match="bias"):
        conv.conv2d_forward_cuda(x, w, b[:2], 1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        conv.conv2d_forward_cuda(x[:, :, :2], w, b, 1, 0)
    with pytest.raises(ValueError, match="versions"):
        conv.conv2d_forward_cuda(x, w, b, 1, 1, version=3)
    _, saved = conv.conv2d_forward_cuda(x, w, b, 1, 1, version=1)
    with pytest.raises(ValueError, match="dy"):
        conv.conv2d_backward_cuda(saved, dy[:, :2])
