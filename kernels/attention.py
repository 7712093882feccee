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

Versions:
  reference: NumPy einsum, the equations above verbatim — the ground truth.
  cpu:       batched np.matmul (BLAS) in place on the score buffer; D from dO∘O, a (Lq, d) product
             instead of the (Lq, Lk) one.
  cuda v1:   naive — S in global memory (one thread per score), a row-softmax kernel (one block per row,
             shared-memory max and sum), then P V (one thread per output); backward from the saved P.
  cuda v2:   flash-style (Dao et al. 2022, "FlashAttention") — one block per (b, h, 16-query tile) streams
             16-key tiles of K and V through shared memory with an online softmax, so S and P never
             touch DRAM (v1 writes and re-reads the Lq×Lk matrix several times); saves only the row
             log-sum-exp L = m + log l. Backward recomputes P = exp(S − L) tile by tile: one kernel for
             dQ (parallel over query tiles), one for dK and dV (parallel over key tiles), no atomics.
"""
import functools
import math

import numpy as np
from numba import float32

from ._bench import OpBench, Version
from ._cuda import array_module, ceil_div, cuda, kernel


def _default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ---- NumPy reference ------------------------------------------------------------------------------
def _softmax_reference(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention_reference(q, k, v, scale=None):
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


# ---- CPU implementation ---------------------------------------------------------------------------
def attention_cpu(q, k, v, scale=None):
    """O = softmax(scale · Q Kᵀ) V with batched BLAS matmuls; the softmax runs in place on the scores.
    Returns (O, saved), keeping P and O for the backward."""
    scale = _default_scale(q, scale)
    p = np.matmul(q, k.swapaxes(-1, -2))
    p *= scale
    p -= p.max(axis=-1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    o = np.matmul(p, v)
    return o, {"q": q, "k": k, "v": v, "o": o, "p": p, "scale": scale}


def attention_backward_cpu(saved, do):
    """dV = Pᵀ dO, dS = P∘(dO Vᵀ − D) with D = rowsum(dO∘O) (equal to rowsum(dP∘P), and (Lq, d) work
    instead of (Lq, Lk)), dQ = scale·dS K, dK = scale·dSᵀ Q."""
    q, k, v, o, p, scale = (saved[name] for name in ("q", "k", "v", "o", "p", "scale"))
    dv = np.matmul(p.swapaxes(-1, -2), do)
    ds = np.matmul(do, v.swapaxes(-1, -2))  # dP, turned into dS in place
    ds -= (do * o).sum(axis=-1, keepdims=True)
    ds *= p
    dq = np.matmul(ds, k)
    dq *= scale
    dk = np.matmul(ds.swapaxes(-1, -2), q)
    dk *= scale
    return dq, dk, dv


# ---- CUDA v1: naive, S and P materialised in global memory ----------------------------------------
# Kernels see (B·H, L, d) views: the batch and head axes play the same role.
THREADS_PER_BLOCK = 128  # one thread per output element; 4 warps, enough blocks to fill every SM
ROW_THREADS = 32         # one block (one warp) per softmax row: rows are a few hundred long, 32 threads stride them
MATMUL_SIGNATURE = "void(float32[:,:,::1], float32[:,:,::1], float32, float32[:,:,::1])"
NEG_INF = float32(-math.inf)


@kernel(MATMUL_SIGNATURE)
def scaled_matmul_abt_kernel(a, b, scale, out):
    """out[n, i, j] = scale · Σ_c a[n, i, c] b[n, j, c]   (S = scale·Q Kᵀ, dP = dO Vᵀ)."""
    idx = cuda.grid(1)
    if idx < out.size:
        rows, cols = out.shape[1], out.shape[2]
        n, i, j = idx // (rows * cols), idx // cols % rows, idx % cols
        total = float32(0)
        for c in range(a.shape[2]):
            total += a[n, i, c] * b[n, j, c]
        out[n, i, j] = scale * total


@kernel(MATMUL_SIGNATURE)
def scaled_matmul_ab_kernel(a, b, scale, out):
    """out[n, i, c] = scale · Σ_j a[n, i, j] b[n, j, c]   (O = P V, dQ = scale·dS K)."""
    idx = cuda.grid(1)
    if idx < out.size:
        rows, cols = out.shape[1], out.shape[2]
        n, i, c = idx // (rows * cols), idx // cols % rows, idx % cols
        total = float32(0)
        for j in range(a.shape[2]):
            total += a[n, i, j] * b[n, j, c]
        out[n, i, c] = scale * total


@kernel(MATMUL_SIGNATURE)
def scaled_matmul_atb_kernel(a, b, scale, out):
    """out[n, j, c] = scale · Σ_i a[n, i, j] b[n, i, c]   (dV = Pᵀ dO, dK = scale·dSᵀ Q)."""
    idx = cuda.grid(1)
    if idx < out.size:
        rows, cols = out.shape[1], out.shape[2]
        n, j, c = idx // (rows * cols), idx // cols % rows, idx % cols
        total = float32(0)
        for i in range(a.shape[1]):
            total += a[n, i, j] * b[n, i, c]
        out[n, j, c] = scale * total


# The row kernels reduce through shared memory with a tree: log2(ROW_THREADS) halving steps, each
# ending in a barrier. (No device functions: numba-cuda compiles those only with a GPU present.)
@kernel("void(float32[:,::1])")
def softmax_rows_kernel(s):
    """In place, one block per row: s[r, :] ← exp(s[r, :] − max) / Σ exp(s[r, :] − max)."""
    partial = cuda.shared.array(ROW_THREADS, float32)
    row, t, n = cuda.blockIdx.x, cuda.threadIdx.x, s.shape[1]
    local_max = NEG_INF
    for j in range(t, n, ROW_THREADS):
        local_max = max(local_max, s[row, j])
    partial[t] = local_max
    cuda.syncthreads()
    stride = ROW_THREADS // 2
    while stride > 0:
        if t < stride:
            partial[t] = max(partial[t], partial[t + stride])
        cuda.syncthreads()
        stride //= 2
    row_max = partial[0]
    cuda.syncthreads()  # every thread has read the max before `partial` is reused for the sum

    local_sum = float32(0)
    for j in range(t, n, ROW_THREADS):
        e = math.exp(s[row, j] - row_max)
        s[row, j] = e
        local_sum += e
    partial[t] = local_sum
    cuda.syncthreads()
    stride = ROW_THREADS // 2
    while stride > 0:
        if t < stride:
            partial[t] += partial[t + stride]
        cuda.syncthreads()
        stride //= 2
    inverse_sum = float32(1) / partial[0]
    for j in range(t, n, ROW_THREADS):
        s[row, j] *= inverse_sum


@kernel("void(float32[:,::1], float32[:,::1])")
def softmax_rows_backward_kernel(p, dp):
    """In place, one block per row: dp[r, :] ← p[r, :] ∘ (dp[r, :] − Σ_j dp[r, j] p[r, j])  (dP → dS)."""
    partial = cuda.shared.array(ROW_THREADS, float32)
    row, t, n = cuda.blockIdx.x, cuda.threadIdx.x, p.shape[1]
    local_dot = float32(0)
    for j in range(t, n, ROW_THREADS):
        local_dot += dp[row, j] * p[row, j]
    partial[t] = local_dot
    cuda.syncthreads()
    stride = ROW_THREADS // 2
    while stride > 0:
        if t < stride:
            partial[t] += partial[t + stride]
        cuda.syncthreads()
        stride //= 2
    row_dot = partial[0]
    for j in range(t, n, ROW_THREADS):
        dp[row, j] = p[row, j] * (dp[row, j] - row_dot)


def _scaled_matmul(matmul_kernel, a, b, scale, out):
    matmul_kernel[ceil_div(out.size, THREADS_PER_BLOCK), THREADS_PER_BLOCK](a, b, float32(scale), out)
    return out


def _attention_v1(q, k, v, scale):
    xp = array_module(q)
    n, lq, lk, d = q.shape[0], q.shape[1], k.shape[1], q.shape[2]
    p = _scaled_matmul(scaled_matmul_abt_kernel, q, k, scale, xp.empty((n, lq, lk), np.float32))
    softmax_rows_kernel[n * lq, ROW_THREADS](p.reshape(n * lq, lk))
    o = _scaled_matmul(scaled_matmul_ab_kernel, p, v, 1.0, xp.empty((n, lq, d), np.float32))
    return o, {"p": p}


def _attention_backward_v1(q, k, v, do, scale, p):
    xp = array_module(q)
    n, lq, lk = p.shape
    dv = _scaled_matmul(scaled_matmul_atb_kernel, p, do, 1.0, xp.empty_like(v))
    ds = _scaled_matmul(scaled_matmul_abt_kernel, do, v, 1.0, xp.empty((n, lq, lk), np.float32))
    softmax_rows_backward_kernel[n * lq, ROW_THREADS](p.reshape(n * lq, lk), ds.reshape(n * lq, lk))
    dq = _scaled_matmul(scaled_matmul_ab_kernel, ds, k, scale, xp.empty_like(q))
    dk = _scaled_matmul(scaled_matmul_atb_kernel, ds, q, scale, xp.empty_like(k))
    return dq, dk, dv


# ---- CUDA v2: flash-style, tiles in shared memory, online softmax ---------------------------------
TILE = 16                    # queries and keys per tile; a block is TILE×TILE = 256 threads, one per score
MAX_HEAD_SIZE = 128          # bounds the shared tiles: 4 tiles of TILE×(128+1) floats stay under 48 KB
TILE_STRIDE = MAX_HEAD_SIZE + 1  # +1 pad: rows start in different banks, so 16 threads reading one
#                                  column of 16 different rows hit 16 different banks
CHANNELS_PER_THREAD = MAX_HEAD_SIZE // TILE  # a thread accumulates output channels t, t+16, ... (≤ 8)
# Tiles are loaded by all 256 threads striding over the tile's TILE·d floats, which are contiguous in
# DRAM (coalesced); rows past the end are zero-filled so they add nothing (and no garbage inf·0 = nan).


@kernel("void(float32[:,:,::1], float32[:,:,::1], float32[:,:,::1], float32, float32[:,:,::1], float32[:,::1])")
def flash_forward_kernel(q, k, v, scale, o, lse):
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
    n, q0 = cuda.blockIdx.x, cuda.blockIdx.y * TILE
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    thread = ty * TILE + tx
    n_queries, n_keys, d = q.shape[1], k.shape[1], q.shape[2]

    for idx in range(thread, TILE * d, TILE * TILE):
        r, c = idx // d, idx % d
        q_tile[r, c] = q[n, q0 + r, c] if q0 + r < n_queries else float32(0)
    for r in range(CHANNELS_PER_THREAD):
        acc[r] = float32(0)
    if tx == 0:
        row_max[ty] = NEG_INF
        row_sum[ty] = float32(0)
    for k0 in range(0, n_keys, TILE):
        cuda.syncthreads()  # the previous tiles are consumed before they are overwritten
        for idx in range(thread, TILE * d, TILE * TILE):
            r, c = idx // d, idx % d
            inside = k0 + r < n_keys
            k_tile[r, c] = k[n, k0 + r, c] if inside else float32(0)
            v_tile[r, c] = v[n, k0 + r, c] if inside else float32(0)
        cuda.syncthreads()
        score = NEG_INF  # keys past the end get probability exp(−inf) = 0
        if k0 + tx < n_keys:
            dot = float32(0)
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
            tile_sum = float32(0)
            for j in range(TILE):
                tile_sum += p_tile[ty, j]
            row_sum[ty] = rescale * row_sum[ty] + tile_sum
        for r in range(CHANNELS_PER_THREAD):
            c = tx + r * TILE
            if c < d:
                pv = float32(0)
                for j in range(TILE):
                    pv += p_tile[ty, j] * v_tile[j, c]
                acc[r] = rescale * acc[r] + pv
    cuda.syncthreads()  # the last tile's row_sum is visible to the whole row
    i = q0 + ty
    if i < n_queries:
        inverse_sum = float32(1) / row_sum[ty]
        for r in range(CHANNELS_PER_THREAD):
            c = tx + r * TILE
            if c < d:
                o[n, i, c] = acc[r] * inverse_sum
        if tx == 0:
            lse[n, i] = row_max[ty] + math.log(row_sum[ty])


@kernel("void(float32[:,:,::1], float32[:,:,::1], float32[:,::1])")
def row_dot_kernel(o, do, delta):
    """delta[n, i] = Σ_c o[n, i, c] do[n, i, c]  (D = rowsum(dO∘O)), one thread per row: O(L·d) work."""
    idx = cuda.grid(1)
    if idx < delta.size:
        n, i = idx // delta.shape[1], idx % delta.shape[1]
        total = float32(0)
        for c in range(o.shape[2]):
            total += o[n, i, c] * do[n, i, c]
        delta[n, i] = total


@kernel("void(float32[:,:,::1], float32[:,:,::1], float32[:,:,::1], float32[:,:,::1], float32[:,::1], "
        "float32[:,::1], float32, float32[:,:,::1])")
def flash_backward_dq_kernel(q, k, v, do, lse, delta, scale, dq):
    """Block (n, query tile), thread (query row ty, key tx). For each key tile: P = exp(scale·Q Kᵀ − lse),
    dS = P∘(dO Vᵀ − D), dQ += scale · dS K."""
    q_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    do_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    k_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    v_tile = cuda.shared.array((TILE, TILE_STRIDE), float32)
    ds_tile = cuda.shared.array((TILE, TILE), float32)
    acc = cuda.local.array(CHANNELS_PER_THREAD, float32)
    n, q0 = cuda.blockIdx.x, cuda.blockIdx.y * TILE
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    thread = ty * TILE + tx
    n_queries, n_keys, d = q.shape[1], k.shape[1], q.shape[2]
    i = q0 + ty

    for idx in range(thread, TILE * d, TILE * TILE):
        r, c = idx // d, idx % d
        inside = q0 + r < n_queries
        q_tile[r, c] = q[n, q0 + r, c] if inside else float32(0)
        do_tile[r, c] = do[n, q0 + r, c] if inside else float32(0)
    row_lse = lse[n, i] if i < n_queries else float32(0)
    row_delta = delta[n, i] if i < n_queries else float32(0)
    for r in range(CHANNELS_PER_THREAD):
        acc[r] = float32(0)
    for k0 in range(0, n_keys, TILE):
        cuda.syncthreads()  # the previous tiles are consumed before they are overwritten
        for idx in range(thread, TILE * d, TILE * TILE):
            r, c = idx // d, idx % d
            inside = k0 + r < n_keys
            k_tile[r, c] = k[n, k0 + r, c] if inside else float32(0)
            v_tile[r, c] = v[n, k0 + r, c] if inside else float32(0)
        cuda.syncthreads()
        ds = float32(0)
        if i < n_queries and k0 + tx < n_keys:
            qk = float32(0)
            dp = float32(0)
            for c in range(d):
                qk += q_tile[ty, c] * k_tile[tx, c]
                dp += do_tile[ty, c] * v_tile[tx, c]
            ds = math.exp(scale * qk - row_lse) * (dp - row_delta)
        ds_tile[ty, tx] = ds
        cuda.syncthreads()
        for r in range(CHANNELS_PER_THREAD):
            c = tx + r * TILE
            if c < d:
                for j in range(TILE):
                    acc[r] += ds_tile[ty, j] * k_tile[j, c]
    if i < n_queries:
        for r in range(CHANNELS_PER_THREAD):
            c = tx + r * TILE
            if c < d:
                dq[n, i, c] = scale * acc[r]


@kernel("void(float32[:,:,::1], float32[:,:,::1], float32[:,:,::1], float32[:,:,::1], float32[:,::1], "
        "float32[:,::1], float32, float32[:,:,::1], float32[:,:,::1])")
def flash_backward_dkdv_kernel(q, k, v, do, lse, delta, scale, dk, dv):
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
    n, k0 = cuda.blockIdx.x, cuda.blockIdx.y * TILE
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    thread = ty * TILE + tx
    n_queries, n_keys, d = q.shape[1], k.shape[1], q.shape[2]
    j = k0 + ty

    for idx in range(thread, TILE * d, TILE * TILE):
        r, c = idx // d, idx % d
        inside = k0 + r < n_keys
        k_tile[r, c] = k[n, k0 + r, c] if inside else float32(0)
        v_tile[r, c] = v[n, k0 + r, c] if inside else float32(0)
    for r in range(CHANNELS_PER_THREAD):
        dk_acc[r] = float32(0)
        dv_acc[r] = float32(0)
    for q0 in range(0, n_queries, TILE):
        cuda.syncthreads()  # the previous tiles are consumed before they are overwritten
        for idx in range(thread, TILE * d, TILE * TILE):
            r, c = idx // d, idx % d
            inside = q0 + r < n_queries
            q_tile[r, c] = q[n, q0 + r, c] if inside else float32(0)
            do_tile[r, c] = do[n, q0 + r, c] if inside else float32(0)
        if ty == 0 and q0 + tx < n_queries:
            lse_tile[tx] = lse[n, q0 + tx]
            delta_tile[tx] = delta[n, q0 + tx]
        cuda.syncthreads()
        p = float32(0)
        ds = float32(0)
        if q0 + tx < n_queries and j < n_keys:
            qk = float32(0)
            dp = float32(0)
            for c in range(d):
                qk += q_tile[tx, c] * k_tile[ty, c]
                dp += do_tile[tx, c] * v_tile[ty, c]
            p = math.exp(scale * qk - lse_tile[tx])
            ds = p * (dp - delta_tile[tx])
        p_tile[ty, tx] = p
        ds_tile[ty, tx] = ds
        cuda.syncthreads()
        for r in range(CHANNELS_PER_THREAD):
            c = tx + r * TILE
            if c < d:
                for i in range(TILE):
                    dv_acc[r] += p_tile[ty, i] * do_tile[i, c]
                    dk_acc[r] += ds_tile[ty, i] * q_tile[i, c]
    if j < n_keys:
        for r in range(CHANNELS_PER_THREAD):
            c = tx + r * TILE
            if c < d:
                dk[n, j, c] = scale * dk_acc[r]
                dv[n, j, c] = dv_acc[r]


def _attention_v2(q, k, v, scale):
    xp = array_module(q)
    n, lq = q.shape[0], q.shape[1]
    o, lse = xp.empty_like(q), xp.empty((n, lq), np.float32)
    flash_forward_kernel[(n, ceil_div(lq, TILE)), (TILE, TILE)](q, k, v, float32(scale), o, lse)
    return o, {"o": o, "lse": lse}


def _attention_backward_v2(q, k, v, do, scale, o, lse):
    xp = array_module(q)
    n, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    delta = xp.empty((n, lq), np.float32)
    row_dot_kernel[ceil_div(delta.size, THREADS_PER_BLOCK), THREADS_PER_BLOCK](o, do, delta)
    dq, dk, dv = xp.empty_like(q), xp.empty_like(k), xp.empty_like(v)
    flash_backward_dq_kernel[(n, ceil_div(lq, TILE)), (TILE, TILE)](q, k, v, do, lse, delta, float32(scale), dq)
    flash_backward_dkdv_kernel[(n, ceil_div(lk, TILE)), (TILE, TILE)](
        q, k, v, do, lse, delta, float32(scale), dk, dv)
    return dq, dk, dv


# ---- launchers ------------------------------------------------------------------------------------
def _check_inputs(q, k, v, version):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention needs q (B, H, Lq, d), k and v (B, H, Lk, d); got {q.shape}, {k.shape}, {v.shape}")
    if min(q.shape) < 1 or k.shape[2] < 1:
        raise ValueError(f"attention needs non-empty inputs; got q {q.shape}, k {k.shape}")
    if not (q.dtype == k.dtype == v.dtype == np.float32):
        raise ValueError(f"attention_cuda needs float32 inputs; got {q.dtype}, {k.dtype}, {v.dtype}")
    if version not in (1, 2):
        raise ValueError(f"attention_cuda has versions 1 and 2; got version={version}")
    if version == 2 and q.shape[3] > MAX_HEAD_SIZE:
        raise ValueError(f"attention_cuda v2 supports head size d ≤ {MAX_HEAD_SIZE}; got d = {q.shape[3]}")


def _heads_as_batch(a):
    """(B, H, L, d) → (B·H, L, d): a view of a C-contiguous array (made contiguous if it is not)."""
    a = array_module(a).ascontiguousarray(a)
    return a.reshape(a.shape[0] * a.shape[1], a.shape[2], a.shape[3])


def attention_cuda(q, k, v, scale=None, version=2):
    """O = softmax(scale · Q Kᵀ) V on the GPU (float32); returns (O, saved) for attention_backward_cuda."""
    _check_inputs(q, k, v, version)
    scale = _default_scale(q, scale)
    q3, k3, v3 = _heads_as_batch(q), _heads_as_batch(k), _heads_as_batch(v)
    forward = _attention_v1 if version == 1 else _attention_v2
    o, state = forward(q3, k3, v3, scale)
    saved = {"version": version, "shape": q.shape, "q": q3, "k": k3, "v": v3, "scale": scale, **state}
    return o.reshape(q.shape), saved


def attention_backward_cuda(saved, do):
    """(dQ, dK, dV) for the version that produced `saved`: v1 from the saved P, v2 by recomputation."""
    if do.shape != saved["shape"] or do.dtype != np.float32:
        raise ValueError(f"attention_backward_cuda needs a float32 dO of shape {saved['shape']}; "
                         f"got {do.dtype} {do.shape}")
    q, k, v, scale = saved["q"], saved["k"], saved["v"], saved["scale"]
    do3 = _heads_as_batch(do)
    if saved["version"] == 1:
        dq, dk, dv = _attention_backward_v1(q, k, v, do3, scale, saved["p"])
    else:
        dq, dk, dv = _attention_backward_v2(q, k, v, do3, scale, saved["o"], saved["lse"])
    b, h = saved["shape"][:2]
    return dq.reshape(b, h, *dq.shape[1:]), dk.reshape(b, h, *dk.shape[1:]), dv.reshape(b, h, *dv.shape[1:])


# ---- benchmark description ------------------------------------------------------------------------
def _host(a):
    return a.get() if hasattr(a, "get") else a


def _make_case(shape, xp, seed):
    rng = np.random.default_rng(seed)
    b, h, n, d = shape["B"], shape["H"], shape["L"], shape["d"]
    return {name: xp.asarray(rng.standard_normal((b, h, n, d), dtype=np.float32))
            for name in ("q", "k", "v", "do")}


def _reference(case, direction):
    q, k, v, do = (_host(case[name]).astype(np.float64) for name in ("q", "k", "v", "do"))
    if direction == "forward":
        return (attention_reference(q, k, v),)
    return attention_backward_reference(q, k, v, do)


def _flops(shape, direction):
    forward = 4 * shape["B"] * shape["H"] * shape["L"] ** 2 * shape["d"]  # Q Kᵀ and P V, 2 flops per MAC
    return forward if direction == "forward" else 2.5 * forward  # dV, dP, dQ, dK and the recomputed S


def _bytes(shape, direction):
    per_tensor = 4 * shape["B"] * shape["H"] * shape["L"] * shape["d"]
    return (4 if direction == "forward" else 7) * per_tensor  # q, k, v → o;  q, k, v, dO → dq, dk, dv


def _forward_run(forward):
    return lambda case: (forward(case["q"], case["k"], case["v"])[0],)


def _backward_run(name, forward, backward):
    """The forward runs once per case (its saved state cached in the case) so a backward timing is the
    backward alone."""
    def run(case):
        key = f"saved_{name}"
        if key not in case:
            case[key] = forward(case["q"], case["k"], case["v"])[1]
        return backward(case[key], case["do"])
    return run


def _reference_forward(case):
    return (attention_reference(case["q"], case["k"], case["v"]),)


def _reference_backward(case):
    return attention_backward_reference(case["q"], case["k"], case["v"], case["do"])


_cuda_v1 = functools.partial(attention_cuda, version=1)
_cuda_v2 = functools.partial(attention_cuda, version=2)
_IDEA_REFERENCE = "NumPy einsum of the equations: the ground truth"
_IDEA_CPU = "batched BLAS matmuls, softmax in place on the score buffer"
_IDEA_V1 = "naive: S and P in global memory, one thread per element, one block per softmax row"
_IDEA_V2 = "flash: K/V tiles in shared memory, online softmax, S and P never reach DRAM"

BENCH = OpBench(
    name="attention",
    make_case=_make_case,
    reference=_reference,
    flops=_flops,
    bytes=_bytes,
    versions=[
        Version("reference", "forward", "cpu", _reference_forward, _IDEA_REFERENCE),
        Version("reference", "backward", "cpu", _reference_backward, _IDEA_REFERENCE),
        Version("cpu", "forward", "cpu", _forward_run(attention_cpu), _IDEA_CPU),
        Version("cpu", "backward", "cpu", _backward_run("cpu", attention_cpu, attention_backward_cpu), _IDEA_CPU),
        Version("cuda_v1", "forward", "cuda", _forward_run(_cuda_v1), _IDEA_V1),
        Version("cuda_v1", "backward", "cuda", _backward_run("cuda_v1", _cuda_v1, attention_backward_cuda), _IDEA_V1),
        Version("cuda_v2", "forward", "cuda", _forward_run(_cuda_v2), _IDEA_V2),
        Version("cuda_v2", "backward", "cuda", _backward_run("cuda_v2", _cuda_v2, attention_backward_cuda), _IDEA_V2),
    ],
    shapes=[dict(B=64, H=4, L=49, d=16), dict(B=64, H=4, L=196, d=16)],
    sim_shapes=[dict(B=1, H=2, L=5, d=3), dict(B=1, H=1, L=19, d=18)],  # 19 and 18: two tiles, two channel chunks
)
