"""Winograd F(4×4, 3×3) for the 3×3 stride-1 CPU conv2d (Lavin & Gray 2016), channels-last inside,
float32 (float64 too, for the gradchecks).

A 4×4 output tile y of one channel pair is Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A for its 6×6 input patch d and
3×3 filter g, with the interpolation points 0, ±1, ±2, ∞:

    Bᵀ = [[4, 0, −5, 0, 1, 0], [0, −4, −4, 1, 1, 0], [0, 4, −4, −1, 1, 0],
          [0, −2, −1, 2, 1, 0], [0, 2, −1, −2, 1, 0], [0, 4, 0, −5, 0, 1]],
    G = [[¼, 0, 0], [−⅙, −⅙, −⅙], [−⅙, ⅙, −⅙], [1/24, 1/12, ⅙], [1/24, −1/12, ⅙], [0, 0, 1]],
    Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, −1, 2, −2, 0], [0, 1, 1, 4, 4, 0], [0, 1, −1, 8, −8, 1]].

Summed over input channels, the 36 elementwise products become 36 GEMMs M_ξ = V_ξ Uᵀ_ξ, with V_ξ the
(tiles × C) transformed inputs and U_ξ[k, c] = (G g_kc Gᵀ)_ξ: 36·K·C multiplies per tile of 16 outputs
instead of 144·K·C (4x fewer; F(2×2, 3×3) in kernels/winograd.py does 2.25x fewer), and V is 2.25x the
input where F(2×2)'s is 4x. The price is float32 rounding about 10x F(2×2)'s (relative 4e-6 of max|y|
at the U-Net's shapes), from the larger entries of the transforms.

The transforms vectorise along channels: per chunk of images, x is copied into the channels-last
layout of kernels/winograd_layout.py with each padded row split into its four column phases, so the 6
columns of every tile's patch are 6 runs of (tiles in a row × C) contiguous floats; each 1-D transform
(Bᵀ down a tile row, B across it, Aᵀ and A back) is then one loop of 6 loads and 6 (or 4) stores that
LLVM turns into 8-float vector code. The output comes back to NCHW with the bias added in the same
copy. Backward-data is itself a 3×3 stride-1 conv (of dy with the flipped, transposed filters), so it
runs through the same code; backward-weight is F(2×2)'s (kernels/winograd.py says why).
"""
import numpy as np
from numba import njit

from .cpu_threads import parallel_map, scratch, task_slices
from .winograd import filter_transform
from .winograd_layout import copy_in, copy_out, planes

# V and M of one chunk of images: about this many bytes, so they stay in L2/L3 between the transforms
# and the GEMMs (2 MiB beat 4 and 8 at every U-Net shape here, 28×28 C32 to 7×7 C128).
CHUNK_BYTES = 2 << 20
_G4 = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])


@njit(inline="always", fastmath=True)
def _bt(d0, d1, d2, d3, d4, d5, two, four, five):
    """Bᵀ d for one 6-vector d (shared subexpressions: 12 adds and 6 multiplies)."""
    t0, t1 = d4 - four * d2, d3 - four * d1
    t2, t3 = d4 - d2, two * (d3 - d1)
    return four * d0 - five * d2 + d4, t0 + t1, t0 - t1, t2 + t3, t2 - t3, four * d1 - five * d3 + d5


@njit(inline="always", fastmath=True)
def _at(m0, m1, m2, m3, m4, m5, two, four, eight):
    """Aᵀ m for one 6-vector m."""
    s12, d12, s34, d34 = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return m0 + s12 + s34, d12 + two * d34, s12 + four * s34, d12 + eight * d34 + m5


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _input_transform(xp, m, th, tw, rows, v):
    """v[6a + b, t·C + c] = (Bᵀ d B)[a, b] for channel c of every tile t of the m images of xp, tile
    rows one at a time: Bᵀ down the 6 patch rows into rows[a, s] (column s of the row's patches), then
    B across those 6 columns. Each loop runs over (tiles in a row × C) contiguous floats. (Views come
    from integer indices and slices only: a reshape inside the loops made them 4x slower.)"""
    length = rows.shape[2]
    c = length // tw
    two, four, five = v.dtype.type(2), v.dtype.type(4), v.dtype.type(5)
    for n in range(m):
        for ti in range(th):
            h = 4 * ti
            for s in range(6):  # patch column s of tile tj is padded column 4tj + s: phase s % 4, q = tj + s // 4
                start = (s // 4) * c
                x0 = xp[n, h, s % 4, start:start + length]
                x1 = xp[n, h + 1, s % 4, start:start + length]
                x2 = xp[n, h + 2, s % 4, start:start + length]
                x3 = xp[n, h + 3, s % 4, start:start + length]
                x4 = xp[n, h + 4, s % 4, start:start + length]
                x5 = xp[n, h + 5, s % 4, start:start + length]
                r0, r1, r2, r3, r4, r5 = rows[0, s], rows[1, s], rows[2, s], rows[3, s], rows[4, s], rows[5, s]
                for e in range(length):
                    r0[e], r1[e], r2[e], r3[e], r4[e], r5[e] = _bt(x0[e], x1[e], x2[e], x3[e], x4[e], x5[e],
                                                                   two, four, five)
            e0 = (n * th + ti) * length
            for a in range(6):
                d0, d1, d2, d3, d4, d5 = rows[a, 0], rows[a, 1], rows[a, 2], rows[a, 3], rows[a, 4], rows[a, 5]
                v0, v1 = v[6 * a, e0:e0 + length], v[6 * a + 1, e0:e0 + length]
                v2, v3 = v[6 * a + 2, e0:e0 + length], v[6 * a + 3, e0:e0 + length]
                v4, v5 = v[6 * a + 4, e0:e0 + length], v[6 * a + 5, e0:e0 + length]
                for e in range(length):
                    v0[e], v1[e], v2[e], v3[e], v4[e], v5[e] = _bt(d0[e], d1[e], d2[e], d3[e], d4[e], d5[e],
                                                                   two, four, five)


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def _output_transform(mm, m, th, tw, rows, y4):
    """y4[n, 4ti + a, b, tj·K + k] = (Aᵀ M A)[a, b] for output channel k of the tiles of mm (36, T·K),
    tile rows one at a time: A across each of the 6 rows of M into rows[ρ, b], then Aᵀ down them. y4
    is channels-last with the output columns split into phases (column 4tj + b), like the input."""
    length = y4.shape[3]
    two, four, eight = y4.dtype.type(2), y4.dtype.type(4), y4.dtype.type(8)
    for n in range(m):
        for ti in range(th):
            e0 = (n * th + ti) * length
            for r in range(6):
                m0, m1 = mm[6 * r, e0:e0 + length], mm[6 * r + 1, e0:e0 + length]
                m2, m3 = mm[6 * r + 2, e0:e0 + length], mm[6 * r + 3, e0:e0 + length]
                m4, m5 = mm[6 * r + 4, e0:e0 + length], mm[6 * r + 5, e0:e0 + length]
                o0, o1, o2, o3 = rows[r, 0], rows[r, 1], rows[r, 2], rows[r, 3]
                for e in range(length):
                    o0[e], o1[e], o2[e], o3[e] = _at(m0[e], m1[e], m2[e], m3[e], m4[e], m5[e], two, four, eight)
            h = 4 * ti
            for b in range(4):
                m0, m1, m2, m3, m4, m5 = rows[0, b], rows[1, b], rows[2, b], rows[3, b], rows[4, b], rows[5, b]
                y0, y1, y2, y3 = y4[n, h, b], y4[n, h + 1, b], y4[n, h + 2, b], y4[n, h + 3, b]
                for e in range(length):
                    y0[e], y1[e], y2[e], y3[e] = _at(m0[e], m1[e], m2[e], m3[e], m4[e], m5[e], two, four, eight)


def conv2d_forward_winograd4(x, w, b, padding):
    """y = conv2d(x, w) + b for a 3×3 stride-1 kernel, 0 ≤ padding ≤ 2 (winograd.fits). Chunks of
    images run on the pool of kernels/cpu_threads.py, each task with buffers of its own."""
    n, c, h, width = x.shape
    k = w.shape[0]
    dtype = np.result_type(x, w)
    out_h, out_w = h + 2 * padding - 2, width + 2 * padding - 2
    th, tw = -(-out_h // 4), -(-out_w // 4)
    nb = int(max(1, min(n, CHUNK_BYTES // (dtype.itemsize * 36 * (c + k) * th * tw))))
    u_t = filter_transform(w, dtype, _G4).transpose(0, 2, 1)  # Uᵀ_ξ (C, K): BLAS reads the transpose as is
    bias = np.zeros(k, dtype) if b is None else b.astype(dtype, copy=False)
    x = np.ascontiguousarray(x, dtype)  # copy_in reads each image as one flat run
    y = np.empty((n, k, out_h, out_w), dtype)
    starts = range(0, n, nb)

    def run(task):
        xp = scratch("winograd4 x", (nb, 4 * th + 2, 4, (tw + 1) * c), dtype)
        in_rows = scratch("winograd4 rows in", (6, 6, tw * c), dtype)
        out_rows = scratch("winograd4 rows out", (6, 4, tw * k), dtype)
        v, mm = planes("winograd4 V", 36, nb * th * tw, c, dtype), planes("winograd4 M", 36, nb * th * tw, k, dtype)
        y4 = scratch("winograd4 y", (nb, 4 * th, 4, tw * k), dtype)
        for n0 in starts[task]:
            m = min(nb, n - n0)
            tiles = m * th * tw
            copy_in(x, n0, m, padding, xp)
            _input_transform(xp, m, th, tw, in_rows, v)
            np.matmul(v[:, :tiles * c].reshape(36, tiles, c), u_t, out=mm[:, :tiles * k].reshape(36, tiles, k))
            _output_transform(mm, m, th, tw, out_rows, y4)
            copy_out(y4, bias, n0, m, y)
    parallel_map(run, task_slices(len(starts)))
    return y


def conv2d_backward_data_winograd4(w, dy, padding):
    """dx of a 3×3 stride-1 conv: dy convolved with w flipped in (r, s) and transposed in (k, c),
    padded by 2 − π (kernels/conv2d.py's module docstring has the identity)."""
    w_back = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    return conv2d_forward_winograd4(dy, w_back, None, 2 - padding)

