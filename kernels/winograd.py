"""Winograd F(2×2, 3×3) for the 3×3 stride-1 CPU conv2d (Lavin & Gray 2016, "Fast Algorithms for
Convolutional Neural Networks"), NCHW, float32 (float64 too, for the gradchecks).

A 2×2 output tile y of one channel pair is Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A for its 4×4 input patch d and
3×3 filter g, with

    Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]],   G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]],
    Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]].

Summed over input channels, the 16 elementwise products become 16 GEMMs M_ξ = U_ξ V_ξ with
U_ξ[k, c] = (G g_kc Gᵀ)_ξ and V_ξ[c, t] = (Bᵀ d_ct B)_ξ over the tiles t: 16·K·C multiplies per tile of 4
outputs instead of 36·K·C (2.25x fewer). V is 4x the input (im2col: 9x); chunks of images keep V and
M in cache between the transforms (compiled numba loops) and the GEMMs. Backward-data is itself a
3×3 stride-1 conv (of dy with the flipped, transposed filters), so it runs through the same code.
Backward-weight is the adjoint of the forward, read right to left:

    dM_ξ[k, t] = (A dY_kt Aᵀ)_ξ,    dU_ξ = Σ_t dM_ξ[:, t] V_ξ[:, t]ᵀ,    dw[k, c] = Gᵀ dU[k, c] G

16 GEMMs again (2.25x fewer multiplies than dW = dY X̂ᵀ), over V rebuilt from x; V and dM are built
channels-last (kernels/winograd_layout.py), where their transforms vectorise. kernels/winograd4.py's
F(4×4, 3×3) uses this backward-weight too.
"""
import numpy as np
from numba import njit

from .cpu_threads import parallel_map, scratch, task_slices
from .winograd_layout import copy_in, planes

# V and M of one chunk of images: about this many bytes, so they stay in L2/L3
CHUNK_BYTES = 2 << 20
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]])


def fits(w, stride, padding):
    """Whether conv2d_forward_winograd takes this conv: 3×3, stride 1, padding ≤ 2."""
    return w.shape[2:] == (3, 3) and stride == 1 and padding <= 2


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _filter_transform(w9, g, rows, u):
    """u[αa + b] = Σ_{r,s} G[a, r]·G[b, s]·w9[3r + s] for the K·C filters side by side in w9 (9, K·C): G
    down the 3 filter rows into rows[a, s], then G across the 3 columns, each a loop over K·C floats."""
    alpha, count = g.shape[0], w9.shape[1]
    for a in range(alpha):
        g0, g1, g2 = g[a, 0], g[a, 1], g[a, 2]
        for s in range(3):
            out, w0, w1, w2 = rows[a, s], w9[s], w9[3 + s], w9[6 + s]
            for e in range(count):
                out[e] = g0 * w0[e] + g1 * w1[e] + g2 * w2[e]
    for a in range(alpha):
        t0, t1, t2 = rows[a, 0], rows[a, 1], rows[a, 2]
        for b in range(alpha):
            g0, g1, g2 = g[b, 0], g[b, 1], g[b, 2]
            out = u[alpha * a + b]
            for e in range(count):
                out[e] = g0 * t0[e] + g1 * t1[e] + g2 * t2[e]


def filter_transform(w, dtype, g=_G):
    """U[αa + b, k, c] = (G g Gᵀ)[a, b] for g = w[k, c]: (α², K, C) in dtype, G (α × 3) F(2×2)'s by default
    (α = 4), as two vectorised passes over the K·C filters (0.1 ms at K·C = 8192 against 0.4 for the
    (G ⊗ G) GEMM, whose inner dimension is 9; batched 4×4 products over the filters took 10-20x longer)."""
    k, c = w.shape[:2]
    w9 = np.ascontiguousarray(w.transpose(2, 3, 0, 1), dtype).reshape(9, k * c)
    u = np.empty((len(g) ** 2, k * c), dtype)
    _filter_transform(w9, g.astype(dtype), np.empty((len(g), 3, k * c), dtype), u)
    return u.reshape(-1, k, c)


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _filter_transform_adjoint(du, g, rows, dw9):
    """dw9[3r + s] = Σ_{a,b} G[a, r]·G[b, s]·du[αa + b] over the K·C filters, in float64 (rows, dw9): Gᵀ
    across the α columns into rows[a, s], then down the α rows; the adjoint of _filter_transform."""
    alpha, count = g.shape[0], du.shape[1]
    for a in range(alpha):
        for s in range(3):
            out = rows[a, s]
            out[:] = 0
            for b in range(alpha):
                gb, plane = g[b, s], du[alpha * a + b]
                for e in range(count):
                    out[e] += gb * plane[e]
    for r in range(3):
        for s in range(3):
            out = dw9[3 * r + s]
            out[:] = 0
            for a in range(alpha):
                ga, t = g[a, r], rows[a, s]
                for e in range(count):
                    out[e] += ga * t[e]


def filter_transform_adjoint(du, dtype, g=_G):
    """dw[k, c] = Gᵀ dU[:, k, c] G for dU (α², K, C): the adjoint of filter_transform, (K, C, 3, 3) in dtype
    (summed in float64: 0.1 ms at K·C = 8192, against 0.4 for the (G ⊗ G)ᵀ GEMM)."""
    _, k, c = du.shape
    dw9 = np.empty((9, k * c))
    _filter_transform_adjoint(du.reshape(-1, k * c), g, np.empty((len(g), 3, k * c)), dw9)
    return np.ascontiguousarray(dw9.reshape(3, 3, k, c).transpose(2, 3, 0, 1), dtype=dtype)


@njit(cache=True, fastmath=True, nogil=True)
def _input_transform(xp, v, th, tw, m):
    """v[ξ, c, t] = (Bᵀ d B)_ξ for the 4×4 patch d of tile t of the m images of xp (C, nb, Hq, Wq),
    zero-padded. The inner loop runs along a row of tiles (16 contiguous output streams), so LLVM
    vectorises it."""
    for ci in range(xp.shape[0]):
        for n in range(m):
            for ti in range(th):
                x0, x1, x2, x3 = xp[ci, n, 2 * ti], xp[ci, n, 2 * ti + 1], xp[ci, n, 2 * ti + 2], xp[ci, n, 2 * ti + 3]
                base = (n * th + ti) * tw
                for tj in range(tw):
                    j = 2 * tj
                    # Bᵀ d (rows of the patch) ...
                    a0, a1, a2, a3 = x0[j] - x2[j], x0[j + 1] - x2[j + 1], x0[j + 2] - x2[j + 2], x0[j + 3] - x2[j + 3]
                    b0, b1, b2, b3 = x1[j] + x2[j], x1[j + 1] + x2[j + 1], x1[j + 2] + x2[j + 2], x1[j + 3] + x2[j + 3]
                    c0, c1, c2, c3 = x2[j] - x1[j], x2[j + 1] - x1[j + 1], x2[j + 2] - x1[j + 2], x2[j + 3] - x1[j + 3]
                    d0, d1, d2, d3 = x1[j] - x3[j], x1[j + 1] - x3[j + 1], x1[j + 2] - x3[j + 2], x1[j + 3] - x3[j + 3]
                    t = base + tj
                    # ... times B (its columns)
                    v[0, ci, t], v[1, ci, t], v[2, ci, t], v[3, ci, t] = a0 - a2, a1 + a2, a2 - a1, a1 - a3
                    v[4, ci, t], v[5, ci, t], v[6, ci, t], v[7, ci, t] = b0 - b2, b1 + b2, b2 - b1, b1 - b3
                    v[8, ci, t], v[9, ci, t], v[10, ci, t], v[11, ci, t] = c0 - c2, c1 + c2, c2 - c1, c1 - c3
                    v[12, ci, t], v[13, ci, t], v[14, ci, t], v[15, ci, t] = d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit(cache=True, fastmath=True, nogil=True)
def _output_transform(mm, bias, y, n0, th, tw, m):
    """y[n0 + n, k, 2ti + a, 2tj + b] = (Aᵀ M A)[a, b] + bias[k] for the tiles of mm (16, K, T), cropped
    to y's (Ho, Wo) where Ho or Wo is odd."""
    ho, wo = y.shape[2], y.shape[3]
    for kk in range(mm.shape[1]):
        bk = bias[kk]
        for n in range(m):
            for ti in range(th):
                base = (n * th + ti) * tw
                i = 2 * ti
                two_rows = i + 1 < ho
                y0 = y[n0 + n, kk, i]
                y1 = y[n0 + n, kk, i + 1] if two_rows else y0
                for tj in range(tw):
                    t = base + tj
                    # Aᵀ M (two rows) ...
                    s00 = mm[0, kk, t] + mm[4, kk, t] + mm[8, kk, t]
                    s01 = mm[1, kk, t] + mm[5, kk, t] + mm[9, kk, t]
                    s02 = mm[2, kk, t] + mm[6, kk, t] + mm[10, kk, t]
                    s03 = mm[3, kk, t] + mm[7, kk, t] + mm[11, kk, t]
                    s10 = mm[4, kk, t] - mm[8, kk, t] - mm[12, kk, t]
                    s11 = mm[5, kk, t] - mm[9, kk, t] - mm[13, kk, t]
                    s12 = mm[6, kk, t] - mm[10, kk, t] - mm[14, kk, t]
                    s13 = mm[7, kk, t] - mm[11, kk, t] - mm[15, kk, t]
                    # ... times A (two columns), the second one only inside y
                    j = 2 * tj
                    y0[j] = s00 + s01 + s02 + bk
                    if two_rows:
                        y1[j] = s10 + s11 + s12 + bk
                    if j + 1 < wo:
                        y0[j + 1] = s01 - s02 - s03 + bk
                        if two_rows:
                            y1[j + 1] = s11 - s12 - s13 + bk


@njit(inline="always", fastmath=True)
def _bt(d0, d1, d2, d3):
    """Bᵀ d for one 4-vector d."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit(inline="always", fastmath=True)
def _a(e0, e1):
    """A e for one 2-vector e (A is Aᵀ's transpose, 4 × 2): what the adjoint of y = Aᵀ M A applies."""
    return e0, e0 + e1, e0 - e1, -e1


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _input_transform_channels_last(xp, m, th, tw, rows, v):
    """v[4a + b, t·C + c] = (Bᵀ d B)[a, b] for channel c of every tile t of the m images of xp (the
    layout of kernels/winograd_layout.py, two phases), tile rows one at a time: Bᵀ down the 4 patch
    rows into rows[a, s], then B across those 4 columns, each a loop over (tiles in a row × C) floats."""
    length = rows.shape[2]
    c = length // tw
    for n in range(m):
        for ti in range(th):
            h = 2 * ti
            for s in range(4):  # patch column s of tile tj is padded column 2tj + s: phase s % 2, q = tj + s // 2
                start = (s // 2) * c
                x0, x1 = xp[n, h, s % 2, start:start + length], xp[n, h + 1, s % 2, start:start + length]
                x2, x3 = xp[n, h + 2, s % 2, start:start + length], xp[n, h + 3, s % 2, start:start + length]
                r0, r1, r2, r3 = rows[0, s], rows[1, s], rows[2, s], rows[3, s]
                for e in range(length):
                    r0[e], r1[e], r2[e], r3[e] = _bt(x0[e], x1[e], x2[e], x3[e])
            e0 = (n * th + ti) * length
            for a in range(4):
                d0, d1, d2, d3 = rows[a, 0], rows[a, 1], rows[a, 2], rows[a, 3]
                v0, v1 = v[4 * a, e0:e0 + length], v[4 * a + 1, e0:e0 + length]
                v2, v3 = v[4 * a + 2, e0:e0 + length], v[4 * a + 3, e0:e0 + length]
                for e in range(length):
                    v0[e], v1[e], v2[e], v3[e] = _bt(d0[e], d1[e], d2[e], d3[e])


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _output_transform_adjoint(dyp, m, th, tw, rows, dm):
    """dm[4a + b, t·K + k] = (A dY Aᵀ)[a, b] for the 2×2 tile dY of channel k at tile t, from dyp (dy in
    the layout of kernels/winograd_layout.py, two phases, 0 where a tile hangs over dy's edge): the
    adjoint of _output_transform (y = Aᵀ M A), as dW needs it. A down the tile's 2 rows into rows[a, p],
    then A across the 2 columns."""
    length = rows.shape[2]
    for n in range(m):
        for ti in range(th):
            h = 2 * ti
            for p in range(2):
                y0, y1 = dyp[n, h, p, :length], dyp[n, h + 1, p, :length]
                r0, r1, r2, r3 = rows[0, p], rows[1, p], rows[2, p], rows[3, p]
                for e in range(length):
                    r0[e], r1[e], r2[e], r3[e] = _a(y0[e], y1[e])
            e0 = (n * th + ti) * length
            for a in range(4):
                d0, d1 = rows[a, 0], rows[a, 1]
                o0, o1 = dm[4 * a, e0:e0 + length], dm[4 * a + 1, e0:e0 + length]
                o2, o3 = dm[4 * a + 2, e0:e0 + length], dm[4 * a + 3, e0:e0 + length]
                for e in range(length):
                    o0[e], o1[e], o2[e], o3[e] = _a(d0[e], d1[e])


def _planes(rows, cols, dtype):
    """A (16, rows, cols) array whose 16 planes lie 256 B (mod 4 KiB) apart: the transforms touch all
    16 planes at one tile, and planes a multiple of 4 KiB apart would all fall in one L1 set (measured:
    123 ms instead of 18 ms for the 28×28 forward, 2 images per chunk)."""
    size = np.dtype(dtype).itemsize
    plane = (-(-rows * cols * size // 4096) * 4096 + 256) // size  # elements; bytes ≡ 256 (mod 4096)
    flat = np.empty(16 * plane, dtype)
    return np.lib.stride_tricks.as_strided(flat, (16, rows, cols), (size * plane, size * cols, size))


def _tiling(x, k, padding, dtype):
    """(Ho, Wo, th, tw, nb): output size, 2×2 tiles per column and row (the last may hang over), and
    images per chunk so that a chunk's V and M (or dM) stay near CHUNK_BYTES."""
    n, c, h, width = x.shape
    out_h, out_w = h + 2 * padding - 2, width + 2 * padding - 2
    th, tw = (out_h + 1) // 2, (out_w + 1) // 2
    nb = int(max(1, min(n, CHUNK_BYTES // (dtype.itemsize * 16 * (c + k) * th * tw))))
    return out_h, out_w, th, tw, nb


def _transform_chunk(x, xp, v, n0, m, padding, th, tw):
    """V of images n0 .. n0 + m of x, through xp (C, nb, Hq, Wq), whose border stays zero: the padding."""
    h, width = x.shape[2:]
    xp[:, :m, padding:padding + h, padding:padding + width] = x[n0:n0 + m].transpose(1, 0, 2, 3)
    _input_transform(xp, v, th, tw, m)


def conv2d_forward_winograd(x, w, b, padding):
    """y = conv2d(x, w) + b for a 3×3 stride-1 kernel, 0 ≤ padding ≤ 2 (see `fits`). Chunks of images
    run on the pool of kernels/cpu_threads.py, each task with buffers of its own."""
    n, c = x.shape[:2]
    k = w.shape[0]
    dtype = np.result_type(x, w)
    out_h, out_w, th, tw, nb = _tiling(x, k, padding, dtype)
    u = filter_transform(w, dtype)
    bias = np.zeros(k, dtype) if b is None else b.astype(dtype, copy=False)
    y = np.empty((n, k, out_h, out_w), dtype)
    starts = range(0, n, nb)

    def run(task):
        xp = np.zeros((c, nb, 2 * th + 2, 2 * tw + 2), dtype)
        v, mm = _planes(c, nb * th * tw, dtype), _planes(k, nb * th * tw, dtype)
        for n0 in starts[task]:
            m = min(nb, n - n0)
            tiles = m * th * tw
            _transform_chunk(x, xp, v, n0, m, padding, th, tw)
            np.matmul(u, v[:, :, :tiles], out=mm[:, :, :tiles])
            _output_transform(mm, bias, y, n0, th, tw, m)
    parallel_map(run, task_slices(len(starts)))
    return y


def conv2d_backward_weight_winograd(x, dy, padding):
    """dw (K, C, 3, 3) of conv2d_forward_winograd(x, w, ·, padding), and of F(4×4)'s (kernels/winograd4.py),
    whose own adjoint rounds ~10x worse in float32 (3-6e-6 of max|dw| against 5e-7; up to 2.9x the
    harness tolerance at 28×28 C32) for at best 8-25% less time: dU_ξ = Σ_t dM_ξᵀ V_ξ over chunks of
    images on the pool, each task summing its own chunks in order; the task sums are added in task
    order, so the bits do not depend on the threads. Then dw = Gᵀ dU G. V and dM are built
    channels-last (kernels/winograd_layout.py), where their transforms vectorise."""
    n, c = x.shape[:2]
    k = dy.shape[1]
    dtype = np.result_type(x, dy)
    _, _, th, tw, nb = _tiling(x, k, padding, dtype)
    x, dy = np.ascontiguousarray(x, dtype), np.ascontiguousarray(dy, dtype)  # copy_in reads flat images
    starts = range(0, n, nb)
    tasks = task_slices(len(starts))
    du_terms = scratch("winograd dW partials", (len(tasks), 16, k, c), dtype)  # fresh zeros: ~1 ms of page faults

    def run(i):
        xp = scratch("winograd dW x", (nb, 2 * th + 2, 2, (tw + 1) * c), dtype)
        dyp = scratch("winograd dW dy", (nb, 2 * th, 2, tw * k), dtype)
        x_rows, dy_rows = scratch("winograd dW x rows", (4, 4, tw * c), dtype), scratch("winograd dW dy rows", (4, 2, tw * k), dtype)
        v, dm = planes("winograd dW V", 16, nb * th * tw, c, dtype), planes("winograd dW dM", 16, nb * th * tw, k, dtype)
        chunk_du = scratch("winograd dW dU", (16, k, c), dtype)
        for n0 in starts[tasks[i]]:
            m = min(nb, n - n0)
            tiles = m * th * tw
            copy_in(x, n0, m, padding, xp)
            _input_transform_channels_last(xp, m, th, tw, x_rows, v)
            copy_in(dy, n0, m, 0, dyp)
            _output_transform_adjoint(dyp, m, th, tw, dy_rows, dm)
            first = n0 == starts[tasks[i]][0]  # the task's first chunk writes its partial sum, the others add
            np.matmul(dm[:, :tiles * k].reshape(16, tiles, k).transpose(0, 2, 1),
                      v[:, :tiles * c].reshape(16, tiles, c), out=du_terms[i] if first else chunk_du)
            if not first:
                du_terms[i] += chunk_du
    parallel_map(run, range(len(tasks)))
    du = np.zeros((16, k, c), dtype)
    for term in du_terms:  # in task order, as a serial loop would
        du += term
    return filter_transform_adjoint(du, dtype)


def conv2d_backward_data_winograd(w, dy, padding):
    """dx of a 3×3 stride-1 conv: dy convolved with w flipped in (r, s) and transposed in (k, c),
    padded by 2 − π (kernels/conv2d.py's module docstring has the identity)."""
    w_back = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    return conv2d_forward_winograd(np.ascontiguousarray(dy), w_back, None, 2 - padding)
