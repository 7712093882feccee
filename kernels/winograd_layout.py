"""The channels-last, column-phase-split layout in which the Winograd transforms of kernels/winograd.py
and kernels/winograd4.py vectorise, and the copies between it and NCHW.

A chunk of images is held as a[n, h, p, q·C + c] = x[n, c, h, P·q + p]: channels innermost, each row's
columns split into their P phases (P = the tile's output size m: 2 for F(2×2, 3×3), 4 for F(4×4)). A
tile tj of a row starts at column m·tj, so column s of every tile's patch (s < α = m + 2) is phase
s % m at q = tj + s // m: for all the tiles of a row at once, one run of (tiles × C) contiguous floats.
Each 1-D transform is then a loop over such runs that LLVM vectorises 8 floats wide, where on NCHW
the patches' columns interleave with a stride of m and the loops stayed scalar.
"""
import numpy as np
from numba import njit, uint64

from .cpu_threads import scratch


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def copy_in(x, n0, m, padding, out):
    """out[n, padding + i, w % P, (w // P)·C + c] = x[n0 + n, c, i, j] at w = padding + j, for images
    n0 .. n0 + m, and 0 everywhere else (out is a reused buffer, so the zero padding is written too).
    P = out.shape[2]; out's rows and columns may run past x's padded size (tiles that hang over)."""
    c, h, width = x.shape[1:]
    phases = out.shape[2]
    plane = uint64(h * width)
    for n in range(m):
        image = x[n0 + n].reshape(-1)
        for i in range(out.shape[1]):
            row = out[n, i]
            if i < padding or i >= padding + h:
                row[:] = 0
                continue
            for w in range(phases * (out.shape[3] // c)):
                start = (w // phases) * c
                pixel = row[w % phases, start:start + c]
                j = w - padding
                if 0 <= j < width:
                    first = uint64((i - padding) * width + j)
                    for ci in range(uint64(c)):  # unsigned: no negative-index wrap, 1.4-2.5x faster
                        pixel[ci] = image[first + ci * plane]
                else:
                    pixel[:] = 0


@njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
def copy_out(a, bias, n0, m, y):
    """y[n0 + n, k, i, j] = a[n, i, j % P, (j // P)·K + k] + bias[k]: back to NCHW, cropped to y's
    (Ho, Wo), the bias added on the way."""
    k, out_h, out_w = y.shape[1:]
    phases = a.shape[2]
    plane = uint64(out_h * out_w)
    for n in range(m):
        image = y[n0 + n].reshape(-1)
        for i in range(out_h):
            for j in range(out_w):
                start = (j // phases) * k
                pixel = a[n, i, j % phases, start:start + k]
                first = uint64(i * out_w + j)
                for kk in range(uint64(k)):  # unsigned, as in copy_in (2x faster than gathering along j)
                    image[first + kk * plane] = pixel[kk] + bias[kk]


def planes(name, count, rows, cols, dtype):
    """scratch (count, rows'·cols) planes, rows' ≥ rows, each holding a C-contiguous (rows', cols) matrix,
    an odd multiple of max(256 B, gcd(row bytes, 4 KiB)) apart: the transforms touch all planes at once,
    and planes a multiple of 4 KiB apart would crowd into one L1 set (kernels/winograd.py measured 7x
    slower)."""
    row_bytes = cols * np.dtype(dtype).itemsize
    spacing = max(256, int(np.gcd(row_bytes, 4096)))
    padded = rows
    while padded * row_bytes % (2 * spacing) != spacing:
        padded += 1
    return scratch(name, (count, padded * cols), dtype)
