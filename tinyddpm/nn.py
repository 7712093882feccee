"""Layers: a ``Module`` finds its parameters by walking its attributes (Parameters, sub-Modules and
lists of Modules), in definition order, so names match the equivalent PyTorch module's.

Initialisations are PyTorch's defaults, so a twin built in PyTorch has the same distributions.
"""
import math

import numpy as np

from . import device as _dev
from . import functional as F
from . import random as _random
from .tensor import Tensor


class StateDictError(ValueError):
    """A state dict does not fit the module (the message names the tensor)."""


class Parameter(Tensor):
    def __init__(self, data):
        super().__init__(_dev.to_device(np.asarray(data, dtype=np.float32)), requires_grad=True)


def _uniform(bound, *shape):
    return Parameter(_random.generator().uniform(-bound, bound, size=shape))


class Module:
    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def children(self):
        """(name, Module) pairs of the sub-modules held directly or in (nested) lists, in attribute order."""
        def walk(name, value):
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    yield from walk(f"{name}.{i}", item)
        for name, value in vars(self).items():
            yield from walk(name, value)

    def named_parameters(self, prefix=""):
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def train(self, mode=True):
        self.training = mode
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def state_dict(self):
        """name → NumPy array copy of every parameter."""
        return {name: _dev.to_numpy(p.data).copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        params = dict(self.named_parameters())
        missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
        if missing or unexpected:
            raise StateDictError(f"state dict does not fit the model: missing {sorted(missing)[:5]}, "
                                 f"unexpected {sorted(unexpected)[:5]}")
        for name, p in params.items():
            value = state[name]
            if value.shape != p.shape or value.dtype != p.dtype:
                raise StateDictError(f"tensor {name!r}: expected {p.dtype} {tuple(p.shape)}, "
                                     f"got {value.dtype} {tuple(value.shape)}")
            p.data[...] = _dev.to_device(value, p.device)


class Sequential(Module):
    def __init__(self, *layers):
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Linear(Module):
    """y = x Wᵀ + b; W, b ~ U(−1/√in, 1/√in) (PyTorch's default)."""

    def __init__(self, in_features, out_features, bias=True):
        bound = 1 / math.sqrt(in_features)
        self.weight = _uniform(bound, out_features, in_features)
        self.bias = _uniform(bound, out_features) if bias else None

    def forward(self, x):  # (..., in) → (..., out)
        return F.linear(x, self.weight, self.bias)


class Conv2d(Module):
    """NCHW convolution with W (out, in, k, k); W, b ~ U(−1/√fan_in, 1/√fan_in), fan_in = in·k²."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        bound = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.weight = _uniform(bound, out_channels, in_channels, kernel_size, kernel_size)
        self.bias = _uniform(bound, out_channels) if bias else None
        self.stride, self.padding = stride, padding

    def forward(self, x):  # (N, in, H, W) → (N, out, H', W')
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class GroupNorm(Module):
    def __init__(self, num_groups, num_channels, eps=1e-5):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_groups} groups do not divide {num_channels} channels")
        self.num_groups, self.eps = num_groups, eps
        self.weight = Parameter(np.ones(num_channels))
        self.bias = Parameter(np.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GroupNormSiLU(GroupNorm):
    """silu(GroupNorm(x)) + emb[:, :, None, None] in one fused kernel (the ResNet block's norm → act,
    then the time/class embedding added). Same parameters as GroupNorm."""

    def forward(self, x, emb=None):
        return F.group_norm_silu(x, self.num_groups, self.weight, self.bias, emb, self.eps)


class LayerNorm(Module):
    def __init__(self, dim, eps=1e-5):
        self.eps = eps
        self.weight = Parameter(np.ones(dim))
        self.bias = Parameter(np.zeros(dim))

    def forward(self, x):  # normalises the last dim
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class Embedding(Module):
    """A lookup table of ``num`` rows, initialised N(0, 1) like PyTorch."""

    def __init__(self, num, dim):
        self.weight = Parameter(_random.generator().standard_normal((num, dim)))

    def forward(self, idx):  # int (...) → (..., dim)
        return F.embedding(idx, self.weight)


class MultiheadSelfAttention(Module):
    """softmax(Q Kᵀ/√d) V per head, with Q, K, V = x W_{q,k,v}ᵀ (batch first, (B, L, D)).

    The parameters are laid out like torch.nn.MultiheadAttention (in_proj_weight (3D, D),
    Xavier-uniform; zero biases; out_proj Linear) so its weights load one to one."""

    def __init__(self, dim, num_heads):
        if dim % num_heads:
            raise ValueError(f"MultiheadSelfAttention: {num_heads} heads do not divide dim {dim}")
        self.num_heads = num_heads
        self.in_proj_weight = _uniform(math.sqrt(6 / (dim + 3 * dim)), 3 * dim, dim)
        self.in_proj_bias = Parameter(np.zeros(3 * dim))
        self.out_proj = Linear(dim, dim)
        self.out_proj.bias = Parameter(np.zeros(dim))

    def forward(self, x):
        b, length, dim = x.shape
        h = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)           # (B, L, 3D)
        qkv = qkv.reshape(b, length, 3, h, dim // h).permute(2, 0, 3, 1, 4)  # (3, B, h, L, d)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])        # (B, h, L, d)
        return self.out_proj(out.permute(0, 2, 1, 3).reshape(b, length, dim))
