"""Guidance: its weight per timestep (interval, schedule) against hand-computed tables, the interval's
edge cases bit for bit in every sampler, and the x̂_0-space combination against the ε-space one."""
import math

import numpy as np
import pytest

import tinyddpm as td
from tinyddpm.diffusion import GaussianDiffusion
from tinyddpm.guidance import Guidance, as_guidance, in_interval, noise_levels, schedule_factors
from tinyddpm.schedules import cosine_betas, linear_betas


class ClassModel:
    """A fixed, imperfect network whose output depends on x_t, t and the class (the null class included),
    so guidance changes every step; records the batch sizes it is called with."""
    num_classes = 10

    def __init__(self):
        self.batches = []

    def __call__(self, xt, t, y):
        self.batches.append(len(y))
        shift = (np.asarray(y, dtype=np.float64) - 4.5) / 10.0
        scale = 0.3 + 0.2 * np.asarray(t, dtype=np.float64) / 50
        out = xt.data * scale.reshape(-1, 1, 1, 1) + shift.reshape(-1, 1, 1, 1)
        return td.Tensor(out.astype(xt.dtype))


def sample(d, guidance, sampler, model=None, steps=6):
    model = model or ClassModel()
    x = d.sample(model, (3, 1, 2, 2), y=np.array([1, 5, 9]), guidance=guidance, sampler=sampler,
                 steps=None if sampler == "ddpm" else steps, eta=0.5 if sampler == "ddim" else 0.0, progress=False,
                 rng=np.random.default_rng(0))
    return x.data, model.batches


# ---- the weight per timestep ----------------------------------------------------------------------
def test_noise_levels_against_a_hand_computed_table():
    alphas_cumprod = np.array([0.8, 0.5, 0.2, 0.0])
    np.testing.assert_allclose(noise_levels(alphas_cumprod, 1 - alphas_cumprod), [0.5, 1.0, 2.0, math.inf], rtol=1e-15)


def test_schedules_against_a_hand_computed_table():
    # T = 5: u = t/(T − 1) = 0, 1/4, 1/2, 3/4, 1
    np.testing.assert_array_equal(schedule_factors("constant", 5), [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(schedule_factors("rising", 5), [0, 0.5, 1, 1.5, 2])
    np.testing.assert_array_equal(schedule_factors("falling", 5), [2, 1.5, 1, 0.5, 0])
    for name in ("constant", "rising", "falling"):
        assert schedule_factors(name, 1000).mean() == pytest.approx(1.0, rel=1e-12)


def test_the_interval_is_closed_at_both_ends():
    sigmas = np.array([0.5, 1.0, 2.0, 4.0, math.inf])
    np.testing.assert_array_equal(in_interval(sigmas, (1.0, 2.0)), [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(in_interval(sigmas, (2.0, 2.0)), [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(in_interval(sigmas, (1.0, math.inf)), [0, 1, 1, 1, 1])


def test_weights_combine_the_schedule_and_the_interval():
    sigmas = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
    np.testing.assert_array_equal(Guidance(2.0, (1.0, 4.0), schedule="rising").weights(sigmas), [0, 1, 2, 3, 0])
    np.testing.assert_array_equal(Guidance(1.5).weights(sigmas), [1.5] * 5)
    assert as_guidance(0.5) == Guidance(0.5) and as_guidance(Guidance(1.0, space="x0")).space == "x0"


@pytest.mark.parametrize("kwargs, message", [
    ({"weight": -1.0}, ">= 0"), ({"weight": math.nan}, ">= 0"), ({"interval": (2.0, 1.0)}, "sigma_lo <= sigma_hi"),
    ({"interval": (-1.0, 1.0)}, "sigma_lo"), ({"space": "v"}, "unknown guidance space"),
    ({"schedule": "cosine"}, "unknown guidance schedule")])
def test_bad_guidance_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Guidance(**{"weight": 1.0, **kwargs})


# ---- the interval in the samplers, bit for bit ------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_an_interval_covering_every_noise_level_is_plain_guidance_bit_for_bit(sampler):
    d = GaussianDiffusion(linear_betas(50))
    plain, _ = sample(d, 1.5, sampler)
    lo, hi = d.noise_levels.min(), d.noise_levels.max()  # the closed interval holds both ends
    for interval in ((0.0, math.inf), (lo, hi)):
        covered, batches = sample(d, Guidance(1.5, interval), sampler)
        np.testing.assert_array_equal(covered, plain)
        assert set(batches) == {6}  # every step guided: conditional and null in one batch


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_an_empty_interval_is_no_guidance_bit_for_bit_and_skips_the_null_class(sampler):
    d = GaussianDiffusion(linear_betas(50))
    unguided, _ = sample(d, 0.0, sampler)
    above = d.noise_levels.max() * 2
    for interval in ((above, above * 2), (0.0, d.noise_levels.min() / 2)):
        empty, batches = sample(d, Guidance(1.5, interval), sampler)
        np.testing.assert_array_equal(empty, unguided)
        assert set(batches) == {3}


def test_guidance_acts_exactly_at_the_timesteps_whose_noise_level_is_in_the_interval():
    d = GaussianDiffusion(linear_betas(50))
    grid = d.ddim_timesteps(6)  # 49, 39, 29, 20, 10, 0
    # from the σ of one visited timestep to the σ of the next one down: both ends are guided
    interval = (d.noise_levels[grid[3]], d.noise_levels[grid[2]])
    _, batches = sample(d, Guidance(1.5, interval), "ddim")
    assert batches == [3, 3, 6, 6, 3, 3]
    # an interval ending just below a timestep's σ leaves it unguided
    interval = (d.noise_levels[grid[3]], np.nextafter(d.noise_levels[grid[2]], 0))
    _, batches = sample(d, Guidance(1.5, interval), "ddim")
    assert batches == [3, 3, 3, 6, 3, 3]


def test_a_zero_weight_schedule_step_skips_the_null_class():
    d = GaussianDiffusion(linear_betas(50))
    _, batches = sample(d, Guidance(1.5, schedule="falling"), "ddim")  # w_t = 0 at t = T − 1 only
    assert batches == [3, 6, 6, 6, 6, 6]


# ---- x̂_0-space against ε-space ----------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_x0_space_guidance_equals_eps_space_without_clipping(prediction):
    """(1 + w) a − w b with weights summing to 1 commutes with the affine maps between ε, x_0 and v."""
    d = GaussianDiffusion(cosine_betas(40), prediction=prediction)
    xt = np.random.default_rng(1).standard_normal((3, 1, 2, 2))
    y = np.array([0, 4, 8])
    for t in (0, 17, 39):
        eps_space = d.model_x0_eps(ClassModel(), xt, t, y, Guidance(2.0), clip_x0=False)
        x0_space = d.model_x0_eps(ClassModel(), xt, t, y, Guidance(2.0, space="x0"), clip_x0=False)
        for a, b in zip(eps_space, x0_space):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_with_clipping_x0_space_guidance_extrapolates_from_clipped_estimates():
    """x̂_0(y) = 0.9 and x̂_0(∅) = 1.5 at w = 1: ε-space gives 2·0.9 − 1.5 = 0.3, x̂_0-space
    2·0.9 − clip(1.5) = 0.8."""
    def model(xt, t, y):
        return td.Tensor(np.where((np.asarray(y) == 10)[:, None, None, None], 1.5, 0.9) * np.ones_like(xt.data))
    model.num_classes = 10
    d = GaussianDiffusion(linear_betas(30), prediction="x0")
    xt = np.zeros((2, 1, 1, 1))
    x0_eps_space, _ = d.model_x0_eps(model, xt, 10, np.array([3, 7]), Guidance(1.0))
    x0_x0_space, _ = d.model_x0_eps(model, xt, 10, np.array([3, 7]), Guidance(1.0, space="x0"))
    np.testing.assert_allclose(x0_eps_space, 0.3, rtol=1e-12)
    np.testing.assert_allclose(x0_x0_space, 0.8, rtol=1e-12)
