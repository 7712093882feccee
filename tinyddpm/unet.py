"""The noise-prediction U-Net ε_θ(x_t, t, y) of Ho et al. 2020 ("Denoising Diffusion Probabilistic
Models", Appendix B), with the blocks the blog post "Diffusion Model原理" (a Stable Diffusion series) draws.

ResNet blocks (conv3×3 → GroupNorm → SiLU, twice, plus a residual), max-pool ×2 down, nearest ×2
up with skip connections by concatenation, self-attention blocks over pixels (LayerNorm →
4-head attention → residual; LayerNorm → Linear → GELU → Linear → residual), a sinusoidal timestep
embedding through an MLP with a class embedding (10 digits + a null class for classifier-free
guidance) added to it, injected into every ResNet block through SiLU → Linear, and a final 1×1
conv predicting the target (ε, x₀ or v).
"""
import math
from dataclasses import asdict, dataclass

import numpy as np

from . import device as _dev
from . import functional as F
from . import nn
from .tensor import Tensor


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 28
    in_channels: int = 1
    base_channels: int = 24               # not 32: at the same training time, narrower and longer won (docs/quality.md)
    channel_mults: tuple = (1, 2, 2)      # level i has base·mults[i] channels at size/2^i
    blocks_per_level: int = 1
    attention_resolutions: tuple = (7,)   # feature-map sizes that get a self-attention block
    num_groups: int = 8
    num_heads: int = 4
    dropout: float = 0.0
    num_classes: int = 10                 # 0: unconditional; the null class is index num_classes

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if self.image_size % 2 ** (len(self.channel_mults) - 1):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.channel_mults) - 1} "
                             f"(one halving per extra level in channel_mults {self.channel_mults})")
        for mult in self.channel_mults:
            if (self.base_channels * mult) % self.num_groups:
                raise ValueError(f"num_groups {self.num_groups} does not divide {self.base_channels * mult} channels")

    def to_dict(self):
        return asdict(self)

    def image_shape(self, n):
        """The shape of a batch of n images, (n, C, H, W)."""
        return (n, self.in_channels, self.image_size, self.image_size)


def timestep_embedding(t, dim):
    """Sinusoidal embedding (Vaswani et al. 2017, as in DDPM): [sin(t·ω_i), cos(t·ω_i)] with
    ω_i = 10000^(−i/(dim/2)), i < dim/2.  t: int (B,) → float32 (B, dim), computed (in float64) where
    t lives, so a GPU's timesteps never go through the host."""
    xp = _dev.array_module(t)
    half = dim // 2
    freqs = xp.exp(-math.log(10000.0) * xp.arange(half) / half)
    args = xp.asarray(t, dtype=np.float64)[:, None] * freqs[None]
    return xp.concatenate([xp.sin(args), xp.cos(args)], axis=1).astype(np.float32)


class ResBlock(nn.Module):
    """h = silu(GN(conv₁ x)) + Linear(silu(emb));  h = silu(GN(conv₂ dropout(h)));  out = h + skip(x)."""

    def __init__(self, cin, cout, emb_dim, groups, dropout):
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNormSiLU(groups, cout)
        self.emb_proj = nn.Linear(emb_dim, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNormSiLU(groups, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.dropout = dropout

    def forward(self, x, emb_silu):  # x (N, cin, H, W), emb_silu (N, emb_dim) → (N, cout, H, W)
        h = self.norm1(self.conv1(x), self.emb_proj(emb_silu))
        h = F.dropout(h, self.dropout, self.training)
        h = self.norm2(self.conv2(h))
        return h + (self.skip(x) if self.skip is not None else x)


class AttentionBlock(nn.Module):
    """Pixels as tokens: h = x + MHA(LN(x));  out = h + W₂ gelu(W₁ LN(h))."""

    def __init__(self, channels, heads):
        self.norm1 = nn.LayerNorm(channels)
        self.attn = nn.MultiheadSelfAttention(channels, heads)
        self.norm2 = nn.LayerNorm(channels)
        self.ff1 = nn.Linear(channels, channels)
        self.ff2 = nn.Linear(channels, channels)

    def forward(self, x, emb_silu=None):  # (N, C, H, W) → (N, C, H, W)
        n, c, hgt, wid = x.shape
        tokens = x.reshape(n, c, hgt * wid).permute(0, 2, 1)            # (N, HW, C)
        h = tokens + self.attn(self.norm1(tokens))
        h = h + self.ff2(F.gelu(self.ff1(self.norm2(h))))
        return h.permute(0, 2, 1).reshape(n, c, hgt, wid)


class UNet(nn.Module):
    def __init__(self, config=UNetConfig()):
        self.config = cfg = config
        self.num_classes = cfg.num_classes
        base, emb_dim = cfg.base_channels, 4 * cfg.base_channels
        self.time_mlp = [nn.Linear(base, emb_dim), nn.Linear(emb_dim, emb_dim)]
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.stem = nn.Conv2d(cfg.in_channels, base, 3, padding=1)

        def level_blocks(cin, cout, size):
            blocks = []
            for i in range(cfg.blocks_per_level):
                blocks.append(ResBlock(cin if i == 0 else cout, cout, emb_dim, cfg.num_groups, cfg.dropout))
                if size in cfg.attention_resolutions:
                    blocks.append(AttentionBlock(cout, cfg.num_heads))
            return blocks

        widths = [base * m for m in cfg.channel_mults]
        sizes = [cfg.image_size // 2 ** i for i in range(len(widths))]
        self.down = [level_blocks(cin, cout, s) for cin, cout, s in zip([base] + widths[:-1], widths, sizes)]
        mid = widths[-1]
        self.middle = [ResBlock(mid, mid, emb_dim, cfg.num_groups, cfg.dropout), AttentionBlock(mid, cfg.num_heads),
                       ResBlock(mid, mid, emb_dim, cfg.num_groups, cfg.dropout)]
        # up level i takes the deeper level's output concatenated with level i's skip
        deeper = [mid] + widths[:0:-1]
        self.up = [level_blocks(cin + skip, skip, s)
                   for cin, skip, s in zip(deeper, widths[::-1], sizes[::-1])]
        self.out = nn.Conv2d(base, cfg.in_channels, 1)

    def embed(self, t, y):
        """SiLU of the time embedding MLP output plus the class embedding: (B, 4·base)."""
        temb = Tensor(timestep_embedding(_dev.to_device(t), self.config.base_channels))
        emb = self.time_mlp[1](F.silu(self.time_mlp[0](temb)))
        if self.class_emb is not None:
            if y is None:  # unconditional sampling from a conditional model: the null class
                y = np.full(len(t), self.num_classes)
            emb = emb + self.class_emb(y)
        return F.silu(emb)  # every block applies SiLU → Linear: compute the SiLU once

    def forward(self, x, t, y=None):
        """x (B, C, H, W), t int (B,), y int (B,) or None → prediction (B, C, H, W)."""
        emb = self.embed(t, y)
        h = self.stem(x)
        skips = []
        for i, level in enumerate(self.down):
            for block in level:
                h = block(h, emb)
            skips.append(h)
            if i < len(self.down) - 1:
                h = F.max_pool2d(h, 2)
        for block in self.middle:
            h = block(h, emb)
        for i, level in enumerate(self.up):
            h = F.concat([h, skips.pop()], axis=1)
            for block in level:
                h = block(h, emb)
            if i < len(self.up) - 1:
                h = F.upsample_nearest2d(h, 2)
        return self.out(h)
