"""Hypothesis properties of GaussianDiffusion against the float64 reference in gaussian_reference.py.

Schedules are drawn from the four named ones at a random T, or are arbitrary valid β sequences."""
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import gaussian_reference as ref
import tinyddpm as td
from tinyddpm.diffusion import GaussianDiffusion, normal_kl
from tinyddpm.schedules import SCHEDULES

named_schedules = st.builds(lambda name, T: SCHEDULES[name](T), st.sampled_from(sorted(SCHEDULES)),
                            st.integers(21, 600))
arbitrary_schedules = st.lists(st.floats(1e-5, 0.5), min_size=2, max_size=60).map(np.array)
schedules = st.one_of(named_schedules, arbitrary_schedules)


@st.composite
def schedule_and_step(draw, first=0):
    """(betas, t) with first ≤ t < T."""
    betas = draw(schedules)
    return betas, draw(st.integers(first, len(betas) - 1))


def column(values):
    """A batch of scalars as (B, 1) so the per-sample coefficients broadcast."""
    return np.asarray(values, dtype=np.float64).reshape(-1, 1)


# 1. composing single steps q(x_t|x_{t−1}) gives the closed form q(x_t|x_0) ----------------------------
@given(schedule_and_step(), st.floats(-3, 3))
def test_composed_single_steps_equal_the_closed_form(case, x0):
    betas, t = case
    m, v = ref.compose_forward_steps(betas, t)
    mean, variance, log_variance = GaussianDiffusion(betas).q_mean_variance(column([x0]), t)
    assert math.isclose(mean.item(), m * x0, rel_tol=1e-12, abs_tol=1e-15)
    assert math.isclose(variance.item(), v, rel_tol=1e-12)
    assert math.isclose(log_variance.item(), math.log(v), rel_tol=1e-12, abs_tol=1e-13)


# 2. Bayes' rule: q(x_t|x_{t−1}) q(x_{t−1}|x_0) / q(x_{t−1}|x_t, x_0) does not depend on x_{t−1} -----------
@given(schedule_and_step(first=1), st.floats(-1, 1), st.floats(-3, 3))
def test_the_posterior_is_bayes_rule(case, x0, eps):
    betas, t = case
    d = GaussianDiffusion(betas)
    xt = d.q_sample(column([x0]), t, column([eps])).item()
    mean, variance, _ = d.q_posterior(column([x0]), column([xt]), t)
    mean, variance = mean.item(), variance.item()
    _, prev_variance = ref.compose_forward_steps(betas, t - 1)
    prev_mean = d.sqrt_alphas_cumprod[t - 1] * x0
    constants, scale = [], 0.0
    for k in (-2.0, -0.5, 0.0, 1.0, 3.0):  # points around the posterior mean
        x_prev = mean + k * math.sqrt(variance)
        terms = (ref.gaussian_log_density(xt, math.sqrt(1 - betas[t]) * x_prev, betas[t]),
                 ref.gaussian_log_density(x_prev, prev_mean, prev_variance),
                 -ref.gaussian_log_density(x_prev, mean, variance))
        constants.append(sum(terms))
        scale = max(scale, sum(abs(term) for term in terms))
    # the constant is log q(x_t|x_0)
    m, v = ref.compose_forward_steps(betas, t)
    expected = ref.gaussian_log_density(xt, m * x0, v)
    np.testing.assert_allclose(constants, expected, rtol=0, atol=1e-9 * (1 + scale))
    # the ε-form of the posterior mean (Ho et al. 2020, Eq. 11) equals the x_0-form
    assert math.isclose(ref.posterior_mean_eps_form(betas, t, xt, eps), mean, rel_tol=1e-9, abs_tol=1e-9)


# 3. averaging the posterior over q(x_t|x_0) gives back q(x_{t−1}|x_0) ---------------------------------------
@given(schedule_and_step(first=1))
def test_marginalising_the_posterior_gives_the_previous_marginal(case):
    """x_{t−1} = c₁ x_0 + c₂ x_t + √β̃ z with x_t ~ N(√ᾱ_t x_0, 1 − ᾱ_t): mean (c₁ + c₂√ᾱ_t) x_0,
    variance β̃_t + c₂² (1 − ᾱ_t)."""
    betas, t = case
    d = GaussianDiffusion(betas)
    c1, c2 = d.posterior_mean_coef1[t], d.posterior_mean_coef2[t]
    m_prev, v_prev = ref.compose_forward_steps(betas, t - 1)
    _, v_t = ref.compose_forward_steps(betas, t)
    assert math.isclose(c1 + c2 * d.sqrt_alphas_cumprod[t], m_prev, rel_tol=1e-12)
    assert math.isclose(d.posterior_variance[t] + c2 ** 2 * v_t, v_prev, rel_tol=1e-12)


# 4. the Gaussian KL of the bound matches quadrature ------------------------------------------------------------
@given(st.floats(-5, 5), st.floats(-12, 3), st.floats(-5, 5), st.floats(-12, 3))
def test_normal_kl_matches_quadrature(mean1, logvar1, mean2, logvar2):
    kl = normal_kl(np.array(mean1), np.array(logvar1), np.array(mean2), np.array(logvar2))
    expected = ref.kl_by_quadrature(mean1, math.exp(logvar1), mean2, math.exp(logvar2))
    assert kl >= 0
    assert math.isclose(kl, expected, rel_tol=1e-9, abs_tol=1e-9)


# 5. parameterisations and DDIM ------------------------------------------------------------------------------
@given(schedule_and_step(), st.lists(st.floats(-1, 1), min_size=1, max_size=4),
       st.lists(st.floats(-4, 4), min_size=4, max_size=4))
def test_eps_x0_and_v_conversions_round_trip(case, x0, eps):
    betas, t = case
    d = GaussianDiffusion(betas)
    x0, eps = column(x0), column(eps[:len(x0)])
    xt = d.q_sample(x0, t, eps)
    v = d.v_from_x0_eps(x0, t, eps)
    tolerance = 1e-12 / d.sqrt_alphas_cumprod[t]  # recovering x_0 divides by √ᾱ_t
    np.testing.assert_allclose(d.predict_x0_from_eps(xt, t, eps), x0, atol=tolerance * 10)
    np.testing.assert_allclose(d.predict_eps_from_x0(xt, t, x0), eps, atol=1e-12 / d.sqrt_one_minus_alphas_cumprod[t])
    np.testing.assert_allclose(d.predict_x0_from_v(xt, t, v), x0, atol=1e-12)
    np.testing.assert_allclose(d.predict_eps_from_v(xt, t, v), eps, atol=1e-12)
    for prediction in ("eps", "x0", "v"):
        out = GaussianDiffusion(betas, prediction=prediction).training_target(x0, t, eps)
        x0_back, eps_back = GaussianDiffusion(betas, prediction=prediction).x0_eps_from_output(out, xt, t)
        np.testing.assert_allclose(x0_back, x0, atol=tolerance * 10)
        np.testing.assert_allclose(eps_back, eps, atol=1e-11 / d.sqrt_one_minus_alphas_cumprod[t])


@given(schedule_and_step())
def test_ddim_with_eta_one_over_all_steps_has_the_posterior_variance(case):
    betas, t = case
    d = GaussianDiffusion(betas)
    sigma = d.ddim_sigma(t, t - 1, 1.0)
    assert math.isclose(sigma ** 2, ref.tables(betas)["posterior_variance"][t], rel_tol=1e-10, abs_tol=0)
    assert d.ddim_sigma(t, t - 1, 0.0) == 0.0


@given(schedules, st.integers(1, 60), st.integers(0, 2 ** 32 - 1))
def test_ddim_with_eta_zero_is_deterministic_given_x_T(betas, steps, seed):
    d = GaussianDiffusion(betas)
    steps = min(steps, len(betas))
    x_T = np.random.default_rng(seed).standard_normal((2, 1, 2, 2))

    def model(xt, t, y):
        return td.Tensor(np.tanh(xt.data) * 0.5 + 0.01 * t.reshape(-1, 1, 1, 1))  # any deterministic network

    runs = [d.sample(model, x_T.shape, sampler="ddim", steps=steps, eta=0.0, progress=False, x_T=x_T,
                     rng=np.random.default_rng(seed + i)).data for i in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])


# 6. q_sample's empirical moments ----------------------------------------------------------------------------------
@given(schedule_and_step(), st.floats(-1, 1))
def test_q_sample_moments_match_the_closed_form(case, x0):
    """n draws: the sample mean is within 5 standard errors √(v/n) of m x_0, and the sample variance
    within 5 of its standard errors v √(2/(n−1))."""
    betas, t = case
    n = 20_000
    rng = np.random.default_rng(0)
    samples = GaussianDiffusion(betas).q_sample(np.full((n, 1), x0), t, rng.standard_normal((n, 1)))[:, 0]
    m, v = ref.compose_forward_steps(betas, t)
    assert abs(samples.mean() - m * x0) <= 5 * math.sqrt(v / n)
    assert abs(samples.var(ddof=1) - v) <= 5 * v * math.sqrt(2 / (n - 1))
