"""Noise schedules: published values, shapes and ranges, and a clear ValueError for every bad argument."""
import math

import numpy as np
import pytest

import gaussian_reference as ref
from tinyddpm.schedules import (SCHEDULES, cosine_betas, get_betas, linear_betas, quadratic_betas,
                                rescale_zero_terminal_snr, sigmoid_betas)


def test_linear_at_1000_steps_has_the_ddpm_paper_values():
    betas = linear_betas(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, rel=1e-15) and betas[-1] == pytest.approx(0.02, rel=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_linear_ends_scale_with_1000_over_T():
    betas = linear_betas(250)
    assert betas[0] == pytest.approx(4e-4) and betas[-1] == pytest.approx(0.08)


@pytest.mark.parametrize("T", [1, 7, 100, 1000])
def test_cosine_matches_nichol_dhariwal(T):
    np.testing.assert_allclose(cosine_betas(T), ref.cosine_betas(T), rtol=1e-12)


def test_cosine_alpha_bar_follows_the_squared_cosine_and_last_beta_is_clipped():
    T, s = 50, 0.008
    alpha_bar = np.cumprod(1 - cosine_betas(T))
    f = np.cos((np.arange(1, T + 1) / T + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    np.testing.assert_allclose(alpha_bar[:-1], f[:-1], rtol=1e-12)
    assert cosine_betas(T)[-1] == 0.999 and cosine_betas(T, max_beta=0.5)[-1] == 0.5


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("T", [21, 64, 1000, 4000])
def test_every_schedule_is_float64_in_the_open_unit_interval_and_nondecreasing(name, T):
    betas = get_betas(name, T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert np.all(betas > 0) and np.all(betas < 1)
    assert np.all(np.diff(betas) >= 0)


def test_quadratic_hits_the_ends_and_sigmoid_stays_strictly_between_them():
    quadratic, sigmoid = quadratic_betas(1000), sigmoid_betas(1000)
    assert quadratic[0] == pytest.approx(1e-4, rel=1e-12) and quadratic[-1] == pytest.approx(0.02, rel=1e-12)
    assert 1e-4 < sigmoid[0] < 2e-4 and 0.0199 < sigmoid[-1] < 0.02


def test_quadratic_has_evenly_spaced_square_roots_and_stays_below_linear():
    betas = quadratic_betas(300)
    np.testing.assert_allclose(np.diff(np.sqrt(betas)), np.diff(np.sqrt(betas))[0], rtol=1e-9)
    assert np.all(betas[1:-1] < linear_betas(300)[1:-1])


def test_sigmoid_is_symmetric_about_its_midpoint():
    betas = sigmoid_betas(300)
    start, end = 1e-4 * 1000 / 300, 0.02 * 1000 / 300
    np.testing.assert_allclose(betas + betas[::-1], start + end, rtol=1e-12)


@pytest.mark.parametrize("T", [0, -5])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_fewer_than_one_step_is_rejected(name, T):
    with pytest.raises(ValueError, match="at least 1"):
        get_betas(name, T)


@pytest.mark.parametrize("T", [2.5, "100", True])
def test_non_integer_T_is_rejected(T):
    with pytest.raises(ValueError, match="integer"):
        linear_betas(T)


@pytest.mark.parametrize("schedule", [linear_betas, quadratic_betas, sigmoid_betas])
def test_a_T_whose_scaled_beta_reaches_one_is_rejected(schedule):
    schedule(21)  # 0.02 · 1000/21 < 1
    with pytest.raises(ValueError, match="reaches beta=1 >= 1"):
        schedule(20)
    with pytest.raises(ValueError, match="T > 20"):
        schedule(3)


@pytest.mark.parametrize("start, end", [(0.0, 0.02), (-1e-4, 0.02), (0.02, 1e-4)])
def test_ends_outside_the_valid_range_are_rejected(start, end):
    with pytest.raises(ValueError, match="0 < beta_start <= beta_end"):
        linear_betas(1000, start, end)


@pytest.mark.parametrize("kwargs, message", [({"s": -0.1}, "s >= 0"), ({"max_beta": 1.0}, "max_beta"),
                                             ({"max_beta": 0.0}, "max_beta")])
def test_cosine_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cosine_betas(100, **kwargs)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="unknown noise schedule 'cosin'.*linear, cosine, quadratic, sigmoid"):
        get_betas("cosin", 100)


def test_zero_terminal_snr_rescaling_against_a_hand_computed_table():
    # β = 0.1, 0.2, 0.3: √ᾱ = 0.948683, 0.848528, 0.709930; shifted by 0.709930 and scaled by
    # 0.948683/0.238753: 0.948683, 0.550719, 0; ᾱ' = 0.9, 0.303291, 0; β' = 0.1, 1 − 0.303291/0.9, 1
    np.testing.assert_allclose(rescale_zero_terminal_snr([0.1, 0.2, 0.3]), [0.1, 0.663010, 1.0], rtol=2e-6)


@pytest.mark.parametrize("schedule", [linear_betas, cosine_betas])
def test_zero_terminal_snr_keeps_the_first_step_and_makes_the_last_pure_noise(schedule):
    betas = schedule(1000)
    rescaled = rescale_zero_terminal_snr(betas)
    root, new_root = np.sqrt(np.cumprod(1 - betas)), np.sqrt(np.cumprod(1 - rescaled))
    assert rescaled[-1] == 1.0 and new_root[-1] == 0.0 and rescaled[0] == betas[0]
    assert ((rescaled[:-1] > 0) & (rescaled[:-1] < 1)).all()
    # √ᾱ' is √ᾱ shifted and scaled: an affine map fixing the first value and sending the last to 0
    np.testing.assert_allclose(new_root, (root - root[-1]) * root[0] / (root[0] - root[-1]), rtol=1e-9, atol=1e-15)
