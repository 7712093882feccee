"""The stride-1 CPU conv2d without im2col: one GEMM over a channels-last copy holding S shifts.

Flatten the zero-padded batch channels-last: X[q, c] = x_pad[n, c, h, v] at q = (n·Hp + h)·Wp + v
(Hp = H + 2π, Wp = W + 2π). Kernel offset (r, s) moves a window by r·Wp + s rows of X, so with
X_S[q, (s, c)] = X[q + s, c] (S column shifts side by side) and W_cat[(s, c), (r, k)] = w[k, c, r, s],

    forward          Z = X_S W_cat                      (P, R·K), P = N·Hp·Wp
                     y[n, k, i, j] = b[k] + Σ_r Z[p + r·Wp, (r, k)],   p = (n·Hp + i)·Wp + j
    backward         dZ[p + r·Wp, (r, k)] = dy[n, k, i, j]   (0 at positions no output reads)
                     dW_cat = X_Sᵀ dZ,    dX_S = dZ W_catᵀ,    dx[n, c, h, v] = Σ_s dX_S[q − s, (s, c)]

X_S is S/(R·S) of im2col's size (a third for 3×3) and the row shifts r cost nothing: they are
folded into the epilogue that also adds the bias and returns to NCHW. Both passes run over chunks of
images whose X_S, Z and dZ fit in cache; nothing but x is kept for the backward. The price is output computed
at the padded positions too: Hp·Wp/(Ho·Wo) of the work (1.15× at 28×28, 1.65× at 7×7).
"""
import numpy as np
from numba import njit

from .cpu_threads import parallel_map, task_slices

# Bytes of GEMM output per chunk of images: small enough to stay in L2/L3 until the loop reading it.
CHUNK_BYTES = 1 << 20


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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
    """Image ranges [b0, b1) whose GEMM output fits CHUNK_BYTES, so the chunk's X_S, Z and dZ stay in
    cache between the loop that writes them and the GEMM or loop that reads them."""
    step = max(1, CHUNK_BYTES // (rows_per_image * row_bytes))
    return [(b0, min(n, b0 + step)) for b0 in range(0, n, step)]


def conv2d_forward_shifted(x, w, b, padding, out_h, out_w):
    """y = Σ_r shift_r(X_S W_cat) + b, stride 1 -> (y, saved). X_S lives one chunk at a time (the
    backward rebuilds it from x, cheaper than keeping it), so saved is x itself.
    Chunks run on the pool of kernels/cpu_threads.py, each task with buffers of its own."""
    n, c, h, width = x.shape
    k, _, kh, kw = w.shape
    rows = (h + 2 * padding) * (width + 2 * padding)
    dtype = np.result_type(x, w)
    saved = shifted_state(x, w, padding)
    w_cat = saved["w_cat"]
    bias = np.zeros(k, dtype) if b is None else b.astype(dtype, copy=False)
    y = np.empty((n, k, out_h, out_w), dtype)
    chunks = _chunks(n, rows, np.dtype(dtype).itemsize * max(kh * k, kw * c))

    def run(task):
        mine = chunks[task]
        most = max(b1 - b0 for b0, b1 in mine)
        xs, z = np.empty((most * rows, kw * c), dtype), np.empty((most * rows, kh * k), dtype)
        for b0, b1 in mine:
            xs_chunk, z_chunk = xs[:(b1 - b0) * rows], z[:(b1 - b0) * rows]
            _shifted_columns(x[b0:b1], padding, kw, xs_chunk)
            np.matmul(xs_chunk, w_cat, out=z_chunk)
            _sum_row_shifts(z_chunk, bias, h + 2 * padding, width + 2 * padding, y[b0:b1])
    parallel_map(run, task_slices(len(chunks)))
    return y, saved


def shifted_state(x, w, padding):
    """What conv2d_backward_shifted reads: x, the weights as W_cat[(s, c), (r, k)] = w[k, c, r, s]."""
    kw, c, kh, k = w.shape[3], w.shape[1], w.shape[2], w.shape[0]
    w_cat = w.transpose(3, 1, 2, 0).reshape(kw * c, kh * k).astype(np.result_type(x, w), copy=False)
    return {"x": x, "w_cat": w_cat, "w_shape": w.shape, "padding": padding}


def conv2d_backward_shifted(saved, dy, need_dx=True):
    """(dx or None, dw, db) of conv2d_forward_shifted: per chunk of images X_S is rebuilt, then
    dW_cat += X_Sᵀ dZ and dX_S = dZ W_catᵀ (one GEMM each). Chunks run on the pool; their dW_cat terms
    are added in chunk order afterwards, so the sum does not depend on the threads."""
    x, w_cat, (k, c, kh, kw), padding = saved["x"], saved["w_cat"], saved["w_shape"], saved["padding"]
    n, _, h, width = x.shape
    hp, wp = h + 2 * padding, width + 2 * padding
    rows, dtype = hp * wp, w_cat.dtype
    chunks = _chunks(n, rows, dtype.itemsize * max(kh * k, kw * c))
    dx = np.empty(x.shape, dtype) if need_dx else None
    dw_terms = np.empty((len(chunks),) + w_cat.shape, dtype)

    def run(task):
        mine = chunks[task]
        most = max(b1 - b0 for b0, b1 in mine)
        xs, dz, dxs = (np.empty((most * rows, cols), dtype) for cols in (kw * c, kh * k, kw * c))
        for i, (b0, b1) in enumerate(mine, start=task.start):
            xs_chunk, dz_chunk, dxs_chunk = xs[:(b1 - b0) * rows], dz[:(b1 - b0) * rows], dxs[:(b1 - b0) * rows]
            _shifted_columns(x[b0:b1], padding, kw, xs_chunk)
            _spread_row_shifts(dy[b0:b1], kh, hp, wp, dz_chunk)
            np.matmul(xs_chunk.T, dz_chunk, out=dw_terms[i])
            if need_dx:
                np.matmul(dz_chunk, w_cat.T, out=dxs_chunk)
                _gather_column_shifts(dxs_chunk, padding, kw, dx[b0:b1])
    parallel_map(run, task_slices(len(chunks)))
    dw_cat = np.zeros(w_cat.shape, dtype)
    for term in dw_terms:  # in chunk order, as a serial loop would
        dw_cat += term
    dw = dw_cat.reshape(kw, c, kh, k).transpose(3, 1, 2, 0)
    return dx, np.ascontiguousarray(dw), dy.sum(axis=(0, 2, 3))
