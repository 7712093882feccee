"""PyTorch twins of tinyddpm's U-Net and kernels, for side-by-side checks and timings.

PyTorch is never a dependency of tinyddpm: only the benchmarks (and an optional test) import this.
The twin's parameter names and layouts equal tinyddpm's, so one state dict loads into both.
"""
import numpy as np

from tinyddpm.extras import import_torch
from tinyddpm.unet import timestep_embedding

torch = import_torch("the PyTorch twin (benchmarks/torch_twins.py)")
tnn, tf = torch.nn, torch.nn.functional


class ResBlock(tnn.Module):
    def __init__(self, block):
        super().__init__()
        cin, cout = block.conv1.weight.shape[1], block.conv1.weight.shape[0]
        self.conv1 = tnn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = tnn.GroupNorm(block.norm1.num_groups, cout)
        self.emb_proj = tnn.Linear(block.emb_proj.weight.shape[1], cout)
        self.conv2 = tnn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = tnn.GroupNorm(block.norm2.num_groups, cout)
        self.skip = tnn.Conv2d(cin, cout, 1) if block.skip is not None else None

    def forward(self, x, emb_silu):
        h = tf.silu(self.norm1(self.conv1(x))) + self.emb_proj(emb_silu)[:, :, None, None]
        h = tf.silu(self.norm2(self.conv2(h)))
        return h + (self.skip(x) if self.skip is not None else x)


class AttentionBlock(tnn.Module):
    def __init__(self, block):
        super().__init__()
        c = block.ff1.weight.shape[0]
        self.norm1 = tnn.LayerNorm(c)
        self.attn = tnn.MultiheadAttention(c, block.attn.num_heads, batch_first=True)
        self.norm2 = tnn.LayerNorm(c)
        self.ff1, self.ff2 = tnn.Linear(c, c), tnn.Linear(c, c)

    def forward(self, x, emb_silu=None):
        n, c, h, w = x.shape
        tokens = x.reshape(n, c, h * w).permute(0, 2, 1)
        q = self.norm1(tokens)
        t = tokens + self.attn(q, q, q, need_weights=False)[0]
        t = t + self.ff2(tf.gelu(self.ff1(self.norm2(t))))
        return t.permute(0, 2, 1).reshape(n, c, h, w)


def _twin_block(block):
    return AttentionBlock(block) if hasattr(block, "attn") else ResBlock(block)


class UNet(tnn.Module):
    """The same network as tinyddpm.unet.UNet, built from a tinyddpm model's structure."""

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.config, self.num_classes = cfg, cfg.num_classes
        base, emb_dim = cfg.base_channels, 4 * cfg.base_channels
        self.time_mlp = tnn.ModuleList([tnn.Linear(base, emb_dim), tnn.Linear(emb_dim, emb_dim)])
        self.class_emb = tnn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.stem = tnn.Conv2d(cfg.in_channels, base, 3, padding=1)
        self.down = tnn.ModuleList(tnn.ModuleList(_twin_block(b) for b in level) for level in model.down)
        self.middle = tnn.ModuleList(_twin_block(b) for b in model.middle)
        self.up = tnn.ModuleList(tnn.ModuleList(_twin_block(b) for b in level) for level in model.up)
        self.out = tnn.Conv2d(base, cfg.in_channels, 1)
        self.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})

    def forward(self, x, t, y=None):
        temb = torch.from_numpy(timestep_embedding(np.asarray(t), self.config.base_channels)).to(x.device)
        emb = self.time_mlp[1](tf.silu(self.time_mlp[0](temb)))
        if self.class_emb is not None:
            y = torch.full((len(t),), self.num_classes) if y is None else torch.as_tensor(np.array(y))  # a copy: torch wants writable memory
            emb = emb + self.class_emb(y.to(x.device))
        emb = tf.silu(emb)
        h, skips = self.stem(x), []
        for i, level in enumerate(self.down):
            for block in level:
                h = block(h, emb)
            skips.append(h)
            if i < len(self.down) - 1:
                h = tf.max_pool2d(h, 2)
        for block in self.middle:
            h = block(h, emb)
        for i, level in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in level:
                h = block(h, emb)
            if i < len(self.up) - 1:
                h = tf.interpolate(h, scale_factor=2, mode="nearest")
        return self.out(h)


def op_timer(name, on_gpu):
    """time(case, direction, timer, repeats) of the PyTorch op for a kernel BENCH case."""
    device = "cuda" if on_gpu else "cpu"

    def as_torch(a, grad=False):
        t = torch.as_tensor(a.get() if hasattr(a, "get") else a, device=device)
        return t.requires_grad_(grad)

    def run(case, direction, timer, repeats):
        inputs = {k: as_torch(v, grad=k in DIFFERENTIABLE[name]) if hasattr(v, "shape") else v
                  for k, v in case.items() if "saved" not in k}
        forward = lambda: OPS[name](inputs)  # noqa: E731
        if direction == "forward":
            with torch.no_grad():
                return timer(forward, repeats)
        out = forward()
        upstream = inputs[UPSTREAM[name]]
        return timer(lambda: torch.autograd.grad(out, [inputs[k] for k in DIFFERENTIABLE[name]], upstream,
                                                 retain_graph=True), repeats)
    return run


# The keys of each kernel module's BENCH.make_case that PyTorch sees.
OPS = {
    "conv2d": lambda c: tf.conv2d(c["x"], c["w"], c["b"], stride=c["stride"], padding=c["padding"]),
    "group_norm": lambda c: tf.group_norm(c["x"], c["num_groups"], c["weight"], c["bias"], 1e-5),
    "group_norm_silu": lambda c: tf.silu(tf.group_norm(c["x"], c["num_groups"], c["weight"], c["bias"], 1e-5))
    + c["emb"][:, :, None, None],
    "attention": lambda c: tf.scaled_dot_product_attention(c["q"], c["k"], c["v"]),
}
DIFFERENTIABLE = {"conv2d": ("x", "w", "b"), "group_norm": ("x", "weight", "bias"),
                  "group_norm_silu": ("x", "weight", "bias", "emb"), "attention": ("q", "k", "v")}
UPSTREAM = {"conv2d": "dy", "group_norm": "dy", "group_norm_silu": "dy", "attention": "do"}
