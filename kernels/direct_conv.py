"""The direct CPU conv2d for few input channels (the U-Net's first conv: C = 1), stride 1, NCHW,
float32 (float64 too, for the gradchecks).

A GEMM of im2col's (C·R·S = 9)-deep columns keeps BLAS waiting on memory (the shifted GEMM took 6.5–8.7
ms at N = 64, 28×28, K = 32; PyTorch 0.8–1.5), so this conv adds scaled copies of x instead. On the zero-padded
image flattened row by row (Wp = W + 2π wide), kernel offset (r, s) is a shift by r·Wp + s, so with
z[p] computed at every padded position p = i·Wp + j,

    z[p] = b[k] + Σ_{c, r, s} w[k, c, r, s] · x_pad[n, c][p + r·Wp + s],    y[n, k, i, j] = z[i·Wp + j]

each term one contiguous loop of ~Ho·Wp multiply-adds, which LLVM vectorises (the columns j ≥ Wo
are computed and dropped). The backward reads the same sums the other way, with dz = dy spread to
the padded positions (0 at j ≥ Wo):

    dw[k, c, r, s] = Σ_{n, p} dz[p] · x_pad[n, c][p + r·Wp + s],    dx_pad[n, c][p + r·Wp + s] += w[k, c, r, s] · dz[p]

Images are split over the pool of kernels/cpu_threads.py; each task adds its images' dw into a
float64 partial of its own, and the partials are summed in task order, so no bit depends on the threads.
"""
import numpy as np
from numba import njit

from .cpu_threads import parallel_map, task_slices

# Products per output up to which the direct loop beat the shifted GEMM (N = 64, 28×28, K = 32, 3×3,
# forward/backward ms, measured before the row copies became loops over views, which made the direct
# loop faster still): C = 1: 2.0/2.7 against 9.2/7.3; C = 4: 5.1/8.8 against 9.9/9.5; C = 8:
# 8.2/17.3, where Winograd (kernels/winograd.py) takes over at 5.6/13.2.
MAX_DEPTH = 36


def fits(w, stride):
    """Whether conv2d_forward_direct takes this conv: stride 1 and C·R·S ≤ MAX_DEPTH."""
    return stride == 1 and w.shape[1] * w.shape[2] * w.shape[3] <= MAX_DEPTH


@njit(cache=True, fastmath=True, nogil=True)
def _forward_images(x_pad, w, bias, y, n0, n1):
    """y[n] for images n0 .. n1 − 1 of x_pad (N, C, Hp·Wp)."""
    k, c, kh, kw = w.shape
    out_h, out_w = y.shape[2], y.shape[3]
    wp = out_w + kw - 1
    length = (out_h - 1) * wp + out_w
    z = np.empty(length, y.dtype)
    for b in range(n0, n1):
        for kk in range(k):
            z[:] = bias[kk]
            for ci in range(c):
                x_flat = x_pad[b, ci]
                if kh == 3 and kw == 3:  # the 9 terms in one pass: 11 memory operations per 8 outputs instead of 27
                    g = w[kk, ci]
                    t0, t1, t2 = x_flat[0:length], x_flat[1:1 + length], x_flat[2:2 + length]
                    m0, m1, m2 = x_flat[wp:wp + length], x_flat[wp + 1:wp + 1 + length], x_flat[wp + 2:wp + 2 + length]
                    lo = 2 * wp
                    u0, u1, u2 = x_flat[lo:lo + length], x_flat[lo + 1:lo + 1 + length], x_flat[lo + 2:lo + 2 + length]
                    for p in range(length):
                        z[p] += (g[0, 0] * t0[p] + g[0, 1] * t1[p] + g[0, 2] * t2[p] + g[1, 0] * m0[p] + g[1, 1] * m1[p]
                                 + g[1, 2] * m2[p] + g[2, 0] * u0[p] + g[2, 1] * u1[p] + g[2, 2] * u2[p])
                    continue
                for r in range(kh):
                    for s in range(kw):
                        wv, shift = w[kk, ci, r, s], r * wp + s
                        x_shifted = x_flat[shift:shift + length]  # a view: x_flat[p + shift] would keep
                        for p in range(length):                   # numba's negative-index check, scalar (12x slower)
                            z[p] += wv * x_shifted[p]
            for i in range(out_h):  # a loop over views: the slice assignment y[b, kk, i, :] = … took 2x as long
                z_row, y_row = z[i * wp:i * wp + out_w], y[b, kk, i]
                for j in range(out_w):
                    y_row[j] = z_row[j]


@njit(cache=True, fastmath=True, nogil=True)
def _backward_images(x_pad, w, dy, need_dx, dx_pad, dw_part, n0, n1):
    """dw_part += the dw terms of images n0 .. n1 − 1 (in float64); dx_pad[n] of those images if need_dx."""
    k, c, kh, kw = w.shape
    out_h, out_w = dy.shape[2], dy.shape[3]
    wp = out_w + kw - 1
    length = (out_h - 1) * wp + out_w
    dz = np.zeros(length, dy.dtype)  # the columns j ≥ Wo stay 0
    for b in range(n0, n1):
        if need_dx:
            dx_pad[b] = 0
        for kk in range(k):
            for i in range(out_h):
                dz_row, dy_row = dz[i * wp:i * wp + out_w], dy[b, kk, i]
                for j in range(out_w):
                    dz_row[j] = dy_row[j]
            for ci in range(c):
                x_flat = x_pad[b, ci]
                for r in range(kh):
                    for s in range(kw):
                        shift = r * wp + s
                        x_shifted = x_flat[shift:shift + length]  # views, as in _forward_images
                        acc = dz.dtype.type(0)  # one image's sum in the input's precision, vectorised
                        for p in range(length):
                            acc += dz[p] * x_shifted[p]
                        dw_part[kk, ci, r, s] += acc
                        if need_dx:
                            wv, dx_shifted = w[kk, ci, r, s], dx_pad[b, ci, shift:shift + length]
                            for p in range(length):
                                dx_shifted[p] += wv * dz[p]


def _padded_flat(x, padding):
    n, c, h, width = x.shape
    x_pad = np.zeros((n, c, h + 2 * padding, width + 2 * padding), x.dtype)
    x_pad[:, :, padding:padding + h, padding:padding + width] = x
    return x_pad.reshape(n, c, -1)


def conv2d_forward_direct(x, w, b, padding, out_h, out_w):
    """y = conv2d(x, w) + b (stride 1) by the direct loop, images on the pool -> (y, saved)."""
    dtype = np.result_type(x, w)
    x_pad, w = _padded_flat(x.astype(dtype, copy=False), padding), w.astype(dtype, copy=False)
    bias = np.zeros(w.shape[0], dtype) if b is None else b.astype(dtype, copy=False)
    y = np.empty((x.shape[0], w.shape[0], out_h, out_w), dtype)
    parallel_map(lambda part: _forward_images(x_pad, w, bias, y, part.start, part.stop), task_slices(x.shape[0]))
    return y, {"method": "direct", "x_pad": x_pad, "w": w, "x_shape": x.shape, "padding": padding}


def conv2d_backward_direct(saved, dy, need_dx=True):
    """(dx or None, dw, db) of conv2d_forward_direct."""
    x_pad, w, (n, c, h, width), padding = saved["x_pad"], saved["w"], saved["x_shape"], saved["padding"]
    tasks = task_slices(n)
    dx_pad = np.empty(x_pad.shape if need_dx else (1, 1, 1), x_pad.dtype)
    dw_terms = np.zeros((len(tasks),) + w.shape, np.float64)
    dy = dy.astype(x_pad.dtype, copy=False)
    parallel_map(lambda i: _backward_images(x_pad, w, dy, need_dx, dx_pad, dw_terms[i], tasks[i].start, tasks[i].stop),
                 range(len(tasks)))
    dw = np.zeros(w.shape, np.float64)
    for term in dw_terms:  # in task order, as a serial loop would
        dw += term
    dx = None
    if need_dx:
        dx_full = dx_pad.reshape(n, c, h + 2 * padding, width + 2 * padding)
        dx = np.ascontiguousarray(dx_full[:, :, padding:padding + h, padding:padding + width])
    return dx, dw.astype(w.dtype), dy.sum(axis=(0, 2, 3))
