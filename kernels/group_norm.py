"""Group normalisation (Wu & He 2018, "Group Normalization").

x has shape (N, C, *spatial); the trailing dims are one spatial dim of size S. The C channels form
G groups of C/G; each (sample n, group g) holds M = (C/G)·S values x_i with

    μ = (1/M) Σ_i x_i,    σ² = (1/M) Σ_i (x_i − μ)²    (two-pass or Welford: never E[x²] − E[x]²)
    x̂_i = (x_i − μ)·rstd,   rstd = 1/√(σ² + eps)
    y_i = γ_c x̂_i + β_c                                  (c = the channel of element i)

Backward, with upstream gradient dy and ĝ_i = dy_i·γ_c (means over the group):

    dx_i = rstd·(ĝ_i − mean(ĝ) − x̂_i·mean(ĝ·x̂))
    dγ_c = Σ_{n,s} dy·x̂,    dβ_c = Σ_{n,s} dy

The versions (reference, cpu, cpu_numpy, cuda_v1, cuda_v2) are the rows of VERSIONS at the end of this file,
with their kernels ``group_norm_<pass>_v<N>``; ``python benchmarks/bench_kernels.py --list`` prints
them with the command that runs each one alone. kernels/group_norm_silu.py fuses SiLU (and the time
embedding) into these passes, with the statistics, closed-form backward and launch helpers below.
"""
import math

import numpy as np
from numba import float32, njit

from ._bench import OpBench, Version, host64, saved_backward
from ._cuda import (ONE, ZERO, array_module, block_sum, cuda, device_function, kernel, require_float32,
                    sum_columns)
from .cpu_threads import parallel_map, row_tasks


# ---- NumPy reference ---------------------------------------------------------------------------
def _channel_shape(x):
    """Shape that broadcasts a per-channel (C,) vector against x (N, C, *spatial)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def group_norm_forward_reference(x, num_groups, weight, bias, eps=1e-5):
    """y = (x − μ)/√(σ² + eps)·γ + β, μ and σ² per (sample, group)  (Wu & He 2018)."""
    groups = x.reshape(x.shape[0], num_groups, -1)
    mean = groups.mean(axis=2, keepdims=True)
    var = ((groups - mean) ** 2).mean(axis=2, keepdims=True)
    xhat = ((groups - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return xhat * weight.reshape(_channel_shape(x)) + bias.reshape(_channel_shape(x))


def group_norm_backward_reference(x, num_groups, weight, dy, eps=1e-5):
    """(dx, dγ, dβ) by the chain rule through x̂ = (x − μ)·(σ² + eps)^−½, μ and σ² (Ioffe & Szegedy
    2015, Sec. 3, applied per group)."""
    n = x.shape[0]
    groups = x.reshape(n, num_groups, -1)
    m = groups.shape[2]
    mean = groups.mean(axis=2, keepdims=True)
    xc = groups - mean
    var = (xc ** 2).mean(axis=2, keepdims=True)
    rstd = 1 / np.sqrt(var + eps)
    xhat = (xc * rstd).reshape(x.shape)

    dxhat = (dy * weight.reshape(_channel_shape(x))).reshape(groups.shape)
    dvar = (dxhat * xc).sum(axis=2, keepdims=True) * -0.5 * rstd ** 3
    dmean = -(dxhat * rstd).sum(axis=2, keepdims=True) + dvar * (-2 * xc).mean(axis=2, keepdims=True)
    dx = dxhat * rstd + dvar * 2 * xc / m + dmean / m

    spatial_and_batch = (0,) + tuple(range(2, x.ndim))
    return dx.reshape(x.shape), (dy * xhat).sum(axis=spatial_and_batch), dy.sum(axis=spatial_and_batch)


# ---- CPU implementation (the engine's `cpu` backend) -------------------------------------------
# float32 (training, sampling): numba passes over one (sample, group) row at a time, slices of samples
# on the pool of kernels/cpu_threads.py. One row of M = (C/G)·S contiguous floats (NCHW) is a few tens
# of KB: after its first read it is served from L1/L2, so a pass costs about one DRAM read of x (and
# dy) and one write of y (dx), where NumPy makes a pass and a temporary per operation (6x slower than
# PyTorch at N = 64, 28×28, C32). saved is x itself, μ and rstd. NumPy's passes below serve float64
# (the gradchecks) and are the `cpu_numpy` version row; kernels/group_norm_silu.py fuses SiLU into
# the same row loops.
def as_group_rows(x, num_groups):
    """x (N, C, *spatial) as C-contiguous (N, G, C/G, S): each (n, g) row of M values in one block."""
    n, c = x.shape[:2]
    return np.ascontiguousarray(x).reshape(n, num_groups, c // num_groups, -1)


@njit(inline="always", fastmath=True, error_model="numpy")
def row_moments(row, eps):
    """(μ, rstd) of one C-contiguous (C/G, S) row: two passes, μ first, then Σ(x − μ)² (never E[x²] −
    E[x]²), each over the row flattened (at 7×7, loops of S = 49 vectorised poorly: 2x slower)."""
    flat = row.reshape(row.size)
    m = float32(flat.size)
    total = float32(0)
    for i in range(flat.size):
        total += flat[i]
    mu = total / m
    total = float32(0)
    for i in range(flat.size):
        d = flat[i] - mu
        total += d * d
    return mu, float32(1) / np.sqrt(total / m + eps)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _forward_rows(x, weight, bias, eps, y, mean, rstd):
    """Per (n, g) row of x (N, G, Cg, S): μ and rstd, then y = x·(γ_c·rstd) + (β_c − μ·γ_c·rstd)."""
    n, g, cg, s = x.shape
    for b in range(n):
        for gi in range(g):
            mu, rs = row_moments(x[b, gi], eps)
            mean[b, gi], rstd[b, gi] = mu, rs
            for ci in range(cg):
                scale = weight[gi * cg + ci] * rs
                shift = bias[gi * cg + ci] - mu * scale
                xc, yc = x[b, gi, ci], y[b, gi, ci]
                for j in range(s):
                    yc[j] = xc[j] * scale + shift


@njit(inline="always", fastmath=True, error_model="numpy")
def closed_form_dx_row(x_row, grad_row, weight, first_channel, mu, rs, sum_g, sum_gx, dx_row):
    """dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) over one (C/G, S) row, ĝ = γ_c·grad (the gradient of the
    normalised output; dx_row may be grad_row itself), from Σĝ and Σĝ·x̂ over the row."""
    m = float32(x_row.shape[0] * x_row.shape[1])
    mean_g, mean_gx = sum_g / m, sum_gx / m
    for ci in range(x_row.shape[0]):
        gamma = weight[first_channel + ci]
        xc, gc, dxc = x_row[ci], grad_row[ci], dx_row[ci]
        for j in range(x_row.shape[1]):
            dxc[j] = rs * (gamma * gc[j] - mean_g - (xc[j] - mu) * rs * mean_gx)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _backward_rows(x, dy, weight, mean, rstd, dx, dweight_part, dbias_part):
    """Per (n, g) row, two passes: (1) the channel sums Σdy·x̂ (→ dγ) and Σdy (→ dβ) into (N, C)
    partials, which also give mean(ĝ) and mean(ĝ·x̂); (2) dx by closed_form_dx_row."""
    n, g, cg, s = x.shape
    for b in range(n):
        for gi in range(g):
            mu, rs = mean[b, gi], rstd[b, gi]
            sum_g, sum_gx = float32(0), float32(0)
            for ci in range(cg):
                c = gi * cg + ci
                xc, dyc = x[b, gi, ci], dy[b, gi, ci]
                s_dy, s_dyx = float32(0), float32(0)
                for j in range(s):
                    s_dy += dyc[j]
                    s_dyx += dyc[j] * ((xc[j] - mu) * rs)
                dweight_part[b, c], dbias_part[b, c] = s_dyx, s_dy
                sum_g += weight[c] * s_dy
                sum_gx += weight[c] * s_dyx
            closed_form_dx_row(x[b, gi], dy[b, gi], weight, gi * cg, mu, rs, sum_g, sum_gx, dx[b, gi])


def group_norm_forward_cpu(x, num_groups, weight, bias, eps=1e-5):
    """GroupNorm forward (Wu & He 2018) -> (y, saved)."""
    if x.dtype != np.float32:
        return group_norm_forward_numpy(x, num_groups, weight, bias, eps)
    rows = as_group_rows(x, num_groups)
    y = np.empty(rows.shape, np.float32)
    mean, rstd = np.empty(rows.shape[:2], np.float32), np.empty(rows.shape[:2], np.float32)
    weight32, bias32 = weight.astype(np.float32, copy=False), bias.astype(np.float32, copy=False)
    parallel_map(lambda part: _forward_rows(rows[part], weight32, bias32, np.float32(eps), y[part], mean[part],
                                            rstd[part]), row_tasks(len(rows), rows.size))
    return y.reshape(x.shape), {"x": rows, "mean": mean, "rstd": rstd, "weight": weight, "shape": x.shape}


def group_norm_backward_cpu(saved, dy):
    """(dx, dγ, dβ) of group_norm_forward_cpu by the closed form (see the module docstring)."""
    if "xhat" in saved:
        return group_norm_backward_numpy(saved, dy)
    rows, n, c = saved["x"], saved["shape"][0], saved["shape"][1]
    dx = np.empty(rows.shape, np.float32)
    dweight_part, dbias_part = np.empty((n, c), np.float32), np.empty((n, c), np.float32)
    dy_rows = np.ascontiguousarray(dy, np.float32).reshape(rows.shape)
    weight32 = saved["weight"].astype(np.float32, copy=False)
    parallel_map(lambda part: _backward_rows(rows[part], dy_rows[part], weight32, saved["mean"][part],
                                             saved["rstd"][part], dx[part], dweight_part[part], dbias_part[part]),
                 row_tasks(n, rows.size))
    return dx.reshape(saved["shape"]), dweight_part.sum(axis=0), dbias_part.sum(axis=0)


def _row_dot(a, b):
    """Σ_k a[..., k]·b[..., k] as a batch of BLAS dot products, without an a·b temporary."""
    return np.matmul(a[..., None, :], b[..., :, None])[..., 0, 0]


def normalise_cpu(x, num_groups, eps):
    """x̂ as (N, G, M) and rstd as (N, G, 1), two-pass statistics."""
    groups = x.reshape(x.shape[0], num_groups, -1)
    m = groups.shape[2]
    xhat = groups - groups.sum(axis=2, keepdims=True) / m
    var = _row_dot(xhat, xhat)[..., None] / m
    rstd = 1 / np.sqrt(var + x.dtype.type(eps))
    xhat *= rstd
    return xhat, rstd


def affine_cpu(xhat, shape, weight, bias):
    """γ_c x̂ + β_c on (N, C, S)."""
    out = np.multiply(xhat.reshape(shape[0], shape[1], -1), weight[:, None])
    out += bias[:, None]
    return out


def group_norm_forward_numpy(x, num_groups, weight, bias, eps=1e-5):
    """GroupNorm forward in NumPy passes (any float dtype) -> (y, saved); saved keeps x̂ and rstd."""
    xhat, rstd = normalise_cpu(x, num_groups, eps)
    y = affine_cpu(xhat, x.shape, weight, bias)
    return y.reshape(x.shape), {"xhat": xhat, "rstd": rstd, "weight": weight, "shape": x.shape}


def norm_backward_cpu(xhat, rstd, weight, dnorm):
    """(dx, dγ, dβ) from the gradient dnorm (N, C, S) of γx̂ + β: the closed form
    dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)), ĝ = dnorm·γ."""
    dweight = _row_dot(dnorm, xhat.reshape(dnorm.shape)).sum(axis=0)
    dbias = dnorm.sum(axis=(0, 2))
    ghat = np.multiply(dnorm, weight[:, None]).reshape(xhat.shape)
    m = xhat.shape[2]
    mean_g = ghat.sum(axis=2, keepdims=True) / m
    mean_gx = _row_dot(ghat, xhat)[..., None] / m
    ghat -= mean_g
    ghat -= xhat * mean_gx
    ghat *= rstd
    return ghat, dweight, dbias


def group_norm_backward_numpy(saved, dy):
    """(dx, dγ, dβ) of group_norm_forward_numpy by the closed form."""
    shape = saved["shape"]
    dnorm = dy.reshape(shape[0], shape[1], -1)
    dx, dweight, dbias = norm_backward_cpu(saved["xhat"], saved["rstd"], saved["weight"], dnorm)
    return dx.reshape(shape), dweight, dbias


# ---- CUDA kernels ------------------------------------------------------------------------------
# One block per (sample, group) row: NCHW makes each row's M values contiguous. 256 threads (8 warps)
# keep enough loads in flight to stream a row of a few thousand floats, and a power of two lets the
# shared-memory trees halve cleanly. The simulator runs the same 256 (slow, but then every level of
# the 8-level tree and every Welford/Chan merge a GPU runs is executed in the tests too).
THREADS = 256


@device_function
def row_channels(row, groups, channels):
    """(n, first channel, channels per group) of the (n, g) row of x seen as (N·G, M)."""
    per_group = channels // groups
    return row // groups, (row % groups) * per_group, per_group


@device_function
def two_pass_stats(x, row, buf, eps):
    """(μ, rstd) of x[row]: a block sum for μ, then a second pass for Σ(x − μ)²."""
    size = x.shape[1]
    inv_size = ONE / float32(size)
    acc = ZERO
    for j in range(cuda.threadIdx.x, size, cuda.blockDim.x):
        acc += x[row, j]
    mean = block_sum(buf, acc) * inv_size
    acc = ZERO
    for j in range(cuda.threadIdx.x, size, cuda.blockDim.x):
        d = x[row, j] - mean
        acc += d * d
    var = block_sum(buf, acc) * inv_size
    return mean, ONE / math.sqrt(var + eps)


@device_function
def welford_stats(x, row, count_buf, mean_buf, m2_buf, eps):
    """(μ, rstd) of x[row] in one pass: Welford (1962) per thread, then Chan et al. (1979) merges
    pairs (count, mean, M2) up a shared-memory tree: δ = μ_b − μ_a,
    μ = μ_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n."""
    tid = cuda.threadIdx.x
    count, mean, m2 = ZERO, ZERO, ZERO
    for j in range(tid, x.shape[1], cuda.blockDim.x):
        value = x[row, j]
        count += ONE
        delta = value - mean
        mean += delta / count
        m2 += delta * (value - mean)
    count_buf[tid], mean_buf[tid], m2_buf[tid] = count, mean, m2
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride and count_buf[tid + stride] > 0:  # threads past the row's end hold nothing
            n_a, n_b = count_buf[tid], count_buf[tid + stride]
            n = n_a + n_b
            delta = mean_buf[tid + stride] - mean_buf[tid]
            mean_buf[tid] += delta * (n_b / n)
            m2_buf[tid] += m2_buf[tid + stride] + delta * delta * (n_a * n_b / n)
            count_buf[tid] = n
        cuda.syncthreads()
        stride //= 2
    return mean_buf[0], ONE / math.sqrt(m2_buf[0] / count_buf[0] + eps)


@device_function
def normalise_row(x, weight, bias, groups, spatial, row, mean, rstd, y):
    """y[row] = γ_c·(x − μ)·rstd + β_c."""
    _, first_channel, _ = row_channels(row, groups, weight.shape[0])
    for j in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
        c = first_channel + j // spatial
        y[row, j] = (x[row, j] - mean) * rstd * weight[c] + bias[c]


FORWARD_SIGNATURE = ("void(float32[:,::1], float32[::1], float32[::1], float32, int32, int32, "
                     "float32[:,::1], float32[::1], float32[::1])")


@kernel(FORWARD_SIGNATURE)
def group_norm_forward_v1(x, weight, bias, eps, groups, spatial, y, mean, rstd):
    """x, y: (N·G, M) rows; mean, rstd: (N·G,). Two-pass statistics, then normalise."""
    row = cuda.blockIdx.x
    buf = cuda.shared.array(THREADS, float32)
    row_mean, row_rstd = two_pass_stats(x, row, buf, eps)
    normalise_row(x, weight, bias, groups, spatial, row, row_mean, row_rstd, y)
    if cuda.threadIdx.x == 0:
        mean[row], rstd[row] = row_mean, row_rstd


@kernel(FORWARD_SIGNATURE)
def group_norm_forward_v2(x, weight, bias, eps, groups, spatial, y, mean, rstd):
    """As v1, with Welford statistics: one read of x for μ and σ² instead of two."""
    row = cuda.blockIdx.x
    count_buf = cuda.shared.array(THREADS, float32)
    mean_buf = cuda.shared.array(THREADS, float32)
    m2_buf = cuda.shared.array(THREADS, float32)
    row_mean, row_rstd = welford_stats(x, row, count_buf, mean_buf, m2_buf, eps)
    normalise_row(x, weight, bias, groups, spatial, row, row_mean, row_rstd, y)
    if cuda.threadIdx.x == 0:
        mean[row], rstd[row] = row_mean, row_rstd


@kernel("void(float32[:,::1], float32[:,::1], float32[::1], float32[::1], float32[::1], int32, int32, "
        "float32[:,::1], float32[:,::1], float32[:,::1])")
def group_norm_backward_v1(x, dy, weight, mean, rstd, groups, spatial, dx, dweight_part, dbias_part):
    """dx of one (n, g) row, and the dγ, dβ partials of sample n: (N, C) arrays summed over n later.
    Σ_group ĝ = Σ_c γ_c·Σ_s dy and Σ_group ĝx̂ = Σ_c γ_c·Σ_s dy·x̂ come from the same partials."""
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    buf = cuda.shared.array(THREADS, float32)
    n, first_channel, channels = row_channels(row, groups, weight.shape[0])
    row_mean, row_rstd = mean[row], rstd[row]
    sum_g, sum_gx = ZERO, ZERO
    for i in range(channels):
        c = first_channel + i
        acc_dy, acc_dyx = ZERO, ZERO
        for j in range(i * spatial + tid, (i + 1) * spatial, cuda.blockDim.x):
            d = dy[row, j]
            acc_dy += d
            acc_dyx += d * (x[row, j] - row_mean) * row_rstd
        channel_dy = block_sum(buf, acc_dy)
        channel_dyx = block_sum(buf, acc_dyx)
        if tid == 0:
            dbias_part[n, c], dweight_part[n, c] = channel_dy, channel_dyx
        sum_g += weight[c] * channel_dy
        sum_gx += weight[c] * channel_dyx
    inv_size = ONE / float32(x.shape[1])
    mean_g, mean_gx = sum_g * inv_size, sum_gx * inv_size
    for j in range(tid, x.shape[1], cuda.blockDim.x):
        xhat = (x[row, j] - row_mean) * row_rstd
        dx[row, j] = row_rstd * (dy[row, j] * weight[first_channel + j // spatial] - mean_g - xhat * mean_gx)


# ---- launchers (NumPy arrays under the simulator, CuPy arrays on a GPU) ------------------------
def as_rows(x, num_groups, weight, bias, emb=None):
    """Validate the arguments and view x (N, C, *spatial) as its (N·G, M) rows; also returns S."""
    if x.ndim < 2 or x.size == 0:
        raise ValueError(f"group_norm needs a non-empty x of shape (N, C, *spatial), got {x.shape}")
    n, c = x.shape[:2]
    if num_groups < 1 or c % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups} must divide the {c} channels of x {x.shape}")
    if weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"group_norm: weight {weight.shape} and bias {bias.shape} must be ({c},)")
    if emb is not None and emb.shape != (n, c):
        raise ValueError(f"group_norm_silu: emb {emb.shape} must be (N, C) = {(n, c)}")
    require_float32("group_norm", x=x, weight=weight, bias=bias, **({} if emb is None else {"emb": emb}))
    spatial = x.size // (n * c)
    return x.reshape(n * num_groups, -1), spatial


def grad_rows(saved, dy):
    if dy.shape != saved["shape"]:
        raise ValueError(f"group_norm backward: dy {dy.shape} must match x {saved['shape']}")
    require_float32("group_norm", dy=dy)
    return dy.reshape(saved["x"].shape)


def forward_outputs(rows):
    xp = array_module(rows)
    return xp.empty_like(rows), xp.empty(rows.shape[0], np.float32), xp.empty(rows.shape[0], np.float32)


def group_norm_forward_cuda(x, num_groups, weight, bias, eps=1e-5, version=2):
    """GroupNorm forward on the GPU -> (y, saved); saved keeps x, μ and rstd per (n, g)."""
    if version not in BENCH.cuda_versions:
        raise ValueError(f"group_norm CUDA: version must be one of {BENCH.cuda_versions}, got {version}")
    rows, spatial = as_rows(x, num_groups, weight, bias)
    y, mean, rstd = forward_outputs(rows)
    forward_kernel = group_norm_forward_v1 if version == 1 else group_norm_forward_v2
    forward_kernel[rows.shape[0], THREADS](
        rows, weight, bias, np.float32(eps), np.int32(num_groups), np.int32(spatial), y, mean, rstd)
    saved = {"x": rows, "mean": mean, "rstd": rstd, "weight": weight, "groups": num_groups,
             "spatial": spatial, "shape": x.shape}
    return y.reshape(x.shape), saved


def group_norm_backward_cuda(saved, dy):
    """(dx, dγ, dβ) of group_norm_forward_cuda (either version): the closed form, and dγ, dβ by a
    two-stage reduction (per sample, then over the batch)."""
    rows, (n, c) = saved["x"], saved["shape"][:2]
    dy_rows = grad_rows(saved, dy)
    xp = array_module(rows)
    dx, dweight_part, dbias_part = xp.empty_like(rows), xp.empty((n, c), np.float32), xp.empty((n, c), np.float32)
    group_norm_backward_v1[rows.shape[0], THREADS](
        rows, dy_rows, saved["weight"], saved["mean"], saved["rstd"], np.int32(saved["groups"]),
        np.int32(saved["spatial"]), dx, dweight_part, dbias_part)
    return dx.reshape(saved["shape"]), sum_columns(dweight_part), sum_columns(dbias_part)




# ---- the version table and the benchmark description (shared with kernels/group_norm_silu.py) ----
def make_case(shape, xp, seed, with_emb=False):
    rng = np.random.default_rng(seed)
    n, c, h, w = shape["N"], shape["C"], shape["H"], shape["W"]
    host = {"x": rng.standard_normal((n, c, h, w)), "weight": 1 + 0.1 * rng.standard_normal(c),
            "bias": 0.1 * rng.standard_normal(c), "dy": rng.standard_normal((n, c, h, w))}
    if with_emb:
        host["emb"] = rng.standard_normal((n, c))
    case = {name: xp.asarray(a.astype(np.float32)) for name, a in host.items()}
    case["num_groups"] = shape["G"]
    return case


def case_args(case):
    """(x, num_groups, weight, bias) of a case."""
    return case["x"], case["num_groups"], case["weight"], case["bias"]


def elements(shape):
    return shape["N"] * shape["C"] * shape["H"] * shape["W"]


def traffic_bytes(shape, direction):
    return 4 * elements(shape) * (2 if direction == "forward" else 3)  # x, y  |  x, dy, dx


def _reference(case, direction):
    x, w, b, dy = (host64(case[k]) for k in ("x", "weight", "bias", "dy"))
    if direction == "forward":
        return (group_norm_forward_reference(x, case["num_groups"], w, b),)
    return group_norm_backward_reference(x, case["num_groups"], w, dy)


def _flops(shape, direction):
    """Per element: forward Σx 1, Σ(x−μ)² 3, normalise 4; backward channel pass 5, dx pass 7."""
    return elements(shape) * (8 if direction == "forward" else 12)


def _forward(fn, **options):
    return lambda case: fn(*case_args(case), **options)


VERSIONS = (
    Version("reference", "plain NumPy, the chain rule through μ and σ² step by step: the ground truth",
            lambda case: (group_norm_forward_reference(*case_args(case)), None),
            lambda case, _: group_norm_backward_reference(*case_args(case)[:3], case["dy"])),
    Version("cpu",
            "numba passes over one (n, g) row at a time, samples on the thread pool: two-pass statistics, "
            "then y = x·(γ·rstd) + (β − μ·γ·rstd); the closed-form backward in two passes per row from "
            "the saved x, μ and rstd (two channel sums per group, not the chain rule)",
            _forward(group_norm_forward_cpu), saved_backward(group_norm_backward_cpu)),
    Version("cpu_numpy",
            "vectorised NumPy (any float dtype: the engine's path for float64): two-pass statistics with "
            "BLAS row dots for Σ(x−μ)², normalised in place; the closed-form backward from the saved x̂",
            _forward(group_norm_forward_numpy), saved_backward(group_norm_backward_numpy)),
    Version("cuda_v1",
            "one block per (n, g) row: a shared-memory sum for μ, a second pass for Σ(x−μ)², then "
            "normalise (three reads of x). Backward: one pass per channel for Σdy and Σdy·x̂ (the dβ, dγ "
            "partials of sample n, which also give mean(ĝ) and mean(ĝ·x̂)), one pass for dx, then a "
            "column sum over the batch (no atomics)",
            _forward(group_norm_forward_cuda, version=1), saved_backward(group_norm_backward_cuda)),
    Version("cuda_v2",
            "Welford per thread, merged up the tree by Chan's formula: one read of x for the statistics, "
            "two in all (a third less traffic than v1). Forward only: the backward is v1's",
            _forward(group_norm_forward_cuda, version=2)),
)

SHAPES = [dict(N=64, C=32, H=28, W=28, G=8), dict(N=64, C=64, H=14, W=14, G=8), dict(N=64, C=64, H=7, W=7, G=8)]
SIM_SHAPES = [dict(N=2, C=6, H=3, W=5, G=3), dict(N=1, C=4, H=7, W=1, G=1),
              dict(N=1, C=2, H=13, W=11, G=1)]  # a row of 286 > THREADS: each thread strides it

BENCH = OpBench("group_norm", make_case, _reference, _flops, traffic_bytes, VERSIONS, SHAPES, SIM_SHAPES)
