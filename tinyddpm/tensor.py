"""The autograd engine: a Tensor wraps a NumPy/CuPy array and remembers the Function that made it.

``loss.backward()`` walks that graph in reverse topological order (iteratively, so deep graphs hit no
recursion limit) and calls each Function's ``backward`` with the gradient of its output.
Every op is a ``Function`` written once against the array module ``xp`` of its inputs
(see functional.py); the heavy ones call kernel implementations chosen by the device.
"""
import contextlib

import numpy as np

from . import device as _dev

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Inside this block ops record no graph (sampling, evaluation, optimiser updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


class Function:
    """One differentiable op. Subclasses define ``forward(self, *arrays, **params) -> array`` and
    ``backward(self, grad) -> tuple`` (one gradient or None per tensor input), storing in ``self``
    whatever backward needs; ``self.recorded`` says whether backward can be called at all (forward may
    skip what only backward reads, e.g. under no_grad)."""

    @classmethod
    def apply(cls, *inputs, **params):
        fn = cls()
        fn.needs_grad = tuple(t is not None and t.requires_grad for t in inputs)
        fn.recorded = _grad_enabled and any(fn.needs_grad)
        out = Tensor(fn.forward(*(None if t is None else t.data for t in inputs), **params))
        if fn.recorded:
            out.requires_grad = True
            out._fn, out._parents = fn, inputs
        return out


class Tensor:
    __array_priority__ = 1000  # so ndarray <op> Tensor defers to Tensor's reflected operators
    grad_view = None  # a parameter's slice of a flat gradient buffer (optim.FlatParameters), if any

    def __init__(self, data, requires_grad=False):
        if isinstance(data, Tensor):
            data = data.data
        elif isinstance(data, np.generic):  # NumPy reductions return scalars: keep their dtype
            data = np.asarray(data)
        elif not (isinstance(data, np.ndarray) or _dev.is_cupy(data)):
            data = np.asarray(data)
            if data.dtype.kind == "f":
                data = data.astype(np.float32)  # Python floats and lists default to float32
            data = _dev.to_device(data)
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._fn = None
        self._parents = ()

    # ---- array facts -----------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: "cuda" if _dev.is_cupy(self.data) else "cpu")

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device}{grad})"

    def numpy(self):
        return _dev.to_host(self.data)

    def item(self):
        return _dev.to_host(self.data).item()

    def to(self, device):
        return Tensor(_dev.to_device(self.data, device), requires_grad=self.requires_grad)

    def detach(self):
        return Tensor(self.data)

    def zero_grad(self):
        self.grad = None

    # ---- reverse mode ------------------------------------------------------------------------
    def _topological_order(self):
        """Tensors reachable from self, each after all of its parents (iterative DFS)."""
        order, visited, stack = [], set(), [(self, False)]
        while stack:
            node, parents_done = stack.pop()
            if parents_done:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents if p is not None and p.requires_grad)
        return order

    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) · grad into every leaf's ``.grad``."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar, got shape {self.shape}")
            grad = _dev.array_module(self.data).ones_like(self.data)
        grads = {id(self): grad.data if isinstance(grad, Tensor) else grad}
        for node in reversed(self._topological_order()):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._fn is None:  # a leaf: keep its gradient
                node._accumulate_grad(g)
                continue
            for parent, pg in zip(node._parents, node._fn.backward(g)):
                if pg is None or parent is None or not parent.requires_grad:
                    continue
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg

    def _accumulate_grad(self, g):
        """grad ← grad + g. A parameter in a flat buffer accumulates into its ``grad_view`` in place,
        so the optimiser finds every gradient already in one array (no gather, whatever the count)."""
        view = self.grad_view
        if view is None:
            self.grad = g if self.grad is None else self.grad + g
        elif self.grad is view:
            view += g
        else:  # the first gradient since zero_grad, or one assigned to .grad directly
            view[...] = g if self.grad is None else self.grad + g
            self.grad = view

    # ---- operators and methods (all defined in functional.py) --------------------------------
    def __add__(self, other): return F.add(self, other)
    def __radd__(self, other): return F.add(other, self)
    def __sub__(self, other): return F.sub(self, other)
    def __rsub__(self, other): return F.sub(other, self)
    def __mul__(self, other): return F.mul(self, other)
    def __rmul__(self, other): return F.mul(other, self)
    def __truediv__(self, other): return F.div(self, other)
    def __rtruediv__(self, other): return F.div(other, self)
    def __neg__(self): return F.mul(self, -1.0)
    def __pow__(self, exponent): return F.pow(self, exponent)
    def __matmul__(self, other): return F.matmul(self, other)
    def __getitem__(self, index): return F.getitem(self, index)

    def sum(self, axis=None, keepdims=False): return F.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return F.mean(self, axis, keepdims)
    def reshape(self, *shape): return F.reshape(self, shape[0] if len(shape) == 1 else shape)
    def transpose(self, dim0, dim1): return F.transpose(self, dim0, dim1)
    def permute(self, *axes): return F.permute(self, axes)
    def exp(self): return F.exp(self)
    def log(self): return F.log(self)
    def sqrt(self): return F.sqrt(self)
    def relu(self): return F.relu(self)
    def silu(self): return F.silu(self)
    def sigmoid(self): return F.sigmoid(self)
    def tanh(self): return F.tanh(self)
    def softmax(self, axis=-1): return F.softmax(self, axis)


from . import functional as F  # noqa: E402  (functional imports Tensor; methods look F up at call time)
