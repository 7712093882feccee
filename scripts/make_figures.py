"""The figures of docs/walkthrough.md, drawn with tinyddpm's own schedules, forward process, posterior
and samplers:

- forward_process.png    x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε on a real digit, one row per schedule
- schedules.png          ᾱ_t and log-SNR_t = log(ᾱ_t/(1 − ᾱ_t)) per schedule
- posterior_variance.png β̃_t against β_t per schedule, and their ratio
- bayes_posterior.png    q(x_{t−1}|x_0) · q(x_t|x_{t−1}) ∝ q(x_{t−1}|x_t, x_0) for one pixel
- reverse_trajectory.png x_t and x̂_0 along a DDPM and a DDIM chain from the same x_T

    python scripts/make_figures.py [--out DIR] [--tiny] [--checkpoint PATH]

The reverse chain needs a noise predictor. No trained model ships with the project, so by default it
is the *ideal* one of a few training digits x^(1..N) (the empirical data distribution): there q(x_t)
is a mixture of N Gaussians N(√ᾱ_t x^(i), (1 − ᾱ_t) I), so E[x_0|x_t] is a softmax-weighted average of
the digits and ε̂ = (x_t − √ᾱ_t E[x_0|x_t]) / √(1 − ᾱ_t) is the minimiser of the DDPM loss. It
memorises: every sample it draws is one of the N digits. ``--checkpoint`` draws the chain of a model
trained by ``tinyddpm train`` instead.

The digits are the first MNIST training images: every source ``tinyddpm.data.load_mnist`` may find
(offline, the embedded subset) holds the same ones, so the pictures do not depend on which it found.
"""
import argparse
import math
import os
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display needed
from matplotlib import pyplot as plt  # noqa: E402

from tinyddpm import data  # noqa: E402
from tinyddpm.checkpoint import CheckpointError  # noqa: E402
from tinyddpm.diffusion import GaussianDiffusion  # noqa: E402
from tinyddpm.schedules import SCHEDULES, get_betas  # noqa: E402
from tinyddpm.tensor import Tensor, no_grad  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 1000
FORWARD_T = (0, 50, 100, 250, 500, 750, 1000)   # the paper's 1-based t; t = 0 is the data
REVERSE_T = (1000, 800, 650, 550, 450, 350, 250, 150, 50, 1)
COLORS = {"linear": "#143ca0", "cosine": "#b4321e", "quadratic": "#1e7846", "sigmoid": "#8c46a0"}
FIGURES = ("forward_process", "schedules", "posterior_variance", "bayes_posterior", "reverse_trajectory")  # .png


def diffusions():
    """GaussianDiffusion of every named schedule at T = 1000 steps."""
    return {name: GaussianDiffusion(get_betas(name, T)) for name in SCHEDULES}


class EmpiricalDenoiser:
    """The exact ε-predictor for data = N images x^(i) with equal weights (unconditional, ε-prediction):
        p(i | x_t) = softmax_i(−‖x_t − √ᾱ_t x^(i)‖² / (2(1 − ᾱ_t))),  E[x_0|x_t] = Σ_i p(i | x_t) x^(i),
        ε̂(x_t, t) = (x_t − √ᾱ_t E[x_0|x_t]) / √(1 − ᾱ_t).
    Called as the samplers call a network: model(Tensor x_t, t ints (B,), y) → Tensor, in x_t's dtype."""

    def __init__(self, diffusion, images):
        self.diffusion = diffusion
        self.images = np.asarray(images, dtype=np.float64)  # (N, C, H, W) in [−1, 1]

    def posterior_mean(self, xt, t):
        """E[x_0 | x_t] (float64, x_t's shape) at timesteps t (ints (B,), 0-based as the tables)."""
        x = np.asarray(xt, dtype=np.float64).reshape(len(xt), 1, -1)
        a, one_minus_a = (table[np.asarray(t)].reshape(-1, 1) for table in
                          (self.diffusion.alphas_cumprod, self.diffusion.one_minus_alphas_cumprod))
        squared = ((x - np.sqrt(a)[:, :, None] * self.images.reshape(1, len(self.images), -1)) ** 2).sum(axis=2)
        with no_grad():  # the library's max-subtracted softmax
            weights = Tensor(-squared / (2 * one_minus_a)).softmax(axis=1).numpy()
        return (weights @ self.images.reshape(len(self.images), -1)).reshape(np.shape(xt))

    def __call__(self, xt, t, y=None):
        x0 = self.posterior_mean(xt.data, t)
        return Tensor(self.diffusion.predict_eps_from_x0(xt.data.astype(np.float64), t, x0).astype(xt.dtype))


class InputRecorder:
    """Passes the calls of a one-image chain through to ``model`` and keeps each x_t it is given, keyed by
    t: what the network sees along the chain. (With guidance the batch is [x_t, x_t]: the first is kept.)"""

    def __init__(self, model):
        self.model, self.inputs = model, {}
        self.num_classes = getattr(model, "num_classes", 0)

    def __call__(self, xt, t, y=None):
        self.inputs[int(np.asarray(t)[0])] = xt.data[:1].copy()
        return self.model(xt, t, y)


# ---- figures ------------------------------------------------------------------------------------------
def _save(fig, path, dpi):
    # no "Software" entry: the bytes depend on the drawing only, not on the matplotlib version
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    plt.close(fig)


def _show(ax, image, title=None):
    ax.imshow(np.asarray(image).squeeze(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def forward_process(path, digit, dpi, seed):
    """One row per schedule: q_sample of the same digit with the same ε at each t of FORWARD_T."""
    eps = np.random.default_rng(seed).standard_normal(digit.shape).astype(np.float32)
    models = diffusions()
    fig, axes = plt.subplots(len(models), len(FORWARD_T), figsize=(1.05 * len(FORWARD_T), 1.3 * len(models)),
                             squeeze=False)
    for row, (name, d) in zip(axes, models.items()):
        for ax, t in zip(row, FORWARD_T):
            xt = digit if t == 0 else d.q_sample(digit[None], t - 1, eps[None])[0]
            _show(ax, xt, f"t = {t}" if name == "linear" else None)
            ax.set_xlabel(rf"$\bar\alpha_t$ = {1.0 if t == 0 else d.alphas_cumprod[t - 1]:.3g}", fontsize=7)
        row[0].set_ylabel(name, fontsize=9)
    fig.suptitle(r"$x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$"
                 "  (GaussianDiffusion.q_sample; one ε for every panel)", fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.88, bottom=0.04, hspace=0.35, wspace=0.08)
    _save(fig, path, dpi)


def schedules(path, dpi):
    """ᾱ_t and the log signal-to-noise ratio log(ᾱ_t/(1 − ᾱ_t)) against t, per schedule."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    t = np.arange(1, T + 1)
    for name, d in diffusions().items():
        left.plot(t, d.alphas_cumprod, color=COLORS[name], label=name)
        right.plot(t, np.log(d.alphas_cumprod) - d.log_one_minus_alphas_cumprod, color=COLORS[name], label=name)
    left.set_ylabel(r"$\bar\alpha_t = \prod_{s \leq t} (1 - \beta_s)$")
    right.set_ylabel(r"log-SNR $= \log \bar\alpha_t / (1 - \bar\alpha_t)$")
    right.axhline(0, color="gray", linewidth=0.6)
    for ax in (left, right):
        ax.set_xlabel("t")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi)


def posterior_variance(path, dpi):
    """β_t (solid) and β̃_t = β_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) (dashed) from q_posterior, and β̃_t/β_t, for t ≥ 2
    (β̃_1 = 0: x_0 is known)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    t = np.arange(1, T + 1)
    zeros = np.zeros((T, 1))
    for name, d in diffusions().items():
        _, beta_tilde, _ = d.q_posterior(zeros, zeros, np.arange(T))
        beta_tilde = beta_tilde[:, 0]
        left.plot(t[1:], d.betas[1:], color=COLORS[name], label=rf"{name} $\beta_t$")
        left.plot(t[1:], beta_tilde[1:], color=COLORS[name], linestyle="--", label=rf"{name} $\tilde\beta_t$")
        right.plot(t[1:], beta_tilde[1:] / d.betas[1:], color=COLORS[name], label=name)
    left.set_yscale("log")
    left.set_ylabel("variance of one step")
    left.set_xscale("log")
    left.legend(fontsize=7, ncol=2)
    right.set_xscale("log")
    right.set_ylim(0, 1.05)
    right.set_ylabel(r"$\tilde\beta_t / \beta_t = (1 - \bar\alpha_{t-1}) / (1 - \bar\alpha_t)$")
    for ax in (left, right):
        ax.set_xlabel("t")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _save(fig, path, dpi)


def _normal_pdf(x, mean, variance):
    return np.exp(-(x - mean) ** 2 / (2 * variance)) / math.sqrt(2 * math.pi * variance)


def bayes_posterior(path, dpi, x0=0.6, steps=(2, 500)):
    """For one pixel x_0 and a draw x_t (linear schedule), as functions of x_{t−1}: the prior
    q(x_{t−1}|x_0) = N(√ᾱ_{t−1} x_0, 1 − ᾱ_{t−1}), the likelihood q(x_t|x_{t−1}) ∝ N(x_{t−1}; x_t/√α_t,
    β_t/α_t), and their normalised product, the posterior N(μ̃_t, β̃_t) of q_posterior."""
    d = GaussianDiffusion(get_betas("linear", T))
    fig, axes = plt.subplots(1, len(steps), figsize=(4.5 * len(steps), 3.2), squeeze=False)
    for ax, t in zip(axes[0], steps):
        i = t - 1  # the tables' 0-based row of the paper's step t
        xt = d.q_sample(np.array([[x0]]), i, np.array([[0.5]])).item()
        mean, variance, _ = (v.item() for v in d.q_posterior(np.array([[x0]]), np.array([[xt]]), i))
        prior = (d.sqrt_alphas_cumprod[i - 1] * x0, d.one_minus_alphas_cumprod[i - 1])
        likelihood = (xt / math.sqrt(d.alphas[i]), d.betas[i] / d.alphas[i])
        spread = 4 * math.sqrt(max(prior[1], likelihood[1]))
        x = np.linspace(mean - spread, mean + spread, 400)
        ax.plot(x, _normal_pdf(x, mean, variance), color="#b4321e", linewidth=2.5,
                label=r"posterior $q(x_{t-1} | x_t, x_0)$")
        ax.plot(x, _normal_pdf(x, *prior), color="#1e7846", label=r"prior $q(x_{t-1} | x_0)$")
        ax.plot(x, _normal_pdf(x, *likelihood), color="#143ca0", linestyle="--",
                label=r"likelihood $q(x_t | x_{t-1})$, normalised")
        ax.set_title(rf"t = {t}: $x_0$ = {x0}, $x_t$ = {xt:.4f}, $\tilde\beta_t$ = {variance:.3g}", fontsize=9)
        ax.set_xlabel(r"$x_{t-1}$")
        ax.set_yticks([])
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, dpi)


def _chains(model, diffusion, shape, y, guidance, ddim_steps, seed):
    """{sampler: ({t: x_t}, x_0)} for DDPM (all T steps) and DDIM (η = 0) from the same x_T of ``shape``."""
    x_T = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    chains = {}
    for sampler, steps in (("ddpm", None), ("ddim", ddim_steps)):
        recorder = InputRecorder(model)
        x0 = diffusion.sample(recorder, shape, y=y, guidance=guidance, sampler=sampler, steps=steps,
                              progress=False, rng=np.random.default_rng(seed + 1), x_T=x_T)
        name = f"DDPM, {diffusion.num_timesteps} steps" if sampler == "ddpm" else f"DDIM, {steps} steps, η = 0"
        chains[name] = recorder.inputs, x0.data
    return chains


def reverse_trajectory(path, dpi, model, diffusion, shape, title, y=None, guidance=0.0, ddim_steps=50, seed=0,
                       digits=None):
    """Per sampler, a row of x_t at the visited t nearest each of REVERSE_T (then the sample x_0) and a
    row of the x̂_0 the sampler computed there; with ``digits`` (the ideal denoiser's data) the x̂_0 row
    ends with the training digit nearest the sample."""
    chains = _chains(model, diffusion, shape, y, guidance, ddim_steps, seed)
    fig, axes = plt.subplots(2 * len(chains), len(REVERSE_T) + 1, figsize=(0.95 * (len(REVERSE_T) + 1),
                                                                           1.35 * 2 * len(chains)), squeeze=False)
    for (label, (inputs, sample)), (row_x, row_x0) in zip(chains.items(), zip(axes[::2], axes[1::2])):
        visited = np.array(sorted(inputs))
        for ax_x, ax_x0, t in zip(row_x, row_x0, REVERSE_T):
            i = int(visited[np.abs(visited - (t - 1)).argmin()])
            x0_hat, _ = diffusion.model_x0_eps(model, inputs[i], i, y, guidance)
            _show(ax_x, inputs[i], f"t = {i + 1}")
            _show(ax_x0, x0_hat)
        _show(row_x[-1], sample, r"sample $x_0$")
        row_x[0].set_ylabel(f"{label}\n" r"$x_t$", fontsize=8)
        row_x0[0].set_ylabel(r"$\hat x_0$", fontsize=8)
        if digits is None:
            row_x0[-1].axis("off")
        else:
            distance = np.abs(digits - sample).reshape(len(digits), -1).max(axis=1)
            nearest = int(distance.argmin())
            _show(row_x0[-1], digits[nearest])
            row_x0[-1].set_xlabel(f"= training #{nearest}\n(max |Δ| {distance[nearest]:.1g})", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.99, top=0.9, bottom=0.07, hspace=0.55, wspace=0.08)
    _save(fig, path, dpi)


# ---- command line ---------------------------------------------------------------------------------------
class UsageError(Exception):
    """Bad input: main prints the message as one line and returns 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "docs", "figures"), help="directory for the PNGs "
                   "(default: docs/figures)")
    p.add_argument("--only", nargs="+", choices=FIGURES, default=None,
                   help="draw only these figures (default: all)")
    p.add_argument("--tiny", action="store_true", help="small and quick (the test): 4 digits, 10 DDIM steps, dpi 40")
    p.add_argument("--digits", type=int, default=None, help="training digits of the ideal denoiser (default 20)")
    p.add_argument("--ddim-steps", type=int, default=None, help="steps of the DDIM chain (default 50)")
    p.add_argument("--dpi", type=int, default=None, help="resolution of the PNGs (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of ε and x_T (default 0)")
    p.add_argument("--checkpoint", default=None, help="draw the reverse chain of this checkpoint.npz of "
                   "`tinyddpm train` (its EMA weights) instead of the ideal denoiser")
    p.add_argument("--label", type=int, choices=range(10), default=3, help="digit the checkpoint draws (default 3)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance w ≥ 0 of the checkpoint "
                   "(default 1)")
    args = p.parse_args(argv)
    small = dict(digits=4, ddim_steps=10, dpi=40) if args.tiny else dict(digits=20, ddim_steps=50, dpi=100)
    for name, default in small.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name, lowest in (("digits", 1), ("ddim_steps", 2), ("dpi", 10), ("guidance", 0)):
        if getattr(args, name) < lowest:
            p.error(f"--{name.replace('_', '-')} must be at least {lowest}, got {getattr(args, name)}")
    return args


def _trained_chain(args):
    """The reverse_trajectory arguments for --checkpoint."""
    from tinyddpm import train
    model, diffusion, config = train.load_model(args.checkpoint)
    if args.ddim_steps > diffusion.num_timesteps:
        raise UsageError(f"--ddim-steps {args.ddim_steps} exceeds the checkpoint's {diffusion.num_timesteps} steps")
    y = np.array([args.label]) if config.conditional else None
    guidance = args.guidance if config.conditional else 0.0  # an unconditional model has nothing to guide towards
    title = (f"trained model {os.path.basename(args.checkpoint)} (EMA weights)"
             + (f", digit {args.label}, guidance w = {guidance:g}" if y is not None else ""))
    return dict(model=model, diffusion=diffusion, shape=model.config.image_shape(1), title=title, y=y,
                guidance=guidance)


def _ideal_chain(digits):
    """The reverse_trajectory arguments for the ideal denoiser of ``digits``."""
    diffusion = GaussianDiffusion(get_betas("linear", T))
    title = (f"the ideal denoiser of {len(digits)} MNIST training digits (linear schedule): "
             "it memorises them, so each sample is one of them")
    return dict(model=EmpiricalDenoiser(diffusion, digits), diffusion=diffusion, shape=(1,) + digits.shape[1:],
                title=title, digits=digits)


def main(argv=None):
    args = parse_args(argv)
    try:
        mnist = data.load_mnist("train", download=False)
        digits = data.to_model_range(mnist.images[:args.digits])
        chain = _trained_chain(args) if args.checkpoint else _ideal_chain(digits)
    except (UsageError, CheckpointError, data.DataError) as e:
        print(f"make_figures: {e}", file=sys.stderr)
        return 2
    draw = {
        "forward_process": lambda path: forward_process(path, digits[0], args.dpi, args.seed),
        "schedules": lambda path: schedules(path, args.dpi),
        "posterior_variance": lambda path: posterior_variance(path, args.dpi),
        "bayes_posterior": lambda path: bayes_posterior(path, args.dpi),
        "reverse_trajectory": lambda path: reverse_trajectory(path, args.dpi, ddim_steps=args.ddim_steps,
                                                              seed=args.seed, **chain),
    }
    names = args.only or FIGURES
    os.makedirs(args.out, exist_ok=True)
    for name in names:
        draw[name](os.path.join(args.out, name + ".png"))
    print(f"wrote {', '.join(names)} to {args.out} (digits from {mnist.source})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
