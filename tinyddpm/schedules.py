"""Noise schedules β_0 … β_{T-1}: how much Gaussian noise each forward step q(x_t|x_{t-1}) adds.

Every schedule returns a float64 NumPy array of length T with 0 < β_t < 1 (a β of 1 would erase
x_{t-1} in one step and make the posterior undefined). The "linear", "quadratic" and "sigmoid" ends
are scaled by 1000/T as in improved DDPM (Nichol & Dhariwal 2021), so every T adds about the same
total noise and T = 1000 gives the DDPM paper's values (Ho et al. 2020: β from 1e-4 to 0.02).
"""
import numbers

import numpy as np


def _check_timesteps(T):
    if isinstance(T, bool) or not isinstance(T, numbers.Integral):
        raise ValueError(f"the number of timesteps T must be an integer, got {T!r}")
    if T < 1:
        raise ValueError(f"the number of timesteps T must be at least 1, got {T}")


def _scaled_ends(name, T, beta_start, beta_end):
    """(β_start, β_end) · 1000/T, checked to lie in (0, 1)."""
    _check_timesteps(T)
    if not 0 < beta_start <= beta_end:
        raise ValueError(f"{name} schedule needs 0 < beta_start <= beta_end, got {beta_start} and {beta_end}")
    scale = 1000.0 / T
    start, end = scale * beta_start, scale * beta_end
    if end >= 1:
        raise ValueError(f"{name} schedule with T={T} reaches beta={end:g} >= 1 (both ends are scaled by "
                         f"1000/T): use T > {int(1000 * beta_end)} or a smaller beta_end")
    return start, end


def _checked(name, betas):
    bad = ~((betas > 0) & (betas < 1))  # also catches NaN
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name} schedule has beta[{i}] = {betas[i]!r}, outside (0, 1)")
    return betas


def linear_betas(T, beta_start=1e-4, beta_end=0.02):
    """β_t evenly spaced from β_start·1000/T to β_end·1000/T (Ho et al. 2020, §4; scaling of
    Nichol & Dhariwal 2021)."""
    start, end = _scaled_ends("linear", T, beta_start, beta_end)
    return _checked("linear", np.linspace(start, end, T, dtype=np.float64))


def quadratic_betas(T, beta_start=1e-4, beta_end=0.02):
    """√β_t evenly spaced between the scaled ends, then squared (the "quad" schedule of the DDPM code)."""
    start, end = _scaled_ends("quadratic", T, beta_start, beta_end)
    return _checked("quadratic", np.linspace(np.sqrt(start), np.sqrt(end), T, dtype=np.float64) ** 2)


def sigmoid_betas(T, beta_start=1e-4, beta_end=0.02):
    """β_t = β_start + (β_end − β_start)·sigmoid(u_t), u_t evenly spaced in [−6, 6] (Xu et al. 2022,
    GeoDiff): slow at both ends, fast in the middle."""
    start, end = _scaled_ends("sigmoid", T, beta_start, beta_end)
    u = np.linspace(-6.0, 6.0, T, dtype=np.float64)
    return _checked("sigmoid", start + (end - start) / (1.0 + np.exp(-u)))


def cosine_betas(T, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal 2021, Eq. 17: ᾱ(τ) = f(τ)/f(0) with f(τ) = cos²((τ/T + s)/(1 + s) · π/2), and
    β_t = min(1 − ᾱ(t+1)/ᾱ(t), max_beta). The offset s keeps β_0 from being vanishingly small; the
    clip stops the final steps (where ᾱ → 0) from reaching β = 1."""
    _check_timesteps(T)
    if not s >= 0:
        raise ValueError(f"cosine schedule needs an offset s >= 0, got {s}")
    if not 0 < max_beta < 1:
        raise ValueError(f"cosine schedule needs 0 < max_beta < 1, got {max_beta}")
    tau = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((tau + s) / (1 + s) * np.pi / 2) ** 2
    alpha_bar = f / f[0]
    return _checked("cosine", np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta))


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1):
    shift and scale √ᾱ_t so that the last is 0 and the first keeps its value,
        √ᾱ'_t = (√ᾱ_t − √ᾱ_{T−1}) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_{T−1}),   β'_t = 1 − ᾱ'_t/ᾱ'_{t−1}  (β'_0 = β_0),
    so x_{T−1} is pure noise, as sampling from N(0, I) assumes (a schedule ending at ᾱ_{T−1} > 0 leaks
    √ᾱ_{T−1} of the data's low frequencies into training that sampling never sees). The last β' is 1:
    only the "v" or "x0" prediction can be trained and sampled with it."""
    betas = np.asarray(betas, dtype=np.float64)
    if len(betas) < 2:
        raise ValueError("a zero terminal SNR needs a schedule of at least 2 steps")
    root = np.sqrt(np.cumprod(1.0 - betas))
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    alphas_cumprod = root ** 2
    return np.append(betas[0], 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1])


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "quadratic": quadratic_betas,
             "sigmoid": sigmoid_betas}


def get_betas(name, T):
    """The named schedule ("linear", "cosine", "quadratic" or "sigmoid") with its default parameters."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](T)
