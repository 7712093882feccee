"""The U-Net: shapes, conditioning, gradients to every parameter, config validation."""
import dataclasses

import numpy as np
import pytest

import tinyddpm as td
from tinyddpm.train import PRESETS
from tinyddpm.unet import UNet, UNetConfig, timestep_embedding

SMOKE = PRESETS["smoke"].unet


def batch(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return td.Tensor(rng.standard_normal((n, 1, 28, 28)).astype(np.float32)), rng.integers(0, 200, n)


@pytest.mark.parametrize("preset", ["sim", "smoke", "tiny"])
def test_output_has_the_input_shape(preset):
    config = PRESETS[preset].unet
    x = td.Tensor(np.random.default_rng(0).standard_normal(config.image_shape(2)).astype(np.float32))
    out = UNet(config)(x, np.array([5, 150]), np.array([3, 7]))
    assert out.shape == config.image_shape(2) and out.dtype == np.float32


def test_class_label_changes_the_output_and_none_means_the_null_class():
    td.random.manual_seed(0)
    model = UNet(SMOKE)
    x, t = batch()
    with td.no_grad():
        a = model(x, t, np.array([1, 1])).data
        b = model(x, t, np.array([2, 2])).data
        null = model(x, t, np.array([10, 10])).data
        none = model(x, t, None).data
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(null, none)


def test_unconditional_model_has_no_class_embedding():
    model = UNet(dataclasses.replace(SMOKE, num_classes=0))
    assert model.class_emb is None and not any("class_emb" in n for n, _ in model.named_parameters())
    x, t = batch()
    assert model(x, t).shape == (2, 1, 28, 28)


def test_every_parameter_gets_a_gradient():
    model = UNet(dataclasses.replace(SMOKE, dropout=0.1))
    x, t = batch()
    model(x, t, np.array([0, 9])).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not np.isfinite(p.grad).all()]
    assert not missing


def test_parameter_names_are_stable_and_nested():
    names = [n for n, _ in UNet(SMOKE).named_parameters()]
    assert names[:6] == ["time_mlp.0.weight", "time_mlp.0.bias", "time_mlp.1.weight", "time_mlp.1.bias",
                         "class_emb.weight", "stem.weight"]
    assert "down.1.1.attn.in_proj_weight" in names and "up.1.0.skip.weight" in names
    assert names[-2:] == ["out.weight", "out.bias"]


def test_timestep_embedding():
    e = timestep_embedding(np.array([0, 5]), 8)
    assert e.shape == (2, 8) and e.dtype == np.float32
    np.testing.assert_array_equal(e[0], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(e[1, 0], np.sin(5.0), rtol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="num_groups 8 does not divide 12"):
        UNetConfig(base_channels=12)
    with pytest.raises(ValueError, match="not divisible"):
        UNetConfig(channel_mults=(1, 2, 2, 2))
