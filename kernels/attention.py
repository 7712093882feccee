"""Scaled dot-product attention (Vaswani et al. 2017, "Attention Is All You Need"), non-causal.

For each batch b and head h, with Q (Lq, d), K and V (Lk, d) and scale = 1/√d by default:

    forward     S = scale · Q Kᵀ                     (Lq, Lk) scores
                P = softmax(S) row-wise: P_ij = exp(S_ij − m_i) / Σ_j' exp(S_ij' − m_i), m_i = max_j S_ij
                O = P V                              (Lq, d)
    backward    dV = Pᵀ dO
                dP = dO Vᵀ
                dS = P ∘ (dP − D),  D_i = Σ_j dP_ij P_ij = Σ_c dO_ic O_ic   (softmax backward)
                dQ = scale · dS K
                dK = scale · dSᵀ Q

The max subtraction (m_i) keeps exp from overflowing: scores of a few hundred are common once q and k
grow during training, and exp(89) is already inf in float32.

The versions (reference, cpu, cpu_batched, cuda_v1, cuda_v2) are the rows of VERSIONS at the end of this file,
with their kernels ``attention_<pass>_v<N>``; ``python benchmarks/bench_kernels.py --list`` prints
them with the command that runs each one alone.
"""
import math

import numpy as np
from numba import float32, njit

from ._bench import OpBench, Version, host64, saved_backward
from ._cuda import ONE, ZERO, array_module, block_max, block_sum, ceil_div, cuda, device_function, kernel
from .cpu_threads import TASKS, even_slices, parallel_map, task_slices
from .vector_math import exp32, max32


def _default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ---- NumPy reference ------------------------------------------------------------------------------
def _softmax_reference(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention_forward_reference(q, k, v, scale=None):
    """O = softmax(scale · Q Kᵀ) V on (B, H, L, d) arrays (Vaswani et al. 2017)."""
    scale = _default_scale(q, scale)
    p = _softmax_reference(scale * np.einsum("bhic,bhjc->bhij", q, k))
    return np.einsum("bhij,bhjc->bhic", p, v)


def attention_backward_reference(q, k, v, do, scale=None):
    """dV = Pᵀ dO, dP = dO Vᵀ, dS = P∘(dP − rowsum(dP∘P)), dQ = scale·dS K, dK = scale·dSᵀ Q."""
    scale = _default_scale(q, scale)
    p = _softmax_reference(scale * np.einsum("bhic,bhjc->bhij", q, k))
    dv = np.einsum("bhij,bhic->bhjc", p, do)
    dp = np.einsum("bhic,bhjc->bhij", do, v)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = scale * np.einsum("bhij,bhjc->bhic", ds, k)
    dk = scale * np.einsum("bhij,bhic->bhjc", ds, q)
    return dq, dk, dv


# ---- CPU implementation: fused per block of heads and query rows, flash attention's way -----------
# A block of whole heads (or of one head's query rows, once one head's scores alone pass the budget)
# goes S = QKᵀ (BLAS) → softmax (a numba row loop) → O = P V (BLAS) while its scores are still in
# cache, and only the row log-sum-exp is kept: the backward recomputes P block by block (Dao et al.
# 2022, "FlashAttention"). Materialising the (B, H, L, L) probabilities instead, as cpu_batched does,
# cost a 39 MB buffer at L = 196 that the forward writes and the backward reads back; recomputing
# them was as fast or faster in both passes (see cpu_batched's row).
# At most this many bytes of scores per block. Each block costs ~15 µs of Python (4 to 6 BLAS and numba
# calls and their views), so blocks should be large, yet stay in cache: on an AMD EPYC (Zen 3, 512 KB
# L2 per core), one thread, L = 196, blocks of 1 and 2 MB (4 and 12 heads) timed alike in both passes,
# 512 KB (2 heads) 1.1x slower forward, 128 KB (half a head) 1.5x, 4 MB (24 heads) 1.2x slower backward.
SCORE_BLOCK_BYTES = 1 << 20


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _exp_scores_rows(s, scale, lse, inverse_sums):
    """Per row of the (.., .., rows, Lk) block s: m = max_j scale·s_j, s_j ← exp(scale·s_j − m),
    l = Σ_j s_j; lse = m + log l, inverse_sums = 1/l. float32, the max, exps and sum in two passes
    (NumPy's whole-array passes took twice as long)."""
    for a in range(s.shape[0]):
        for b in range(s.shape[1]):
            for i in range(s.shape[2]):
                row = s[a, b, i]
                top = row[0] * scale
                for j in range(row.shape[0]):
                    top = max32(top, row[j] * scale)  # the max of scale·s (scale may be negative)
                total = float32(0)
                for j in range(row.shape[0]):
                    e = exp32(row[j] * scale - top)
                    row[j] = e
                    total += e
                lse[a, b, i] = top + math.log(total)
                inverse_sums[a, b, i] = float32(1) / total


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _scale_rows(x, factors):
    """x[a, b, i, :] *= factors[a, b, i]."""
    for a in range(x.shape[0]):
        for b in range(x.shape[1]):
            for i in range(x.shape[2]):
                f = factors[a, b, i]
                for c in range(x.shape[3]):
                    x[a, b, i, c] *= f


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _probabilities_and_score_grads_rows(s, ds, lse, do, o, scale):
    """Per row: s ← P = exp(scale·s − lse), ds ← scale·P∘(dP − D) from ds = dP, D = Σ_c dO_c O_c."""
    for a in range(s.shape[0]):
        for b in range(s.shape[1]):
            for i in range(s.shape[2]):
                delta = float32(0)
                for c in range(do.shape[3]):
                    delta += do[a, b, i, c] * o[a, b, i, c]
                row, grad, m = s[a, b, i], ds[a, b, i], lse[a, b, i]
                for j in range(row.shape[0]):
                    p = exp32(row[j] * scale - m)
                    row[j] = p
                    grad[j] = scale * p * (grad[j] - delta)


def _exp_scores(s, scale, lse, inverse_sums):
    """_exp_scores_rows in float32, NumPy for float64 (the gradchecks)."""
    if s.dtype == np.float32:
        _exp_scores_rows(s, np.float32(scale), lse, inverse_sums)
        return
    s *= scale
    top = s.max(axis=-1, keepdims=True)
    s -= top
    np.exp(s, out=s)
    total = s.sum(axis=-1)
    lse[...] = top[..., 0] + np.log(total)
    inverse_sums[...] = 1 / total


def _probabilities_and_score_grads(s, ds, lse, do, o, scale):
    """_probabilities_and_score_grads_rows in float32, NumPy for float64."""
    if s.dtype == np.float32:
        _probabilities_and_score_grads_rows(s, ds, lse, do, o, np.float32(scale))
        return
    s *= scale
    s -= lse[..., None]
    np.exp(s, out=s)
    ds -= (do * o).sum(axis=-1, keepdims=True)
    ds *= s
    ds *= scale


def _head_groups(batch, heads, head_bytes):
    """The units of work: (batch slice, head slice) groups of whole heads whose scores fit
    SCORE_BLOCK_BYTES together (one head when one does not), at most ⌈B·H / TASKS⌉ heads each so that
    every thread gets work. Cut the same way whatever the thread count."""
    size = max(1, min(SCORE_BLOCK_BYTES // head_bytes, -(-batch * heads // TASKS)))
    if size >= heads:
        return [(images, slice(0, heads)) for images in _slices_of_at_most(batch, size // heads)]
    return [(slice(b, b + 1), group) for b in range(batch) for group in _slices_of_at_most(heads, size)]


def _query_blocks(lq, lk, itemsize):
    """Query-row slices of one head with at most SCORE_BLOCK_BYTES of scores each (all rows at once
    when the whole head fits)."""
    return _slices_of_at_most(lq, max(1, SCORE_BLOCK_BYTES // (lk * itemsize)))


def _slices_of_at_most(count, most):
    """range(count) in the fewest near-equal slices of at most `most` (4 heads by at most 3: 2 + 2)."""
    return even_slices(count, -(-count // most))


def _length(part):
    return part.stop - part.start


def _blocked(fn, q, k, scratch):
    """fn(heads, block, first_row, buffers) for every head group (heads: its (batch, head) slices) and
    query block (block: its (batch, head, row) slices), the head groups split into tasks on the pool
    of kernels/cpu_threads.py; buffers are `scratch` arrays of the task's own, shaped (images, heads,
    rows, Lk) for the block."""
    (batch, heads, lq, _), lk, dtype = q.shape, k.shape[2], q.dtype
    groups = _head_groups(batch, heads, lq * lk * dtype.itemsize)
    query_blocks = _query_blocks(lq, lk, dtype.itemsize)
    most_rows = max(map(_length, query_blocks))

    def run(task):
        largest = max(_length(b) * _length(h) for b, h in groups[task]) * most_rows * lk
        buffers = [np.empty(largest, dtype) for _ in range(scratch)]
        for b, h in groups[task]:
            for rows in query_blocks:
                shape = (_length(b), _length(h), _length(rows), lk)
                fn((b, h), (b, h, rows), rows.start, [buffer[:math.prod(shape)].reshape(shape) for buffer in buffers])
    parallel_map(run, task_slices(len(groups)))


def attention_forward_cpu(q, k, v, scale=None):
    """O = softmax(scale · Q Kᵀ) V, fused per block (the section comment above). Returns (O, saved),
    keeping the row log-sum-exp lse = m + log Σ_j exp(scale·S_ij − m) for the backward."""
    scale = _default_scale(q, scale)
    dtype = np.result_type(q, k, v)
    q, k, v = q.astype(dtype, copy=False), k.astype(dtype, copy=False), v.astype(dtype, copy=False)
    o = np.empty(q.shape[:-1] + v.shape[-1:], dtype)
    lse, inverse_sums = np.empty(q.shape[:-1], dtype), np.empty(q.shape[:-1], dtype)
    kt = k.swapaxes(-1, -2)

    def run(heads, block, first_row, buffers):
        (s,), out, inverse = buffers, o[block], inverse_sums[block]
        np.matmul(q[block], kt[heads], out=s)
        _exp_scores(s, scale, lse[block], inverse)
        np.matmul(s, v[heads], out=out)
        _scale_rows(out, inverse)
    _blocked(run, q, k, scratch=1)
    return o, {"q": q, "k": k, "v": v, "o": o, "lse": lse, "scale": scale}


def attention_backward_cpu(saved, do):
    """Per block: P = exp(scale·Q Kᵀ − lse) recomputed, dV += Pᵀ dO, dS = scale·P∘(dO Vᵀ − D) with
    D = rowsum(dO∘O) (equal to rowsum(dP∘P), and (Lq, d) work instead of (Lq, Lk)), dQ = dS K,
    dK += dSᵀ Q; a head's query blocks add into its dK, dV in order, inside one task."""
    q, k, v, o, lse, scale = (saved[name] for name in ("q", "k", "v", "o", "lse", "scale"))
    do = do.astype(q.dtype, copy=False)
    dq, dk, dv = np.empty(q.shape, q.dtype), np.empty(k.shape, q.dtype), np.empty(v.shape, q.dtype)
    kt, vt = k.swapaxes(-1, -2), v.swapaxes(-1, -2)

    def run(heads, block, first_row, buffers):
        p, ds = buffers
        qb, dob = q[block], do[block]
        np.matmul(qb, kt[heads], out=p)
        np.matmul(dob, vt[heads], out=ds)
        _probabilities_and_score_grads(p, ds, lse[block], dob, o[block], scale)
        np.matmul(ds, k[heads], out=dq[block])
        if first_row == 0:
            np.matmul(p.swapaxes(-1, -2), dob, out=dv[heads])
            np.matmul(ds.swapaxes(-1, -2), qb, out=dk[heads])
        else:
            dv[heads] += np.matmul(p.swapaxes(-1, -2), dob)
            dk[heads] += np.matmul(ds.swapaxes(-1, -2), qb)
    _blocked(run, q, k, scratch=2)
    return dq, dk, dv


# ---- CPU, unfused: the whole (B, H, L, L) probabilities materialised (the cpu_batched row) ---------
def attention_forward_batched(q, k, v, scale=None):
    """O = softmax(scale · Q Kᵀ) V with batched BLAS matmuls over a task's images at once, the softmax
    in place on their scores; returns (O, saved), keeping P and O for the backward."""
    scale = _default_scale(q, scale)
    dtype = np.result_type(q, k, v)
    p = np.empty(q.shape[:-1] + k.shape[-2:-1], dtype)
    o = np.empty(q.shape[:-1] + v.shape[-1:], dtype)
    lse, inverse_sums = np.empty(q.shape[:-1], dtype), np.empty(q.shape[:-1], dtype)

    def run(part):
        _exp_scores(np.matmul(q[part], k[part].swapaxes(-1, -2), out=p[part]), scale, lse[part], inverse_sums[part])
        _scale_rows(p[part], inverse_sums[part])
        np.matmul(p[part], v[part], out=o[part])
    parallel_map(run, task_slices(len(q)))
    return o, {"q": q, "k": k, "v": v, "o": o, "p": p, "scale": scale}


def attention_backward_batched(saved, do):
    """dV = Pᵀ dO, dS = P∘(dO Vᵀ − D) with D = rowsum(dO∘O), dQ = scale·dS K, dK = scale·dSᵀ Q from the
    saved P; slices of the batch on the pool."""
    q, k, v, o, p, scale = (saved[name] for name in ("q", "k", "v", "o", "p", "scale"))
    dtype = np.result_type(p, do)
    dq, dk, dv = np.empty(q.shape, dtype), np.empty(k.shape, dtype), np.empty(v.shape, dtype)

    def run(part):
        pp, dop = p[part], do[part]
        np.matmul(pp.swapaxes(-1, -2), dop, out=dv[part])
        ds = np.matmul(dop, v[part].swapaxes(-1, -2))  # dP, turned into dS in place
        ds -= (dop * o[part]).sum(axis=-1, keepdims=True)
        ds *= pp
        np.matmul(ds, k[part], out=dq[part])
        dq[part] *= scale
        np.matmul(ds.swapaxes(-1, -2), q[part], out=dk[part])
        dk[part] *= scale
    parallel_map(run, task_slices(len(q)))
    return dq, dk, dv


# ---- CUDA v1: naive, S and P materialised in global memory ----------------------------------------
# Kernels see (B·H, L, d) views: the batch and head axes play the same role.
THREADS_PER_BLOCK = 128  # one thread per output element; 4 warps, enough blocks to fill every SM
ROW_THREADS = 32         # one block (one warp) per softmax row: rows are a few hundred long, 32 threads stride them
NEG_INF = float32(-math.inf)


@device_function
def entry(a, n, i, j, transposed):
    """A[n, i, j] for A = a, or A = aᵀ (per batch n) when transposed."""
    return a[n, j, i] if transposed else a[n, i, j]


@kernel("void(float32[:,:,::1], boolean, float32[:,:,::1], boolean, float32, float32[:,:,::1])")
def attention_matmul_v1(a, a_transposed, b, b_transposed, scale, out):
    """out[n, i, j] = scale · Σ_c A[n, i, c]·B[n, c, j] with A = a or aᵀ and B = b or bᵀ, one thread
    per output: S = scale·Q Kᵀ, O = P V, dV = Pᵀ dO, dP = dO Vᵀ, dQ = scale·dS K, dK = scale·dSᵀ Q."""
    idx = cuda.grid(1)
    if idx < out.size:
        rows, cols = out.shape[1], out.shape[2]
        n, i, j = idx // (rows * cols), idx // cols % rows, idx % cols
        total = ZERO
        for c in range(a.shape[1] if a_transposed else a.shape[2]):
            total += entry(a, n, i, c, a_transposed) * entry(b, n, c, j, b_transposed)
        out[n, i, j] = scale * total


@kernel("void(float32[:,::1])")
def attention_softmax_forward_v1(s):
    """In place, one block per row: s[r, :] ← exp(s[r, :] − max) / Σ exp(s[r, :] − max)."""
    buf = cuda.shared.array(ROW_THREADS, float32)
    row, t, n = cuda.blockIdx.x, cuda.threadIdx.x, s.shape[1]
    local_max = NEG_INF
    for j in range(t, n, ROW_THREADS):
        local_max = max(local_max, s[row, j])
    row_max = block_max(buf, local_max)
    local_sum = ZERO
    for j in range(t, n, ROW_THREADS):
        e = math.exp(s[row, j] - row_max)
        s[row, j] = e
        local_sum += e
    inverse_sum = ONE / block_sum(buf, local_sum)
    for j in range(t, n, ROW_THREADS):
        s[row, j] *= inverse_sum


@kernel("void(float32[:,::1], float32[:,::1])")
def attention_softmax_backward_v1(p, dp):
    """In place, one block per row: dp[r, :] ← p[r, :] ∘ (dp[r, :] − Σ_j dp[r, j] p[r, j])  (dP → dS)."""
    buf = cuda.shared.array(ROW_THREADS, float32)
    row, t, n = cuda.blockIdx.x, cuda.threadIdx.x, p.shape[1]
    local_dot = ZERO
    for j in range(t, n, ROW_THREADS):
        local_dot += dp[row, j] * p[row, j]
    row_dot = block_sum(buf, local_dot)
    for j in range(t, n, ROW_THREADS):
        dp[row, j] = p[row, j] * (dp[row, j] - row_dot)


def _scaled_matmul(a, b, scale, out, a_transposed=False, b_transposed=False):
    """out = scale · A B, batched over the first axis, by attention_matmul_v1."""
    attention_matmul_v1[ceil_div(out.size, THREADS_PER_BLOCK), THREADS_PER_BLOCK](
        a, a_transposed, b, b_transposed, float32(scale), out)
    return out


def _attention_forward_v1(q, k, v, scale):
    xp = array_module(q)
    n, lq, lk, d = q.shape[0], q.shape[1], k.shape[1], q.shape[2]
    p = _scaled_matmul(q, k, scale, xp.empty((n, lq, lk), np.float32), b_transposed=True)
    attention_softmax_forward_v1[n * lq, ROW_THREADS](p.reshape(n * lq, lk))
    o = _scaled_matmul(p, v, 1.0, xp.empty((n, lq, d), np.float32))
    return o, {"p": p}


def _attention_backward_v1(q, k, v, do, scale, p):
    xp = array_module(q)
    n, lq, lk = p.shape
    dv = _scaled_matmul(p, do, 1.0, xp.empty_like(v), a_transposed=True)
    ds = _scaled_matmul(do, v, 1.0, xp.empty((n, lq, lk), np.float32), b_transposed=True)
    attention_softmax_backward_v1[n * lq, ROW_THREADS](p.reshape(n * lq, lk), ds.reshape(n * lq, lk))
    dq = _scaled_matmul(ds, k, scale, xp.empty_like(q))
    dk = _scaled_matmul(ds, q, scale, xp.empty_like(k), a_transposed=True)
    return dq, dk, dv


# ---- CUDA v2: flash-style, tiles in shared memory, online softmax ---------------------------------
TILE = 16                    # queries and keys per tile; a block is TILE×TILE = 256 threads, one per score
MAX_HEAD_SIZE = 128          # bounds the shared tiles: 4 tiles of TILE×(128+1) floats stay under 48 KB
TILE_STRIDE = MAX_HEAD_SIZE + 1  # +1 pad: rows start in different banks, so 16 threads reading one
#                                  column of 16 different rows hit 16 different banks
CHANNELS_PER_THREAD = MAX_HEAD_SIZE // TILE  # a thread accumulates output channels t, t+16, ... (≤ 8)
# Each kernel declares its own shared tiles, so their declarations look alike on purpose: a helper
# cannot allocate them, since numba's simulator keys a shared array by its source line and one helper
# line would hand every tile the same array.


@device_function
def tile_coordinates():
    """(n, first row of the block's tile, ty, tx, flat thread index) in a flash kernel: block
    (n, tile), TILE×TILE threads."""
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    return cuda.blockIdx.x, cuda.blockIdx.y * TILE, ty, tx, ty * TILE + tx


@device_function
def load_tile(tile, a, n, first_row, thread):
    """tile[r, c] = a[n, first_row + r, c] for the TILE rows from first_row, all TILE² threads striding
    over the TILE·d floats, contiguous in DRAM (coalesced); rows past a's end are zero-filled, so
    they add nothing (and no garbage inf·0 = nan)."""
    d = a.shape[2]
    for idx in range(thread, TILE * d, TILE * TILE):
        r, c = idx // d, idx % d
        tile[r, c] = a[n, first_row + r, c] if first_row + r < a.shape[1] else ZERO


@device_function
def load_tiles(a_tile, b_tile, a, b, n, first_row, thread):
    """load_tile of the same rows of a and b (k and v, or q and dO)."""
    load_tile(a_tile, a, n, first_row, thread)
    load_tile(b_tile, b, n, first_row, thread)


@device_function
def score_and_dp(q_tile, k_tile, do_tile, v_tile, query, key, d):
    """(Q Kᵀ, dO Vᵀ) at (query, key): the two length-d dot products of rows of the tiles."""
    qk = ZERO
    dp = ZERO
    for c in range(d):
        qk += q_tile[query, c] * k_tile[key, c]
        dp += do_tile[query, c] * v_tile[key, c]
    return qk, dp


@device_function
def add_tile_product(acc, a_tile, b_tile, row, d):
    """acc[r] += Σ_j a_tile[row, j]·b_tile[j, c] for this thread's channels c = threadIdx.x + r·TILE < d."""
    for r in range(CHANNELS_PER_THREAD):
        c = cuda.threadIdx.x + r * TILE
        if c < d:
            for j in range(TILE):
                acc[r] += a_tile[row, j] * b_tile[j, c]


@device_function
def store_channels(out, n, row, acc, factor, d):
    """out[n, row, c] = factor·acc[r] for this thread's channels c = threadIdx.x + r·TILE < d."""
    for r in range(CHANNELS_PER_THREAD):
        c = cuda.threadIdx.x + r * TILE
        if c < d:
            out[n, row, c] = factor * acc[r]


@kernel("void(float32[:,:,::1], float32[:,:,::1], float32[:,:,::1], float32, float32[:,:,::1], float32[:,::1])")
def attention_forward_v2(q, k, v, scale, o, lse):
    """Block (n, query tile), thread (query row ty, key tx). For each key tile: S = scale·Q Kᵀ, running
    max m' = max(m, max_j S), rescale α = exp(m − m'), l ← α·l + Σ_j exp(S − m'),
    acc ← α·acc + exp(S − m') V. At the end O = acc / l and lse = m + log l."""
    q_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    k_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    v_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    p_tile = cuda.shared.array((TILE, TILE), float32)
    row_max = cuda.shared.array(TILE, float32)
    row_sum = cuda.shared.array(TILE, float32)
    row_rescale = cuda.shared.array(TILE, float32)
    acc = cuda.local.array(CHANNELS_PER_THREAD, float32)
    n, q0, ty, tx, thread = tile_coordinates()
    n_queries, n_keys, d = q.shape[1], k.shape[1], q.shape[2]

    load_tile(q_tile, q, n, q0, thread)
    for r in range(CHANNELS_PER_THREAD):
        acc[r] = ZERO
    if tx == 0:
        row_max[ty] = NEG_INF
        row_sum[ty] = ZERO
    for k0 in range(0, n_keys, TILE):
        cuda.syncthreads()  # the previous tiles are consumed before they are overwritten
        load_tiles(k_tile, v_tile, k, v, n, k0, thread)
        cuda.syncthreads()
        score = NEG_INF  # keys past the end get probability exp(−inf) = 0
        if k0 + tx < n_keys:
            dot = ZERO
            for c in range(d):
                dot += q_tile[ty, c] * k_tile[tx, c]
            score = scale * dot
        p_tile[ty, tx] = score
        cuda.syncthreads()
        if tx == 0:  # one thread per row; key k0 always exists, so the new max is finite
            new_max = row_max[ty]
            for j in range(TILE):
                new_max = max(new_max, p_tile[ty, j])
            row_rescale[ty] = math.exp(row_max[ty] - new_max)  # exp(−inf) = 0 on the first tile
            row_max[ty] = new_max
        cuda.syncthreads()
        p_tile[ty, tx] = math.exp(score - row_max[ty])
        cuda.syncthreads()
        rescale = row_rescale[ty]
        if tx == 0:
            tile_sum = ZERO
            for j in range(TILE):
                tile_sum += p_tile[ty, j]
            row_sum[ty] = rescale * row_sum[ty] + tile_sum
        for r in range(CHANNELS_PER_THREAD):
            c = tx + r * TILE
            if c < d:
                pv = ZERO
                for j in range(TILE):
                    pv += p_tile[ty, j] * v_tile[j, c]
                acc[r] = rescale * acc[r] + pv
    cuda.syncthreads()  # the last tile's row_sum is visible to the whole row
    i = q0 + ty
    if i < n_queries:
        store_channels(o, n, i, acc, ONE / row_sum[ty], d)
        if tx == 0:
            lse[n, i] = row_max[ty] + math.log(row_sum[ty])


@kernel("void(float32[:,:,::1], float32[:,:,::1], float32[:,::1])")
def attention_backward_delta_v2(o, do, delta):
    """delta[n, i] = Σ_c o[n, i, c] do[n, i, c]  (D = rowsum(dO∘O)), one thread per row: O(L·d) work."""
    idx = cuda.grid(1)
    if idx < delta.size:
        n, i = idx // delta.shape[1], idx % delta.shape[1]
        total = ZERO
        for c in range(o.shape[2]):
            total += o[n, i, c] * do[n, i, c]
        delta[n, i] = total


@kernel("void(float32[:,:,::1], float32[:,:,::1], float32[:,:,::1], float32[:,:,::1], float32[:,::1], "
        "float32[:,::1], float32, float32[:,:,::1])")
def attention_backward_dq_v2(q, k, v, do, lse, delta, scale, dq):
    """Block (n, query tile), thread (query row ty, key tx). For each key tile: P = exp(scale·Q Kᵀ − lse),
    dS = P∘(dO Vᵀ − D), dQ += scale · dS K."""
    q_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    do_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    k_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    v_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    ds_tile = cuda.shared.array((TILE, TILE), float32)
    acc = cuda.local.array(CHANNELS_PER_THREAD, float32)
    n, q0, ty, tx, thread = tile_coordinates()
    n_queries, n_keys, d = q.shape[1], k.shape[1], q.shape[2]
    i = q0 + ty

    load_tiles(q_tile, do_tile, q, do, n, q0, thread)
    row_lse = lse[n, i] if i < n_queries else ZERO
    row_delta = delta[n, i] if i < n_queries else ZERO
    for r in range(CHANNELS_PER_THREAD):
        acc[r] = ZERO
    for k0 in range(0, n_keys, TILE):
        cuda.syncthreads()  # the previous tiles are consumed before they are overwritten
        load_tiles(k_tile, v_tile, k, v, n, k0, thread)
        cuda.syncthreads()
        ds = ZERO
        if i < n_queries and k0 + tx < n_keys:
            qk, dp = score_and_dp(q_tile, k_tile, do_tile, v_tile, ty, tx, d)
            ds = math.exp(scale * qk - row_lse) * (dp - row_delta)
        ds_tile[ty, tx] = ds
        cuda.syncthreads()
        add_tile_product(acc, ds_tile, k_tile, ty, d)
    if i < n_queries:
        store_channels(dq, n, i, acc, scale, d)


@kernel("void(float32[:,:,::1], float32[:,:,::1], float32[:,:,::1], float32[:,:,::1], float32[:,::1], "
        "float32[:,::1], float32, float32[:,:,::1], float32[:,:,::1])")
def attention_backward_dkdv_v2(q, k, v, do, lse, delta, scale, dk, dv):
    """Block (n, key tile), thread (key row ty, query tx). For each query tile: P = exp(scale·Q Kᵀ − lse),
    dS = P∘(dO Vᵀ − D), dV += Pᵀ dO, dK += scale · dSᵀ Q. Each block owns its keys' rows: no atomics."""
    k_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    v_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    q_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    do_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    p_tile = cuda.shared.array((TILE, TILE), float32)  # [key, query]
    ds_tile = cuda.shared.array((TILE, TILE), float32)
    lse_tile = cuda.shared.array(TILE, float32)
    delta_tile = cuda.shared.array(TILE, float32)
    dk_acc = cuda.local.array(CHANNELS_PER_THREAD, float32)
    dv_acc = cuda.local.array(CHANNELS_PER_THREAD, float32)
    n, k0, ty, tx, thread = tile_coordinates()
    n_queries, n_keys, d = q.shape[1], k.shape[1], q.shape[2]
    j = k0 + ty

    load_tiles(k_tile, v_tile, k, v, n, k0, thread)
    for r in range(CHANNELS_PER_THREAD):
        dk_acc[r] = ZERO
        dv_acc[r] = ZERO
    for q0 in range(0, n_queries, TILE):
        cuda.syncthreads()  # the previous tiles are consumed before they are overwritten
        load_tiles(q_tile, do_tile, q, do, n, q0, thread)
        if ty == 0 and q0 + tx < n_queries:
            lse_tile[tx] = lse[n, q0 + tx]
            delta_tile[tx] = delta[n, q0 + tx]
        cuda.syncthreads()
        p = ZERO
        ds = ZERO
        if q0 + tx < n_queries and j < n_keys:
            qk, dp = score_and_dp(q_tile, k_tile, do_tile, v_tile, tx, ty, d)
            p = math.exp(scale * qk - lse_tile[tx])
            ds = p * (dp - delta_tile[tx])
        p_tile[ty, tx] = p
        ds_tile[ty, tx] = ds
        cuda.syncthreads()
        add_tile_product(dv_acc, p_tile, do_tile, ty, d)
        add_tile_product(dk_acc, ds_tile, q_tile, ty, d)
    if j < n_keys:
        store_channels(dk, n, j, dk_acc, scale, d)
        store_channels(dv, n, j, dv_acc, ONE, d)


def _attention_forward_v2(q, k, v, scale):
    xp = array_module(q)
    n, lq = q.shape[0], q.shape[1]
    o, lse = xp.empty_like(q), xp.empty((n, lq), np.float32)
    attention_forward_v2[(n, ceil_div(lq, TILE)), (TILE, TILE)](q, k, v, float32(scale), o, lse)
    return o, {"o": o, "lse": lse}


def _attention_backward_v2(q, k, v, do, scale, o, lse):
    xp = array_module(q)
    n, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    delta = xp.empty((n, lq), np.float32)
    attention_backward_delta_v2[ceil_div(delta.size, THREADS_PER_BLOCK), THREADS_PER_BLOCK](o, do, delta)
    dq, dk, dv = xp.empty_like(q), xp.empty_like(k), xp.empty_like(v)
    attention_backward_dq_v2[(n, ceil_div(lq, TILE)), (TILE, TILE)](q, k, v, do, lse, delta, float32(scale), dq)
    attention_backward_dkdv_v2[(n, ceil_div(lk, TILE)), (TILE, TILE)](
        q, k, v, do, lse, delta, float32(scale), dk, dv)
    return dq, dk, dv


# ---- launchers ------------------------------------------------------------------------------------
def _check_inputs(q, k, v, version):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention needs q (B, H, Lq, d), k and v (B, H, Lk, d); got {q.shape}, {k.shape}, {v.shape}")
    if min(q.shape) < 1 or k.shape[2] < 1:
        raise ValueError(f"attention needs non-empty inputs; got q {q.shape}, k {k.shape}")
    if not (q.dtype == k.dtype == v.dtype == np.float32):
        raise ValueError(f"attention CUDA kernels need float32 inputs; got {q.dtype}, {k.dtype}, {v.dtype}")
    if version not in BENCH.cuda_versions:
        raise ValueError(f"attention CUDA has versions {BENCH.cuda_versions}; got version={version}")
    if version == 2 and q.shape[3] > MAX_HEAD_SIZE:
        raise ValueError(f"attention CUDA v2 supports head size d ≤ {MAX_HEAD_SIZE}; got d = {q.shape[3]}")


def _heads_as_batch(a):
    """(B, H, L, d) → (B·H, L, d): a view of a C-contiguous array (made contiguous if it is not)."""
    a = array_module(a).ascontiguousarray(a)
    return a.reshape(a.shape[0] * a.shape[1], a.shape[2], a.shape[3])


def attention_forward_cuda(q, k, v, scale=None, version=2):
    """O = softmax(scale · Q Kᵀ) V on the GPU (float32); returns (O, saved) for attention_backward_cuda."""
    _check_inputs(q, k, v, version)
    scale = _default_scale(q, scale)
    q3, k3, v3 = _heads_as_batch(q), _heads_as_batch(k), _heads_as_batch(v)
    forward = _attention_forward_v1 if version == 1 else _attention_forward_v2
    o, state = forward(q3, k3, v3, scale)
    saved = {"version": version, "shape": q.shape, "q": q3, "k": k3, "v": v3, "scale": scale, **state}
    return o.reshape(q.shape), saved


def attention_backward_cuda(saved, do):
    """(dQ, dK, dV) for the version that produced `saved`: v1 from the saved P, v2 by recomputation."""
    if do.shape != saved["shape"] or do.dtype != np.float32:
        raise ValueError(f"attention CUDA backward needs a float32 dO of shape {saved['shape']}; "
                         f"got {do.dtype} {do.shape}")
    q, k, v, scale = saved["q"], saved["k"], saved["v"], saved["scale"]
    do3 = _heads_as_batch(do)
    if saved["version"] == 1:
        dq, dk, dv = _attention_backward_v1(q, k, v, do3, scale, saved["p"])
    else:
        dq, dk, dv = _attention_backward_v2(q, k, v, do3, scale, saved["o"], saved["lse"])
    b, h = saved["shape"][:2]
    return dq.reshape(b, h, *dq.shape[1:]), dk.reshape(b, h, *dk.shape[1:]), dv.reshape(b, h, *dv.shape[1:])


# ---- the version table and the benchmark description ------------------------------------------
def _make_case(shape, xp, seed):
    rng = np.random.default_rng(seed)
    b, h, n, d = shape["B"], shape["H"], shape["L"], shape["d"]
    return {name: xp.asarray(rng.standard_normal((b, h, n, d), dtype=np.float32))
            for name in ("q", "k", "v", "do")}


def _reference(case, direction):
    q, k, v, do = (host64(case[name]) for name in ("q", "k", "v", "do"))
    if direction == "forward":
        return (attention_forward_reference(q, k, v),)
    return attention_backward_reference(q, k, v, do)


def _flops(shape, direction):
    forward = 4 * shape["B"] * shape["H"] * shape["L"] ** 2 * shape["d"]  # Q Kᵀ and P V, 2 flops per MAC
    return forward if direction == "forward" else 2.5 * forward  # dV, dP, dQ, dK and the recomputed S


def _bytes(shape, direction):
    per_tensor = 4 * shape["B"] * shape["H"] * shape["L"] * shape["d"]
    return (4 if direction == "forward" else 7) * per_tensor  # q, k, v → o;  q, k, v, dO → dq, dk, dv


def _forward(fn, **options):
    return lambda case: fn(case["q"], case["k"], case["v"], **options)


VERSIONS = (
    Version("reference", "NumPy einsum of the module docstring's equations: the ground truth",
            lambda case: (attention_forward_reference(case["q"], case["k"], case["v"]), None),
            lambda case, _: attention_backward_reference(case["q"], case["k"], case["v"], case["do"])),
    Version("cpu",
            "the engine's CPU path, fused (Dao et al. 2022 on the CPU): per block of whole heads (or of "
            "query rows, past 1 MB of scores a head) S = QKᵀ by BLAS, scale·softmax by a numba row loop "
            "and O = P V by BLAS while the block is in cache, no (B, H, L, L) array; saves the row "
            "log-sum-exp, and the backward recomputes P per block (dS = scale·P∘(dO Vᵀ − rowsum(dO∘O)))",
            _forward(attention_forward_cpu), saved_backward(attention_backward_cpu, "do")),
    Version("cpu_batched",
            "unfused: batched np.matmul over a task's images, the softmax in place on their scores; the "
            "(B, H, L, L) P and O kept for the backward, where D comes from dO∘O, a (Lq, d) product "
            "instead of the (Lq, Lk) one",
            _forward(attention_forward_batched), saved_backward(attention_backward_batched, "do")),
    Version("cuda_v1",
            "naive: S and P in global memory, one thread per element of each product, one block per "
            "softmax row (shared-memory max and sum); the backward starts from the saved P",
            _forward(attention_forward_cuda, version=1), saved_backward(attention_backward_cuda, "do")),
    Version("cuda_v2",
            "flash-style (Dao et al. 2022): one block per (b·h, 16-query tile) streams 16-key tiles of K "
            "and V through shared memory with an online softmax, so S and P never reach DRAM (v1 writes "
            "and re-reads the Lq×Lk matrix several times); saves only the row log-sum-exp. The backward "
            "recomputes P tile by tile: one kernel for dQ (over query tiles), one for dK and dV (over "
            "key tiles), no atomics",
            _forward(attention_forward_cuda, version=2), saved_backward(attention_backward_cuda, "do")),
)

BENCH = OpBench(
    "attention", _make_case, _reference, _flops, _bytes, VERSIONS,
    shapes=[dict(B=64, H=4, L=49, d=16), dict(B=64, H=4, L=196, d=16)],
    sim_shapes=[dict(B=1, H=2, L=5, d=3), dict(B=1, H=1, L=19, d=18)])  # 19 and 18: two tiles, two channel chunks
