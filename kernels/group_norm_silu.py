"""GroupNorm fused with SiLU and the time embedding: the ResNet block's GroupNorm → SiLU → + emb
(Ho et al. 2020) in the passes of kernels/group_norm.py, which has the GroupNorm maths:

    a = GN(x),   y = silu(a) + emb[n, c] = a·σ(a) + emb[n, c]
    da = dy·silu'(a) = dy·σ(a)·(1 + a·(1 − σ(a))),   demb[n, c] = Σ_s dy
    then the GroupNorm backward with dy → da.

σ(a) = ½ + ½·tanh(a/2) everywhere outside the reference: it cannot overflow, unlike 1/(1 + e^−a).

The versions (reference, cpu, cpu_numpy, cuda_v1) are the rows of VERSIONS at the end of this file, with their
kernels ``group_norm_silu_<pass>_v<N>``; ``python benchmarks/bench_kernels.py --list`` prints them
with the command that runs each one alone.
"""
import math

import numpy as np
from numba import float32, njit

from ._bench import OpBench, Version, host64, saved_backward
from ._cuda import HALF, ONE, ZERO, array_module, block_sum3, cuda, device_function, kernel, sum_columns
from .group_norm import (SHAPES, SIM_SHAPES, THREADS, affine_cpu, as_group_rows, as_rows, case_args,
                         closed_form_dx_row, elements, forward_outputs, grad_rows, group_norm_backward_reference,
                         group_norm_forward_reference, make_case, norm_backward_cpu, normalise_cpu, row_channels,
                         row_moments, traffic_bytes, welford_stats)
from .cpu_threads import parallel_map, row_tasks
from .vector_math import sigmoid32


# ---- NumPy reference ---------------------------------------------------------------------------
def group_norm_silu_forward_reference(x, num_groups, weight, bias, emb=None, eps=1e-5):
    """y = silu(GN(x)) + emb[:, :, None, None],  silu(a) = a·σ(a)  (Elfwing et al. 2018)."""
    a = group_norm_forward_reference(x, num_groups, weight, bias, eps)
    y = a / (1 + np.exp(-a))
    return y if emb is None else y + emb.reshape(emb.shape + (1,) * (x.ndim - 2))


def group_norm_silu_backward_reference(x, num_groups, weight, bias, dy, has_emb, eps=1e-5):
    """(dx, dγ, dβ, demb or None): da = dy·σ(a)(1 + a(1 − σ(a))) into the GroupNorm backward;
    demb = Σ_spatial dy."""
    a = group_norm_forward_reference(x, num_groups, weight, bias, eps)
    sig = 1 / (1 + np.exp(-a))
    da = dy * sig * (1 + a * (1 - sig))
    dx, dweight, dbias = group_norm_backward_reference(x, num_groups, weight, da, eps)
    demb = dy.reshape(dy.shape[:2] + (-1,)).sum(axis=2) if has_emb else None
    return dx, dweight, dbias, demb


# ---- CPU implementation (the engine's `cpu` backend) -------------------------------------------
# float32 (training, sampling): fused numba passes over one (sample, group) row at a time. NumPy's
# passes below serve float64 (the gradchecks) and are the `cpu_numpy` version row.
def group_norm_silu_forward_cpu(x, num_groups, weight, bias, emb=None, eps=1e-5):
    """y = silu(GN(x)) + emb[:, :, None, None] -> (y, saved)."""
    if x.dtype != np.float32:
        return group_norm_silu_forward_numpy(x, num_groups, weight, bias, emb, eps)
    n, c = x.shape[:2]
    rows = as_group_rows(x, num_groups)
    y = np.empty(rows.shape, np.float32)
    mean, rstd = np.empty((n, num_groups), np.float32), np.empty((n, num_groups), np.float32)
    emb_rows = np.zeros((1, 1), np.float32) if emb is None else np.ascontiguousarray(emb, np.float32).reshape(n, c)
    weight32, bias32, has_emb = weight.astype(np.float32, copy=False), bias.astype(np.float32, copy=False), emb is not None
    parallel_map(lambda part: _fused_forward_rows(
        rows[part], weight32, bias32, emb_rows[part] if has_emb else emb_rows, has_emb, np.float32(eps), y[part],
        mean[part], rstd[part]), row_tasks(n, rows.size))
    saved = {"x": rows, "mean": mean, "rstd": rstd, "weight": weight, "bias": bias, "shape": x.shape,
             "has_emb": emb is not None}
    return y.reshape(x.shape), saved


def group_norm_silu_backward_cpu(saved, dy):
    """(dx, dγ, dβ, demb or None) of group_norm_silu_forward_cpu."""
    if "xhat" in saved:
        return group_norm_silu_backward_numpy(saved, dy)
    rows = saved["x"]
    n, c = saved["shape"][:2]
    dx = np.empty(rows.shape, np.float32)
    dweight_part, dbias_part, demb = (np.empty((n, c), np.float32) for _ in range(3))
    dy_rows = np.ascontiguousarray(dy, np.float32).reshape(rows.shape)
    weight32, bias32 = saved["weight"].astype(np.float32, copy=False), saved["bias"].astype(np.float32, copy=False)
    parallel_map(lambda part: _fused_backward_rows(
        rows[part], dy_rows[part], weight32, bias32, saved["mean"][part], saved["rstd"][part], dx[part],
        dweight_part[part], dbias_part[part], demb[part]), row_tasks(n, rows.size))
    return (dx.reshape(saved["shape"]), dweight_part.sum(axis=0), dbias_part.sum(axis=0),
            demb if saved["has_emb"] else None)


# The row loops of kernels/group_norm.py's CPU path (its comment says why rows), with SiLU and + emb
# fused in: the NumPy version makes a dozen full-size passes and temporaries. saved is x itself (no
# copy), μ and rstd; sigmoid32 keeps the exp vectorised (kernels/vector_math.py).
@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _fused_forward_rows(x, weight, bias, emb, has_emb, eps, y, mean, rstd):
    """Per (n, g) row of x (N, G, Cg, S): two-pass μ and σ², then y = a·σ(a) + emb[n, c] at
    a = x·(γ_c·rstd) + (β_c − μ·γ_c·rstd); μ and rstd (N, G) are written for the backward."""
    n, g, cg, s = x.shape
    for b in range(n):
        for gi in range(g):
            xr = x[b, gi]
            mu, rs = row_moments(xr, eps)
            mean[b, gi], rstd[b, gi] = mu, rs
            for ci in range(cg):
                c = gi * cg + ci
                scale = weight[c] * rs
                shift = bias[c] - mu * scale
                e = emb[b, c] if has_emb else float32(0)
                xc, yc = xr[ci], y[b, gi, ci]
                for j in range(s):
                    a = xc[j] * scale + shift
                    yc[j] = a * sigmoid32(a) + e


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _fused_backward_rows(x, dy, weight, bias, mean, rstd, dx, dweight_part, dbias_part, demb):
    """Per (n, g) row, two passes: (1) a and σ(a) recomputed, da = dy·σ(a)(1 + a(1 − σ(a))) kept in dx,
    the channel sums Σ da·x̂ (→ dγ), Σ da (→ dβ) and Σ dy (→ demb) into (N, C) partials; (2) the GroupNorm
    closed form (closed_form_dx_row) with ĝ = γ_c·da, in place."""
    n, g, cg, s = x.shape
    for b in range(n):
        for gi in range(g):
            mu, rs = mean[b, gi], rstd[b, gi]
            sum_g, sum_gx = float32(0), float32(0)
            for ci in range(cg):
                c = gi * cg + ci
                scale = weight[c] * rs
                shift = bias[c] - mu * scale
                xc, dyc, dac = x[b, gi, ci], dy[b, gi, ci], dx[b, gi, ci]
                s_da, s_dax, s_dy = float32(0), float32(0), float32(0)
                for j in range(s):
                    a = xc[j] * scale + shift
                    sig = sigmoid32(a)
                    da = dyc[j] * sig * (float32(1) + a * (float32(1) - sig))
                    dac[j] = da
                    s_da += da
                    s_dax += da * ((xc[j] - mu) * rs)
                    s_dy += dyc[j]
                dweight_part[b, c], dbias_part[b, c], demb[b, c] = s_dax, s_da, s_dy
                sum_g += weight[c] * s_da
                sum_gx += weight[c] * s_dax
            closed_form_dx_row(x[b, gi], dx[b, gi], weight, gi * cg, mu, rs, sum_g, sum_gx, dx[b, gi])  # da → dx in place


def sigmoid_cpu(a):
    """σ(a) = ½ + ½·tanh(a/2) = 1/(1 + e^−a), without overflow for very negative a; one new array."""
    sig = np.multiply(a, 0.5)
    np.tanh(sig, out=sig)
    sig *= 0.5
    sig += 0.5
    return sig


def group_norm_silu_forward_numpy(x, num_groups, weight, bias, emb=None, eps=1e-5):
    """y = silu(GN(x)) + emb[:, :, None, None] -> (y, saved), in NumPy passes (any float dtype)."""
    xhat, rstd = normalise_cpu(x, num_groups, eps)
    a = affine_cpu(xhat, x.shape, weight, bias)
    a *= sigmoid_cpu(a)
    if emb is not None:
        a += emb[:, :, None]
    saved = {"xhat": xhat, "rstd": rstd, "weight": weight, "bias": bias, "shape": x.shape,
             "has_emb": emb is not None}
    return a.reshape(x.shape), saved


def group_norm_silu_backward_numpy(saved, dy):
    """(dx, dγ, dβ, demb or None) of group_norm_silu_forward_numpy; a = γx̂ + β is recomputed from the
    saved x̂ rather than stored (one (N, C, S) array less held between forward and backward)."""
    shape = saved["shape"]
    dy = dy.reshape(shape[0], shape[1], -1)
    a = affine_cpu(saved["xhat"], shape, saved["weight"], saved["bias"])
    sig = sigmoid_cpu(a)
    a *= 1 - sig
    a += 1
    a *= sig
    a *= dy  # da = dy·σ(a)·(1 + a(1 − σ(a)))
    dx, dweight, dbias = norm_backward_cpu(saved["xhat"], saved["rstd"], saved["weight"], a)
    demb = dy.sum(axis=2) if saved["has_emb"] else None
    return dx.reshape(shape), dweight, dbias, demb


# ---- CUDA kernels ------------------------------------------------------------------------------
# One block per (sample, group) row, THREADS threads, as in kernels/group_norm.py.
@device_function
def sigmoid(a):
    return HALF + HALF * math.tanh(HALF * a)  # = 1/(1 + e^−a), no overflow


@kernel("void(float32[:,::1], float32[::1], float32[::1], float32[:,::1], float32, int32, int32, "
        "float32[:,::1], float32[::1], float32[::1])")
def group_norm_silu_forward_v1(x, weight, bias, emb, eps, groups, spatial, y, mean, rstd):
    """y = silu(γx̂ + β) + emb[n, c] in the normalising pass; Welford statistics as group_norm v2."""
    row = cuda.blockIdx.x
    count_buf = cuda.shared.array(THREADS, float32)
    mean_buf = cuda.shared.array(THREADS, float32)
    m2_buf = cuda.shared.array(THREADS, float32)
    row_mean, row_rstd = welford_stats(x, row, count_buf, mean_buf, m2_buf, eps)
    n, first_channel, _ = row_channels(row, groups, weight.shape[0])
    for j in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
        c = first_channel + j // spatial
        a = (x[row, j] - row_mean) * row_rstd * weight[c] + bias[c]
        y[row, j] = a * sigmoid(a) + emb[n, c]
    if cuda.threadIdx.x == 0:
        mean[row], rstd[row] = row_mean, row_rstd


@device_function
def silu_backward(d, x, row_mean, row_rstd, w, b):
    """da = d·silu'(a) at a = γ(x − μ)·rstd + β; returns (da, x̂)."""
    xhat = (x - row_mean) * row_rstd
    a = xhat * w + b
    sig = sigmoid(a)
    return d * sig * (ONE + a * (ONE - sig)), xhat


@kernel("void(float32[:,::1], float32[:,::1], float32[::1], float32[::1], float32[::1], float32[::1], "
        "int32, int32, float32[:,::1], float32[:,::1], float32[:,::1], float32[:,::1])")
def group_norm_silu_backward_v1(x, dy, weight, bias, mean, rstd, groups, spatial, dx, dweight_part,
                                dbias_part, demb):
    """group_norm_backward_v1 with dy → da = dy·silu'(a) recomputed in both passes; demb[n, c] = Σ_s dy
    from the same channel pass, its three channel sums in one reduction tree (block_sum3). Its loops are
    group_norm_backward_v1's written again on purpose: one shared loop would make the plain kernel sum
    a third accumulator and round x̂ differently."""
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    buf3 = cuda.shared.array((3, THREADS), float32)
    n, first_channel, channels = row_channels(row, groups, weight.shape[0])
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
        channel_dy, channel_da, channel_dax = block_sum3(buf3, acc_dy, acc_da, acc_dax)
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


# ---- launchers (NumPy arrays under the simulator, CuPy arrays on a GPU) ------------------------
def group_norm_silu_forward_cuda(x, num_groups, weight, bias, emb=None, eps=1e-5):
    """y = silu(GN(x)) + emb[:, :, None, None] in one normalising pass -> (y, saved)."""
    rows, spatial = as_rows(x, num_groups, weight, bias, emb)
    xp = array_module(x)
    # No emb adds zeros: N·C reads, nothing next to the N·C·S of x, and one kernel instead of two.
    emb_or_zeros = xp.zeros(x.shape[:2], np.float32) if emb is None else emb
    y, mean, rstd = forward_outputs(rows)
    group_norm_silu_forward_v1[rows.shape[0], THREADS](
        rows, weight, bias, emb_or_zeros, np.float32(eps), np.int32(num_groups), np.int32(spatial), y, mean, rstd)
    saved = {"x": rows, "mean": mean, "rstd": rstd, "weight": weight, "bias": bias, "groups": num_groups,
             "spatial": spatial, "shape": x.shape, "has_emb": emb is not None}
    return y.reshape(x.shape), saved


def group_norm_silu_backward_cuda(saved, dy):
    """(dx, dγ, dβ, demb or None) of group_norm_silu_forward_cuda."""
    rows, (n, c) = saved["x"], saved["shape"][:2]
    dy_rows = grad_rows(saved, dy)
    xp = array_module(rows)
    dx = xp.empty_like(rows)
    dweight_part, dbias_part, demb = (xp.empty((n, c), np.float32) for _ in range(3))
    group_norm_silu_backward_v1[rows.shape[0], THREADS](
        rows, dy_rows, saved["weight"], saved["bias"], saved["mean"], saved["rstd"],
        np.int32(saved["groups"]), np.int32(saved["spatial"]), dx, dweight_part, dbias_part, demb)
    return (dx.reshape(saved["shape"]), sum_columns(dweight_part), sum_columns(dbias_part),
            demb if saved["has_emb"] else None)




# ---- the version table and the benchmark description ------------------------------------------
def _make_case(shape, xp, seed):
    return make_case(shape, xp, seed, with_emb=True)


def _reference(case, direction):
    x, w, b, emb, dy = (host64(case[k]) for k in ("x", "weight", "bias", "emb", "dy"))
    if direction == "forward":
        return (group_norm_silu_forward_reference(x, case["num_groups"], w, b, emb),)
    return group_norm_silu_backward_reference(x, case["num_groups"], w, b, dy, has_emb=True)


def _flops(shape, direction):
    """GroupNorm's (8 | 12 per element) + ~5 forward (σ by tanh, a·σ, + emb) and ~9 per backward
    pass (a, σ, silu', da)."""
    return elements(shape) * (13 if direction == "forward" else 30)


def _bytes(shape, direction):
    return traffic_bytes(shape, direction) + 4 * shape["N"] * shape["C"]  # + emb read | + demb written


def _forward(fn):
    return lambda case: fn(*case_args(case), case["emb"])


VERSIONS = (
    Version("reference", "GroupNorm, then SiLU, then + emb; backward: silu', then the GroupNorm chain rule",
            lambda case: (group_norm_silu_forward_reference(*case_args(case), case["emb"]), None),
            lambda case, _: group_norm_silu_backward_reference(*case_args(case), case["dy"], has_emb=True)),
    Version("cpu",
            "float32: fused numba passes per (sample, group) row, statistics, SiLU and + emb in one write "
            "of y; backward in two passes per row (da and the channel sums, then the closed form); saves "
            "x, μ and rstd only; a vectorisable exp (kernels/vector_math.py)",
            _forward(group_norm_silu_forward_cpu), saved_backward(group_norm_silu_backward_cpu)),
    Version("cpu_numpy",
            "NumPy passes (any float dtype: the engine's path for float64): SiLU and + emb in place on the "
            "normalised array; backward: a recomputed from the saved x̂, silu' in place, then GroupNorm's "
            "closed-form backward",
            _forward(group_norm_silu_forward_numpy), saved_backward(group_norm_silu_backward_numpy)),
    Version("cuda_v1",
            "group_norm cuda_v2's forward with SiLU and + emb in its normalising pass, and cuda_v1's "
            "backward with silu' recomputed in both passes and demb from the channel pass (its three "
            "channel sums in one reduction tree): no extra round trip through DRAM",
            _forward(group_norm_silu_forward_cuda), saved_backward(group_norm_silu_backward_cuda)),
)

BENCH = OpBench("group_norm_silu", _make_case, _reference, _flops, _bytes, VERSIONS, SHAPES, SIM_SHAPES)
