"""Every differentiable op: one ``Function`` (forward and backward on arrays) plus its public function.

Argument order and weight layouts follow torch.nn.functional, so a PyTorch twin loads the same weights.
Each Function is written once against ``xp`` (numpy or cupy, whichever owns the input). conv2d,
group norm, GroupNorm·SiLU and attention, which call ``tinyddpm.kernels``, are in kernel_ops.py and
re-exported here.
"""
import functools
import math

import numpy as np

from . import device as _dev
from . import random as _random
from .tensor import Function, Tensor
# the ops that run tinyddpm.kernels live in kernel_ops.py; they are part of this module's namespace
from .kernel_ops import (Conv2d, GroupNorm, GroupNormSiLU, ScaledDotProductAttention, conv2d,  # noqa: F401
                         group_norm, group_norm_silu, scaled_dot_product_attention)


def _xp(a):
    return _dev.array_module(a)


def _lift(x, like):
    """A Tensor for x: Tensors pass through; numbers and arrays become constants of like's dtype."""
    if isinstance(x, Tensor) or x is None:
        return x
    return Tensor(_xp(like.data).asarray(x, dtype=like.dtype))


def _binary(a, b):
    like = a if isinstance(a, Tensor) else b
    return _lift(a, like), _lift(b, like)


def _unbroadcast(g, shape):
    """Sum a broadcast gradient back to the input's shape."""
    if g.shape == shape:
        return g
    g = g.sum(axis=tuple(range(g.ndim - len(shape)))) if g.ndim > len(shape) else g
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


# ---- elementwise arithmetic -----------------------------------------------------------------
class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        return _unbroadcast(g, self.shapes[0]), _unbroadcast(g, self.shapes[1])


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        return _unbroadcast(g, self.shapes[0]), _unbroadcast(-g, self.shapes[1])


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        da = _unbroadcast(g * self.b, self.a.shape) if self.needs_grad[0] else None
        db = _unbroadcast(g * self.a, self.b.shape) if self.needs_grad[1] else None
        return da, db


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        da = _unbroadcast(g / self.b, self.a.shape) if self.needs_grad[0] else None
        db = _unbroadcast(-g * self.a / (self.b * self.b), self.b.shape) if self.needs_grad[1] else None
        return da, db


class Pow(Function):
    def forward(self, a, exponent):
        self.a, self.p = a, exponent
        return a ** exponent

    def backward(self, g):
        return (g * self.p * self.a ** (self.p - 1),)


def add(a, b): return Add.apply(*_binary(a, b))
def sub(a, b): return Sub.apply(*_binary(a, b))
def mul(a, b): return Mul.apply(*_binary(a, b))
def div(a, b): return Div.apply(*_binary(a, b))
def pow(a, exponent): return Pow.apply(a, exponent=exponent)  # noqa: A001 (mirrors torch.pow)


class MatMul(Function):
    """C = A @ B (batched, broadcasting): dA = dC @ Bᵀ, dB = Aᵀ @ dC."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a @ b

    def backward(self, g):
        da = _unbroadcast(g @ self.b.swapaxes(-1, -2), self.a.shape) if self.needs_grad[0] else None
        db = _unbroadcast(self.a.swapaxes(-1, -2) @ g, self.b.shape) if self.needs_grad[1] else None
        return da, db


def matmul(a, b): return MatMul.apply(*_binary(a, b))


# ---- unary functions ------------------------------------------------------------------------
class Exp(Function):
    def forward(self, a):
        self.out = _xp(a).exp(a)
        return self.out

    def backward(self, g):
        return (g * self.out,)


class Log(Function):
    def forward(self, a):
        self.a = a
        return _xp(a).log(a)

    def backward(self, g):
        return (g / self.a,)


class Sqrt(Function):
    def forward(self, a):
        self.out = _xp(a).sqrt(a)
        return self.out

    def backward(self, g):
        return (g * 0.5 / self.out,)


class ReLU(Function):
    def forward(self, a):
        self.mask = a > 0
        return a * self.mask

    def backward(self, g):
        return (g * self.mask,)


def _sigmoid(a):
    # σ(a) = (1 + tanh(a/2))/2: no overflow for large |a|, unlike 1/(1+exp(−a)).
    xp = _xp(a)
    return xp.multiply(xp.tanh(a * 0.5) + 1, 0.5, dtype=a.dtype)


class Sigmoid(Function):
    def forward(self, a):
        self.out = _sigmoid(a)
        return self.out

    def backward(self, g):
        return (g * self.out * (1 - self.out),)


class Tanh(Function):
    def forward(self, a):
        self.out = _xp(a).tanh(a)
        return self.out

    def backward(self, g):
        return (g * (1 - self.out * self.out),)


class SiLU(Function):
    """silu(a) = a·σ(a);  silu'(a) = σ(a)·(1 + a·(1 − σ(a)))  (Hendrycks & Gimpel 2016)."""

    def forward(self, a):
        self.a, self.s = a, _sigmoid(a)
        return a * self.s

    def backward(self, g):
        s = self.s
        return (g * (s * (1 + self.a * (1 - s))),)


@functools.cache
def _cpu_erf():
    import numba  # NumPy has no erf: vectorise math.erf with numba, a core dependency

    def erf(a):
        return math.erf(a)
    return numba.vectorize(["float32(float32)", "float64(float64)"])(erf)


def _erf(a):
    if _dev.is_cupy(a):
        from cupyx.scipy.special import erf
        return erf(a)
    return _cpu_erf()(a)


class GELU(Function):
    """gelu(a) = a·Φ(a) = a/2·(1 + erf(a/√2))  (exact, not the tanh approximation);
    gelu'(a) = Φ(a) + a·φ(a)."""

    def forward(self, a):
        self.a, self.cdf = a, 0.5 * (1 + _erf(a * (1 / math.sqrt(2))))
        return a * self.cdf

    def backward(self, g):
        a = self.a
        pdf = _xp(a).exp(-0.5 * a * a) * (1 / math.sqrt(2 * math.pi))
        return (g * (self.cdf + a * pdf),)


class Softmax(Function):
    """softmax(a)_i = exp(a_i − max a) / Σ_j exp(a_j − max a);  da = s·(g − Σ g·s)."""

    def forward(self, a, axis):
        xp = _xp(a)
        e = xp.exp(a - a.max(axis=axis, keepdims=True))
        self.out, self.axis = e / e.sum(axis=axis, keepdims=True), axis
        return self.out

    def backward(self, g):
        s = self.out
        return (s * (g - (g * s).sum(axis=self.axis, keepdims=True)),)


def exp(a): return Exp.apply(a)
def log(a): return Log.apply(a)
def sqrt(a): return Sqrt.apply(a)
def relu(a): return ReLU.apply(a)
def sigmoid(a): return Sigmoid.apply(a)
def tanh(a): return Tanh.apply(a)
def silu(a): return SiLU.apply(a)
def gelu(a): return GELU.apply(a)
def softmax(a, axis=-1): return Softmax.apply(a, axis=axis)


# ---- reductions and shapes ------------------------------------------------------------------
class Sum(Function):
    def forward(self, a, axis, keepdims):
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        return a.sum(axis=axis, keepdims=keepdims)

    def backward(self, g):
        if not self.keepdims and self.axis is not None:
            g = _xp(g).expand_dims(g, self.axis)
        return (_xp(g).broadcast_to(g, self.shape),)


def sum(a, axis=None, keepdims=False):  # noqa: A001 (mirrors torch.sum)
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def mean(a, axis=None, keepdims=False):
    axes = range(a.ndim) if axis is None else np.atleast_1d(axis)
    count = math.prod(a.shape[i] for i in axes)
    return mul(sum(a, axis, keepdims), 1.0 / count)


class Reshape(Function):
    def forward(self, a, shape):
        self.shape = a.shape
        return a.reshape(shape)

    def backward(self, g):
        return (g.reshape(self.shape),)


class Permute(Function):
    def forward(self, a, axes):
        self.inverse = tuple(np.argsort(axes))
        return a.transpose(axes)

    def backward(self, g):
        return (g.transpose(self.inverse),)


def reshape(a, shape): return Reshape.apply(a, shape=tuple(shape))
def permute(a, axes): return Permute.apply(a, axes=tuple(axes))


def transpose(a, dim0, dim1):
    axes = list(range(a.ndim))
    axes[dim0], axes[dim1] = axes[dim1], axes[dim0]
    return permute(a, axes)


def _is_basic_index(index):
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in items)


def _segment_sum(keys, values, n):
    """out[j] = Σ_{i: keys[i] = j} values[i] for j < n: rows values (K, ...) → (n, ...), with no
    atomics (xp.add.at adds with atomics on a GPU, in an order that varies from run to run), so the
    same inputs give the same bits every time.

    Sort by key, then an inclusive segmented scan (Hillis & Steele 1986): ⌈log₂K⌉ whole-array steps,
    step d adding the partial sum d places back where its key is the same — a tree summation, error
    growing as log K. Each j then gathers the scan at its key's last place (a binary search); a key
    that never occurs gets 0."""
    xp = _xp(values)
    if len(keys) == 0:
        return xp.zeros((n,) + values.shape[1:], dtype=values.dtype)
    order = xp.argsort(keys, kind="stable")
    keys, acc = keys[order], values[order]
    row = (-1,) + (1,) * (values.ndim - 1)  # a per-row flag broadcast over the row's elements
    d = 1
    while d < len(keys):
        same = (keys[d:] == keys[:-d]).reshape(row)
        acc[d:] = acc[d:] + xp.where(same, acc[:-d], 0)
        d *= 2
    j = xp.arange(n)
    last = xp.maximum(xp.searchsorted(keys, j, side="right") - 1, 0)
    return xp.where((keys[last] == j).reshape(row), acc[last], 0)


class GetItem(Function):
    def forward(self, a, index):
        self.shape, self.dtype, self.index = a.shape, a.dtype, index
        return a[index]

    def backward(self, g):
        xp = _xp(g)
        if _is_basic_index(self.index):
            out = xp.zeros(self.shape, dtype=self.dtype)
            out[self.index] = g  # a view: every element is hit at most once
            return (out,)
        # advanced indexing may repeat elements: sum g per source element (flat position)
        positions = xp.arange(math.prod(self.shape)).reshape(self.shape)[self.index]
        return (_segment_sum(positions.ravel(), g.ravel(), math.prod(self.shape)).reshape(self.shape),)


def getitem(a, index):
    if isinstance(index, Tensor):
        index = index.data
    return GetItem.apply(a, index=index)


class Concat(Function):
    def forward(self, *arrays, axis):
        self.axis, self.sizes = axis, [a.shape[axis] for a in arrays]
        return _xp(arrays[0]).concatenate(arrays, axis=axis)

    def backward(self, g):
        return tuple(_xp(g).split(g, np.cumsum(self.sizes)[:-1].tolist(), axis=self.axis))


def concat(tensors, axis=0): return Concat.apply(*tensors, axis=axis)


class Pad(Function):
    def forward(self, a, widths):
        self.slices = tuple(slice(lo, lo + n) for (lo, _), n in zip(widths, a.shape))
        return _xp(a).pad(a, widths)

    def backward(self, g):
        return (g[self.slices],)


def pad(a, pad):
    """Zero padding, torch.nn.functional.pad order: (last_lo, last_hi, second_last_lo, ...)."""
    if len(pad) % 2 or len(pad) // 2 > a.ndim:
        raise ValueError(f"pad needs (lo, hi) pairs for at most {a.ndim} dims, got {pad}")
    pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)][::-1]
    return Pad.apply(a, widths=[(0, 0)] * (a.ndim - len(pairs)) + pairs)


# ---- spatial resampling (NCHW) -----------------------------------------------------------------
def _windows(a, k):
    """(N, C, H, W) → (N, C, H//k, W//k, k·k): non-overlapping k×k windows (floor, like torch)."""
    n, c, h, w = a.shape
    ho, wo = h // k, w // k
    a = a[:, :, :ho * k, :wo * k].reshape(n, c, ho, k, wo, k)
    return a.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, k * k)


def _unwindows(g, shape, k):
    """Inverse of _windows for gradients: scatter windows back and zero-fill the cropped border."""
    n, c, h, w = shape
    ho, wo = h // k, w // k
    g = g.reshape(n, c, ho, wo, k, k).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, ho * k, wo * k)
    return g if (ho * k, wo * k) == (h, w) else _xp(g).pad(g, ((0, 0), (0, 0), (0, h - ho * k), (0, w - wo * k)))


class MaxPool2d(Function):
    """y = max over each k×k window (floor, like torch); the gradient goes to the window's first maximum
    (row-major). The k² window offsets are strided views of x, compared in place: no transposed copy
    of x into windows (that copy and its inverse took ~55 ms of a 0.8 s training step). The forward
    keeps no argmax (its masked writes took 20 ms a step): backward finds each window's first maximum
    again by comparing the offsets with y."""

    def forward(self, a, k):
        ho, wo = a.shape[2] // k, a.shape[3] // k
        self.k = k
        offsets = [a[:, :, i:ho * k:k, j:wo * k:k] for i in range(k) for j in range(k)]
        y = offsets[0].copy()
        for view in offsets[1:]:
            _xp(a).maximum(y, view, out=y)
        if self.recorded:
            self.x, self.y = a, y
        return y

    def backward(self, g):
        xp, k, y = _xp(g), self.k, self.y
        dx = xp.zeros(self.x.shape, dtype=g.dtype)  # the cropped border (h % k, w % k) gets no gradient
        unclaimed = xp.ones(y.shape, dtype=bool)    # windows whose first maximum is still to come
        for index in range(k * k):
            i, j = divmod(index, k)
            window = (slice(None), slice(None), slice(i, y.shape[2] * k, k), slice(j, y.shape[3] * k, k))
            first = self.x[window] == y
            first &= unclaimed
            unclaimed &= ~first
            xp.multiply(g, first, out=dx[window])  # copyto(where=) took 5x longer into a strided view
        return (dx,)


class AvgPool2d(Function):
    def forward(self, a, k):
        self.shape, self.k = a.shape, k
        return _windows(a, k).mean(axis=-1)

    def backward(self, g):
        k2 = self.k * self.k
        win = _xp(g).broadcast_to((g / k2)[..., None], g.shape + (k2,))
        return (_unwindows(win, self.shape, self.k),)


class UpsampleNearest2d(Function):
    def forward(self, a, s):
        n, c, h, w = a.shape
        self.s = s
        y = _xp(a).empty((n, c, h * s, w * s), a.dtype)
        for i in range(s):  # s² strided copies: reshaping a 6-d broadcast view took 11 ms, these 6 (N=64, C64, 14×14)
            for j in range(s):
                y[:, :, i::s, j::s] = a
        return y

    def backward(self, g):
        # Σ over each s×s block as s² strided views added in place: a reduction over the block's two
        # non-contiguous axes ran ~10x slower (63 ms of a 0.8 s training step)
        s = self.s
        out = g[:, :, ::s, ::s].copy()
        for i in range(s):
            for j in range(s):
                if i or j:
                    out += g[:, :, i::s, j::s]
        return (out,)


def max_pool2d(a, kernel_size=2): return MaxPool2d.apply(a, k=kernel_size)
def avg_pool2d(a, kernel_size=2): return AvgPool2d.apply(a, k=kernel_size)
def upsample_nearest2d(a, scale_factor=2): return UpsampleNearest2d.apply(a, s=scale_factor)


# ---- layers ---------------------------------------------------------------------------------
class Embedding(Function):
    def forward(self, table, idx):
        self.shape, self.idx = table.shape, idx
        return table[idx]

    def backward(self, g):
        # dtable[r] = Σ of g's rows whose index is r (repeats accumulate); negative indices wrap as in forward
        rows = _xp(g).arange(self.shape[0])[self.idx].ravel()
        return (_segment_sum(rows, g.reshape((len(rows),) + self.shape[1:]), self.shape[0]),)


def embedding(idx, table):
    """Rows of ``table`` (num, dim) picked by integer ``idx`` (any shape)."""
    idx = idx.data if isinstance(idx, Tensor) else idx
    return Embedding.apply(table, idx=_dev.array_module(table.data).asarray(idx))


class Linear(Function):
    """y = x Wᵀ + b with W (out, in):  dx = g W,  dW = gᵀ x,  db = Σ g. Leading dims are flattened so
    each product is one GEMM (NumPy runs (B, L, in) @ (in, out) as B small ones)."""

    def forward(self, x, w, b):
        self.x, self.w = x, w
        y = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(x.shape[:-1] + (w.shape[0],))
        return y + b if b is not None else y

    def backward(self, g):
        x2, g2 = self.x.reshape(-1, self.x.shape[-1]), g.reshape(-1, g.shape[-1])
        dx = (g2 @ self.w).reshape(self.x.shape) if self.needs_grad[0] else None
        dw = g2.T @ x2 if self.needs_grad[1] else None
        db = g2.sum(axis=0) if self.needs_grad[2] else None
        return dx, dw, db


def linear(x, w, b=None): return Linear.apply(x, w, b)


class LayerNorm(Function):
    """y = (x − μ)/√(σ² + eps) · γ + β over the last dim (Ba et al. 2016; two-pass variance);
    dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) with ĝ = g·γ."""

    def forward(self, x, weight, bias, eps):
        xc = x - x.mean(axis=-1, keepdims=True)
        self.rstd = 1 / _xp(x).sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
        self.xhat, self.weight = xc * self.rstd, weight
        return self.xhat * weight + bias

    def backward(self, g):
        xhat = self.xhat
        gh = g * self.weight
        dx = self.rstd * (gh - gh.mean(axis=-1, keepdims=True) - xhat * (gh * xhat).mean(axis=-1, keepdims=True))
        lead = tuple(range(g.ndim - 1))
        return dx, (g * xhat).sum(axis=lead), g.sum(axis=lead)


def layer_norm(x, weight, bias, eps=1e-5): return LayerNorm.apply(x, weight, bias, eps=eps)


def dropout(x, p, training=True):
    """Zero each element with probability p and scale the rest by 1/(1−p) (Srivastava et al. 2014)."""
    if not training or p == 0:
        return x
    keep = _random.uniform(x.shape, x.data) >= p  # drawn where x lives: no mask crosses to a GPU
    return mul(x, keep.astype(x.dtype) / (1 - p))


# ---- losses ---------------------------------------------------------------------------------
class MSELoss(Function):
    """mean((pred − target)²)."""

    def forward(self, pred, target):
        self.diff = pred - target
        return (self.diff * self.diff).mean()

    def backward(self, g):
        d = self.diff * (2 * g / self.diff.size)
        return d, (-d if self.needs_grad[1] else None)


def mse_loss(pred, target): return MSELoss.apply(*_binary(pred, target))


class CrossEntropy(Function):
    """mean over n of −log softmax(z_n)[y_n] = logsumexp(z_n) − z_n[y_n]  (stable: max-subtracted)."""

    def forward(self, logits, target):
        xp = _xp(logits)
        z = logits - logits.max(axis=1, keepdims=True)
        e = xp.exp(z)
        s = e.sum(axis=1, keepdims=True)
        rows = xp.arange(len(target))
        self.probs, self.target = e / s, target
        return (xp.log(s)[:, 0] - z[rows, target]).mean()

    def backward(self, g):
        d = self.probs.copy()
        d[_xp(d).arange(len(self.target)), self.target] -= 1
        return d * (g / len(self.target)), None


def cross_entropy(logits, target):
    """Mean cross-entropy of (N, K) logits against integer class targets (N,)."""
    target = target.data if isinstance(target, Tensor) else target
    return CrossEntropy.apply(logits, Tensor(_dev.array_module(logits.data).asarray(target)))
