"""GaussianDiffusion: tables against the reference, Algorithm 1, the samplers, guidance and bits/dim."""
import math

import numpy as np
import pytest

import gaussian_reference as ref
import tinyddpm as td
from tinyddpm.diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl
from tinyddpm.nn import Parameter
from tinyddpm.schedules import cosine_betas, linear_betas, rescale_zero_terminal_snr

TABLES = ["betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
          "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
          "posterior_mean_coef1", "posterior_mean_coef2"]


def data_levels(shape, seed=0):
    """Images on the 256 data levels in [−1, 1], both ends included."""
    levels = np.random.default_rng(seed).integers(0, 256, size=shape)
    levels.flat[:2] = [0, 255]
    return levels / 127.5 - 1.0


class Oracle:
    """Knows the clean batch x0 and returns the exact prediction (ε, x0 or v) at (x_t, t), with the
    reference tables: the ideal network for that batch."""

    def __init__(self, betas, x0, prediction="eps", num_classes=0):
        self.tables, self.x0, self.prediction, self.num_classes = ref.tables(betas), x0, prediction, num_classes

    def __call__(self, xt, t, y=None):
        a = self.tables["sqrt_alphas_cumprod"][t].reshape(-1, 1, 1, 1)
        s = self.tables["sqrt_one_minus_alphas_cumprod"][t].reshape(-1, 1, 1, 1)
        x0 = np.tile(self.x0, (len(t) // len(self.x0), 1, 1, 1)).astype(xt.dtype)  # guidance doubles the batch
        eps = (xt.data - a * x0) / s
        out = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.prediction]
        return td.Tensor(out.astype(xt.dtype))


class Recorder:
    """Returns zeros and remembers every call's (x_t, t, y) and whether gradients were being recorded."""

    def __init__(self, num_classes=0):
        self.num_classes, self.calls = num_classes, []

    def __call__(self, xt, t, y=None):
        self.calls.append((xt.data.copy(), np.array(t), None if y is None else np.array(y), td.is_grad_enabled()))
        return td.Tensor(np.zeros_like(xt.data))


# ---- tables -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule, reference", [(linear_betas, ref.linear_betas), (cosine_betas, ref.cosine_betas)])
@pytest.mark.parametrize("T", [21, 100, 1000])
def test_tables_equal_the_reference(schedule, reference, T):
    diffusion, expected = GaussianDiffusion(schedule(T)), ref.tables(reference(T))
    for name in TABLES:
        table = getattr(diffusion, name)
        assert table.dtype == np.float64 and table.shape == (T,)
        np.testing.assert_allclose(table, expected[name], rtol=1e-12, atol=0, err_msg=name)


def test_first_step_conventions():
    d = GaussianDiffusion(linear_betas(100))
    assert d.alphas_cumprod_prev[0] == 1.0 and d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1] == math.log(d.posterior_variance[1])


def test_fixed_large_uses_beta_except_the_clipped_first_step():
    d = GaussianDiffusion(linear_betas(100), variance="fixed_large")
    np.testing.assert_allclose(d.model_log_variance[1:], np.log(d.betas[1:]), rtol=1e-15)
    assert d.model_log_variance[0] == math.log(d.posterior_variance[1])


@pytest.mark.parametrize("kwargs, message", [
    ({"betas": [0.1]}, "at least 2"), ({"betas": [[0.1, 0.2]]}, "1-D"), ({"betas": [1.0, 0.1]}, r"\(0, 1\)"),
    ({"betas": [0.1, 1.5]}, r"\(0, 1\]"), ({"betas": [0.1, 1.0]}, "zero terminal SNR"),
    ({"betas": [0.0, 0.1]}, r"\(0, 1\)"), ({"betas": [0.1, 0.2], "prediction": "noise"}, "unknown prediction"),
    ({"betas": [0.1, 0.2], "variance": "learned"}, "unknown variance")])
def test_invalid_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(**kwargs)


def test_timesteps_outside_the_schedule_are_rejected():
    d = GaussianDiffusion(linear_betas(50))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        d.q_sample(np.zeros((2, 1)), np.array([0, 50]), np.zeros((2, 1)))


# ---- the forward process on float32 arrays and Tensors ------------------------------------------------------
def test_q_sample_keeps_float32_and_unwraps_tensors():
    d = GaussianDiffusion(cosine_betas(40))
    x0, eps = np.full((3, 1, 2, 2), 0.5, np.float32), np.ones((3, 1, 2, 2), np.float32)
    xt = d.q_sample(td.Tensor(x0), np.array([0, 20, 39]), td.Tensor(eps))
    assert xt.dtype == np.float32
    expected = 0.5 * d.sqrt_alphas_cumprod[[0, 20, 39]] + d.sqrt_one_minus_alphas_cumprod[[0, 20, 39]]
    np.testing.assert_allclose(xt[:, 0, 0, 0], expected, rtol=1e-6)


# ---- Algorithm 1 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_loss_of_the_exact_predictor_is_zero(prediction):
    betas = cosine_betas(30)
    x0 = data_levels((5, 1, 3, 2))
    d = GaussianDiffusion(betas, prediction=prediction)
    loss = d.training_loss(Oracle(betas, x0, prediction), x0, rng=np.random.default_rng(0))
    assert loss.shape == () and loss.item() < 1e-20


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_loss_of_a_zero_predictor_is_the_mean_square_target(prediction):
    betas, x0 = linear_betas(50), data_levels((4, 1, 2, 3), seed=1)
    model = Recorder()
    loss = GaussianDiffusion(betas, prediction=prediction).training_loss(model, td.Tensor(x0), rng=np.random.default_rng(3))
    xt, t, _, _ = model.calls[0]
    # the model's input determines ε given x0 and t: rebuild the target from the reference tables
    tables = ref.tables(betas)
    a, s = (tables[k][t].reshape(-1, 1, 1, 1) for k in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))
    eps = (xt - a * x0) / s
    target = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]
    assert loss.item() == pytest.approx(np.mean(target ** 2), rel=1e-12)


def test_training_loss_draws_uniform_timesteps_and_gaussian_noise_in_the_input_dtype():
    T, d, model = 8, GaussianDiffusion(linear_betas(40)[:8]), Recorder()
    x0 = np.zeros((4000, 1, 1, 1), np.float32)
    d.training_loss(model, x0, rng=np.random.default_rng(0))
    xt, t, _, _ = model.calls[0]
    assert xt.dtype == np.float32 and t.dtype == np.int64
    counts = np.bincount(t, minlength=T)
    assert len(counts) == T and np.all(np.abs(counts - 500) < 5 * math.sqrt(4000 * (1 / T) * (1 - 1 / T)))
    eps = xt[:, 0, 0, 0] / d.sqrt_one_minus_alphas_cumprod[t]  # x0 = 0, so x_t = √(1−ᾱ) ε
    assert abs(eps.mean()) < 5 / math.sqrt(4000) and abs(eps.var() - 1) < 5 * math.sqrt(2 / 4000)


def test_training_loss_is_reproducible_from_the_generator_and_differentiable():
    x0 = data_levels((3, 1, 4, 4))
    d = GaussianDiffusion(cosine_betas(20))
    weight = Parameter(np.array([0.7]))

    def loss_at(w):
        weight.data[...] = w
        return d.training_loss(lambda xt, t, y: xt * weight, x0, rng=np.random.default_rng(11))

    loss = loss_at(0.7)
    loss.backward()
    assert loss.item() == loss_at(0.7).item()
    with td.no_grad():  # the same draws for every evaluation: an exact central difference
        numeric = (loss_at(0.7 + 1e-3).item() - loss_at(0.7 - 1e-3).item()) / 2e-3
    assert weight.grad[0] == pytest.approx(numeric, rel=1e-4)


@pytest.mark.parametrize("p_uncond, expected_null_fraction", [(0.0, 0.0), (1.0, 1.0), (0.25, 0.25)])
def test_labels_are_dropped_to_the_null_class_with_probability_p_uncond(p_uncond, expected_null_fraction):
    model, n = Recorder(num_classes=10), 4000
    y = np.arange(n) % 10
    GaussianDiffusion(linear_betas(30)).training_loss(model, np.zeros((n, 1, 1, 1), np.float32), y,
                                                      p_uncond=p_uncond, rng=np.random.default_rng(0))
    seen = model.calls[0][2]
    null = seen == 10
    np.testing.assert_array_equal(seen[~null], y[~null])
    tolerance = 5 * math.sqrt(p_uncond * (1 - p_uncond) / n)
    assert abs(null.mean() - expected_null_fraction) <= tolerance


def test_training_loss_rejects_labels_for_an_unconditional_model_and_bad_probabilities():
    d, x0 = GaussianDiffusion(linear_betas(30)), np.zeros((2, 1, 1, 1))
    with pytest.raises(ValueError, match="unconditional"):
        d.training_loss(Recorder(), x0, np.array([1, 2]), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="probability"):
        d.training_loss(Recorder(10), x0, np.array([1, 2]), p_uncond=1.5, rng=np.random.default_rng(0))


# ---- sampling (Algorithm 2 and DDIM) ------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", None, 0.0), ("ddim", 7, 0.0),
                                                 ("ddim", 7, 1.0), ("ddim", 1, 0.5), ("dpmpp2m", 7, 0.0),
                                                 ("dpmpp2m", 1, 0.0)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sampling_with_the_exact_predictor_recovers_x0(prediction, sampler, steps, eta, dtype):
    betas = cosine_betas(25)
    x0 = data_levels((2, 1, 3, 3), seed=4)
    d = GaussianDiffusion(betas, prediction=prediction)
    x = d.sample(Oracle(betas, x0, prediction), x0.shape, sampler=sampler, steps=steps, eta=eta, progress=False,
                 rng=np.random.default_rng(5), dtype=dtype)
    assert isinstance(x, td.Tensor) and x.dtype == dtype
    # x̂_0 = (x_t − √(1−ᾱ) ε)/√ᾱ magnifies rounding by up to 1/√ᾱ_{T−1} (a single step from x_T)
    tolerance = 16 * np.finfo(dtype).eps / d.sqrt_alphas_cumprod[-1]
    np.testing.assert_allclose(x.data, x0, atol=tolerance)


def test_ddim_with_eta_one_over_all_steps_is_the_ddpm_sampler():
    """σ_t² = β̃_t and the DDIM mean equals μ̃_t(x̂_0, x_t): the same draws give the same chain."""
    betas = linear_betas(40)
    d, model = GaussianDiffusion(betas), (lambda xt, t, y: xt * 0.3)
    kwargs = dict(progress=False, dtype=np.float64, clip_x0=False)
    ddpm = d.sample(model, (2, 1, 2, 2), sampler="ddpm", rng=np.random.default_rng(9), **kwargs)
    ddim = d.sample(model, (2, 1, 2, 2), sampler="ddim", eta=1.0, rng=np.random.default_rng(9), **kwargs)
    np.testing.assert_allclose(ddim.data, ddpm.data, rtol=1e-9, atol=1e-12)


class GaussianData:
    """Data x_0 ~ N(μ, s²) per pixel: ε(x_t, t) is exact (E[x_0|x_t] in closed form), and the probability-flow
    ODE keeps z = (x_t − √ᾱ_t μ)/√(ᾱ_t s² + 1 − ᾱ_t), so its solution from a given x_T is known."""
    mu, s = 0.3, 0.5

    def __init__(self, diffusion):
        self.a = diffusion.alphas_cumprod
        self.x_T = np.random.default_rng(0).standard_normal((4, 1, 2, 2))

    def posterior_mean(self, x, at):  # E[x_0 | x_t = x] at ᾱ_t = at
        return self.mu + np.sqrt(at) * self.s ** 2 * (x - np.sqrt(at) * self.mu) / (at * self.s ** 2 + 1 - at)

    def __call__(self, xt, t, y=None):
        at = self.a[np.asarray(t)].reshape(-1, 1, 1, 1)
        return td.Tensor((xt.data - np.sqrt(at) * self.posterior_mean(xt.data, at)) / np.sqrt(1 - at))

    def exact(self):
        """Every sampler ends by stepping to x̂_0 at t = 0, the posterior mean of the ODE's state there."""
        a, mu, s = self.a, self.mu, self.s
        z = (self.x_T - np.sqrt(a[-1]) * mu) / np.sqrt(a[-1] * s ** 2 + 1 - a[-1])
        return self.posterior_mean(np.sqrt(a[0]) * mu + np.sqrt(a[0] * s ** 2 + 1 - a[0]) * z, a[0])


def test_dpm_solver_pp_2m_is_second_order_on_the_probability_flow_ode_of_gaussian_data():
    """On one family of grids (evenly spaced t), halving the step size divides DPM-Solver++(2M)'s error by
    ~4 (second order) and DDIM's (η = 0, Euler) by ~2."""
    d = GaussianDiffusion(linear_betas(1000))
    model = GaussianData(d)

    def dpmpp_2m_error(steps):
        x, history, grid = model.x_T, None, d.ddim_timesteps(steps)
        for t, t_prev in zip(grid, [*grid[1:], -1]):
            x, history = d.dpmpp_2m_step(model, x, int(t), int(t_prev), history, clip_x0=False)
        return np.abs(x - model.exact()).max()

    def ddim_error(steps):
        x = d.sample(model, model.x_T.shape, sampler="ddim", steps=steps, clip_x0=False, x_T=model.x_T,
                     dtype=np.float64, progress=False, rng=np.random.default_rng(0))
        return np.abs(x.data - model.exact()).max()

    assert 3.5 < dpmpp_2m_error(100) / dpmpp_2m_error(200) < 4.5
    assert 1.7 < ddim_error(100) / ddim_error(200) < 2.3


def test_dpm_solver_pp_on_its_log_snr_grid_agrees_with_the_exact_ode_solution_in_few_steps():
    d = GaussianDiffusion(linear_betas(1000))
    model = GaussianData(d)

    def error(sampler, steps):
        x = d.sample(model, model.x_T.shape, sampler=sampler, steps=steps, clip_x0=False, x_T=model.x_T,
                     dtype=np.float64, progress=False, rng=np.random.default_rng(0))
        return np.abs(x.data - model.exact()).max()

    assert error("dpmpp2m", 40) < error("ddim", 200) / 3
    assert error("dpmpp2m", 200) < 1e-3


def test_the_log_snr_grid_is_evenly_spaced_in_log_snr_and_runs_from_t_max_to_0():
    d = GaussianDiffusion(linear_betas(1000))
    lam = np.array([d.log_snr_half(t) for t in range(1000)])
    grid = d.log_snr_timesteps(10)
    assert grid[0] == 999 and grid[-1] == 0 and len(grid) == 10 and (np.diff(grid) < 0).all()
    gaps = np.diff(lam[grid])
    np.testing.assert_allclose(gaps, (lam[0] - lam[999]) / 9, rtol=0.2)  # up to rounding t to an integer
    many = d.log_snr_timesteps(1000)  # near t = 0 many λ targets round to one t: each is kept once
    assert (np.diff(many) < 0).all() and many[0] == 999 and many[-1] == 0 and len(many) < 1000
    assert list(d.log_snr_timesteps(1)) == [999]
    with pytest.raises(ValueError, match="steps"):
        d.log_snr_timesteps(0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weights_against_a_hand_computed_table(prediction):
    betas = linear_betas(100)
    d, table = GaussianDiffusion(betas, prediction=prediction), ref.tables(betas)
    t = np.array([0, 10, 50, 99])
    snr = table["alphas_cumprod"][t] / (1 - table["alphas_cumprod"][t])
    assert snr[0] > 5 > snr[-1]  # γ = 5 clips the low-noise end only
    x0_weight = np.minimum(snr, 5.0)
    expected = {"eps": x0_weight / snr, "x0": x0_weight, "v": x0_weight / (snr + 1)}[prediction]
    np.testing.assert_allclose(d.min_snr_weights(t, 5.0), expected, rtol=1e-12)
    if prediction == "eps":
        np.testing.assert_allclose(d.min_snr_weights(t, 5.0)[1:], [5 / s if s > 5 else 1.0 for s in snr[1:]], rtol=1e-12)


def test_min_snr_loss_weights_each_sample_by_its_timestep():
    betas = linear_betas(40)
    d, x0 = GaussianDiffusion(betas), data_levels((3, 1, 2, 2), seed=2)
    model = lambda xt, t, y=None: td.Tensor(xt.data * 0.5)  # noqa: E731  (a fixed, imperfect predictor)
    plain = d.training_loss(model, x0, rng=np.random.default_rng(7))
    weighted = d.training_loss(model, x0, min_snr_gamma=2.0, rng=np.random.default_rng(7))
    # the same draws as training_loss makes: t, then ε
    rng = np.random.default_rng(7)
    t = rng.integers(0, 40, size=3)
    eps = rng.standard_normal(x0.shape)
    xt = d.q_sample(x0, t, eps)
    squared = ((xt * 0.5 - eps) ** 2).mean(axis=(1, 2, 3))
    assert plain.item() == pytest.approx(squared.mean(), rel=1e-6)
    assert weighted.item() == pytest.approx((squared * d.min_snr_weights(t, 2.0)).mean(), rel=1e-6)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        d.training_loss(model, x0, min_snr_gamma=-1.0, rng=np.random.default_rng(7))


def test_sampling_runs_without_recording_gradients_and_visits_the_timesteps_in_order():
    model, d = Recorder(), GaussianDiffusion(linear_betas(30))
    d.sample(model, (1, 1, 2, 2), sampler="ddim", steps=4, progress=False, rng=np.random.default_rng(0))
    assert [c[1].tolist() for c in model.calls] == [[29], [19], [10], [0]]
    assert not any(c[3] for c in model.calls)


def test_trajectory_runs_from_x_T_to_x0():
    betas = cosine_betas(30)
    x0, x_T = data_levels((1, 1, 2, 2)), np.random.default_rng(1).standard_normal((1, 1, 2, 2))
    d = GaussianDiffusion(betas)
    x, frames = d.sample(Oracle(betas, x0), x0.shape, sampler="ddim", steps=6, progress=False,
                         rng=np.random.default_rng(0), x_T=x_T, return_trajectory=4)
    assert len(frames) == 4
    np.testing.assert_array_equal(frames[0].data, x_T)
    np.testing.assert_array_equal(frames[-1].data, x.data)
    _, all_frames = d.sample(Oracle(betas, x0), x0.shape, sampler="ddim", steps=6, progress=False,
                             rng=np.random.default_rng(0), x_T=x_T, return_trajectory=50)
    assert len(all_frames) == 7  # the chain x_T, x_τ5, …, x_0 has only steps + 1 states


def test_guidance_combines_conditional_and_null_predictions():
    """ε̂ = (1 + w) ε(x_t, y) − w ε(x_t, ∅), with both halves in one batched call."""
    calls = []

    def model(xt, t, y):
        calls.append(len(y))
        return td.Tensor(np.where((y == 10)[:, None, None, None], -1.0, 2.0) * np.ones_like(xt.data))
    model.num_classes = 10
    d, xt = GaussianDiffusion(linear_betas(50)), np.zeros((3, 1, 2, 2))
    _, eps = d.model_x0_eps(model, xt, 10, y=np.array([1, 2, 3]), guidance=1.5, clip_x0=False)
    np.testing.assert_allclose(eps, (1 + 1.5) * 2.0 - 1.5 * -1.0)
    assert calls == [6]
    _, eps = d.model_x0_eps(model, xt, 10, y=np.array([1, 2, 3]), clip_x0=False)
    np.testing.assert_allclose(eps, 2.0)


def test_guided_sampling_of_a_conditional_oracle_recovers_x0():
    betas = linear_betas(30)
    x0 = data_levels((2, 1, 2, 2))
    model = Oracle(betas, x0, num_classes=10)  # the same prediction for every label: guidance changes nothing
    x = GaussianDiffusion(betas).sample(model, x0.shape, y=np.array([3, 10]), guidance=2.0, progress=False,
                                        rng=np.random.default_rng(0), dtype=np.float64)
    np.testing.assert_allclose(x.data, x0, atol=1e-9)


@pytest.mark.parametrize("kwargs, message", [
    ({"sampler": "euler"}, "unknown sampler"), ({"sampler": "ddpm", "steps": 10}, "use sampler='ddim'"),
    ({"sampler": "ddim", "steps": 31}, r"\[1, 30\]"), ({"sampler": "ddim", "steps": 0}, r"\[1, 30\]"),
    ({"return_trajectory": 1}, "frames >= 2"), ({"guidance": 1.0}, "needs class labels"),
    ({"y": np.array([1])}, "1 labels for 2 samples")])
def test_sample_rejects_bad_arguments(kwargs, message):
    model = Recorder(num_classes=10)
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(linear_betas(30)).sample(model, (2, 1, 2, 2), progress=False,
                                                   rng=np.random.default_rng(0), **kwargs)


# ---- a zero terminal SNR (Lin et al. 2024): ᾱ_{T−1} = 0, λ_{T−1} = −∞ ----------------------------------------
def test_a_zero_terminal_snr_schedule_has_finite_tables_and_an_infinite_last_noise_level():
    d = GaussianDiffusion(rescale_zero_terminal_snr(linear_betas(40)), prediction="v")
    assert d.alphas_cumprod[-1] == 0 and d.sqrt_one_minus_alphas_cumprod[-1] == 1
    assert d.log_snr_half(39) == -math.inf and math.isfinite(d.log_snr_half(38))
    assert d.noise_levels[-1] == math.inf and np.isfinite(d.noise_levels[:-1]).all()
    for name in TABLES + ["posterior_log_variance_clipped", "model_log_variance"]:
        assert np.isfinite(getattr(d, name)).all(), name
    with pytest.raises(ValueError, match="needs prediction 'v' or 'x0'"):
        GaussianDiffusion(rescale_zero_terminal_snr(linear_betas(40)))


def test_the_log_snr_grid_of_a_zero_terminal_snr_schedule_starts_from_pure_noise():
    d = GaussianDiffusion(rescale_zero_terminal_snr(linear_betas(1000)), prediction="v")
    lam = np.array([d.log_snr_half(t) for t in range(999)])  # the finite ones
    grid = d.log_snr_timesteps(10)
    assert grid[0] == 999 and grid[-1] == 0 and len(grid) == 10 and (np.diff(grid) < 0).all()
    np.testing.assert_allclose(np.diff(lam[grid[1:]]), (lam[0] - lam[998]) / 9, rtol=0.2)
    assert list(d.log_snr_timesteps(1)) == [999]


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 7), ("dpmpp2m", 7), ("dpmpp2m", 1)])
def test_sampling_a_zero_terminal_snr_schedule_with_the_exact_predictor_recovers_x0(prediction, sampler, steps):
    betas = rescale_zero_terminal_snr(cosine_betas(25))
    x0 = data_levels((2, 1, 3, 3), seed=4)
    d = GaussianDiffusion(betas, prediction=prediction)
    model = Oracle(betas, x0, prediction, num_classes=10)
    x = d.sample(model, x0.shape, y=np.array([1, 2]), guidance=1.0, sampler=sampler, steps=steps, progress=False,
                 rng=np.random.default_rng(5), dtype=np.float64)
    np.testing.assert_allclose(x.data, x0, atol=1e-9)


def test_min_snr_v_training_on_a_zero_terminal_snr_schedule_is_finite():
    """SNR_{T−1} = 0: the v weight min(SNR, γ)/(SNR + 1) is 0 there, and no weight divides by it."""
    d = GaussianDiffusion(rescale_zero_terminal_snr(cosine_betas(30)), prediction="v")
    weights = d.min_snr_weights(np.arange(30), 5.0)
    assert np.isfinite(weights).all() and weights[-1] == 0 and (weights[:-1] > 0).all()
    loss = d.training_loss(Recorder(), data_levels((8, 1, 2, 2)), min_snr_gamma=5.0, rng=np.random.default_rng(0))
    assert math.isfinite(loss.item())


# ---- the variational bound --------------------------------------------------------------------------------
def test_discretized_decoder_matches_the_exact_gaussian_and_sums_to_one():
    levels = np.arange(256) / 127.5 - 1.0
    # the tanh approximation of Φ used by the DDPM code is within 2e-4 of the exact normal CDF
    for mean, std in [(0.0, 0.5), (0.3, 0.02), (-0.97, 0.004), (1.0, 0.1)]:
        log_p = discretized_gaussian_log_likelihood(levels, mean, np.log(std))
        p_exact = np.array([ref.discretized_gaussian_bin_probability(x, mean, std) for x in levels])
        np.testing.assert_allclose(np.exp(log_p), p_exact, atol=4e-4)
        assert np.exp(log_p).sum() == pytest.approx(1.0, abs=1e-9 + 256e-12)


@pytest.mark.parametrize("schedule", [linear_betas, cosine_betas])
def test_bits_per_dim_of_the_exact_predictor_is_prior_plus_decoder(schedule):
    """With x̂_0 = x_0 every posterior KL vanishes and the decoder mean is x_0 itself."""
    betas = schedule(30)
    x0 = data_levels((2, 1, 3, 3), seed=7)
    d = GaussianDiffusion(betas)
    bpd = d.bits_per_dim(Oracle(betas, x0), x0, rng=np.random.default_rng(0))
    tables = ref.tables(betas)
    per_image_dims = x0[0].size * math.log(2)
    prior = np.array([ref.prior_kl_nats(x, tables["alphas_cumprod"][-1]) for x in x0]) / per_image_dims
    decoder_std = math.sqrt(tables["posterior_variance"][1])
    decoder = -discretized_gaussian_log_likelihood(x0, x0, np.log(decoder_std)).sum(axis=(1, 2, 3)) / per_image_dims
    assert bpd.shape == (2,) and bpd.dtype == np.float64
    np.testing.assert_allclose(bpd, prior + decoder, rtol=1e-9)


def test_bits_per_dim_of_a_useless_predictor_is_larger():
    betas, x0 = linear_betas(30), data_levels((2, 1, 3, 3), seed=2)
    d = GaussianDiffusion(betas)
    good = d.bits_per_dim(Oracle(betas, x0), x0.astype(np.float32), rng=np.random.default_rng(0))
    bad = d.bits_per_dim(Recorder(), x0.astype(np.float32), rng=np.random.default_rng(0))
    assert np.all(np.isfinite(bad)) and np.all(bad > good + 1)


def test_normal_kl_of_identical_gaussians_is_zero_and_of_shifted_means_is_half_the_square():
    assert normal_kl(np.array(0.3), np.array(-2.0), 0.3, -2.0) == 0.0
    assert normal_kl(np.array(1.0), np.array(0.0), 0.0, 0.0) == pytest.approx(0.5)
