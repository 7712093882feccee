"""Gaussian diffusion: the forward process q, the learned reverse process p_θ, training and sampling.

Notation follows Ho et al. 2020 (DDPM) with 0-based steps t = 0 … T−1 as in their code and in improved
DDPM (Nichol & Dhariwal 2021): α_t = 1 − β_t, ᾱ_t = α_0·…·α_t, ᾱ_{−1} = 1, so step t = 0 is the first
noising step and x_{−1} stands for the data x_0 of the paper.

- forward:   q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t I),   q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)
- posterior: q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I),  β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t),
             μ̃_t = β_t √ᾱ_{t−1} / (1 − ᾱ_t) · x_0 + (1 − ᾱ_{t−1}) √α_t / (1 − ᾱ_t) · x_t
- reverse:   p_θ(x_{t−1} | x_t) = N(μ̃_t(x̂_0, x_t), σ_t² I), x̂_0 from the network's prediction.

The tables are float64 NumPy; each use gathers the rows for a batch of timesteps and casts them to the
dtype and device of the arrays they multiply. Arrays may be NumPy or CuPy (Tensors are unwrapped).
All randomness is drawn from an explicit ``numpy.random.Generator`` on the host in float64, then cast
and moved to the device, so runs (and training resumes) are reproducible bit for bit.
"""
import math

import numpy as np
from tqdm import tqdm

from . import device as _dev
from . import functional as F
from .guidance import as_guidance, noise_levels
from .tensor import Tensor, no_grad

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large")
SAMPLERS = ("ddpm", "ddim", "dpmpp2m")


def _array(x):
    return x.data if isinstance(x, Tensor) else x


def _like(a, like):
    """Host array a on the device of array ``like``."""
    return _dev.to_device(a, "cuda" if _dev.is_cupy(like) else "cpu")


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(μ₁, e^{ℓ₁}) ‖ N(μ₂, e^{ℓ₂})) elementwise, in nats:
    ½ (−1 + ℓ₂ − ℓ₁ + e^{ℓ₁−ℓ₂} + (μ₁ − μ₂)² e^{−ℓ₂}) = ½ (expm1(d) − d + (μ₁ − μ₂)² e^{−ℓ₂}), d = ℓ₁ − ℓ₂.
    Log variances keep it finite for tiny variances; expm1 keeps it exact (and ≥ 0) when ℓ₁ ≈ ℓ₂."""
    xp = _dev.array_module(mean1)
    d = logvar1 - logvar2
    return 0.5 * (xp.expm1(d) - d + (mean1 - mean2) ** 2 * xp.exp(-logvar2))


def _standard_normal_cdf(x):
    """Φ(x) ≈ ½ (1 + tanh(√(2/π) (x + 0.044715 x³))): the approximation of the DDPM code, so that
    bits/dim compare with published numbers (NumPy has no erf)."""
    xp = _dev.array_module(x)
    return 0.5 * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) for data on 256 levels in [−1, 1] under N(mean, e^{2·log_scale}) integrated over each
    level's bin of width 2/255 (Ho et al. 2020, Eq. 13); the end bins extend to ±∞ so the 256
    probabilities sum to 1. Probabilities are floored at 1e-12 before the log, as in the DDPM code."""
    xp = _dev.array_module(x)
    centered = x - mean
    inv_std = xp.exp(-log_scale)
    cdf_plus = _standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = xp.log(xp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = xp.log(xp.maximum(1.0 - cdf_min, 1e-12))
    log_bin = xp.log(xp.maximum(cdf_plus - cdf_min, 1e-12))
    return xp.where(x < -0.999, log_cdf_plus, xp.where(x > 0.999, log_one_minus_cdf_min, log_bin))


class GaussianDiffusion:
    """The DDPM forward/reverse processes for a β schedule.

    prediction: what the network outputs — "eps" (the noise ε, Ho et al. 2020), "x0" (the clean data) or
    "v" = √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022).
    variance: σ_t² of p_θ(x_{t−1}|x_t) — "fixed_small" β̃_t (the true posterior's) or "fixed_large" β_t
    (Ho et al. 2020, §3.2: both give similar samples; they are the lower and upper bounds on σ_t²).
    The last β may be 1: a zero terminal SNR (ᾱ_{T−1} = 0, ``schedules.rescale_zero_terminal_snr``), where
    x_{T−1} is pure noise; x̂_0 cannot be read from ε̂ there, so it needs the "v" or "x0" prediction."""

    def __init__(self, betas, prediction="eps", variance="fixed_small"):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D schedule of at least 2 steps (the t=0 posterior variance is "
                             f"clipped to the one at t=1), got shape {betas.shape}")
        if not ((betas[:-1] > 0) & (betas[:-1] < 1)).all() or not 0 < betas[-1] <= 1:
            raise ValueError("every beta must lie in (0, 1) (the last in (0, 1]: 1 is a zero terminal SNR)")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}: choose one of {', '.join(PREDICTIONS)}")
        if betas[-1] == 1 and prediction == "eps":
            raise ValueError("a zero terminal SNR (beta = 1 at the last step) needs prediction 'v' or 'x0': "
                             "at SNR 0 the noise prediction says nothing about x_0")
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}: choose one of {', '.join(VARIANCES)}")
        self.prediction, self.variance = prediction, variance
        self.num_timesteps = len(betas)

        self.betas = betas
        self.alphas = 1.0 - betas
        # ᾱ_t in log space, so that 1 − ᾱ_t = −expm1(log ᾱ_t) keeps full precision in the early steps
        # where ᾱ_t ≈ 1 (1.0 − ᾱ_t would cancel to a few significant digits there)
        with np.errstate(divide="ignore"):  # log 0 = −∞ at a zero terminal SNR: ᾱ_{T−1} = 0 exactly
            log_alphas_cumprod = np.cumsum(np.log1p(-betas))
        self.alphas_cumprod = np.exp(log_alphas_cumprod)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.one_minus_alphas_cumprod = -np.expm1(log_alphas_cumprod)
        one_minus_alphas_cumprod_prev = np.append(0.0, self.one_minus_alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(self.one_minus_alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(self.one_minus_alphas_cumprod)
        self.noise_levels = noise_levels(self.alphas_cumprod, self.one_minus_alphas_cumprod)  # σ_t of guidance
        self.posterior_variance = betas * one_minus_alphas_cumprod_prev / self.one_minus_alphas_cumprod
        # β̃_0 = 0 (at t = 0, x_{t−1} is the data itself): its log is clipped to log β̃_1, as in the DDPM code
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1],
                                                               self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / self.one_minus_alphas_cumprod
        self.posterior_mean_coef2 = (one_minus_alphas_cumprod_prev * np.sqrt(self.alphas)
                                     / self.one_minus_alphas_cumprod)
        if variance == "fixed_small":
            self.model_log_variance = self.posterior_log_variance_clipped
        else:  # β_t, except β̃_1 at t = 0 so the decoder's variance is not needlessly large (improved DDPM)
            self.model_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))

    # ---- helpers ---------------------------------------------------------------------------------
    def _timesteps(self, t, batch):
        """t (an int, or ints of shape (batch,), host or device) as a host int64 array (batch,)."""
        t = np.broadcast_to(np.asarray(_dev.to_numpy(t), dtype=np.int64), (batch,))
        if t.min() < 0 or t.max() >= self.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps}), got {t.min()}..{t.max()}")
        return t

    def _coef(self, table, t, like):
        """table[t] as a (B, 1, …, 1) array of like's dtype and device, to broadcast over a batch."""
        t = self._timesteps(t, like.shape[0])
        rows = table[t].astype(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))
        return _like(rows, like)

    # ---- the forward process -----------------------------------------------------------------------
    def q_mean_variance(self, x0, t):
        """q(x_t|x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (Ho et al. 2020, Eq. 4) → (mean, variance, log variance),
        the last two of shape (B, 1, …, 1)."""
        x0 = _array(x0)
        return (x0 * self._coef(self.sqrt_alphas_cumprod, t, x0), self._coef(self.one_minus_alphas_cumprod, t, x0),
                self._coef(self.log_one_minus_alphas_cumprod, t, x0))

    def q_sample(self, x0, t, noise):
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, a draw from q(x_t|x_0) given ε ~ N(0, I) (Ho et al. 2020, Eq. 4)."""
        x0, noise = _array(x0), _array(noise)
        return x0 * self._coef(self.sqrt_alphas_cumprod, t, x0) + noise * self._coef(
            self.sqrt_one_minus_alphas_cumprod, t, x0)

    def q_posterior(self, x0, xt, t):
        """q(x_{t−1}|x_t, x_0) = N(μ̃_t, β̃_t I) (Ho et al. 2020, Eqs. 6–7) → (μ̃_t, β̃_t, clipped log β̃_t)."""
        x0, xt = _array(x0), _array(xt)
        mean = x0 * self._coef(self.posterior_mean_coef1, t, x0) + xt * self._coef(self.posterior_mean_coef2, t, x0)
        return (mean, self._coef(self.posterior_variance, t, x0),
                self._coef(self.posterior_log_variance_clipped, t, x0))

    # ---- ε, x_0 and v: three views of the same x_t = √ᾱ x_0 + √(1−ᾱ) ε --------------------------------
    def predict_x0_from_eps(self, xt, t, eps):
        """x_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t."""
        xt, eps = _array(xt), _array(eps)
        return (xt - eps * self._coef(self.sqrt_one_minus_alphas_cumprod, t, xt)) / self._coef(
            self.sqrt_alphas_cumprod, t, xt)

    def predict_eps_from_x0(self, xt, t, x0):
        """ε = (x_t − √ᾱ_t x_0) / √(1−ᾱ_t)."""
        xt, x0 = _array(xt), _array(x0)
        return (xt - x0 * self._coef(self.sqrt_alphas_cumprod, t, xt)) / self._coef(
            self.sqrt_one_minus_alphas_cumprod, t, xt)

    def v_from_x0_eps(self, x0, t, eps):
        """v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022, §4)."""
        x0, eps = _array(x0), _array(eps)
        return eps * self._coef(self.sqrt_alphas_cumprod, t, x0) - x0 * self._coef(
            self.sqrt_one_minus_alphas_cumprod, t, x0)

    def predict_x0_from_v(self, xt, t, v):
        """x_0 = √ᾱ_t x_t − √(1−ᾱ_t) v."""
        xt, v = _array(xt), _array(v)
        return xt * self._coef(self.sqrt_alphas_cumprod, t, xt) - v * self._coef(
            self.sqrt_one_minus_alphas_cumprod, t, xt)

    def predict_eps_from_v(self, xt, t, v):
        """ε = √(1−ᾱ_t) x_t + √ᾱ_t v."""
        xt, v = _array(xt), _array(v)
        return xt * self._coef(self.sqrt_one_minus_alphas_cumprod, t, xt) + v * self._coef(
            self.sqrt_alphas_cumprod, t, xt)

    def training_target(self, x0, t, eps):
        """What the network is trained to output at x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε: ε, x_0 or v."""
        if self.prediction == "eps":
            return _array(eps)
        if self.prediction == "x0":
            return _array(x0)
        return self.v_from_x0_eps(x0, t, eps)

    def x0_eps_from_output(self, output, xt, t):
        """(x̂_0, ε̂) from the network's output, whichever parameterisation it predicts."""
        output, xt = _array(output), _array(xt)
        if self.prediction == "eps":
            return self.predict_x0_from_eps(xt, t, output), output
        if self.prediction == "x0":
            return output, self.predict_eps_from_x0(xt, t, output)
        return self.predict_x0_from_v(xt, t, output), self.predict_eps_from_v(xt, t, output)

    # ---- training (Algorithm 1) -------------------------------------------------------------------------
    def min_snr_weights(self, t, gamma):
        """Min-SNR-γ loss weights (Hang et al. 2023): weight the x_0 error by min(SNR_t, γ), SNR_t = ᾱ_t/(1 − ᾱ_t),
        which for the output this model predicts is min(SNR, γ)/SNR (ε), min(SNR, γ) (x_0) or
        min(SNR, γ)/(SNR + 1) (v), since ‖ε̂ − ε‖² = SNR‖x̂_0 − x_0‖² and ‖v̂ − v‖² = (SNR + 1)‖x̂_0 − x_0‖².
        t: int (B,) → float64 (B,)."""
        snr = self.alphas_cumprod[t] / self.one_minus_alphas_cumprod[t]
        clipped = np.minimum(snr, gamma)
        if self.prediction == "eps":
            return clipped / snr
        return clipped if self.prediction == "x0" else clipped / (snr + 1)  # finite at SNR 0 (zero terminal SNR)

    def training_loss(self, model, x0, y=None, p_uncond=0.1, min_snr_gamma=0.0, *, rng, shard=(0, 1)):
        """Algorithm 1 of Ho et al. 2020: t ~ U{0, …, T−1}, ε ~ N(0, I), loss = ‖target − model(x_t, t, y)‖²
        (mean), x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε; with min_snr_gamma γ > 0 each sample's squared error is
        weighted by ``min_snr_weights``. Each label is replaced by the null class
        ``model.num_classes`` with probability p_uncond, so one network learns both ε(x_t, y) and
        ε(x_t) for classifier-free guidance (Ho & Salimans 2022).

        shard (i, n): x0 holds the i-th of n equal parts of a global batch (data parallelism,
        tinyddpm.distributed). t, ε and the null labels are drawn for the whole global batch and
        part i kept, so every rank's ``rng`` stays in step and each image gets the draws one process
        with the whole batch would give it."""
        if min_snr_gamma < 0:
            raise ValueError(f"min_snr_gamma is ≥ 0 (0: unweighted), got {min_snr_gamma}")
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond is a probability, got {p_uncond}")
        x0 = _array(x0)
        batch = x0.shape[0]
        part, parts = shard
        rows, whole = slice(part * batch, (part + 1) * batch), parts * batch
        t = rng.integers(0, self.num_timesteps, size=whole)[rows]
        eps = _like(rng.standard_normal((whole,) + x0.shape[1:]).astype(x0.dtype)[rows], x0)
        if y is not None:
            y = _dev.to_numpy(y).astype(np.int64)
            y = np.where(rng.random(whole)[rows] < p_uncond, self._num_classes(model), y)
        xt = self.q_sample(x0, t, eps)
        output = self._call(model, xt, t, y)
        target = self.training_target(x0, t, eps)
        if not min_snr_gamma:
            return F.mse_loss(output, target)
        weights = _like(self.min_snr_weights(t, min_snr_gamma).astype(x0.dtype).reshape((batch,) + (1,) * (x0.ndim - 1)), x0)
        error = output - target
        return F.mean(error * error * weights)

    @staticmethod
    def _num_classes(model):
        n = getattr(model, "num_classes", 0)
        if not n:
            raise ValueError("class labels were given but the model is unconditional (num_classes = 0)")
        return n

    def _call(self, model, xt, t, y):
        """model(x_t, t, y) with t and y moved to x_t's device; returns the output Tensor."""
        t_dev = _like(np.asarray(t, dtype=np.int64), xt)
        y_dev = None if y is None else _like(np.asarray(y, dtype=np.int64), xt)
        return model(Tensor(xt), t_dev, y_dev)

    # ---- the reverse process ----------------------------------------------------------------------------
    def model_x0_eps(self, model, xt, t, y=None, guidance=0.0, clip_x0=True):
        """(x̂_0, ε̂) at x_t. ``guidance``: a weight w or a ``Guidance``, whose weight w_t at this t
        (tinyddpm.guidance) is classifier-free guidance (Ho & Salimans 2022). With w_t > 0 the conditional
        and the null-class predictions go through the network as one batch and are combined as
        (1 + w_t) · conditional − w_t · null, in one of two spaces:
          "eps": the network outputs (ε, x_0 or v). Every parameterisation is affine in x_t and the
                 weights sum to 1, so this is ε̂ = (1 + w) ε(x_t, y) − w ε(x_t, ∅) whichever the network
                 predicts; combining the outputs themselves never divides by √ᾱ_t (0 at zero terminal SNR).
          "x0":  the two x̂_0, each clipped to [−1, 1] first when clip_x0. Without clipping this is
                 algebraically the "eps" combination (again affine, weights summing to 1); with it, the
                 guided x̂_0 is extrapolated from in-range estimates only.
        Where w_t = 0 only the conditional prediction is computed. With clip_x0, x̂_0 is clipped to the
        data range [−1, 1] and ε̂ recomputed from it, so that DDIM stays consistent with the clipped x̂_0."""
        xt = _array(xt)
        batch = xt.shape[0]
        t = self._timesteps(t, batch)
        guidance = as_guidance(guidance)
        weights = guidance.weights(self.noise_levels)
        if y is not None:
            null_class = self._num_classes(model)
            y = np.broadcast_to(_dev.to_numpy(y).astype(np.int64), (batch,))
        if weights[t].any():
            if y is None:
                raise ValueError("classifier-free guidance needs class labels y")
            xp = _dev.array_module(xt)
            both = _array(self._call(model, xp.concatenate([xt, xt]), np.concatenate([t, t]),
                                     np.concatenate([y, np.full(batch, null_class)])))
            # (1 + w) and w each rounded once from float64, as Python-float factors were
            plus_one, w = self._coef(1.0 + weights, t, xt), self._coef(weights, t, xt)
            if guidance.space == "eps":
                x0, eps = self.x0_eps_from_output(both[:batch] * plus_one - both[batch:] * w, xt, t)
            else:
                x0_cond, _ = self.x0_eps_from_output(both[:batch], xt, t)
                x0_null, _ = self.x0_eps_from_output(both[batch:], xt, t)
                if clip_x0:
                    x0_cond, x0_null = xp.clip(x0_cond, -1.0, 1.0), xp.clip(x0_null, -1.0, 1.0)
                x0 = x0_cond * plus_one - x0_null * w
                eps = self.predict_eps_from_x0(xt, t, x0)
        else:
            x0, eps = self.x0_eps_from_output(self._call(model, xt, t, y), xt, t)
        if clip_x0:
            x0 = _dev.array_module(x0).clip(x0, -1.0, 1.0)
            eps = self.predict_eps_from_x0(xt, t, x0)
        return x0, eps

    def p_mean_variance(self, model, xt, t, y=None, guidance=0.0, clip_x0=True):
        """p_θ(x_{t−1}|x_t) = N(μ̃_t(x̂_0, x_t), σ_t² I) (Ho et al. 2020, Eq. 1 with the posterior mean of
        Eq. 7 at the predicted x̂_0) → (mean, variance, log variance, x̂_0)."""
        xt = _array(xt)
        x0, _ = self.model_x0_eps(model, xt, t, y, guidance, clip_x0)
        mean, _, _ = self.q_posterior(x0, xt, t)
        log_variance = self._coef(self.model_log_variance, t, xt)
        return mean, _dev.array_module(xt).exp(log_variance), log_variance, x0

    def p_sample(self, model, xt, t, y=None, guidance=0.0, clip_x0=True, *, rng):
        """One step of Algorithm 2 (Ho et al. 2020): x_{t−1} = μ_θ + σ_t z, z ~ N(0, I); no noise at t = 0.
        t is one int for the whole batch."""
        xt = _array(xt)
        mean, _, log_variance, _ = self.p_mean_variance(model, xt, t, y, guidance, clip_x0)
        if t == 0:
            return mean
        z = _like(rng.standard_normal(xt.shape).astype(xt.dtype), xt)
        return mean + _dev.array_module(xt).exp(0.5 * log_variance) * z

    def ddim_sigma(self, t, t_prev, eta):
        """σ of the DDIM step t → t_prev (Song et al. 2021, Eq. 16):
        σ = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev), with ᾱ_prev = 1 when t_prev = −1.
        η = 1 with t_prev = t − 1 gives σ² = β̃_t (DDPM); η = 0 gives a deterministic step."""
        a_t, one_minus_a_t = self.alphas_cumprod[t], self.one_minus_alphas_cumprod[t]
        a_prev, one_minus_a_prev = ((self.alphas_cumprod[t_prev], self.one_minus_alphas_cumprod[t_prev])
                                    if t_prev >= 0 else (1.0, 0.0))
        return eta * math.sqrt(one_minus_a_prev / one_minus_a_t * (1.0 - a_t / a_prev))

    def ddim_step(self, model, xt, t, t_prev, y=None, guidance=0.0, eta=0.0, clip_x0=True, *, rng):
        """x_{t_prev} = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z (Song et al. 2021, Eq. 12): the same
        marginals q(x_t|x_0) as DDPM for any η, so steps may be skipped (t_prev < t − 1)."""
        xt = _array(xt)
        x0, eps = self.model_x0_eps(model, xt, t, y, guidance, clip_x0)
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else 1.0
        sigma = self.ddim_sigma(t, t_prev, eta)
        x_prev = x0 * math.sqrt(a_prev) + eps * math.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0))
        if sigma > 0:  # draw only when used: η = 0 consumes no randomness at all
            x_prev = x_prev + sigma * _like(rng.standard_normal(xt.shape).astype(xt.dtype), xt)
        return x_prev

    def log_snr_half(self, t):
        """λ_t = log(α_t/σ_t) = ½ log(ᾱ_t/(1 − ᾱ_t)), the half log-SNR DPM-Solver steps in; +∞ at t = −1,
        −∞ where ᾱ_t = 0 (zero terminal SNR)."""
        if t < 0:
            return math.inf
        if self.alphas_cumprod[t] == 0:
            return -math.inf
        return 0.5 * (math.log(self.alphas_cumprod[t]) - math.log(self.one_minus_alphas_cumprod[t]))

    def dpmpp_2m_step(self, model, xt, t, t_prev, history=None, y=None, guidance=0.0, clip_x0=True):
        """One step t → t_prev of DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), a second-order
        multistep solver of the probability-flow ODE in the data prediction D = x̂_0, with α = √ᾱ,
        σ = √(1 − ᾱ), h = λ_prev − λ_t:
            x_prev = (σ_prev/σ_t) x_t − α_prev (e^{−h} − 1) D̃,
            D̃ = (1 + 1/(2r)) D_t − 1/(2r) D_before,  r = h_before/h
        (D̃ = D_t on the first step, and on the last, where σ_prev = 0 and x_prev = D_t). ``history`` is
        the (D, h) the previous step returned; returns (x_prev, (D_t, h)). From ᾱ_t = 0 (zero terminal
        SNR: λ_t = −∞, h = ∞) the step is x_prev = σ_prev x_t + α_prev D_t, and 1/(2r) = 0 on the next."""
        xt = _array(xt)
        x0, _ = self.model_x0_eps(model, xt, t, y, guidance, clip_x0)
        if t_prev < 0:
            return x0, (x0, math.inf)
        h = self.log_snr_half(t_prev) - self.log_snr_half(t)
        d = x0
        if history is not None:
            x0_before, h_before = history
            half_inverse_r = h / (2 * h_before)
            d = x0 * (1 + half_inverse_r) - x0_before * half_inverse_r
        sigma_ratio = math.sqrt(self.one_minus_alphas_cumprod[t_prev] / self.one_minus_alphas_cumprod[t])
        x_prev = xt * sigma_ratio - d * (float(self.sqrt_alphas_cumprod[t_prev]) * math.expm1(-h))  # Python floats keep xt's dtype
        return x_prev, (x0, h)

    def ddim_timesteps(self, steps):
        """``steps`` timesteps from T−1 down to 0, evenly spaced (distinct since steps ≤ T)."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"DDIM steps must lie in [1, {self.num_timesteps}], got {steps}")
        return np.linspace(self.num_timesteps - 1, 0, steps).round().astype(np.int64)

    def log_snr_timesteps(self, steps):
        """Up to ``steps`` timesteps from T−1 down to 0, evenly spaced in λ_t (the "logSNR" grid of Lu et
        al. 2022, their choice for low-resolution images), each rounded to the nearest discrete t and kept
        once where several round to the same t (near t = 0 with many steps; the grid is then shorter). The
        uniform-t grid would take its largest λ step (≈ 3.6 of 9.7 at 10 steps, linear schedule) into t = 0,
        where the second-order extrapolation of DPM-Solver++(2M) overshoots. With a zero terminal SNR
        (λ_{T−1} = −∞) the grid is spread over the finite λ, from λ_{T−2}, and starts at T−1 instead."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"DPM-Solver++ steps must lie in [1, {self.num_timesteps}], got {steps}")
        lam = np.array([self.log_snr_half(t) for t in range(self.num_timesteps)])  # decreasing in t
        finite = lam[np.isfinite(lam)]
        targets = np.linspace(finite[-1], finite[0], steps)
        nearest = np.abs(finite[None, :] - targets[:, None]).argmin(axis=1)
        grid = np.unique(nearest)[::-1]
        grid[0] = self.num_timesteps - 1  # sampling starts from pure noise, at the last step
        return grid

    def sample(self, model, shape, y=None, guidance=0.0, sampler="ddpm", steps=None, eta=0.0, clip_x0=True,
               progress=True, *, rng, return_trajectory=0, x_T=None, dtype=np.float32):
        """Draw samples, starting from x_T ~ N(0, I) (or the given ``x_T``).

        sampler "ddpm": Algorithm 2 of Ho et al. 2020 over all T steps (``steps`` must be None or T).
        sampler "ddim": Song et al. 2021 over ``steps`` evenly spaced timesteps (default T), noise scale η.
        sampler "dpmpp2m": DPM-Solver++(2M) (Lu et al. 2022) over ``steps`` timesteps evenly spaced in
        log-SNR (``log_snr_timesteps``, default T), deterministic.
        guidance: a weight w, ε̂ = (1 + w) ε(x_t, y) − w ε(x_t, ∅) (needs labels y, one per sample), or a
        ``tinyddpm.guidance.Guidance`` (an interval of noise levels, a schedule in t, the space).
        Returns the final x_0 as a Tensor; with return_trajectory = k ≥ 2, also a list of k Tensors
        evenly spaced along the chain from x_T to x_0 (both included; fewer if the chain is shorter)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if sampler == "ddpm" and steps not in (None, self.num_timesteps):
            raise ValueError(f"the ddpm sampler runs all {self.num_timesteps} steps; use sampler='ddim' to skip steps")
        if return_trajectory == 1 or return_trajectory < 0:
            raise ValueError(f"return_trajectory is 0 or a number of frames >= 2, got {return_trajectory}")
        if y is not None and len(y) != shape[0]:
            raise ValueError(f"got {len(y)} labels for {shape[0]} samples")
        if x_T is None:
            x = _dev.to_device(rng.standard_normal(shape).astype(dtype))
        else:
            x = _array(x_T)
        steps = self.num_timesteps if steps is None else steps
        timesteps = (np.arange(self.num_timesteps - 1, -1, -1) if sampler == "ddpm" else
                     self.ddim_timesteps(steps) if sampler == "ddim" else self.log_snr_timesteps(steps))
        # the chain has len(timesteps) + 1 states, x_T first: keep only the frames asked for
        keep = set(np.linspace(0, len(timesteps), return_trajectory).round().astype(np.int64).tolist())
        frames = [Tensor(x)] if 0 in keep else []
        history = None  # DPM-Solver++(2M)'s previous (x̂_0, h)
        with no_grad():
            for i, t in enumerate(tqdm(timesteps, desc=sampler, unit="step", disable=not progress)):
                t = int(t)
                if sampler == "ddpm":
                    x = self.p_sample(model, x, t, y, guidance, clip_x0, rng=rng)
                else:
                    t_prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
                    if sampler == "ddim":
                        x = self.ddim_step(model, x, t, t_prev, y, guidance, eta, clip_x0, rng=rng)
                    else:
                        x, history = self.dpmpp_2m_step(model, x, t, t_prev, history, y, guidance, clip_x0)
                if i + 1 in keep:
                    frames.append(Tensor(x))
        return (Tensor(x), frames) if return_trajectory else Tensor(x)

    # ---- the variational bound ------------------------------------------------------------------------
    def bits_per_dim(self, model, x0, y=None, *, rng, progress=False):
        """The negative variational bound of Ho et al. 2020 (Eq. 5) in bits per dimension, per image:
        L = KL(q(x_{T−1}|x_0) ‖ N(0, I)) + Σ_{t≥1} KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t))
            − log p_θ(x_0|x_{t=0}) (the discretised Gaussian decoder, Eq. 13),
        each term estimated with one draw x_t ~ q(x_t|x_0), divided by (number of dims)·ln 2.
        x0 (in the model's dtype) holds data on 256 levels in [−1, 1]; returns a host float64 array (B,)."""
        x0 = _array(x0)
        batch = x0.shape[0]
        reduce_axes = tuple(range(1, x0.ndim))
        nats_to_bits = 1.0 / (math.log(2.0) * (x0.size // batch))
        x0_64 = x0.astype(np.float64)

        def bits(nats):  # mean over the dimensions of each image, in bits
            return _dev.to_numpy(nats.sum(axis=reduce_axes)) * nats_to_bits

        prior_mean, _, prior_log_variance = self.q_mean_variance(x0_64, self.num_timesteps - 1)
        total = bits(normal_kl(prior_mean, prior_log_variance, 0.0, 0.0))
        with no_grad():
            for t in tqdm(range(self.num_timesteps - 1, -1, -1), desc="bits/dim", disable=not progress):
                eps = _like(rng.standard_normal(x0.shape).astype(x0.dtype), x0)
                xt = self.q_sample(x0, t, eps)
                mean, _, log_variance, _ = self.p_mean_variance(model, xt, t, y)
                mean, log_variance = mean.astype(np.float64), log_variance.astype(np.float64)
                if t == 0:
                    total += bits(-discretized_gaussian_log_likelihood(x0_64, mean, 0.5 * log_variance))
                else:
                    true_mean, _, true_log_variance = self.q_posterior(x0_64, xt.astype(np.float64), t)
                    total += bits(normal_kl(true_mean, true_log_variance, mean, log_variance))
        return total
