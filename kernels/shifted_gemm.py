"""The stride-1 CPU conv2d without im2col: one GEMM over a channels-last copy holding S shifts.

Flatten the zero-padded batch channels-last: X[q, c] = x_pad[n, c, h, v] at q = (n·Hp + h)·Wp + v
(Hp = H + 2π, Wp = W + 2π). Kernel offset (r, s) moves a window by r·Wp + s rows of X, so with
X_S[q, (s, c)] = X[q + s, c] (S column shifts side by side) and W_cat[(s, c), (r, k)] = w[k, c, r, s],

    forward          Z = X_S W_cat                      (P, R·K), P = N·Hp·Wp
                     y[n, k, i, j] = b[k] + Σ_r Z[p + r·Wp, (r, k)],   p = (n·Hp + i)·Wp + j
    backward         dZ[p + r·Wp, (r, k)] = dy[n, k, i, j]   (0 at positions no output reads)
                     dW_cat = X_Sᵀ dZ,    dX_S = dZ W_catᵀ,    dx[n, c, h, v] = Σ_s dX_S[q − s, (s, c)]

X_S is S/(R·S) of im2col's size (a third for 3×3) and the row shifts r cost nothing: they are
folded into the epilogue that also adds the bias and returns to NCHW. The price is output computed
at the padded positions too: Hp·Wp/(Ho·Wo) of the work (1.15× at 28×28, 1.65× at 7×7).
"""
import numpy as np
from numba import njit

# Bytes of GEMM output per chunk of images: small enough to stay in L2/L3 until the loop reading it.
CHUNK_BYTES = 1 << 20


@njit(cache=True)
def _shifted_columns(x, padding, kw, xs):
    """xs[q, s·C + c] = X[q + s, c]: x (N, C, H, W) zero-padded, channels-last, S shifts side by side.
    Written row by row in full (zeros included), so no separate zeroing pass; a shift that runs past
    a padded row's end reads 0 (only outputs outside the image would read it)."""
    n, c, h, w = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    for b in range(n):
        for i in range(hp):
            for j in range(wp):
                q = (b * hp + i) * wp + j
                hi = i - padding
                for s in range(kw):
                    vj = j + s - padding
                    inside = 0 <= hi < h and 0 <= vj < w and j + s < wp
                    for ci in range(c):
                        xs[q, s * c + ci] = x[b, ci, hi, vj] if inside else 0


@njit(cache=True)
def _sum_row_shifts(z, bias, hp, wp, y):
    """y[n, k, i, j] = bias[k] + Σ_r z[p + r·Wp, r·K + k] at p = (n·Hp + i)·Wp + j. One output row at a
    time is summed channels-last in a small buffer (contiguous reads of z), then written transposed."""
    n, k, out_h, out_w = y.shape
    kh = z.shape[1] // k
    row = np.empty((out_w, k), z.dtype)
    for b in range(n):
        for i in range(out_h):
            for j in range(out_w):
                row[j, :] = bias
            for r in range(kh):
                p = (b * hp + i + r) * wp
                for j in range(out_w):
                    for ki in range(k):
                        row[j, ki] += z[p + j, r * k + ki]
            for ki in range(k):
                for j in range(out_w):
                    y[b, ki, i, j] = row[j, ki]


@njit(cache=True)
def _spread_row_shifts(dy, kh, hp, wp, dz):
    """dz[p + r·Wp, r·K + k] = dy[n, k, i, j] (p as in _sum_row_shifts), every other entry 0: the
    adjoint of the epilogue's sum, written row by row in full."""
    n, k, out_h, out_w = dy.shape
    for b in range(n):
        for i in range(hp):
            for j in range(wp):
                q = (b * hp + i) * wp + j
                for r in range(kh):
                    oi = i - r
                    if 0 <= oi < out_h and j < out_w:
                        for ki in range(k):
                            dz[q, r * k + ki] = dy[b, ki, oi, j]
                    else:
                        for ki in range(k):
                            dz[q, r * k + ki] = 0


@njit(cache=True)
def _gather_column_shifts(dxs, padding, kw, dx):
    """dx[n, c, h, v] = Σ_s dxs[q − s, s·C + c] at q = (n·Hp + h + π)·Wp + v + π: the adjoint of
    _shifted_columns (rows before the first have no entries)."""
    n, c, h, w = dx.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    for b in range(n):
        for i in range(h):
            for j in range(w):
                q = (b * hp + i + padding) * wp + j + padding
                for ci in range(c):
                    dx[b, ci, i, j] = 0
                for s in range(kw):
                    if q - s >= 0 and j + padding - s >= 0:
                        for ci in range(c):
                            dx[b, ci, i, j] += dxs[q - s, s * c + ci]


def _chunks(n, rows_per_image, row_bytes):
    """Image ranges [b0, b1) whose GEMM output fits CHUNK_BYTES, so Z and dZ stay in cache between
    the GEMM that writes them and the loop that reads them."""
    step = max(1, CHUNK_BYTES // (rows_per_image * row_bytes))
    return [(b0, min(n, b0 + step)) for b0 in range(0, n, step)]


def conv2d_forward_shifted(x, w, b, padding, out_h, out_w):
    """y = Σ_r shift_r(X_S W_cat) + b, stride 1 -> (y, saved) with saved holding X_S for dW."""
    n, c, h, width = x.shape
    k, _, kh, kw = w.shape
    hp, wp = h + 2 * padding, width + 2 * padding
    dtype = np.result_type(x, w)
    w_cat = w.transpose(3, 1, 2, 0).reshape(kw * c, kh * k).astype(dtype, copy=False)  # [(s, c), (r, k)]
    bias = np.zeros(k, dtype) if b is None else b.astype(dtype, copy=False)
    xs = np.empty((n, hp * wp, kw * c), dtype)
    y = np.empty((n, k, out_h, out_w), dtype)
    z = np.empty((hp * wp * n, kh * k), dtype)  # reused by every chunk
    for b0, b1 in _chunks(n, hp * wp, z.itemsize * kh * k):
        xs_chunk, z_chunk = xs[b0:b1].reshape(-1, kw * c), z[:(b1 - b0) * hp * wp]
        _shifted_columns(x[b0:b1], padding, kw, xs_chunk)
        np.matmul(xs_chunk, w_cat, out=z_chunk)
        _sum_row_shifts(z_chunk, bias, hp, wp, y[b0:b1])
    return y, {"xs": xs, "w_cat": w_cat, "w_shape": w.shape, "x_shape": x.shape, "padding": padding}


def conv2d_backward_shifted(saved, dy):
    """(dx, dw, db) of conv2d_forward_shifted: dW_cat = X_Sᵀ dZ and dX_S = dZ W_catᵀ (one GEMM each per
    chunk of images, dW_cat summed over the chunks)."""
    xs, w_cat, (k, c, kh, kw), x_shape = saved["xs"], saved["w_cat"], saved["w_shape"], saved["x_shape"]
    padding, n, rows = saved["padding"], x_shape[0], xs.shape[1]
    hp, wp = x_shape[2] + 2 * padding, x_shape[3] + 2 * padding
    dz = np.empty((n * rows, kh * k), xs.dtype)  # chunk buffers, reused
    dxs = np.empty((n * rows, kw * c), xs.dtype)
    dw_cat = np.zeros(w_cat.shape, xs.dtype)
    dx = np.empty(x_shape, xs.dtype)
    for b0, b1 in _chunks(n, rows, dz.itemsize * max(kh * k, kw * c)):
        xs_chunk, dz_chunk, dxs_chunk = xs[b0:b1].reshape(-1, kw * c), dz[:(b1 - b0) * rows], dxs[:(b1 - b0) * rows]
        _spread_row_shifts(dy[b0:b1], kh, hp, wp, dz_chunk)
        dw_cat += xs_chunk.T @ dz_chunk
        np.matmul(dz_chunk, w_cat.T, out=dxs_chunk)
        _gather_column_shifts(dxs_chunk, padding, kw, dx[b0:b1])
    dw = dw_cat.reshape(kw, c, kh, k).transpose(3, 1, 2, 0)
    return dx, np.ascontiguousarray(dw), dy.sum(axis=(0, 2, 3))
