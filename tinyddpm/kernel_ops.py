"""The ops that run hand-written kernels: conv2d, group norm, fused GroupNorm·SiLU and attention. Each
``Function`` takes its (forward, backward) pair from ``tinyddpm.kernels`` for the backend that owns
the input (the CPU versions for NumPy arrays, the CUDA versions for CuPy arrays and the simulator),
and its docstring gives the math. ``tinyddpm.functional`` re-exports them beside the other ops.
"""
from . import device as _dev
from .tensor import Function


# The (forward, backward) kernels of each op, for the backend that serves array a. Each helper imports
# its kernels when first called, not at the top of this module: kernel modules import numba.cuda, and
# numba picks the simulator or the driver at that first import, which must follow set_device.
def _by_backend(a, cpu, cuda):
    return cuda if _dev.kernel_backend(a) == "cuda" else cpu


def _conv2d_kernels(a):
    from .kernels.conv2d import conv2d_backward_cpu, conv2d_backward_cuda, conv2d_forward_cpu, conv2d_forward_cuda
    return _by_backend(a, (conv2d_forward_cpu, conv2d_backward_cpu), (conv2d_forward_cuda, conv2d_backward_cuda))


def _group_norm_kernels(a):
    from .kernels.group_norm import (group_norm_backward_cpu, group_norm_backward_cuda, group_norm_forward_cpu,
                                     group_norm_forward_cuda)
    return _by_backend(a, (group_norm_forward_cpu, group_norm_backward_cpu),
                       (group_norm_forward_cuda, group_norm_backward_cuda))


def _group_norm_silu_kernels(a):
    from .kernels.group_norm_silu import (group_norm_silu_backward_cpu, group_norm_silu_backward_cuda,
                                          group_norm_silu_forward_cpu, group_norm_silu_forward_cuda)
    return _by_backend(a, (group_norm_silu_forward_cpu, group_norm_silu_backward_cpu),
                       (group_norm_silu_forward_cuda, group_norm_silu_backward_cuda))


def _attention_kernels(a):
    from .kernels.attention import (attention_backward_cpu, attention_backward_cuda, attention_forward_cpu,
                                    attention_forward_cuda)
    return _by_backend(a, (attention_forward_cpu, attention_backward_cpu),
                       (attention_forward_cuda, attention_backward_cuda))


class Conv2d(Function):
    """y[n,k] = Σ_{c,r,s} w[k,c,r,s] · x[n, c, h·stride + r − pad, w·stride + s − pad] + b[k]
    (kernels/conv2d.py)."""

    def forward(self, x, w, b, stride, padding):
        x, w = _contiguous(x), _contiguous(w)
        forward, self.backward_impl = _conv2d_kernels(x)
        y, self.saved = forward(x, w, b, stride, padding)
        return y

    def backward(self, g):
        dx, dw, db = self.backward_impl(self.saved, _contiguous(g), need_dx=self.needs_grad[0])
        return dx, dw, (db if self.needs_grad[2] else None)


def _contiguous(a):
    """CUDA kernels index C-contiguous arrays; the CPU kernels take any strides (they copy
    where they transpose anyway), so only the cuda backend pays for a copy here."""
    return _dev.array_module(a).ascontiguousarray(a) if _dev.kernel_backend(a) == "cuda" else a


def conv2d(x, w, b=None, stride=1, padding=0):
    if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[1]:
        raise ValueError(f"conv2d needs x (N, C, H, W) and w (K, C, R, S) with the same C, got {x.shape} and {w.shape}")
    return Conv2d.apply(x, w, b, stride=stride, padding=padding)


class GroupNorm(Function):
    """y = (x − μ_g)/√(σ²_g + eps) · γ + β, statistics per (sample, group)  (Wu & He 2018;
    kernels/group_norm.py)."""

    def forward(self, x, weight, bias, num_groups, eps):
        x = _contiguous(x)
        forward, self.backward_impl = _group_norm_kernels(x)
        y, self.saved = forward(x, num_groups, weight, bias, eps)
        return y

    def backward(self, g):
        return self.backward_impl(self.saved, _contiguous(g))


class GroupNormSiLU(Function):
    """y = silu(GroupNorm(x)) + emb[:, :, None, None], one fused pass (kernels/group_norm_silu.py)."""

    def forward(self, x, weight, bias, emb, num_groups, eps):
        x = _contiguous(x)
        forward, self.backward_impl = _group_norm_silu_kernels(x)
        emb = None if emb is None else _contiguous(emb)
        y, self.saved = forward(x, num_groups, weight, bias, emb, eps)
        return y

    def backward(self, g):
        return self.backward_impl(self.saved, _contiguous(g))


def _check_groups(x, num_groups):
    if x.ndim < 2 or num_groups < 1 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups} must divide the {x.shape[1] if x.ndim > 1 else '?'} channels of x {x.shape}")


def group_norm(x, num_groups, weight, bias, eps=1e-5):
    _check_groups(x, num_groups)
    return GroupNorm.apply(x, weight, bias, num_groups=num_groups, eps=eps)


def group_norm_silu(x, num_groups, weight, bias, emb=None, eps=1e-5):
    _check_groups(x, num_groups)
    return GroupNormSiLU.apply(x, weight, bias, emb, num_groups=num_groups, eps=eps)


class ScaledDotProductAttention(Function):
    """O = softmax(Q Kᵀ/√d) V on (B, heads, L, d)  (Vaswani et al. 2017; kernels/attention.py)."""

    def forward(self, q, k, v):
        q, k, v = _contiguous(q), _contiguous(k), _contiguous(v)
        forward, self.backward_impl = _attention_kernels(q)
        out, self.saved = forward(q, k, v)
        return out

    def backward(self, g):
        return self.backward_impl(self.saved, _contiguous(g))


def scaled_dot_product_attention(q, k, v):
    if q.ndim != 4 or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention needs q (B, H, Lq, d), k and v (B, H, Lk, d); got {q.shape}, {k.shape}, {v.shape}")
    return ScaledDotProductAttention.apply(q, k, v)
