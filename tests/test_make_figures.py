"""scripts/make_figures.py: every figure of docs/walkthrough.md is drawn on tiny settings (so the
figures cannot rot), the walkthrough embeds only figures the script makes, and the ideal denoiser of
the empirical data distribution is exact."""
import math
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

import gaussian_reference as ref
from tinyddpm import train
from tinyddpm.diffusion import GaussianDiffusion
from tinyddpm.schedules import linear_betas
from tinyddpm.tensor import Tensor

REPO = os.path.join(os.path.dirname(__file__), os.pardir)
sys.path.insert(0, os.path.join(REPO, "scripts"))
import make_figures  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline")  # tests/conftest.py: the embedded MNIST subset, no network


def assert_sane_png(path):
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        picture.verify()
    with Image.open(path) as picture:
        assert 100 <= picture.width <= 2000 and 100 <= picture.height <= 2000, picture.size
        low, high = picture.convert("L").getextrema()
        assert high - low > 100  # something is drawn


def test_every_figure_is_drawn_on_tiny_settings(tmp_path, capsys):
    assert make_figures.main(["--tiny", "--out", str(tmp_path)]) == 0
    for name in make_figures.FIGURES:
        assert_sane_png(tmp_path / f"{name}.png")
    assert "embedded subset" in capsys.readouterr().err


def test_the_walkthrough_embeds_only_figures_the_script_makes_and_they_are_committed_small():
    with open(os.path.join(REPO, "docs", "walkthrough.md"), encoding="utf-8") as f:
        embedded = re.findall(r"!\[[^\]]*\]\(figures/([a-z_]+)\.png\)", f.read())
    assert len(set(embedded)) >= 4 and set(embedded) <= set(make_figures.FIGURES)
    for name in make_figures.FIGURES:
        path = os.path.join(REPO, "docs", "figures", f"{name}.png")
        assert os.path.getsize(path) < 150_000, path


def test_the_trajectory_of_a_checkpoint(tmp_path, capsys):
    config = train.TrainConfig.for_preset("sim", timesteps=25)
    trainer = train.Trainer(config, str(tmp_path / "run"), log=lambda *_: None)
    trainer.save()  # an untrained 4×4 class-conditional model with T = 25: the plumbing, not the picture
    out = tmp_path / "figures"
    assert make_figures.main(["--tiny", "--ddim-steps", "3", "--checkpoint", trainer.checkpoint_path,
                              "--only", "reverse_trajectory", "--out", str(out)]) == 0
    assert os.listdir(out) == ["reverse_trajectory.png"]
    assert_sane_png(out / "reverse_trajectory.png")
    capsys.readouterr()
    assert make_figures.main(["--ddim-steps", "26", "--checkpoint", trainer.checkpoint_path, "--out", str(out)]) == 2
    assert make_figures.main(["--checkpoint", str(tmp_path / "missing.npz"), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "exceeds the checkpoint's 25 steps" in lines[0] and "does not exist" in lines[1]


# ---- the ideal denoiser -------------------------------------------------------------------------------
def test_the_ideal_denoiser_of_one_image_returns_it_and_the_true_noise():
    betas = linear_betas(100)
    d = GaussianDiffusion(betas)
    x0 = np.random.default_rng(0).uniform(-1, 1, (1, 1, 3, 3))
    eps = np.random.default_rng(1).standard_normal((4, 1, 3, 3))
    t = np.array([0, 10, 50, 99])
    xt = d.q_sample(np.repeat(x0, 4, axis=0), t, eps)
    denoiser = make_figures.EmpiricalDenoiser(d, x0)
    np.testing.assert_array_equal(denoiser.posterior_mean(xt, t), np.repeat(x0, 4, axis=0))
    np.testing.assert_allclose(denoiser(Tensor(xt), t).data, eps, rtol=0, atol=1e-12 / d.sqrt_one_minus_alphas_cumprod[0])


def test_the_ideal_denoiser_is_the_bayes_posterior_mean_of_the_mixture():
    """E[x_0|x_t] = Σ_i w_i x^(i), w_i ∝ N(x_t; √ᾱ_t x^(i), (1 − ᾱ_t) I), with the reference tables and densities."""
    betas = linear_betas(200)
    tables = ref.tables(betas)
    images = np.random.default_rng(2).uniform(-1, 1, (5, 1, 2, 3))
    denoiser = make_figures.EmpiricalDenoiser(GaussianDiffusion(betas), images)
    for t, seed in [(20, 3), (80, 4), (199, 5)]:
        xt = math.sqrt(tables["alphas_cumprod"][t]) * images[seed % 5] + np.random.default_rng(seed).standard_normal(
            (1, 2, 3)) * math.sqrt(tables["one_minus_alphas_cumprod"][t])
        log_w = [ref.gaussian_log_density(xt, tables["sqrt_alphas_cumprod"][t] * x, tables["one_minus_alphas_cumprod"][t])
                 for x in images]
        w = np.exp(np.array(log_w) - max(log_w))
        expected = np.tensordot(w / math.fsum(w), images, axes=1)
        np.testing.assert_allclose(denoiser.posterior_mean(xt[None], [t])[0], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 10)])
def test_samples_of_the_ideal_denoiser_are_training_images(sampler, steps):
    """The minimiser of the DDPM loss on N images can only give those images back: it memorises."""
    d = GaussianDiffusion(linear_betas(1000))
    images = np.random.default_rng(6).uniform(-1, 1, (3, 1, 4, 4))
    x = d.sample(make_figures.EmpiricalDenoiser(d, images), (6, 1, 4, 4), sampler=sampler, steps=steps,
                 progress=False, rng=np.random.default_rng(7)).data
    distance = np.abs(x[:, None] - images[None].astype(np.float32)).reshape(6, 3, -1).max(axis=2)
    assert distance.min(axis=1).max() < 1e-5
