"""Group normalisation (Wu & He 2018, "Group Normalization"), plain and fused with SiLU.

x has shape (N, C, *spatial); the trailing dims are one spatial dim of size S. The C channels form
G groups of C/G; each (sample n, group g) holds M = (C/G)·S values x_i with

    μ = (1/M) Σ_i x_i,    σ² = (1/M) Σ_i (x_i − μ)²    (two-pass or Welford: never E[x²] − E[x]²)
    x̂_i = (x_i − μ)·rstd,   rstd = 1/√(σ² + eps)
    y_i = γ_c x̂_i + β_c                                  (c = the channel of element i)

Backward, with upstream gradient dy and ĝ_i = dy_i·γ_c (means over the group):

    dx_i = rstd·(ĝ_i − mean(ĝ) − x̂_i·mean(ĝ·x̂))
    dγ_c = Σ_{n,s} dy·x̂,    dβ_c = Σ_{n,s} dy

The fused op of the U-Net ResNet block (Ho et al. 2020 use GroupNorm → SiLU → + time embedding):

    a = GN(x),   y = silu(a) + emb[n, c] = a·σ(a) + emb[n, c]
    da = dy·silu'(a) = dy·σ(a)·(1 + a·(1 − σ(a))),   demb[n, c] = Σ_s dy
    then the GroupNorm backward above with dy → da.

σ(a) = ½ + ½·tanh(a/2) everywhere outside the reference: it cannot overflow, unlike 1/(1 + e^−a).

Versions (one CUDA block per (n, g) row; NCHW makes each row's M values contiguous):
    reference: plain NumPy, the chain rule through μ and σ² step by step (the ground truth).
    cpu:       vectorised NumPy, closed-form backward, BLAS row dots for Σ(x−μ)² and Σ dy·x̂.
    cuda v1:   two-pass statistics: a shared-memory sum for μ, a second pass for Σ(x−μ)², then
               normalise — three reads of x.
    cuda v2:   Welford per thread merged with Chan's formula through shared memory: one read of x
               for the statistics — two reads of x in all, so it should beat v1 by ~1/3 of traffic.
    cuda backward (v1): one pass per channel for Σ dy and Σ dy·x̂ (the dβ, dγ partials of sample n,
               which also give the group's mean(ĝ), mean(ĝ·x̂)), one pass for dx; then a per-channel
               sum over the batch: a two-stage reduction, no atomics.
    fused:     the v2 forward and the backward with SiLU (and the emb add) in the same passes.
"""
import math

import numpy as np
from numba import float32

from ._bench import OpBench, Version
from ._cuda import SIMULATED, array_module, ceil_div, cuda, device_function, kernel


# ---- NumPy reference ---------------------------------------------------------------------------
def _channel_shape(x):
    """Shape that broadcasts a per-channel (C,) vector against x (N, C, *spatial)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def group_norm_reference(x, num_groups, weight, bias, eps=1e-5):
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


def group_norm_silu_reference(x, num_groups, weight, bias, emb=None, eps=1e-5):
    """y = silu(GN(x)) + emb[:, :, None, None],  silu(a) = a·σ(a)  (Elfwing et al. 2018)."""
    a = group_norm_reference(x, num_groups, weight, bias, eps)
    y = a / (1 + np.exp(-a))
    return y if emb is None else y + emb.reshape(emb.shape + (1,) * (x.ndim - 2))


def group_norm_silu_backward_reference(x, num_groups, weight, bias, dy, has_emb, eps=1e-5):
    """(dx, dγ, dβ, demb or None): da = dy·σ(a)(1 + a(1 − σ(a))) into the GroupNorm backward;
    demb = Σ_spatial dy."""
    a = group_norm_reference(x, num_groups, weight, bias, eps)
    sig = 1 / (1 + np.exp(-a))
    da = dy * sig * (1 + a * (1 - sig))
    dx, dweight, dbias = group_norm_backward_reference(x, num_groups, weight, da, eps)
    demb = dy.reshape(dy.shape[:2] + (-1,)).sum(axis=2) if has_emb else None
    return dx, dweight, dbias, demb


# ---- CPU implementation (the engine's `cpu` backend) -------------------------------------------
def _row_dot(a, b):
    """Σ_k a[..., k]·b[..., k] as a batch of BLAS dot products, without an a·b temporary."""
    return np.matmul(a[..., None, :], b[..., :, None])[..., 0, 0]


def _sigmoid(a):
    """σ(a) = ½ + ½·tanh(a/2) = 1/(1 + e^−a), without overflow for very negative a; one new array."""
    sig = np.multiply(a, 0.5)
    np.tanh(sig, out=sig)
    sig *= 0.5
    sig += 0.5
    return sig


def _normalise_cpu(x, num_groups, eps):
    """x̂ as (N, G, M) and rstd as (N, G, 1), two-pass statistics."""
    groups = x.reshape(x.shape[0], num_groups, -1)
    m = groups.shape[2]
    xhat = groups - groups.sum(axis=2, keepdims=True) / m
    var = _row_dot(xhat, xhat)[..., None] / m
    rstd = 1 / np.sqrt(var + x.dtype.type(eps))
    xhat *= rstd
    return xhat, rstd


def _affine_cpu(xhat, shape, weight, bias):
    """γ_c x̂ + β_c on (N, C, S)."""
    out = np.multiply(xhat.reshape(shape[0], shape[1], -1), weight[:, None])
    out += bias[:, None]
    return out


def group_norm_cpu(x, num_groups, weight, bias, eps=1e-5):
    """GroupNorm forward (Wu & He 2018) -> (y, saved); saved keeps x̂ and rstd for the backward."""
    xhat, rstd = _normalise_cpu(x, num_groups, eps)
    y = _affine_cpu(xhat, x.shape, weight, bias)
    return y.reshape(x.shape), {"xhat": xhat, "rstd": rstd, "weight": weight, "shape": x.shape}


def _norm_backward_cpu(xhat, rstd, weight, dnorm):
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


def group_norm_backward_cpu(saved, dy):
    """(dx, dγ, dβ) of group_norm_cpu by the closed form (see the module docstring)."""
    shape = saved["shape"]
    dnorm = dy.reshape(shape[0], shape[1], -1)
    dx, dweight, dbias = _norm_backward_cpu(saved["xhat"], saved["rstd"], saved["weight"], dnorm)
    return dx.reshape(shape), dweight, dbias


def group_norm_silu_cpu(x, num_groups, weight, bias, emb=None, eps=1e-5):
    """y = silu(GN(x)) + emb[:, :, None, None] -> (y, saved)."""
    xhat, rstd = _normalise_cpu(x, num_groups, eps)
    a = _affine_cpu(xhat, x.shape, weight, bias)
    a *= _sigmoid(a)
    if emb is not None:
        a += emb[:, :, None]
    saved = {"xhat": xhat, "rstd": rstd, "weight": weight, "bias": bias, "shape": x.shape,
             "has_emb": emb is not None}
    return a.reshape(x.shape), saved


def group_norm_silu_backward_cpu(saved, dy):
    """(dx, dγ, dβ, demb or None) of group_norm_silu_cpu; a = γx̂ + β is recomputed from the saved
    x̂ rather than stored (one (N, C, S) array less held between forward and backward)."""
    shape = saved["shape"]
    dy = dy.reshape(shape[0], shape[1], -1)
    a = _affine_cpu(saved["xhat"], shape, saved["weight"], saved["bias"])
    sig = _sigmoid(a)
    a *= 1 - sig
    a += 1
    a *= sig
    a *= dy  # da = dy·σ(a)·(1 + a(1 − σ(a)))
    dx, dweight, dbias = _norm_backward_cpu(saved["xhat"], saved["rstd"], saved["weight"], a)
    demb = dy.sum(axis=2) if saved["has_emb"] else None
    return dx.reshape(shape), dweight, dbias, demb


# ---- CUDA kernels ------------------------------------------------------------------------------
# One block per (sample, group) row. 256 threads (8 warps) keep enough loads in flight to stream a
# row of a few thousand floats, and a power of two lets the shared-memory trees halve cleanly. The
# simulator runs one Python thread per CUDA thread: 32 keeps its launches fast while still striding
# rows longer than the block and climbing a 5-level tree (the kernels read blockDim, not THREADS).
THREADS = 32 if SIMULATED else 256
# The per-channel sum over the batch: one thread per channel, consecutive channels coalesce.
CHANNEL_THREADS = 128

# float32 constants: a Python float literal would promote the arithmetic to float64.
ZERO, HALF, ONE = float32(0), float32(0.5), float32(1)



@device_function
def block_sum(buf, value):
    """Σ of `value` over the block's threads, returned to every thread (shared-memory tree)."""
    tid = cuda.threadIdx.x
    buf[tid] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            buf[tid] += buf[tid + stride]
        cuda.syncthreads()
        stride //= 2
    total = buf[0]
    cuda.syncthreads()  # every thread has read buf[0] before the next call overwrites it
    return total


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
def sigmoid(a):
    return HALF + HALF * math.tanh(HALF * a)  # = 1/(1 + e^−a), no overflow


@device_function
def normalise_row(x, weight, bias, groups, spatial, row, mean, rstd, y):
    """y[row] = γ_c·(x − μ)·rstd + β_c."""
    first_channel = (row % groups) * (weight.shape[0] // groups)
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


@kernel("void(float32[:,::1], float32[::1], float32[::1], float32[:,::1], float32, int32, int32, "
        "float32[:,::1], float32[::1], float32[::1])")
def group_norm_silu_forward(x, weight, bias, emb, eps, groups, spatial, y, mean, rstd):
    """y = silu(γx̂ + β) + emb[n, c] in the normalising pass; Welford statistics as v2."""
    row = cuda.blockIdx.x
    count_buf = cuda.shared.array(THREADS, float32)
    mean_buf = cuda.shared.array(THREADS, float32)
    m2_buf = cuda.shared.array(THREADS, float32)
    row_mean, row_rstd = welford_stats(x, row, count_buf, mean_buf, m2_buf, eps)
    n = row // groups
    first_channel = (row % groups) * (weight.shape[0] // groups)
    for j in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
        c = first_channel + j // spatial
        a = (x[row, j] - row_mean) * row_rstd * weight[c] + bias[c]
        y[row, j] = a * sigmoid(a) + emb[n, c]
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
    n = row // groups
    channels = weight.shape[0] // groups
    first_channel = (row % groups) * channels
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


@device_function
def silu_backward(d, x, row_mean, row_rstd, w, b):
    """da = d·silu'(a) at a = γ(x − μ)·rstd + β; returns (da, x̂)."""
    xhat = (x - row_mean) * row_rstd
    a = xhat * w + b
    sig = sigmoid(a)
    return d * sig * (ONE + a * (ONE - sig)), xhat


@kernel("void(float32[:,::1], float32[:,::1], float32[::1], float32[::1], float32[::1], float32[::1], "
        "int32, int32, float32[:,::1], float32[:,::1], float32[:,::1], float32[:,::1])")
def group_norm_silu_backward(x, dy, weight, bias, mean, rstd, groups, spatial, dx, dweight_part,
                             dbias_part, demb):
    """The backward v1 with dy → da = dy·silu'(a) recomputed in both passes; demb[n, c] = Σ_s dy
    from the same channel pass."""
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    buf = cuda.shared.array(THREADS, float32)
    n = row // groups
    channels = weight.shape[0] // groups
    first_channel = (row % groups) * channels
    row_mean, row_rstd = mean[row], rstd[row]
    sum_g, sum_gx = ZERO, ZERO
    for i in range(channels):
        c = first_channel + i
        acc_dy, acc_da, acc_dax = ZERO, ZERO, ZERO
        for j in range(i * spatial + tid, (i + 1) * spatial, cuda.blockDim.x):
            da, xhat = silu_backward(dy[row, j], x[row, j], row_mean, row_rstd, weight[c], bias[c])
            acc_dy += dy[row, j]
            acc_da += da
            acc_dax += da * xhat
        channel_dy = block_sum(buf, acc_dy)
        channel_da = block_sum(buf, acc_da)
        channel_dax = block_sum(buf, acc_dax)
        if tid == 0:
            demb[n, c], dbias_part[n, c], dweight_part[n, c] = channel_dy, channel_da, channel_dax
        sum_g += weight[c] * channel_da
        sum_gx += weight[c] * channel_dax
    inv_size = ONE / float32(x.shape[1])
    mean_g, mean_gx = sum_g * inv_size, sum_gx * inv_size
    for j in range(tid, x.shape[1], cuda.blockDim.x):
        c = first_channel + j // spatial
        da, xhat = silu_backward(dy[row, j], x[row, j], row_mean, row_rstd, weight[c], bias[c])
        dx[row, j] = row_rstd * (da * weight[c] - mean_g - xhat * mean_gx)


@kernel("void(float32[:,::1], float32[::1])")
def sum_over_batch(part, out):
    """out[c] = Σ_n part[n, c]: the second stage of the dγ, dβ reductions."""
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c < part.shape[1]:
        acc = ZERO
        for n in range(part.shape[0]):
            acc += part[n, c]
        out[c] = acc


# ---- launchers (NumPy arrays under the simulator, CuPy arrays on a GPU) ------------------------
FORWARD_VERSIONS = {1: group_norm_forward_v1, 2: group_norm_forward_v2}


def _require_float32(**arrays):
    bad = [name for name, a in arrays.items() if a.dtype != np.float32 or not a.flags.c_contiguous]
    if bad:
        raise ValueError(f"group_norm CUDA kernels need C-contiguous float32 arrays: {', '.join(bad)} "
                         f"{'is' if len(bad) == 1 else 'are'} not")


def _as_rows(x, num_groups, weight, bias, emb=None):
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
    _require_float32(x=x, weight=weight, bias=bias, **({} if emb is None else {"emb": emb}))
    spatial = x.size // (n * c)
    return x.reshape(n * num_groups, -1), spatial


def _grad_rows(saved, dy):
    if dy.shape != saved["shape"]:
        raise ValueError(f"group_norm backward: dy {dy.shape} must match x {saved['shape']}")
    _require_float32(dy=dy)
    return dy.reshape(saved["x"].shape)


def _sum_over_batch(part):
    out = array_module(part).empty(part.shape[1], np.float32)
    sum_over_batch[ceil_div(part.shape[1], CHANNEL_THREADS), CHANNEL_THREADS](part, out)
    return out


def _forward_outputs(rows):
    xp = array_module(rows)
    return xp.empty_like(rows), xp.empty(rows.shape[0], np.float32), xp.empty(rows.shape[0], np.float32)


def group_norm_cuda(x, num_groups, weight, bias, eps=1e-5, version=2):
    """GroupNorm forward on the GPU -> (y, saved); saved keeps x, μ and rstd per (n, g)."""
    if version not in FORWARD_VERSIONS:
        raise ValueError(f"group_norm_cuda: version must be one of {sorted(FORWARD_VERSIONS)}, got {version}")
    rows, spatial = _as_rows(x, num_groups, weight, bias)
    y, mean, rstd = _forward_outputs(rows)
    FORWARD_VERSIONS[version][rows.shape[0], THREADS](
        rows, weight, bias, np.float32(eps), np.int32(num_groups), np.int32(spatial), y, mean, rstd)
    saved = {"x": rows, "mean": mean, "rstd": rstd, "weight": weight, "groups": num_groups,
             "spatial": spatial, "shape": x.shape}
    return y.reshape(x.shape), saved


def group_norm_backward_cuda(saved, dy):
    """(dx, dγ, dβ) of group_norm_cuda (closed form, two-stage dγ/dβ reduction)."""
    rows, (n, c) = saved["x"], saved["shape"][:2]
    dy_rows = _grad_rows(saved, dy)
    xp = array_module(rows)
    dx, dweight_part, dbias_part = xp.empty_like(rows), xp.empty((n, c), np.float32), xp.empty((n, c), np.float32)
    group_norm_backward_v1[rows.shape[0], THREADS](
        rows, dy_rows, saved["weight"], saved["mean"], saved["rstd"], np.int32(saved["groups"]),
        np.int32(saved["spatial"]), dx, dweight_part, dbias_part)
    return dx.reshape(saved["shape"]), _sum_over_batch(dweight_part), _sum_over_batch(dbias_part)


def group_norm_silu_cuda(x, num_groups, weight, bias, emb=None, eps=1e-5):
    """y = silu(GN(x)) + emb[:, :, None, None] in one normalising pass -> (y, saved)."""
    rows, spatial = _as_rows(x, num_groups, weight, bias, emb)
    xp = array_module(x)
    # No emb adds zeros: N·C reads, nothing next to the N·C·S of x, and one kernel instead of two.
    emb_or_zeros = xp.zeros(x.shape[:2], np.float32) if emb is None else emb
    y, mean, rstd = _forward_outputs(rows)
    group_norm_silu_forward[rows.shape[0], THREADS](
        rows, weight, bias, emb_or_zeros, np.float32(eps), np.int32(num_groups), np.int32(spatial), y, mean, rstd)
    saved = {"x": rows, "mean": mean, "rstd": rstd, "weight": weight, "bias": bias, "groups": num_groups,
             "spatial": spatial, "shape": x.shape, "has_emb": emb is not None}
    return y.reshape(x.shape), saved


def group_norm_silu_backward_cuda(saved, dy):
    """(dx, dγ, dβ, demb or None) of group_norm_silu_cuda."""
    rows, (n, c) = saved["x"], saved["shape"][:2]
    dy_rows = _grad_rows(saved, dy)
    xp = array_module(rows)
    dx = xp.empty_like(rows)
    dweight_part, dbias_part, demb = (xp.empty((n, c), np.float32) for _ in range(3))
    group_norm_silu_backward[rows.shape[0], THREADS](
        rows, dy_rows, saved["weight"], saved["bias"], saved["mean"], saved["rstd"],
        np.int32(saved["groups"]), np.int32(saved["spatial"]), dx, dweight_part, dbias_part, demb)
    return (dx.reshape(saved["shape"]), _sum_over_batch(dweight_part), _sum_over_batch(dbias_part),
            demb if saved["has_emb"] else None)


# ---- benchmark description ---------------------------------------------------------------------
def _make_case(shape, xp, seed, with_emb=False):
    rng = np.random.default_rng(seed)
    n, c, h, w = shape["N"], shape["C"], shape["H"], shape["W"]
    host = {"x": rng.standard_normal((n, c, h, w)), "weight": 1 + 0.1 * rng.standard_normal(c),
            "bias": 0.1 * rng.standard_normal(c), "dy": rng.standard_normal((n, c, h, w))}
    if with_emb:
        host["emb"] = rng.standard_normal((n, c))
    case = {name: xp.asarray(a.astype(np.float32)) for name, a in host.items()}
    case["num_groups"] = shape["G"]
    return case


def _host64(a):
    """A float64 NumPy copy: the reference computes in float64, the ground truth for float32 runs."""
    return (a.get() if hasattr(a, "get") else a).astype(np.float64)


def _reference(case, direction):
    x, w, b, dy = (_host64(case[k]) for k in ("x", "weight", "bias", "dy"))
    if direction == "forward":
        return (group_norm_reference(x, case["num_groups"], w, b),)
    return group_norm_backward_reference(x, case["num_groups"], w, dy)


def _silu_reference(case, direction):
    x, w, b, emb, dy = (_host64(case[k]) for k in ("x", "weight", "bias", "emb", "dy"))
    if direction == "forward":
        return (group_norm_silu_reference(x, case["num_groups"], w, b, emb),)
    return group_norm_silu_backward_reference(x, case["num_groups"], w, b, dy, has_emb=True)


def _saved_once(case, key, forward):
    """The forward's saved arrays, made on the first call and kept in the case, so that repeated
    backward timings exclude the forward."""
    if key not in case:
        case[key] = forward(case)[1]
    return case[key]


def _args(case):
    return case["x"], case["num_groups"], case["weight"], case["bias"]


def _size(shape):
    return shape["N"] * shape["C"] * shape["H"] * shape["W"]


# flops per element: forward Σx 1, Σ(x−μ)² 3, normalise 4; backward channel pass 5, dx pass 7;
# SiLU adds ~5 forward (σ by tanh, a·σ, + emb) and ~9 per backward pass (a, σ, silu', da).
def _flops(shape, direction):
    return _size(shape) * (8 if direction == "forward" else 12)


def _silu_flops(shape, direction):
    return _size(shape) * (13 if direction == "forward" else 30)


def _bytes(shape, direction):
    return 4 * _size(shape) * (2 if direction == "forward" else 3)  # x, y  |  x, dy, dx


def _silu_bytes(shape, direction):
    return _bytes(shape, direction) + 4 * shape["N"] * shape["C"]  # + emb read | + demb written


_cpu_forward = lambda case: group_norm_cpu(*_args(case))  # noqa: E731
_cuda_forward = lambda case: group_norm_cuda(*_args(case))  # noqa: E731
_silu_cpu_forward = lambda case: group_norm_silu_cpu(*_args(case), case["emb"])  # noqa: E731
_silu_cuda_forward = lambda case: group_norm_silu_cuda(*_args(case), case["emb"])  # noqa: E731

SHAPES = [dict(N=64, C=32, H=28, W=28, G=8), dict(N=64, C=64, H=14, W=14, G=8), dict(N=64, C=64, H=7, W=7, G=8)]
SIM_SHAPES = [dict(N=2, C=6, H=3, W=5, G=3), dict(N=1, C=4, H=7, W=1, G=1)]

BENCH = OpBench(
    name="group_norm",
    make_case=_make_case,
    reference=_reference,
    flops=_flops,
    bytes=_bytes,
    versions=[
        Version("reference", "forward", "cpu", lambda case: (group_norm_reference(*_args(case)),),
                "plain NumPy in the inputs' dtype, step by step"),
        Version("reference", "backward", "cpu",
                lambda case: group_norm_backward_reference(*_args(case)[:3], case["dy"]),
                "chain rule through μ and σ² step by step"),
        Version("cpu", "forward", "cpu", lambda case: (_cpu_forward(case)[0],),
                "two-pass statistics, BLAS row dots, in-place normalise"),
        Version("cpu", "backward", "cpu",
                lambda case: group_norm_backward_cpu(_saved_once(case, "cpu_saved", _cpu_forward), case["dy"]),
                "closed form from the saved x̂: two row sums per group instead of the chain rule"),
        Version("cuda_v1", "forward", "cuda", lambda case: (group_norm_cuda(*_args(case), version=1)[0],),
                "one block per (n, g): two-pass shared-memory statistics, then normalise (3 reads of x)"),
        Version("cuda_v2", "forward", "cuda", lambda case: (group_norm_cuda(*_args(case), version=2)[0],),
                "Welford per thread + Chan merge: one read of x for the statistics (2 reads in all)"),
        Version("cuda_v1", "backward", "cuda",
                lambda case: group_norm_backward_cuda(_saved_once(case, "cuda_saved", _cuda_forward), case["dy"]),
                "per-channel Σdy, Σdy·x̂ give dγ/dβ partials and the group means; dx pass; batch sum"),
    ],
    shapes=SHAPES,
    sim_shapes=SIM_SHAPES,
    extra={"fused": OpBench(
        name="group_norm_silu",
        make_case=lambda shape, xp, seed: _make_case(shape, xp, seed, with_emb=True),
        reference=_silu_reference,
        flops=_silu_flops,
        bytes=_silu_bytes,
        versions=[
            Version("reference", "forward", "cpu",
                    lambda case: (group_norm_silu_reference(*_args(case), case["emb"]),), "GN, then SiLU, then + emb"),
            Version("reference", "backward", "cpu",
                    lambda case: group_norm_silu_backward_reference(*_args(case), case["dy"], has_emb=True),
                    "SiLU derivative, then the GroupNorm chain rule"),
            Version("cpu", "forward", "cpu", lambda case: (_silu_cpu_forward(case)[0],),
                    "SiLU and emb applied in place on the normalised array"),
            Version("cpu", "backward", "cpu",
                    lambda case: group_norm_silu_backward_cpu(_saved_once(case, "cpu_saved", _silu_cpu_forward),
                                                              case["dy"]),
                    "a recomputed from x̂, silu' in place, then the closed-form backward"),
            Version("cuda_v1", "forward", "cuda", lambda case: (_silu_cuda_forward(case)[0],),
                    "v2 forward with SiLU and + emb in the normalising pass: no extra round trip"),
            Version("cuda_v1", "backward", "cuda",
                    lambda case: group_norm_silu_backward_cuda(_saved_once(case, "cuda_saved", _silu_cuda_forward),
                                                               case["dy"]),
                    "silu' recomputed in both passes of the backward v1; demb from the channel pass"),
        ],
        shapes=SHAPES,
        sim_shapes=SIM_SHAPES,
    )},
)
