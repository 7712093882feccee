"""The loss curve: a bias-corrected moving average that starts on the data, drawn with axes by matplotlib."""
import numpy as np
import pytest

from tinyddpm import pictures


def test_smoothed_is_bias_corrected():
    np.testing.assert_allclose(pictures.smoothed([3.0] * 50), 3.0, rtol=1e-12)  # no lag from a zero start
    values = np.random.default_rng(0).random(20)
    out = pictures.smoothed(values, beta=0.9)
    assert out[0] == pytest.approx(values[0])
    weights = 0.1 * 0.9 ** np.arange(19, -1, -1)  # the last value's average by hand
    assert out[-1] == pytest.approx((weights * values).sum() / (1 - 0.9 ** 20))


@pytest.mark.parametrize("n", [0, 1, 300])
def test_loss_curve_draws_any_number_of_steps(n):
    img = pictures.loss_curve(np.exp(-np.linspace(0, 3, n)) + 0.01)
    assert img.mode == "RGB" and img.size == (640, 360)
    assert len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 10  # axes, ticks, labels and lines drawn


@pytest.mark.parametrize("evals", [[(500, 80.0, 0.97)], [(500, 120.0, 0.9), (1000, 60.0, 0.98), (1500, 45.0, np.nan)]])
def test_loss_curve_with_evaluations_adds_a_second_panel(evals):
    img = pictures.loss_curve(np.exp(-np.linspace(0, 3, 1500)) + 0.01, evals)
    assert img.size == (640, 720)
    lower = np.asarray(img)[400:]
    # red cFID points and green accuracy markers are drawn in the lower panel
    assert ((lower[..., 0] > 150) & (lower[..., 1] < 90)).any() and ((lower[..., 1] > 100) & (lower[..., 0] < 60)).any()
