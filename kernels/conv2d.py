"""2-D convolution (cross-correlation, as in PyTorch and LeCun et al. 1998), NCHW, no dilation/groups.

x (N, C, H, W), weight w (K, C, R, S), optional bias b (K,), integer stride σ and zero padding π in
both spatial dims; the output is y (N, K, Ho, Wo) with Ho = (H + 2π − R)//σ + 1 (same for Wo):

    y[n, k, i, j] = b[k] + Σ_{c, r, s} w[k, c, r, s] · x_pad[n, c, iσ + r, jσ + s]

where x_pad is x with π zeros around each image. Seen as a matrix product (Chellapilla et al. 2006,
"High Performance Convolutional Neural Networks for Document Processing"): with the im2col matrix
X̂[(c, r, s), (n, i, j)] = x_pad[n, c, iσ + r, jσ + s] and W[k, (c, r, s)] = w[k, c, r, s],

    forward          Y = W X̂ + b                       (K, N·Ho·Wo)
    backward-weight  dW = dY X̂ᵀ,   db[k] = Σ_{n,i,j} dy[n, k, i, j]
    backward-data    dX̂ = Wᵀ dY,   dx = col2im(dX̂): dx_pad[n, c, iσ + r, jσ + s] += dX̂[(c, r, s), (n, i, j)]

Written as a gather, backward-data is itself a convolution: of dy dilated by σ (σ − 1 zeros between
its pixels) and padded by R − 1 − π, with the weights flipped in (r, s) and transposed in (k, c):

    dx[n, c, h, v] = Σ_{k, r, s} w[k, c, r, s] · dy[n, k, (h + π − r)/σ, (v + π − s)/σ]
                     (terms whose index is not a whole number inside dy are zero)

The versions (reference; cpu, the engine's per-layer choice among cpu_im2col, cpu_shifted,
cpu_winograd, cpu_winograd4 and cpu_direct; cuda_v1, cuda_v2) are the rows of VERSIONS at the end of
this file, each with its idea
(and the CUDA ones with their kernels ``conv2d_<pass>_v<N>``); ``python benchmarks/bench_kernels.py
--list`` prints them with the command that runs each one alone.
"""
import numpy as np
from numba import float32

from ._bench import OpBench, Version, host64, saved_backward
from ._cuda import (ZERO, array_module, block_sum, ceil_div, cuda, device_function, kernel, require_float32,
                    sum_columns, unravel)
from .cpu_threads import parallel_map, task_slices
from .direct_conv import conv2d_backward_direct, conv2d_forward_direct
from .direct_conv import fits as direct_fits
from .im2col import col2im, im2col
from .shifted_gemm import conv2d_backward_shifted, conv2d_forward_shifted
from .winograd import conv2d_backward_data_winograd, conv2d_backward_weight_winograd, conv2d_forward_winograd
from .winograd import fits as winograd_fits
from .winograd4 import conv2d_backward_data_winograd4, conv2d_forward_winograd4


def _output_size(size, kernel_size, stride, padding):
    return (size + 2 * padding - kernel_size) // stride + 1


def _check_args(x, w, b, stride, padding):
    """Raise one clear ValueError for arguments no conv2d can take; return (Ho, Wo)."""
    if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[1]:
        raise ValueError(f"conv2d needs x (N, C, H, W) and w (K, C, R, S) with the same C, got {x.shape} and {w.shape}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"conv2d: bias {b.shape} must be (K,) = ({w.shape[0]},)")
    if stride < 1 or padding < 0:
        raise ValueError(f"conv2d needs stride ≥ 1 and padding ≥ 0, got stride={stride}, padding={padding}")
    out_h = _output_size(x.shape[2], w.shape[2], stride, padding)
    out_w = _output_size(x.shape[3], w.shape[3], stride, padding)
    if x.size == 0 or w.size == 0 or out_h < 1 or out_w < 1:
        raise ValueError(f"conv2d: kernel {w.shape[2:]} does not fit in x {x.shape[2:]} padded by {padding}")
    return out_h, out_w


def _pad(x, padding):
    """x with `padding` zeros around each image (a copy only when padding > 0)."""
    if padding == 0:
        return x
    n, c, h, w = x.shape
    x_pad = np.zeros((n, c, h + 2 * padding, w + 2 * padding), x.dtype)
    x_pad[:, :, padding:padding + h, padding:padding + w] = x
    return x_pad


def _window(a, r, s, stride, out_h, out_w):
    """The (out_h, out_w) pixels of a (…, H, W) that kernel offset (r, s) meets: a[…, iσ + r, jσ + s]."""
    return a[:, :, r:r + stride * out_h:stride, s:s + stride * out_w:stride]


# ---- NumPy reference ---------------------------------------------------------------------------
def conv2d_forward_reference(x, w, b=None, stride=1, padding=0):
    """y[n,k,i,j] = b[k] + Σ_{c,r,s} w[k,c,r,s]·x_pad[n, c, iσ + r, jσ + s]."""
    k, _, kh, kw = w.shape
    out_h, out_w = _output_size(x.shape[2], kh, stride, padding), _output_size(x.shape[3], kw, stride, padding)
    x_pad = _pad(x, padding)
    y = np.zeros((x.shape[0], k, out_h, out_w), np.result_type(x, w))
    for r in range(kh):
        for s in range(kw):
            y += np.einsum("kc,nchw->nkhw", w[:, :, r, s], _window(x_pad, r, s, stride, out_h, out_w))
    return y if b is None else y + b.reshape(1, k, 1, 1)


def conv2d_backward_reference(x, w, dy, stride=1, padding=0):
    """(dx, dw, db): dx_pad[n,c,iσ+r,jσ+s] += Σ_k w[k,c,r,s]·dy[n,k,i,j],
    dw[k,c,r,s] = Σ_{n,i,j} dy[n,k,i,j]·x_pad[n,c,iσ+r,jσ+s],  db[k] = Σ_{n,i,j} dy[n,k,i,j]."""
    n, c, h, width = x.shape
    _, _, kh, kw = w.shape
    out_h, out_w = dy.shape[2:]
    x_pad = _pad(x, padding)
    dx_pad = np.zeros(x_pad.shape, np.result_type(x, w, dy))
    dw = np.zeros(w.shape, dx_pad.dtype)
    for r in range(kh):
        for s in range(kw):
            _window(dx_pad, r, s, stride, out_h, out_w)[...] += np.einsum("kc,nkhw->nchw", w[:, :, r, s], dy)
            dw[:, :, r, s] = np.einsum("nkhw,nchw->kc", dy, _window(x_pad, r, s, stride, out_h, out_w))
    dx = dx_pad[:, :, padding:padding + h, padding:padding + width]
    return dx, dw, dy.sum(axis=(0, 2, 3))


# ---- CPU implementation (the engine's `cpu` backend) -------------------------------------------
# Five ways to a conv, picked per layer (the version rows cpu_im2col, cpu_shifted, cpu_winograd,
# cpu_winograd4 and cpu_direct time each at the U-Net's shapes; docs/benchmarks.md has the tables):
# - im2col (kernels/im2col.py): batch-innermost ("CHWN") columns, so each pass is one large GEMM;
# - the shifted GEMM (kernels/shifted_gemm.py): stride 1, a third of im2col's data for 3×3, but the
#   padded border is computed too;
# - Winograd F(2×2, 3×3) (kernels/winograd.py): 3×3 stride 1, 2.25x fewer multiplies, for the forward,
#   backward-data and backward-weight;
# - Winograd F(4×4, 3×3) (kernels/winograd4.py): 4x fewer multiplies for the forward and
#   backward-data; its backward-weight is F(2×2)'s, whose float32 rounding is ~10x smaller;
# - direct (kernels/direct_conv.py): stride 1 with at most direct_conv.MAX_DEPTH products per output
#   (the first conv, C = 1), scaled rows of x added up: no GEMM too shallow for BLAS.
# A stride-1 conv that fits the direct loop takes it; a 3×3 stride-1 conv with at least
# WINOGRAD_MIN_CHANNELS input channels takes Winograd F(4×4) (it beat F(2×2) at every U-Net shape);
# otherwise a stride-1 conv takes the shifted GEMM where its padded border adds at most
# SHIFTED_MAX_OVERHEAD of work (28×28: 1.15; 7×7: 1.65), else im2col.
WINOGRAD_MIN_CHANNELS = 8
SHIFTED_MAX_OVERHEAD = 1.2
METHODS = ("auto", "im2col", "shifted", "winograd", "winograd4", "direct")


def _is_pointwise(w, stride, padding):
    """A 1×1, stride-1, unpadded conv is a matrix product per pixel: x itself is its im2col matrix."""
    return w.shape[2] == w.shape[3] == stride == 1 and padding == 0


def _method(x, w, stride, padding, out_h, out_w, method):
    """'pointwise', 'im2col', 'shifted', 'winograd', 'winograd4' or 'direct' for this conv; `method`
    forces one of the last five wherever it can run (shifted, direct: stride 1; winograd, winograd4: see
    winograd.fits), else im2col."""
    if method not in METHODS:
        raise ValueError(f"conv2d: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if _is_pointwise(w, stride, padding):
        return "pointwise"
    if method == "direct" and stride == 1 or method == "auto" and direct_fits(w, stride):
        return "direct"
    if method in ("winograd", "winograd4") or (method == "auto" and x.shape[1] >= WINOGRAD_MIN_CHANNELS):
        if winograd_fits(w, stride, padding):
            return "winograd" if method == "winograd" else "winograd4"
    if stride != 1 or method in ("im2col", "winograd", "winograd4", "direct"):
        return "im2col"
    padded = (x.shape[2] + 2 * padding) * (x.shape[3] + 2 * padding)
    return "shifted" if method == "shifted" or padded <= SHIFTED_MAX_OVERHEAD * out_h * out_w else "im2col"


def conv2d_forward_cpu(x, w, b, stride, padding, method="auto"):
    """y = conv2d(x, w) + b -> (y, saved): by one GEMM on x itself for a pointwise conv, else by im2col
    (Chellapilla et al. 2006), the shifted GEMM, Winograd or the direct loop; saved keeps what the
    backward needs."""
    out_h, out_w = _check_args(x, w, b, stride, padding)
    method = _method(x, w, stride, padding, out_h, out_w, method)
    if method == "direct":
        return conv2d_forward_direct(x, w, b, padding, out_h, out_w)
    if method in ("winograd", "winograd4"):
        forward = conv2d_forward_winograd if method == "winograd" else conv2d_forward_winograd4
        return forward(x, w, b, padding), {"method": method, "x": x, "w": w, "padding": padding}
    if method == "shifted":
        y, saved = conv2d_forward_shifted(x, w, b, padding, out_h, out_w)
        return y, dict(saved, method=method)
    n, _, h, width = x.shape
    k, _, kh, kw = w.shape
    w_rows = w.reshape(k, -1)
    y = np.empty((n, k, out_h, out_w), np.result_type(x, w))
    if method == "pointwise":
        cols, y_rows = x.reshape(n, -1, h * width), y.reshape(n, k, -1)

        def run(part):  # (K, C) @ (n, C, HW): NCHW out, no copies
            np.matmul(w_rows, cols[part], out=y_rows[part])
            if b is not None:
                y_rows[part] += b.reshape(k, 1)
        parallel_map(run, task_slices(n))
    else:
        cols = im2col(x, kh, kw, stride, padding, out_h, out_w)
        y_chwn = (w_rows @ cols).reshape(k, out_h, out_w, n)
        bias = 0 if b is None else b.reshape(k, 1, 1, 1)
        np.add(y_chwn, bias, out=y.transpose(1, 2, 3, 0))  # the bias rides on the copy back to NCHW
    saved = {"method": method, "cols": cols, "w": w, "x_shape": x.shape, "stride": stride, "padding": padding}
    return y, saved


def _bias_grad(dy):
    """db[k] = Σ_{n,i,j} dy[n, k, i, j]: einsum's loop took a third of dy.sum(axis=(0, 2, 3))'s time
    (0.06 against 0.17 ms at N = 64, K = 64, 7×7)."""
    return np.einsum("nkp->k", dy.reshape(dy.shape[0], dy.shape[1], -1))


def conv2d_backward_cpu(saved, dy, need_dx=True):
    """(dx, dw, db) of conv2d_forward_cpu: dW = dY X̂ᵀ and dX̂ = Wᵀ dY (one GEMM each), dx = col2im(dX̂),
    db = Σ dy (shifted, Winograd, direct: their modules' backward; dw of either Winograd by F(2×2)'s).
    With need_dx=False (x needs no gradient: the U-Net's first conv) dx is None and not computed."""
    if saved["method"] == "direct":
        return conv2d_backward_direct(saved, dy, need_dx)
    if saved["method"] == "shifted":
        return conv2d_backward_shifted(saved, dy, need_dx)
    if saved["method"] in ("winograd", "winograd4"):
        x, w, padding = saved["x"], saved["w"], saved["padding"]
        f2 = saved["method"] == "winograd"
        backward_data = conv2d_backward_data_winograd if f2 else conv2d_backward_data_winograd4
        dx = backward_data(w, dy, padding) if need_dx else None
        return dx, conv2d_backward_weight_winograd(x, dy, padding), _bias_grad(dy)
    cols, w, x_shape = saved["cols"], saved["w"], saved["x_shape"]
    k, _, kh, kw = w.shape
    n, _, out_h, out_w = dy.shape
    w_rows = w.reshape(k, -1)
    if saved["method"] == "pointwise":
        dy_rows = dy.reshape(n, k, -1)
        dtype = np.result_type(w, dy)
        dx = np.empty(cols.shape, dtype) if need_dx else None
        tasks = task_slices(n)
        dw_terms = np.empty((len(tasks), k, cols.shape[1]), dtype)

        def run(i):  # Σ_n dY_n X_nᵀ per slice of images: the transposed x is a strided view BLAS reads as it is
            part = tasks[i]
            np.matmul(dy_rows[part], cols[part].transpose(0, 2, 1)).sum(axis=0, out=dw_terms[i])
            if need_dx:
                np.matmul(w_rows.T, dy_rows[part], out=dx[part])
        parallel_map(run, range(len(tasks)))
        dw = dw_terms.sum(axis=0)  # in slice order: the same bits for any thread count
        dx = dx.reshape(x_shape) if need_dx else None
        db = _bias_grad(dy)
    else:
        dy_rows = np.ascontiguousarray(dy.transpose(1, 2, 3, 0)).reshape(k, -1)  # (K, Ho·Wo·N)
        dw = dy_rows @ cols.T
        dx = col2im(w_rows.T @ dy_rows, x_shape, kh, kw, saved["stride"], saved["padding"], out_h, out_w) \
            if need_dx else None
        db = dy_rows.sum(axis=1)
    return dx, dw.reshape(w.shape), db


# ---- CUDA kernels ------------------------------------------------------------------------------
# Direct kernels and reductions: 256 threads (8 warps) per block keep enough loads in flight, and a
# power of two lets the shared-memory trees halve cleanly.
THREADS = 256
# Implicit GEMM: 16×16 output tiles, one output per thread (256 threads); each tile of W and of X̂
# staged in shared memory is read by 16 threads, so DRAM/L2 traffic drops 16× against v1.
TILE = 16
# A shared tile written down its columns gets one spare column: rows TILE + 1 floats apart fall in
# different shared-memory banks; TILE apart, the 16 threads writing a column crowd into 2 of the 32
# banks (8-way conflicts).
PADDED_TILE = TILE + 1
# Backward-weight v2 has only K·C·R·S/TILE² output tiles (36 for K = C = 32, 3×3) but a long sum over
# N·Ho·Wo pixels: split the sum until about this many blocks run, ~4 per SM of a 132-SM H100.
WEIGHT_GRAD_BLOCKS = 512


@device_function
def split_pixel(p, out_h, out_w):
    """(n, i, j) of the flat pixel index p = (n·out_h + i)·out_w + j."""
    n = p // (out_h * out_w)
    rest = p - n * out_h * out_w
    i = rest // out_w
    return n, i, rest - i * out_w


@device_function
def split_depth(q, kh, kw):
    """(c, r, s) of the flat im2col row q = (c·kh + r)·kw + s (also (k, r, s) in backward-data)."""
    c = q // (kh * kw)
    rest = q - c * kh * kw
    r = rest // kw
    return c, r, rest - r * kw


@device_function
def input_or_zero(x, n, c, h, v):
    """x[n, c, h, v] inside the image, 0 in the zero padding around it."""
    if 0 <= h < x.shape[2] and 0 <= v < x.shape[3]:
        return x[n, c, h, v]
    return ZERO


@device_function
def dilated_or_zero(dy, n, k, h, v, stride):
    """dy[n, k, h/σ, v/σ] where (h, v) is a pixel of dy dilated by σ, else 0 (the zeros between its
    pixels and the padding around it): the input of backward-data seen as a convolution."""
    if h >= 0 and v >= 0 and h % stride == 0 and v % stride == 0:
        i, j = h // stride, v // stride
        if i < dy.shape[2] and j < dy.shape[3]:
            return dy[n, k, i, j]
    return ZERO


@device_function
def tile_dot(a_tile, b_tile, row, col, acc):
    """acc + Σ_t a_tile[row, t]·b_tile[t, col]: one TILE-deep step of a tiled GEMM."""
    for t in range(TILE):
        acc += a_tile[row, t] * b_tile[t, col]
    return acc


FORWARD_SIGNATURE = "void(float32[:,:,:,::1], float32[:,:,:,::1], float32[::1], int32, int32, float32[:,:,:,::1])"
BACKWARD_DATA_SIGNATURE = "void(float32[:,:,:,::1], float32[:,:,:,::1], int32, int32, float32[:,:,:,::1])"


@kernel(FORWARD_SIGNATURE)
def conv2d_forward_v1(x, w, b, stride, padding, y):
    """One thread per y[n, k, i, j] (consecutive threads: consecutive j, so the stores coalesce):
    b[k] + Σ_{c,r,s} w·x, every operand read from global memory."""
    idx = cuda.grid(1)
    if idx < y.size:
        n, k, i, j = unravel(idx, y)
        acc = b[k]
        for c in range(x.shape[1]):
            for r in range(w.shape[2]):
                for s in range(w.shape[3]):
                    acc += w[k, c, r, s] * input_or_zero(x, n, c, i * stride + r - padding, j * stride + s - padding)
        y[n, k, i, j] = acc


@kernel(FORWARD_SIGNATURE)
def conv2d_forward_v2(x, w, b, stride, padding, y):
    """Implicit GEMM Y[k, p] = Σ_q W[k, q]·X̂[q, p]: the block computes a TILE×TILE tile of Y, thread
    (ty, tx) owns Y[k, p] with k = its tile row, p = (n, i, j) its tile column."""
    w_tile = cuda.shared.array((TILE, TILE), float32)
    x_tile = cuda.shared.array((TILE, TILE), float32)
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    k = cuda.blockIdx.y * TILE + ty
    p = cuda.blockIdx.x * TILE + tx
    kh, kw = w.shape[2], w.shape[3]
    depth = x.shape[1] * kh * kw
    pixel_ok = p < y.shape[0] * y.shape[2] * y.shape[3]
    n, i, j = split_pixel(p, y.shape[2], y.shape[3])
    acc = ZERO
    for q0 in range(0, depth, TILE):
        # W tile: thread (ty, tx) loads W[k, q0 + tx]; a row of w is contiguous in q.
        value = ZERO
        if k < w.shape[0] and q0 + tx < depth:
            c, r, s = split_depth(q0 + tx, kh, kw)
            value = w[k, c, r, s]
        w_tile[ty, tx] = value
        # X̂ tile: thread (ty, tx) gathers X̂[q0 + ty, p]; consecutive tx read neighbouring pixels.
        value = ZERO
        if pixel_ok and q0 + ty < depth:
            c, r, s = split_depth(q0 + ty, kh, kw)
            value = input_or_zero(x, n, c, i * stride + r - padding, j * stride + s - padding)
        x_tile[ty, tx] = value
        cuda.syncthreads()
        acc = tile_dot(w_tile, x_tile, ty, tx, acc)
        cuda.syncthreads()  # the tiles are overwritten next step only once every thread has used them
    if k < w.shape[0] and pixel_ok:
        y[n, k, i, j] = acc + b[k]


@kernel(BACKWARD_DATA_SIGNATURE)
def conv2d_backward_data_v1(dy, w, stride, padding, dx):
    """One thread per dx[n, c, h, v] = Σ_{k,r,s} w[k, c, r, s]·dy[n, k, (h + π − r)/σ, (v + π − s)/σ]
    (whole-number indices inside dy only): a gather, so no two threads write the same dx."""
    idx = cuda.grid(1)
    if idx < dx.size:
        n, c, h, v = unravel(idx, dx)
        acc = ZERO
        for k in range(w.shape[0]):
            for r in range(w.shape[2]):
                for s in range(w.shape[3]):
                    acc += w[k, c, r, s] * dilated_or_zero(dy, n, k, h + padding - r, v + padding - s, stride)
        dx[n, c, h, v] = acc


@kernel(BACKWARD_DATA_SIGNATURE)
def conv2d_backward_data_v2(dy, w, stride, padding, dx):
    """Backward-data as the implicit GEMM of the forward v2 on transformed operands:
    dX[c, p] = Σ_{q=(k,r,s)} W'[c, q]·D̂[q, p], W'[c, (k, r, s)] = w[k, c, r, s] (transposed; the
    flip is in D̂'s index), D̂[(k, r, s), (n, h, v)] = dy dilated at (h + π − r, v + π − s).
    The forward v2's tile loop written again on purpose: only the operands' gathers differ, and numba
    device code cannot take the gather as an argument."""
    w_tile = cuda.shared.array((TILE, TILE), float32)
    dy_tile = cuda.shared.array((TILE, TILE), float32)
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    c = cuda.blockIdx.y * TILE + ty
    p = cuda.blockIdx.x * TILE + tx
    kh, kw = w.shape[2], w.shape[3]
    depth = w.shape[0] * kh * kw
    pixel_ok = p < dx.shape[0] * dx.shape[2] * dx.shape[3]
    n, h, v = split_pixel(p, dx.shape[2], dx.shape[3])
    acc = ZERO
    for q0 in range(0, depth, TILE):
        value = ZERO
        if c < w.shape[1] and q0 + tx < depth:
            k, r, s = split_depth(q0 + tx, kh, kw)
            value = w[k, c, r, s]
        w_tile[ty, tx] = value
        value = ZERO
        if pixel_ok and q0 + ty < depth:
            k, r, s = split_depth(q0 + ty, kh, kw)
            value = dilated_or_zero(dy, n, k, h + padding - r, v + padding - s, stride)
        dy_tile[ty, tx] = value
        cuda.syncthreads()
        acc = tile_dot(w_tile, dy_tile, ty, tx, acc)
        cuda.syncthreads()
    if c < w.shape[1] and pixel_ok:
        dx[n, c, h, v] = acc


@kernel("void(float32[:,:,:,::1], float32[:,:,:,::1], int32, int32, float32[:,:,:,::1])")
def conv2d_backward_weight_v1(x, dy, stride, padding, dw):
    """One block per dw[k, c, r, s] = Σ_{n,i,j} dy[n, k, i, j]·x_pad[n, c, iσ + r, jσ + s]: its threads
    stride over the N·Ho·Wo pixels, then a shared-memory tree adds their partial sums."""
    buf = cuda.shared.array(THREADS, float32)
    k, c, r, s = unravel(cuda.blockIdx.x, dw)
    acc = ZERO
    for p in range(cuda.threadIdx.x, dy.shape[0] * dy.shape[2] * dy.shape[3], cuda.blockDim.x):
        n, i, j = split_pixel(p, dy.shape[2], dy.shape[3])
        acc += dy[n, k, i, j] * input_or_zero(x, n, c, i * stride + r - padding, j * stride + s - padding)
    total = block_sum(buf, acc)
    if cuda.threadIdx.x == 0:
        dw[k, c, r, s] = total


@kernel("void(float32[:,:,:,::1], float32[:,:,:,::1], int32, int32, int32, float32[:,:,:,:,::1])")
def conv2d_backward_weight_v2(x, dy, stride, padding, chunk, dw_part):
    """dW[k, q] = Σ_p dY[k, p]·X̂[q, p] as a tiled GEMM over one chunk of pixels p (blockIdx.z):
    dw_part[z, k, c, r, s] holds the chunk's partial sum. Thread (ty, tx) owns dW[k, q], k its tile
    row, q = (c, r, s) its tile column."""
    dy_tile = cuda.shared.array((TILE, TILE), float32)
    # Stored transposed (pixel, q), rows padded: see PADDED_TILE.
    x_tile = cuda.shared.array((TILE, PADDED_TILE), float32)
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    kh, kw = dw_part.shape[3], dw_part.shape[4]
    depth = x.shape[1] * kh * kw
    k = cuda.blockIdx.y * TILE + ty
    q = cuda.blockIdx.x * TILE + tx
    pixels = dy.shape[0] * dy.shape[2] * dy.shape[3]
    p_begin = cuda.blockIdx.z * chunk
    p_end = min(p_begin + chunk, pixels)
    acc = ZERO
    for p0 in range(p_begin, p_end, TILE):
        p = p0 + tx
        n, i, j = split_pixel(p, dy.shape[2], dy.shape[3])
        value = ZERO  # dY tile: thread (ty, tx) loads dY[k, p0 + tx], coalesced along the pixels
        if k < dy.shape[1] and p < p_end:
            value = dy[n, k, i, j]
        dy_tile[ty, tx] = value
        value = ZERO  # X̂ tile: thread (ty, tx) gathers X̂[q_tile + ty, p0 + tx] into x_tile[tx, ty]
        q_load = cuda.blockIdx.x * TILE + ty
        if q_load < depth and p < p_end:
            c, r, s = split_depth(q_load, kh, kw)
            value = input_or_zero(x, n, c, i * stride + r - padding, j * stride + s - padding)
        x_tile[tx, ty] = value
        cuda.syncthreads()
        acc = tile_dot(dy_tile, x_tile, ty, tx, acc)
        cuda.syncthreads()
    if k < dy.shape[1] and q < depth:
        c, r, s = split_depth(q, kh, kw)
        dw_part[cuda.blockIdx.z, k, c, r, s] = acc


@kernel("void(float32[:,:,::1], float32[::1])")
def conv2d_backward_bias_v1(dy, db):
    """db[k] = Σ_{n,l} dy[n, k, l] (dy as (N, K, Ho·Wo)): block k strides over its N·Ho·Wo values,
    then a shared-memory tree adds the threads' partial sums. v2 uses it too."""
    buf = cuda.shared.array(THREADS, float32)
    k = cuda.blockIdx.x
    pixels = dy.shape[2]
    acc = ZERO
    for e in range(cuda.threadIdx.x, dy.shape[0] * pixels, cuda.blockDim.x):
        n = e // pixels
        acc += dy[n, k, e - n * pixels]
    total = block_sum(buf, acc)
    if cuda.threadIdx.x == 0:
        db[k] = total


# ---- launchers (NumPy arrays under the simulator, CuPy arrays on a GPU) ------------------------
def _reduction_threads(count):
    """Threads for one block per output summing `count` values: a power of two (for the tree), at
    most THREADS and no more than the values (idle threads would only add zeros)."""
    return min(THREADS, 1 << max(0, count - 1).bit_length())


def _check_version(version):
    if version not in BENCH.cuda_versions:
        raise ValueError(f"conv2d CUDA has versions {BENCH.cuda_versions}, got version={version}")


def conv2d_forward_cuda(x, w, b, stride, padding, version=2):
    """conv2d forward on the GPU -> (y, saved); saved keeps x, w and the launch options."""
    out_h, out_w = _check_args(x, w, b, stride, padding)
    _check_version(version)
    require_float32("conv2d", x=x, w=w, **({} if b is None else {"b": b}))
    xp = array_module(x)
    bias = xp.zeros(w.shape[0], np.float32) if b is None else b  # K zeros: cheaper than a 2nd kernel
    y = xp.empty((x.shape[0], w.shape[0], out_h, out_w), np.float32)
    args = (x, w, bias, np.int32(stride), np.int32(padding), y)
    if version == 1:
        conv2d_forward_v1[ceil_div(y.size, THREADS), THREADS](*args)
    else:
        pixels = x.shape[0] * out_h * out_w
        conv2d_forward_v2[(ceil_div(pixels, TILE), ceil_div(w.shape[0], TILE)), (TILE, TILE)](*args)
    return y, {"x": x, "w": w, "stride": stride, "padding": padding, "version": version}


def _weight_grad_v2(x, dy, w_shape, stride, padding):
    """dW by the split tiled GEMM: partial sums over pixel chunks, then their column sum."""
    xp = array_module(x)
    k, c, kh, kw = w_shape
    pixels = dy.shape[0] * dy.shape[2] * dy.shape[3]
    grid_xy = (ceil_div(c * kh * kw, TILE), ceil_div(k, TILE))
    # As many splits as make ~WEIGHT_GRAD_BLOCKS blocks, each at least one TILE of pixels.
    splits = max(1, min(ceil_div(pixels, TILE), ceil_div(WEIGHT_GRAD_BLOCKS, grid_xy[0] * grid_xy[1])))
    chunk = TILE * ceil_div(ceil_div(pixels, splits), TILE)
    splits = ceil_div(pixels, chunk)
    dw_part = xp.empty((splits,) + tuple(w_shape), np.float32)
    conv2d_backward_weight_v2[grid_xy + (splits,), (TILE, TILE)](
        x, dy, np.int32(stride), np.int32(padding), np.int32(chunk), dw_part)
    return sum_columns(dw_part.reshape(splits, -1)).reshape(w_shape)


def conv2d_backward_cuda(saved, dy, need_dx=True, version=None):
    """(dx, dw, db) of conv2d_forward_cuda, by the version of the forward unless `version` is given;
    dx is None and not computed with need_dx=False."""
    x, w, stride, padding = saved["x"], saved["w"], saved["stride"], saved["padding"]
    version = saved["version"] if version is None else version
    _check_version(version)
    out_shape = (x.shape[0], w.shape[0]) + _check_args(x, w, None, stride, padding)
    if dy.shape != out_shape:
        raise ValueError(f"conv2d backward: dy {dy.shape} must be the output shape {out_shape}")
    require_float32("conv2d", dy=dy)
    xp = array_module(x)
    dx = xp.empty(x.shape, np.float32) if need_dx else None
    data_args = (dy, w, np.int32(stride), np.int32(padding), dx)
    threads = _reduction_threads(dy.shape[0] * dy.shape[2] * dy.shape[3])  # per dw (v1) and db element
    if version == 1:
        if need_dx:
            conv2d_backward_data_v1[ceil_div(dx.size, THREADS), THREADS](*data_args)
        dw = xp.empty(w.shape, np.float32)
        conv2d_backward_weight_v1[w.size, threads](x, dy, np.int32(stride), np.int32(padding), dw)
    else:
        if need_dx:
            pixels = x.shape[0] * x.shape[2] * x.shape[3]
            conv2d_backward_data_v2[(ceil_div(pixels, TILE), ceil_div(x.shape[1], TILE)), (TILE, TILE)](*data_args)
        dw = _weight_grad_v2(x, dy, w.shape, stride, padding)
    db = xp.empty(w.shape[0], np.float32)
    conv2d_backward_bias_v1[w.shape[0], threads](dy.reshape(dy.shape[0], dy.shape[1], -1), db)
    return dx, dw, db


# ---- the version table and the benchmark description ------------------------------------------
def _make_case(shape, xp, seed):
    rng = np.random.default_rng(seed)
    n, c, h, w, k, kh, kw = (shape[key] for key in ("N", "C", "H", "W", "K", "R", "S"))
    stride, padding = shape["stride"], shape["padding"]
    out_h, out_w = _output_size(h, kh, stride, padding), _output_size(w, kw, stride, padding)
    host = {"x": rng.standard_normal((n, c, h, w)),
            "w": rng.standard_normal((k, c, kh, kw)) / np.sqrt(c * kh * kw),  # He-like: y is O(1)
            "b": 0.1 * rng.standard_normal(k),
            "dy": rng.standard_normal((n, k, out_h, out_w))}
    case = {name: xp.asarray(a.astype(np.float32)) for name, a in host.items()}
    case.update(stride=stride, padding=padding)
    return case


def _reference(case, direction):
    x, w, b, dy = (host64(case[key]) for key in ("x", "w", "b", "dy"))
    if direction == "forward":
        return (conv2d_forward_reference(x, w, b, case["stride"], case["padding"]),)
    return conv2d_backward_reference(x, w, dy, case["stride"], case["padding"])


def _flops(shape, direction):
    out_h = _output_size(shape["H"], shape["R"], shape["stride"], shape["padding"])
    out_w = _output_size(shape["W"], shape["S"], shape["stride"], shape["padding"])
    forward = 2 * shape["N"] * shape["K"] * out_h * out_w * shape["C"] * shape["R"] * shape["S"]
    return forward if direction == "forward" else 2 * forward  # backward: dX̂ = WᵀdY and dW = dY X̂ᵀ


def _bytes(shape, direction):
    n, c, k = shape["N"], shape["C"], shape["K"]
    x = n * c * shape["H"] * shape["W"]
    y = n * k * _output_size(shape["H"], shape["R"], shape["stride"], shape["padding"]) * \
        _output_size(shape["W"], shape["S"], shape["stride"], shape["padding"])
    w = k * c * shape["R"] * shape["S"]
    if direction == "forward":
        return 4 * (x + w + k + y)  # read x, w, b; write y
    return 4 * (x + w + y + x + w + k)  # read x, w, dy; write dx, dw, db


def _forward(fn, **options):
    return lambda case: fn(case["x"], case["w"], case["b"], case["stride"], case["padding"], **options)


VERSIONS = (
    Version("reference",
            "NumPy, one einsum per kernel offset (r, s) over the zero-padded x (dx by strided adds): "
            "the ground truth",
            lambda case: (conv2d_forward_reference(case["x"], case["w"], case["b"], case["stride"],
                                                   case["padding"]), None),
            lambda case, _: conv2d_backward_reference(case["x"], case["w"], case["dy"], case["stride"],
                                                      case["padding"])),
    Version("cpu",
            "the engine's CPU path: per layer one of the rows below (direct for stride 1 and C·R·S ≤ 36, "
            "Winograd F(4×4) for a 3×3 stride-1 conv of at least 8 input channels, else the shifted GEMM where "
            "the padded border adds at most 20% work, else im2col); a 1×1 stride-1 conv skips them all: "
            "x is its own column matrix",
            _forward(conv2d_forward_cpu), saved_backward(conv2d_backward_cpu)),
    Version("cpu_im2col",
            "im2col into batch-innermost (C·R·S, Ho·Wo·N) columns by a compiled numba loop, then one "
            "BLAS GEMM per pass (dW = dY X̂ᵀ on the kept columns, dX̂ = WᵀdY, col2im by the matching "
            "numba loop of adds)",
            _forward(conv2d_forward_cpu, method="im2col"), saved_backward(conv2d_backward_cpu)),
    Version("cpu_shifted",
            "no im2col: a channels-last copy of the padded x with the S column shifts side by side (1/R "
            "of im2col), one GEMM against all R·K (r, k) weight columns, and the R row shifts summed in "
            "the epilogue that adds the bias and returns to NCHW; chunks of images keep the GEMM's output "
            "in cache until the epilogue reads it (stride 2 falls back to im2col)",
            _forward(conv2d_forward_cpu, method="shifted"), saved_backward(conv2d_backward_cpu)),
    Version("cpu_winograd",
            "Winograd F(2×2, 3×3) for 3×3 stride 1 (Lavin & Gray 2016): 16 GEMMs over input and filter "
            "tiles transformed by numba loops, 2.25x fewer multiplies; backward-data is the same "
            "transform on the flipped filters, dW its adjoint (16 GEMMs dU = dM Vᵀ over channels-last V and "
            "dM, then dw = Gᵀ dU G; other convs fall back to im2col)",
            _forward(conv2d_forward_cpu, method="winograd"), saved_backward(conv2d_backward_cpu)),
    Version("cpu_winograd4",
            "Winograd F(4×4, 3×3) for 3×3 stride 1: 36 GEMMs (tiles × C)(C × K), 4x fewer multiplies; the "
            "transforms vectorise along channels over a channels-last, column-phase-split copy of each chunk "
            "of images, and the bias rides on the copy back to NCHW; backward-data is the same on the "
            "flipped filters, dW F(2×2)'s adjoint (other convs fall back to im2col)",
            _forward(conv2d_forward_cpu, method="winograd4"), saved_backward(conv2d_backward_cpu)),
    Version("cpu_direct",
            "no GEMM: for few input channels (C·R·S ≤ 36, the first conv) each output image is the sum of "
            "C·R·S scaled, shifted copies of the flattened padded x, one vectorised loop each (a 3×3 "
            "kernel's 9 in one loop); the "
            "backward reads the same sums the other way (stride 2 falls back to im2col)",
            _forward(conv2d_forward_cpu, method="direct"), saved_backward(conv2d_backward_cpu)),
    Version("cuda_v1",
            "direct: one thread per y (and per dx) element looping over (c, r, s) (and (k, r, s)) "
            "from global memory; one block per dw element and per db element, shared-memory tree sums",
            _forward(conv2d_forward_cuda, version=1), saved_backward(conv2d_backward_cuda)),
    Version("cuda_v2",
            "implicit GEMM: 16×16 shared-memory tiles of W and of X̂ (gathered from x on the fly, never "
            "materialised), so each value loaded is used 16 times instead of once; backward-data is the "
            "same tiled GEMM on the flipped, transposed w and the dilated dy (a gather: no atomics); dW "
            "is split over pixel chunks to fill the GPU, then a column sum adds the chunks (no "
            "atomics); db as v1",
            _forward(conv2d_forward_cuda, version=2), saved_backward(conv2d_backward_cuda)),
)

BENCH = OpBench(
    "conv2d", _make_case, _reference, _flops, _bytes, VERSIONS,
    shapes=[dict(N=64, C=1, H=28, W=28, K=32, R=3, S=3, stride=1, padding=1),
            dict(N=64, C=32, H=28, W=28, K=32, R=3, S=3, stride=1, padding=1),
            dict(N=64, C=64, H=14, W=14, K=64, R=3, S=3, stride=1, padding=1),
            dict(N=64, C=128, H=7, W=7, K=64, R=3, S=3, stride=1, padding=1),
            dict(N=64, C=32, H=28, W=28, K=64, R=1, S=1, stride=1, padding=0)],
    sim_shapes=[dict(N=2, C=3, H=5, W=4, K=2, R=3, S=2, stride=1, padding=1),
                dict(N=1, C=2, H=6, W=7, K=3, R=1, S=3, stride=2, padding=0)],
    # dw sums N·Ho·Wo ≈ 50k float32 products of size ~1 at the default shapes: its rounding error
    # (~1e-4 absolute) would fail a 1e-4 absolute tolerance wherever dw happens to be near 0.
    shapes_atol=1e-3)
