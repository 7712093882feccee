"""An independent float64 NumPy reference for the diffusion tests, written from the equations.

It deliberately takes other routes than tinyddpm.diffusion (which it does not import): ᾱ by an explicit
running product, the posterior by adding Gaussian precisions (Bayes' rule for a linear-Gaussian pair),
the forward marginal by composing single steps, KL by Gauss–Hermite quadrature, the normal CDF by erf.
"""
import math

import numpy as np


# ---- schedules (Ho et al. 2020; Nichol & Dhariwal 2021) --------------------------------------------
def linear_betas(T, beta_start=1e-4, beta_end=0.02):
    scale = 1000.0 / T
    if T == 1:
        return np.array([scale * beta_start])
    step = scale * (beta_end - beta_start) / (T - 1)
    return np.array([scale * beta_start + i * step for i in range(T)])


def cosine_betas(T, s=0.008, max_beta=0.999):
    def alpha_bar(tau):
        return math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)])


# ---- tables -------------------------------------------------------------------------------------------
def tables(betas):
    """The DDPM tables, step by step. Posterior q(x_{t−1}|x_t, x_0) ∝ q(x_t|x_{t−1}) q(x_{t−1}|x_0):
    precision α_t/β_t + 1/(1 − ᾱ_{t−1}); mean = variance · (√α_t/β_t · x_t + √ᾱ_{t−1}/(1 − ᾱ_{t−1}) · x_0).
    At t = 0, x_{t−1} is x_0 itself: variance 0, mean x_0."""
    T = len(betas)
    alpha_bar, alpha_bar_prev = np.empty(T), np.empty(T)
    # 1 − ᾱ by the variance recursion of compose_forward_steps (a sum of positive terms: no cancellation)
    one_minus, one_minus_prev = np.empty(T), np.empty(T)
    running, running_complement = 1.0, 0.0
    for t in range(T):
        alpha_bar_prev[t], one_minus_prev[t] = running, running_complement
        running *= 1.0 - betas[t]
        running_complement = (1.0 - betas[t]) * running_complement + betas[t]
        alpha_bar[t], one_minus[t] = running, running_complement
    var, c_x0, c_xt = np.empty(T), np.empty(T), np.empty(T)
    for t in range(T):
        if t == 0:
            var[t], c_x0[t], c_xt[t] = 0.0, 1.0, 0.0
            continue
        alpha = 1.0 - betas[t]
        var[t] = 1.0 / (alpha / betas[t] + 1.0 / one_minus_prev[t])
        c_xt[t] = var[t] * math.sqrt(alpha) / betas[t]
        c_x0[t] = var[t] * math.sqrt(alpha_bar_prev[t]) / one_minus_prev[t]
    log_var_clipped = np.log(np.where(np.arange(T) == 0, var[1], var))
    return {"betas": np.asarray(betas, dtype=np.float64), "alphas": 1.0 - np.asarray(betas),
            "alphas_cumprod": alpha_bar, "alphas_cumprod_prev": alpha_bar_prev,
            "one_minus_alphas_cumprod": one_minus,
            "sqrt_alphas_cumprod": np.sqrt(alpha_bar), "sqrt_one_minus_alphas_cumprod": np.sqrt(one_minus),
            "posterior_variance": var, "posterior_log_variance_clipped": log_var_clipped,
            "posterior_mean_coef1": c_x0, "posterior_mean_coef2": c_xt}


def compose_forward_steps(betas, t):
    """q(x_t|x_0) by composing t+1 single steps x_s = √α_s x_{s−1} + √β_s z_s: a scaled Gaussian plus an
    independent Gaussian is Gaussian, so mean coefficient m ← √α_s m and variance v ← α_s v + β_s.
    Returns (m, v) with q(x_t|x_0) = N(m x_0, v)."""
    m, v = 1.0, 0.0
    for s in range(t + 1):
        m *= math.sqrt(1.0 - betas[s])
        v = (1.0 - betas[s]) * v + betas[s]
    return m, v


# ---- densities, KL and the discretised decoder ------------------------------------------------------------
def gaussian_log_density(x, mean, var):
    """Σ log N(x_i; mean_i, var)."""
    x, mean = np.asarray(x, dtype=np.float64), np.asarray(mean, dtype=np.float64)
    return float(np.sum(-0.5 * math.log(2 * math.pi * var) - (x - mean) ** 2 / (2 * var)))


def posterior_mean_eps_form(betas, t, xt, eps):
    """μ̃_t = (x_t − β_t/√(1 − ᾱ_t) · ε) / √α_t (Ho et al. 2020, Eq. 11)."""
    m, v = compose_forward_steps(betas, t)
    return (xt - betas[t] / math.sqrt(v) * eps) / math.sqrt(1.0 - betas[t])


def kl_by_quadrature(mean1, var1, mean2, var2, nodes=40):
    """E_{x~N(μ₁,σ₁²)}[log N(x; μ₁, σ₁²) − log N(x; μ₂, σ₂²)] by Gauss–Hermite quadrature."""
    z, w = np.polynomial.hermite_e.hermegauss(nodes)  # ∫ f(z) e^{−z²/2} dz ≈ Σ w_i f(z_i)
    x = mean1 + math.sqrt(var1) * z
    log_ratio = (-0.5 * math.log(var1) - (x - mean1) ** 2 / (2 * var1)
                 + 0.5 * math.log(var2) + (x - mean2) ** 2 / (2 * var2))
    return float(np.sum(w * log_ratio) / math.sqrt(2 * math.pi))


def discretized_gaussian_bin_probability(x, mean, std):
    """P(bin of x) for N(mean, std²), bins of width 2/255 around 256 levels in [−1, 1], end bins open."""
    def cdf(u):
        return 0.5 * (1.0 + math.erf(u / math.sqrt(2.0)))
    upper = 1.0 if x > 0.999 else cdf((x + 1 / 255 - mean) / std)
    lower = 0.0 if x < -0.999 else cdf((x - 1 / 255 - mean) / std)
    return upper - lower


def prior_kl_nats(x0, alpha_bar_last):
    """Σ KL(N(√ᾱ x_0, 1 − ᾱ) ‖ N(0, 1)) = Σ ½ (ᾱ x_0² + (1 − ᾱ) − 1 − log(1 − ᾱ))."""
    return float(np.sum(0.5 * (alpha_bar_last * x0 ** 2 - alpha_bar_last - math.log(1 - alpha_bar_last))))
