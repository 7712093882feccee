"""Optimisers and training helpers: Adam/AdamW, global-norm clipping, EMA of parameters, LR warmup."""
import math

from . import device as _dev


class Adam:
    """Adam (Kingma & Ba 2015):  m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,
    p ← p − lr·m̂/(√v̂ + eps) with m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ).
    ``weight_decay`` adds λp to g (L2, as torch.optim.Adam)."""

    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = 0
        self.m = [_dev.array_module(p.data).zeros_like(p.data) for p in self.params]
        self.v = [_dev.array_module(p.data).zeros_like(p.data) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        self.step_count += 1
        b1, b2 = self.betas
        # fold both bias corrections into one step size: lr·√(1−β₂ᵗ)/(1−β₁ᵗ), eps scaled to match
        c1, c2 = 1 - b1 ** self.step_count, 1 - b2 ** self.step_count
        step_size, eps = self.lr * math.sqrt(c2) / c1, self.eps * math.sqrt(c2)
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay and self.decoupled:
                p.data *= 1 - self.lr * self.weight_decay
            elif self.weight_decay:
                g = g + self.weight_decay * p.data
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            p.data -= step_size * m / (_dev.array_module(v).sqrt(v) + eps)

    def state_dict(self):
        state = {"step": self.step_count}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            state[f"m.{i}"], state[f"v.{i}"] = _dev.to_numpy(m).copy(), _dev.to_numpy(v).copy()
        return state

    def load_state_dict(self, state):
        self.step_count = int(state["step"])
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            m[...] = _dev.to_device(state[f"m.{i}"], _dev.get_device())
            v[...] = _dev.to_device(state[f"v.{i}"], _dev.get_device())


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019): p ← p(1 − lr·λ) before the step."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


def clip_grad_norm(params, max_norm):
    """Scale all gradients by min(1, max_norm/‖g‖) with ‖g‖ the global L2 norm; returns ‖g‖."""
    grads = [p.grad for p in params if p.grad is not None]
    total = math.sqrt(sum(float((g.astype("float64") ** 2).sum()) for g in grads))
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad = p.grad * scale
    return total


class EMA:
    """Exponential moving average of parameters (Polyak averaging): s ← d·s + (1 − d)·p."""

    def __init__(self, module, decay=0.999):
        self.decay = decay
        self.shadow = {name: p.data.copy() for name, p in module.named_parameters()}

    def update(self, module):
        for name, p in module.named_parameters():
            s = self.shadow[name]
            s *= self.decay
            s += (1 - self.decay) * p.data

    def state_dict(self):
        return {name: _dev.to_numpy(s).copy() for name, s in self.shadow.items()}

    def load_state_dict(self, state):
        for name, s in self.shadow.items():
            s[...] = _dev.to_device(state[name], _dev.get_device())

    def copy_to(self, module):
        """Load the averaged weights into ``module`` (e.g. a second model used for sampling)."""
        module.load_state_dict(self.state_dict())


def warmup_lr(step, base_lr, warmup_steps):
    """Linear warmup: lr = base_lr · min(1, (step + 1)/warmup_steps)."""
    return base_lr if warmup_steps <= 0 else base_lr * min(1.0, (step + 1) / warmup_steps)
