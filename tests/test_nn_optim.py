"""Layers, state dicts, optimisers, EMA, warmup and checkpoint I/O."""
import os

import numpy as np
import pytest

import tinyddpm as td
import tinyddpm.functional as F
from tinyddpm import checkpoint, nn, optim


class Tiny(nn.Module):
    def __init__(self):
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.blocks = [nn.Linear(4, 4), nn.LayerNorm(4)]
        self.attn = nn.MultiheadSelfAttention(4, 2)
        self.emb = nn.Embedding(3, 4)

    def forward(self, x):
        h = self.norm(self.conv(x)).mean(axis=(2, 3))       # (N, 4)
        h = self.blocks[1](self.blocks[0](h)) + self.emb(np.zeros(len(x), dtype=np.int64))
        return self.attn(h.reshape(len(x), 1, 4))


def test_named_parameters_follow_definition_order_with_torch_names():
    names = [n for n, _ in Tiny().named_parameters()]
    assert names == ["conv.weight", "conv.bias", "norm.weight", "norm.bias", "blocks.0.weight",
                     "blocks.0.bias", "blocks.1.weight", "blocks.1.bias", "attn.in_proj_weight",
                     "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "emb.weight"]


def test_torch_default_initialisation_bounds():
    td.random.manual_seed(0)
    lin, conv = nn.Linear(50, 20), nn.Conv2d(8, 16, 3)
    assert np.abs(lin.weight.data).max() <= 1 / np.sqrt(50) and lin.weight.data.std() > 0.1 / np.sqrt(50)
    assert np.abs(conv.weight.data).max() <= 1 / np.sqrt(8 * 9)
    assert lin.weight.dtype == np.float32
    attn = nn.MultiheadSelfAttention(8, 2)
    assert np.abs(attn.in_proj_weight.data).max() <= np.sqrt(6 / 32) and not attn.in_proj_bias.data.any()


def test_state_dict_round_trip_and_errors_name_the_tensor():
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    state = a.state_dict()
    state["norm.bias"] = np.zeros(5, dtype=np.float32)
    with pytest.raises(nn.StateDictError, match="'norm.bias'.*float32 \\(4,\\).*\\(5,\\)"):
        b.load_state_dict(state)
    state["norm.bias"] = np.zeros(4)
    with pytest.raises(nn.StateDictError, match="'norm.bias'.*float64"):
        b.load_state_dict(state)
    del state["norm.bias"]
    with pytest.raises(nn.StateDictError, match="missing \\['norm.bias'\\]"):
        b.load_state_dict(state)


def test_train_eval_propagates():
    m = Tiny().eval()
    assert not m.training and not m.blocks[0].training and not m.attn.out_proj.training
    assert m.train().conv.training


def test_module_backward_reaches_every_parameter():
    m = Tiny()
    x = td.Tensor(np.random.default_rng(0).standard_normal((2, 1, 5, 5)).astype(np.float32))
    m(x).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in m.parameters())


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
def test_adam_converges_on_a_quadratic(cls):
    target = np.array([3.0, -2.0, 0.5], dtype=np.float32)
    p = nn.Parameter(np.zeros(3))
    opt = cls([p], lr=0.1, weight_decay=0.0)
    for _ in range(500):
        opt.zero_grad()
        ((p - target) ** 2).sum().backward()
        opt.step()
    np.testing.assert_allclose(p.data, target, atol=1e-3)


def test_adam_first_step_moves_each_weight_by_lr_and_weight_decay_differs():
    p, q = nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2))
    p.grad = q.grad = np.array([0.3, -5.0], dtype=np.float32)
    optim.Adam([p], lr=0.01).step()
    np.testing.assert_allclose(p.data, [0.99, 1.01], rtol=1e-5)  # m̂/√v̂ = sign(g) on step 1
    optim.AdamW([q], lr=0.01, weight_decay=0.5).step()
    np.testing.assert_allclose(q.data, [0.995 - 0.01, 0.995 + 0.01], rtol=1e-5)


def test_adam_state_dict_round_trip_continues_identically():
    def run(steps, resume_at=None):
        p = nn.Parameter(np.array([1.0, -1.0]))
        opt = optim.Adam([p], lr=0.05)
        for i in range(steps):
            if i == resume_at:
                state = opt.state_dict()
                opt = optim.Adam([p], lr=0.05)
                opt.load_state_dict(state)
            p.grad = np.sin(p.data * (i + 1)).astype(np.float32)
            opt.step()
        return p.data
    np.testing.assert_array_equal(run(10), run(10, resume_at=4))


def test_clip_grad_norm_scales_to_max_norm():
    a, b = nn.Parameter(np.zeros(2)), nn.Parameter(np.zeros(1))
    a.grad, b.grad = np.array([3.0, 0.0], np.float32), np.array([4.0], np.float32)
    assert optim.clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(np.concatenate([a.grad, b.grad]), [0.6, 0, 0.8], rtol=1e-5)
    assert optim.clip_grad_norm([a, b], 10.0) == pytest.approx(1.0, rel=1e-5)


def test_ema_math():
    m = nn.Linear(2, 1)
    ema = optim.EMA(m, decay=0.9)
    w0 = m.weight.data.copy()
    m.weight.data[...] = w0 + 1
    ema.update(m)
    np.testing.assert_allclose(ema.shadow["weight"], w0 + 0.1, rtol=1e-6)
    m.weight.data[...] = w0 + 2
    ema.update(m)
    np.testing.assert_allclose(ema.shadow["weight"], w0 + 0.9 * 0.1 + 0.1 * 2, rtol=1e-6)
    other = nn.Linear(2, 1)
    ema.copy_to(other)
    np.testing.assert_allclose(other.weight.data, ema.shadow["weight"])


def test_learning_rate_warmup_then_constant_or_cosine():
    assert optim.learning_rate(0, 1.0, 4) == 0.25
    assert optim.learning_rate(3, 1.0, 4) == 1.0 and optim.learning_rate(100, 1.0, 4) == 1.0
    assert optim.learning_rate(0, 2e-4, 0) == 2e-4
    cosine = [optim.learning_rate(step, 2.0, 4, 14, "cosine") for step in range(16)]
    assert cosine[:4] == [0.5, 1.0, 1.5, 2.0]                       # warmup, then the decay starts at the top
    assert cosine[9] == pytest.approx(1.0) and cosine[6] == pytest.approx(1 + np.cos(np.pi * 0.2))
    assert cosine[14] == cosine[15] == pytest.approx(0.0, abs=1e-15)  # 0 from total_steps on
    assert all(a >= b for a, b in zip(cosine[3:], cosine[4:]))
    with pytest.raises(ValueError, match="cosine"):
        optim.learning_rate(0, 1.0, 0, 10, "linear")


def test_ema_warmup_decay():
    assert [optim.ema_decay_at(step, 0.995, warmup=True) for step in (0, 1, 8, 100)] == [1 / 10, 2 / 11, 9 / 18, 101 / 110]
    assert optim.ema_decay_at(10_000, 0.995, warmup=True) == 0.995  # capped at the decay
    assert optim.ema_decay_at(0, 0.995) == 0.995


def test_power_ema_decay_against_a_hand_computed_table():
    # γ = 1: (1 − 1/t)² at updates t = 1, 2, 3, 10
    assert [optim.ema_decay_at(step, 0.995, power=1.0) for step in (0, 1, 2, 9)] == pytest.approx([0, 1 / 4, 4 / 9, 0.81])
    assert optim.ema_decay_at(5, 0.995, warmup=True, power=0.0) == pytest.approx(5 / 6)  # the power replaces both


def test_power_ema_averages_the_run_with_weights_growing_as_a_power_of_the_step():
    def average(gamma, updates):
        m = nn.Linear(1, 1)
        ema = optim.EMA(m)
        for step in range(updates):
            m.weight.data[...] = step + 1.0  # θ_τ = τ
            ema.update(m, optim.ema_decay_at(step, 0.0, power=gamma))
        return float(ema.shadow["weight"][0, 0])
    assert average(0.0, 99) == pytest.approx(50.0, rel=1e-6)  # γ = 0: the plain mean of 1 … 99
    # γ = 2: ∫ τ³ dτ / ∫ τ² dτ = 3t/4 over 0 … t
    assert average(2.0, 1000) == pytest.approx(750.0, rel=2e-3)


def test_sigma_rel_gives_the_published_exponents():
    # Karras et al. 2024: σ_rel = 0.05 and 0.10 are γ = 16.97 and 6.94
    assert optim.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert optim.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    for sigma_rel in (0.02, 0.15, 0.25):
        g = optim.sigma_rel_to_gamma(sigma_rel)
        assert (g + 1) / ((g + 2) ** 2 * (g + 3)) == pytest.approx(sigma_rel ** 2, rel=1e-9)
    assert optim.sigma_rel_to_gamma(optim.MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-9)
    for bad in (0.0, 0.3, -0.1):
        with pytest.raises(ValueError, match="sigma_rel"):
            optim.sigma_rel_to_gamma(bad)


def test_ema_update_with_a_given_decay():
    m = nn.Linear(2, 1)
    ema = optim.EMA(m, 0.9)
    before = m.weight.data.copy()
    m.weight.data[...] = before + 1.0
    ema.update(m, decay=0.25)
    np.testing.assert_allclose(ema.shadow["weight"], 0.25 * before + 0.75 * (before + 1.0), rtol=1e-6)


def test_checkpoint_round_trip_is_atomic_and_pickle_free(tmp_path):
    path = tmp_path / "ckpt.npz"
    tree = {"model": {"w": np.arange(3, dtype=np.float32)}, "step": 7, "config": '{"a": 1}'}
    checkpoint.save(path, tree)
    back = checkpoint.load(path)
    np.testing.assert_array_equal(back["model"]["w"], tree["model"]["w"])
    assert int(back["step"]) == 7 and back["config"] == '{"a": 1}'
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # no temp files left behind


def test_checkpoint_save_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    checkpoint.save(path, {"w": np.ones(2)})
    monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"w": np.zeros(2)})
    monkeypatch.undo()
    np.testing.assert_array_equal(checkpoint.load(path)["w"], np.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(checkpoint.CheckpointError, match="bad.npz.*corrupt"):
        checkpoint.load(bad)
    obj = tmp_path / "pickled.npz"
    np.savez(obj, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(checkpoint.CheckpointError, match="pickled.npz"):
        checkpoint.load(obj)


def test_cross_entropy_and_linear_learn_a_separable_problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 2)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    m = nn.Linear(2, 2)
    opt = optim.Adam(m.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(m(td.Tensor(x)), y).backward()
        opt.step()
    assert (m(td.Tensor(x)).data.argmax(1) == y).mean() > 0.97
