"""Optimisers and training helpers: Adam/AdamW, global-norm clipping, EMA of parameters (with an optional
warm-up, or a power-function profile), the learning-rate schedule (warmup, then constant or cosine).

All of them update flat buffers (``FlatParameters``): the parameters of one dtype and device are
views into one contiguous array and their gradients views into a second, so every update below is a
fixed handful of whole-buffer array operations — as many for 10 parameter tensors as for 10,000, and
on a GPU as many kernel launches — and none reads a value back to the host. Each operation is a call
on the array module (``xp.multiply(m, b1, out=m)``, not ``m *= b1``) so ``tinyddpm.instrument`` can
count them.
"""
import math

import numpy as np

from . import device as _dev

# Each parameter's slot starts on a multiple of 64 elements (256 bytes, cudaMalloc's alignment), so a
# view is as aligned for BLAS and the CUDA kernels as an array of its own. The gaps hold zeros in
# every buffer, which every update below keeps at zero.
SLOT_ALIGN = 64


class FlatParameters:
    """Parameters of one dtype and device as views into one flat buffer ``data``, their gradients as
    views into ``grad``.

    Each ``p.data`` becomes a reshaped view of its slot, so writing the parameter (a state-dict load,
    an update) writes the buffer and vice versa; ``p.grad_view`` is its slot of ``grad``, where
    Tensor.backward accumulates its gradient. ``p.flat`` names the FlatParameters holding p."""

    def __init__(self, params):
        self.params = list(params)
        sizes = [-(-p.size // SLOT_ALIGN) * SLOT_ALIGN for p in self.params]
        starts = np.cumsum([0] + sizes)
        self.slots = {id(p): slice(int(lo), int(lo) + p.size) for p, lo in zip(self.params, starts)}
        xp = _dev.array_module(self.params[0].data)
        self.data = xp.zeros(int(starts[-1]), dtype=self.params[0].dtype)
        self.grad = xp.zeros_like(self.data)
        for p in self.params:
            self.view(self.data, p)[...] = p.data
            grad = p.grad
            p.data, p.grad_view, p.flat = self.view(self.data, p), self.view(self.grad, p), self
            p.grad = None
            if grad is not None:
                p._accumulate_grad(grad)

    def view(self, buffer, p):
        """Parameter p's slot of a flat ``buffer`` (data, grad, or an optimiser's moment), shaped like p."""
        return buffer[self.slots[id(p)]].reshape(p.shape)

    def gather_grads(self):
        """The flat gradient buffer, holding every parameter's current gradient. Gradients from
        Tensor.backward are there already; one assigned to ``p.grad`` directly is copied in, and a
        parameter without one contributes zeros (as if its gradient were zero)."""
        for p in self.params:
            if p.grad is None:
                p.grad_view[...] = 0
            elif p.grad is not p.grad_view:
                p.grad_view[...] = p.grad
                p.grad = p.grad_view
        return self.grad


def flatten(params):
    """The FlatParameters holding ``params``, one per (device, dtype), each in the order given.

    Parameters that are already one FlatParameters, in this order, keep it: an optimiser and an EMA
    built over the same model share the buffer (an update through one is seen by the other)."""
    groups = {}
    for p in params:
        groups.setdefault((_dev.is_cupy(p.data), p.dtype), []).append(p)
    return [_flat_parameters(group) for group in groups.values()]


def _flat_parameters(params):
    flat = getattr(params[0], "flat", None)
    if flat is not None and len(flat.params) == len(params) and all(a is b for a, b in zip(flat.params, params)):
        return flat
    if any(getattr(p, "flat", None) is not None for p in params):
        # re-flattening would move p.data out of the buffer that the first optimiser/EMA updates
        raise ValueError("these parameters already share a flat buffer with a different set or order of "
                         "parameters: build optimisers, EMA and clipping over the same parameter list")
    return FlatParameters(params)


class Adam:
    """Adam (Kingma & Ba 2015):  m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,
    p ← p − lr·m̂/(√v̂ + eps) with m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ).
    ``weight_decay`` adds λp to g (L2, as torch.optim.Adam).

    One fused update per flat buffer: 12 whole-buffer operations (13 or 14 with weight decay), whatever
    the number of parameter tensors. A parameter without a gradient counts as a zero gradient."""

    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = 0
        self.flats = flatten(self.params)
        self.m = [_dev.array_module(f.data).zeros_like(f.data) for f in self.flats]
        self.v = [_dev.array_module(f.data).zeros_like(f.data) for f in self.flats]
        self._scratch = [(_dev.array_module(f.data).empty_like(f.data), _dev.array_module(f.data).empty_like(f.data))
                         for f in self.flats]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        self.step_count += 1
        b1, b2 = self.betas
        # fold both bias corrections into one step size: lr·√(1−β₂ᵗ)/(1−β₁ᵗ), eps scaled to match
        c1, c2 = 1 - b1 ** self.step_count, 1 - b2 ** self.step_count
        step_size, eps = self.lr * math.sqrt(c2) / c1, self.eps * math.sqrt(c2)  # Python floats: float32 math
        for flat, m, v, (a, b) in zip(self.flats, self.m, self.v, self._scratch):
            xp, p, g = _dev.array_module(flat.data), flat.data, flat.gather_grads()
            if self.weight_decay and self.decoupled:
                xp.multiply(p, 1 - self.lr * self.weight_decay, out=p)
            elif self.weight_decay:
                g = xp.add(g, xp.multiply(p, self.weight_decay, out=a), out=a)  # g + λp
            xp.multiply(m, b1, out=m)
            xp.add(m, xp.multiply(g, 1 - b1, out=b), out=m)                     # m ← β₁m + (1−β₁)g
            xp.multiply(v, b2, out=v)
            xp.add(v, xp.multiply(xp.multiply(g, g, out=b), 1 - b2, out=b), out=v)  # v ← β₂v + (1−β₂)g²
            denominator = xp.add(xp.sqrt(v, out=b), eps, out=b)
            xp.subtract(p, xp.divide(xp.multiply(m, step_size, out=a), denominator, out=a), out=p)

    def state_dict(self):
        """{"step": t, "m.i": m, "v.i": v} with i the parameter's position: the per-parameter format
        of checkpoints written before the buffers were flat, so either loads into the other."""
        state = {"step": self.step_count}
        for i, p in enumerate(self.params):
            for key, buffers in (("m", self.m), ("v", self.v)):
                state[f"{key}.{i}"] = _dev.to_numpy(p.flat.view(buffers[self.flats.index(p.flat)], p)).copy()
        return state

    def load_state_dict(self, state):
        self.step_count = int(state["step"])
        for i, p in enumerate(self.params):
            for key, buffers in (("m", self.m), ("v", self.v)):
                p.flat.view(buffers[self.flats.index(p.flat)], p)[...] = _dev.to_device(state[f"{key}.{i}"], p.device)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019): p ← p(1 − lr·λ) before the step."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


def clip_grad_norm(params, max_norm):
    """g ← g · min(1, max_norm/(‖g‖ + 1e-6)) for every gradient of ``params``, with ‖g‖ = √(Σ g²) the
    global L2 norm over all of them (Pascanu et al. 2013).

    ‖g‖ is summed in float64 and the scale computed and applied on the device: no value comes back
    to the host, so on a GPU the step need not wait here. Returns ‖g‖ as a 0-d float64 array on the
    device (``float()`` of it is a device→host read)."""
    grads = [flat.gather_grads() for flat in flatten(params)]
    xp = _dev.array_module(grads[0])
    squares = [xp.sum(xp.square(g, dtype=np.float64)) for g in grads]
    norm = xp.sqrt(squares[0] if len(squares) == 1 else xp.sum(xp.stack(squares)))
    scale = xp.minimum(xp.divide(max_norm, xp.add(norm, 1e-6)), 1.0)
    for g in grads:  # in g's dtype, as a Python-float scale would be: float32 gradients stay float32
        xp.multiply(g, xp.asarray(scale, dtype=g.dtype), out=g)
    return norm


class EMA:
    """Exponential moving average of parameters (Polyak averaging): s ← d·s + (1 − d)·p, over the
    model's flat buffers: 3 whole-buffer operations per update, whatever the number of parameters.
    ``shadow`` maps each parameter name to its view of the averaged buffer."""

    def __init__(self, module, decay=0.999):
        self.module, self.decay = module, decay
        names, params = zip(*module.named_parameters())
        self.flats = flatten(params)
        self.buffers = [_dev.array_module(f.data).copy(f.data) for f in self.flats]
        self._scratch = [_dev.array_module(f.data).empty_like(f.data) for f in self.flats]
        self.shadow = {name: p.flat.view(self.buffers[self.flats.index(p.flat)], p) for name, p in zip(names, params)}

    def update(self, module, decay=None):
        """One averaging step with ``decay`` (default: the decay this EMA was built with)."""
        decay = self.decay if decay is None else decay
        if module is not self.module:
            raise ValueError("EMA.update: pass the module this EMA was built over (it averages that module's buffers)")
        for flat, s, tmp in zip(self.flats, self.buffers, self._scratch):
            xp = _dev.array_module(s)
            xp.multiply(s, decay, out=s)
            xp.add(s, xp.multiply(flat.data, 1 - decay, out=tmp), out=s)

    def state_dict(self):
        """name → averaged parameter (NumPy), the format checkpoints have always had."""
        return {name: _dev.to_numpy(s).copy() for name, s in self.shadow.items()}

    def load_state_dict(self, state):
        for name, s in self.shadow.items():
            s[...] = _dev.to_device(state[name], _dev.get_device())

    def copy_to(self, module):
        """Load the averaged weights into ``module`` (e.g. a second model used for sampling)."""
        module.load_state_dict(self.state_dict())


LR_DECAYS = ("constant", "cosine")


def learning_rate(step, base_lr, warmup_steps, total_steps=None, decay="constant"):
    """The learning rate of step ``step`` (0-based): a linear warmup, lr = base_lr · (step + 1)/warmup_steps,
    then ``constant`` base_lr, or a ``cosine`` decay to 0 at total_steps (Loshchilov & Hutter 2017):
    lr = base_lr · ½(1 + cos(π · (step − warmup_steps)/(total_steps − warmup_steps)))."""
    if decay not in LR_DECAYS:
        raise ValueError(f"unknown lr decay {decay!r}: choose one of {', '.join(LR_DECAYS)}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay_at(step, decay, warmup=False, power=None):
    """The EMA decay for update ``step`` (0-based): ``decay``, or with warmup min(decay, (1 + step)/(10 + step))
    (the warm-up of TensorFlow's ExponentialMovingAverage with num_updates), so the average forgets
    the random initialisation within the first few hundred steps instead of ~1/(1 − decay) of them.

    With ``power`` γ ≥ 0 (which then replaces decay and warmup): the power-function EMA of Karras et al. 2024
    ("Analyzing and Improving the Training Dynamics of Diffusion Models", §3.1), β_t = (1 − 1/t)^(γ+1) at
    update t = step + 1 (0 at the first: the average starts at the first weights). The average then follows
    ∫₀ᵗ τ^γ θ_τ dτ / ∫₀ᵗ τ^γ dτ, every update so far weighted by τ^γ (γ = 0: exactly their plain mean), so
    its width grows with the run instead of being a fixed number of steps. A function of the step alone:
    a resumed run continues it exactly."""
    if power is not None:
        return (1.0 - 1.0 / (step + 1)) ** (power + 1)
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


MAX_SIGMA_REL = math.sqrt(1 / 12)  # the power EMA's σ_rel at γ = 0, a plain average of every update


def sigma_rel_to_gamma(sigma_rel):
    """The exponent γ ≥ 0 of the power EMA whose averaging profile has relative standard deviation σ_rel
    (Karras et al. 2024, §3.1): σ_rel² = (γ + 1) / ((γ + 2)² (γ + 3)), i.e. the largest real root of
    γ³ + 7γ² + (16 − σ_rel⁻²) γ + (12 − σ_rel⁻²) = 0 (σ_rel 0.05 → γ ≈ 16.97, 0.10 → γ ≈ 6.94)."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"the power EMA's sigma_rel lies in (0, {MAX_SIGMA_REL:.4f}] (gamma >= 0), got {sigma_rel}")
    inverse_square = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inverse_square, 12.0 - inverse_square])
    return float(max(0.0, roots[np.abs(roots.imag) < 1e-9].real.max()))
