"""im2col and col2im of the CPU conv2d (kernels/conv2d.py), as compiled numba loops:

    X̂[(c, r, s), (i, j, n)] = x_pad[n, c, iσ + r, jσ + s]      and its adjoint (overlapping windows add)

The columns are batch-innermost ("CHWN"): every inner loop runs over N contiguous floats. One channel
at a time, the image is first transposed into a small zero-padded (H + 2π, W + 2π, N) scratch that
stays in L2, so the transposes to and from NCHW cost no extra pass over memory. Measured at N = 64,
C = 32, 28×28, 3×3: col2im 6 ms against 20 ms for the same adds as R·S NumPy strided slices. They
stay single-threaded: prange over channels ran them ~2x faster in isolation but left the training
step unchanged (0.85 s).
"""
import numpy as np
from numba import njit


@njit(cache=True)
def _im2col_into(x, stride, padding, cols):
    """cols[c, r, s, i, j, n] = x_pad[n, c, iσ + r, jσ + s]: X̂ as (C, R, S, Ho, Wo, N)."""
    n, c, h, w = x.shape
    kh, kw, out_h, out_w = cols.shape[1], cols.shape[2], cols.shape[3], cols.shape[4]
    x_pad = np.zeros((h + 2 * padding, w + 2 * padding, n), cols.dtype)  # one channel, CHWN
    for ci in range(c):  # each channel overwrites the interior; the zero border stays
        for b in range(n):
            for i in range(h):
                for j in range(w):
                    x_pad[i + padding, j + padding, b] = x[b, ci, i, j]
        for r in range(kh):
            for s in range(kw):
                for i in range(out_h):
                    for j in range(out_w):
                        for b in range(n):
                            cols[ci, r, s, i, j, b] = x_pad[i * stride + r, j * stride + s, b]


@njit(cache=True)
def _col2im_into(dcols, stride, padding, dx):
    """The adjoint of _im2col_into: dx_pad[n, c, iσ + r, jσ + s] += dcols[c, r, s, i, j, n], then the
    padding is cropped (windows of neighbouring offsets overlap, so they add)."""
    n, c, h, w = dx.shape
    kh, kw, out_h, out_w = dcols.shape[1], dcols.shape[2], dcols.shape[3], dcols.shape[4]
    dx_pad = np.empty((h + 2 * padding, w + 2 * padding, n), dcols.dtype)  # one channel, CHWN
    for ci in range(c):
        dx_pad[:] = 0
        for r in range(kh):
            for s in range(kw):
                for i in range(out_h):
                    for j in range(out_w):
                        for b in range(n):
                            dx_pad[i * stride + r, j * stride + s, b] += dcols[ci, r, s, i, j, b]
        for b in range(n):
            for i in range(h):
                for j in range(w):
                    dx[b, ci, i, j] = dx_pad[i + padding, j + padding, b]


def im2col(x, kh, kw, stride, padding, out_h, out_w):
    """X̂ as a (C·R·S, Ho·Wo·N) matrix."""
    cols = np.empty((x.shape[1], kh, kw, out_h, out_w, x.shape[0]), x.dtype)
    _im2col_into(x, stride, padding, cols)
    return cols.reshape(x.shape[1] * kh * kw, -1)


def col2im(dcols, x_shape, kh, kw, stride, padding, out_h, out_w):
    """dx (N, C, H, W) from dX̂ (C·R·S, Ho·Wo·N)."""
    dx = np.empty(x_shape, dcols.dtype)
    _col2im_into(dcols.reshape(x_shape[1], kh, kw, out_h, out_w, x_shape[0]), stride, padding, dx)
    return dx
