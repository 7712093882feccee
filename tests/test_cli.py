"""`tinyddpm train / sample / trajectory` end to end on the smoke preset, exact resume, Ctrl-C,
nothing a user made is lost (a diverged run included: exit code 3), help that shows every default,
and every bad input a new user might try: one line on stderr, exit code 2."""
import argparse
import dataclasses
import json
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tinyddpm import checkpoint, cli, diffusion, guidance, optim, train

FAST = ["--preset", "smoke", "--batch-size", "8", "--timesteps", "50"]


pytestmark = pytest.mark.usefixtures("offline")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke run of 4 steps with a sample grid at step 2 (shared by the sampling tests)."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))  # not inside the run: tools cache there
        mp.setenv("TINYDDPM_OFFLINE", "1")
        assert cli.main(["train", *FAST, "--steps", "4", "--sample-every", "2", "--ckpt-every", "2",
                         "--out", str(out)]) == 0
    return out


def test_train_writes_checkpoint_samples_and_loss_curve(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"checkpoint.npz", "samples_000002.png", "samples_000004.png", "loss.png"} <= names
    state = checkpoint.load(trained / "checkpoint.npz")
    assert int(state["step"]) == 4 and len(state["losses"]) == 4 and np.isfinite(state["losses"]).all()
    width, height = Image.open(trained / "samples_000004.png").size
    assert width > 2 * 8 * 2 * 28 and height > 10 * 2 * 28  # EMA | raw, 8 digits a row, one row per class, 2x


def test_sample_writes_grid_and_npz(trained, tmp_path):
    grid, npz = tmp_path / "g.png", tmp_path / "s.npz"
    # batches of 4 for 6 images: the last batch is short, and labels must stay aligned across batches
    assert cli.main(["sample", "--checkpoint", str(trained / "checkpoint.npz"), "--n", "6", "--labels", "3,3,7",
                     "--steps", "3", "--batch-size", "4", "--out", str(grid), "--npz", str(npz)]) == 0
    with np.load(npz, allow_pickle=False) as f:
        assert f["images"].shape == (6, 28, 28) and f["images"].dtype == np.uint8
        np.testing.assert_array_equal(f["labels"], [3, 3, 7, 3, 3, 7])
        assert f["labels"].dtype == np.int64
    assert Image.open(grid).mode == "L"


def test_ddpm_sampler_and_trajectory(trained, tmp_path):
    ckpt = str(trained / "checkpoint.npz")
    assert cli.main(["sample", "--checkpoint", ckpt, "--n", "2", "--sampler", "ddpm", "--out", str(tmp_path / "a.png")]) == 0
    assert cli.main(["sample", "--checkpoint", ckpt, "--n", "2", "--sampler", "dpmpp2m", "--steps", "4",
                     "--out", str(tmp_path / "b.png")]) == 0
    assert cli.main(["trajectory", "--checkpoint", ckpt, "--steps", "5", "--frames", "4",
                     "--out", str(tmp_path / "t.png")]) == 0
    w, h = Image.open(tmp_path / "t.png").size
    assert w > 3 * h  # a strip of 4 frames


def test_resume_continues_exactly(tmp_path):
    # a run extended from 2 to 4 steps: only a constant learning rate has no plan over --steps to break
    args = [*FAST, "--lr-decay", "constant", "--sample-every", "1000", "--ckpt-every", "1000"]
    assert cli.main(["train", *args, "--steps", "4", "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["train", *args, "--steps", "2", "--out", str(tmp_path / "b")]) == 0
    assert cli.main(["train", *args, "--steps", "4", "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = checkpoint.load(tmp_path / "a" / "checkpoint.npz"), checkpoint.load(tmp_path / "b" / "checkpoint.npz")
    for part in ("model", "ema", "optim"):
        for key in a[part]:
            np.testing.assert_array_equal(a[part][key], b[part][key], err_msg=f"{part}/{key}")
    np.testing.assert_array_equal(a["losses"], b["losses"])


def assert_a_stopped_run_resumes_exactly(tmp_path, args, config):
    """`tinyddpm train args` run through into a/, and the same run (``config``) stopped after step 2 (as by
    Ctrl-C) and resumed from its checkpoint in b/, end on the same bits."""
    assert cli.main(["train", *args, "--out", str(tmp_path / "a")]) == 0
    stopped = train.Trainer(config, str(tmp_path / "b"), log=lambda m: None)
    for _ in range(2):
        stopped.losses.append(stopped.train_step())
    stopped.save()
    assert cli.main(["train", *args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = (checkpoint.load(tmp_path / d / "checkpoint.npz") for d in "ab")
    for part in ("model", "ema", "optim"):
        for key in a[part]:
            np.testing.assert_array_equal(a[part][key], b[part][key], err_msg=f"{part}/{key}")
    np.testing.assert_array_equal(a["losses"], b["losses"])


def test_resume_continues_exactly_with_the_recipe_options(tmp_path, capsys):
    # cosine lr, EMA warm-up and Min-SNR weights all depend on the step: a resume must land on the same bits
    recipe = ["--lr-decay", "cosine", "--ema-warmup", "--min-snr-gamma", "5"]
    args = [*FAST, *recipe, "--sample-every", "1000", "--ckpt-every", "1000", "--steps", "4"]
    config = train.TrainConfig.for_preset("smoke", batch_size=8, timesteps=50, lr_decay="cosine", ema_warmup=True,
                                          min_snr_gamma=5.0, steps=4, sample_every=1000, ckpt_every=1000)
    assert_a_stopped_run_resumes_exactly(tmp_path, args, config)
    capsys.readouterr()
    # the cosine decay is planned over --steps: extending the run would change it, so it is refused
    assert cli.main(["train", *FAST, *recipe, "--steps", "6", "--out", str(tmp_path / "b"), "--resume"]) == 2
    assert "steps" in capsys.readouterr().err


LEVERS = ["--prediction", "v", "--schedule", "cosine", "--zero-terminal-snr", "--channels", "8",
          "--channel-mult", "1,2", "--num-res-blocks", "2", "--ema-sigma-rel", "0.1"]


def test_resume_continues_exactly_with_the_recipe_levers_and_sampling_rebuilds_their_network(tmp_path, capsys):
    # v-prediction on a zero-terminal-SNR cosine schedule with Min-SNR (the default recipe's), another U-Net
    # shape and the power EMA, whose decay depends on the step: a resume must land on the same bits
    args = [*FAST, *LEVERS, "--sample-every", "1000", "--ckpt-every", "1000", "--steps", "4"]
    config = train.TrainConfig.for_preset("smoke", batch_size=8, timesteps=50, prediction="v", schedule="cosine",
                                          zero_terminal_snr=True, base_channels=8, channel_mults=(1, 2),
                                          blocks_per_level=2, ema_power=optim.sigma_rel_to_gamma(0.1), steps=4,
                                          sample_every=1000, ckpt_every=1000)
    assert_a_stopped_run_resumes_exactly(tmp_path, args, config)
    ckpt = str(tmp_path / "a" / "checkpoint.npz")
    model, diffusion_, saved = train.load_model(ckpt)
    assert saved == config and diffusion_.alphas_cumprod[-1] == 0 and diffusion_.prediction == "v"
    assert (model.config.base_channels, model.config.channel_mults, model.config.blocks_per_level) == (8, (1, 2), 2)
    for sampler in ("ddpm", "ddim", "dpmpp2m"):  # every sampler from pure noise at SNR 0, with interval guidance
        npz = tmp_path / f"{sampler}.npz"
        assert cli.main(["sample", "--checkpoint", ckpt, "--n", "2", "--sampler", sampler, "--steps", "3",
                         "--guidance-interval", "0.5,inf", "--guidance-space", "x0", "--guidance-schedule", "rising",
                         "--out", str(tmp_path / "g.png"), "--npz", str(npz)]) == 0
        with np.load(npz) as f:
            assert f["images"].shape == (2, 28, 28)
    capsys.readouterr()
    # another U-Net cannot continue these weights
    assert cli.main(["train", *args, "--channels", "16", "--out", str(tmp_path / "b"), "--resume"]) == 2
    assert "the U-Net" in capsys.readouterr().err


def test_a_checkpoint_from_before_the_recipe_options_reads_as_the_2020_recipe():
    stored = dataclasses.asdict(train.TrainConfig())
    for field in train.RECIPE_OFF:
        del stored[field]  # as written before the fields existed
    assert train.TrainConfig.from_json(json.dumps(stored)) == train.TrainConfig(**train.RECIPE_OFF)


@pytest.mark.parametrize("flags, expected", [
    ([], dict(min_snr_gamma=5.0, lr_decay="cosine", ema_warmup=True)),  # the default recipe
    (["--min-snr-gamma", "0", "--lr-decay", "constant", "--no-ema-warmup"], train.RECIPE_OFF),
    (["--no-ema-warmup"], dict(min_snr_gamma=5.0, lr_decay="cosine", ema_warmup=False)),
    ([], dict(zero_terminal_snr=False, ema_power=None, base_channels=None, channel_mults=None, blocks_per_level=None)),
    (["--prediction", "v", "--zero-terminal-snr", "--channels", "24", "--channel-mult", "1,2", "--num-res-blocks", "3",
      "--ema-power", "6.94"],
     dict(zero_terminal_snr=True, base_channels=24, channel_mults=(1, 2), blocks_per_level=3, ema_power=6.94)),
    (["--ema-sigma-rel", "0.05"], dict(ema_power=pytest.approx(16.97, abs=5e-3))),
])
def test_recipe_flags_reach_the_training_config(flags, expected, monkeypatch):
    seen = {}

    class Recorder:  # stands in for train.Trainer: only the config cli.main builds matters here
        def __init__(self, config, *args, **kwargs):
            seen["config"] = config

        def run(self):
            pass

    monkeypatch.setattr(train, "Trainer", Recorder)
    assert cli.main(["train", *FAST, *flags]) == 0
    assert {k: getattr(seen["config"], k) for k in expected} == expected


def test_eval_every_scores_the_ema_model_keeps_the_scores_and_changes_no_training_bit(tmp_path, capsys):
    args = [*FAST, "--lr-decay", "constant", "--sample-every", "1000", "--ckpt-every", "1000", "--steps", "4",
            "--eval-n", "20", "--sample-steps", "2"]  # constant: the run is extended from 2 steps to 4
    assert cli.main(["train", *args, "--out", str(tmp_path / "plain")]) == 0
    # stopped after step 2 (its evaluation at step 2 done), then resumed to step 4 with another at step 4
    assert cli.main(["train", *args, "--steps", "2", "--eval-every", "2", "--out", str(tmp_path / "e")]) == 0
    assert cli.main(["train", *args, "--eval-every", "2", "--out", str(tmp_path / "e"), "--resume"]) == 0
    assert "EMA model cFID" in capsys.readouterr().err
    plain, scored = (checkpoint.load(tmp_path / d / "checkpoint.npz") for d in ("plain", "e"))
    for part in ("model", "ema", "optim"):  # sampling for the scores drew on no training RNG
        for key in plain[part]:
            np.testing.assert_array_equal(plain[part][key], scored[part][key], err_msg=f"{part}/{key}")
    evals = scored["evals"]
    assert evals.shape == (2, 3) and list(evals[:, 0]) == [2, 4]
    assert (evals[:, 1] > 0).all() and ((0 <= evals[:, 2]) & (evals[:, 2] <= 1)).all()
    assert plain["evals"].shape == (0, 3)
    width, height = Image.open(tmp_path / "e" / "loss.png").size
    assert height > Image.open(tmp_path / "plain" / "loss.png").size[1] * 1.5  # the second panel


def test_eval_every_refuses_images_the_judge_cannot_read(tmp_path, capsys):
    assert cli.main(["train", "--preset", "sim", "--eval-every", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--eval-every needs 28×28 images" in err
    assert not (tmp_path / "run").exists()


def test_sim_preset_trains_on_pooled_digits_and_samples(tmp_path):
    # the preset gpu_check.py runs in the CUDA simulator, here on the CPU: 4×4 images end to end
    assert cli.main(["train", "--preset", "sim", "--out", str(tmp_path / "run")]) == 0
    state = checkpoint.load(tmp_path / "run" / "checkpoint.npz")
    assert int(state["step"]) == 2 and np.isfinite(state["losses"]).all()
    npz = tmp_path / "s.npz"
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "run" / "checkpoint.npz"), "--n", "3", "--steps", "2",
                     "--out", str(tmp_path / "g.png"), "--npz", str(npz)]) == 0
    with np.load(npz, allow_pickle=False) as f:
        assert f["images"].shape == (3, 4, 4)


def interrupting(at):
    """Trainer.train_step as it is, except that Ctrl-C comes when step `at` + 1 starts."""
    real_step = train.Trainer.train_step

    def step(self):
        if self.step == at:
            raise KeyboardInterrupt
        return real_step(self)
    return step


def test_ctrl_c_saves_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(train.Trainer, "train_step", interrupting(at=3))
    assert cli.main(["train", *FAST, "--steps", "10", "--out", str(tmp_path)]) == 130
    assert int(checkpoint.load(tmp_path / "checkpoint.npz")["step"]) == 3


def bad_inputs(trained, tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.npz"
    checkpoint.save(other, {"weights": np.ones(3)})
    ckpt = str(trained / "checkpoint.npz")
    return {
        "negative steps": (["train", "--steps", "-5"], "--steps"),
        "unknown preset": (["train", "--preset", "huge"], "huge"),
        "bad learning rate": (["train", "--lr", "abc"], "--lr"),
        "unknown schedule": (["train", "--schedule", "exp"], "exp"),
        "resume without out": (["train", "--resume"], "--resume"),
        "resume with nothing there": (["train", *FAST, "--resume", "--out", str(tmp_path / "empty")], "no checkpoint.npz"),
        "train into a used directory": (["train", *FAST, "--out", str(trained)], "already holds a run"),
        "resume and overwrite": (["train", "--resume", "--overwrite", "--out", str(trained)], "--overwrite"),
        "resume with another preset": (["train", "--resume", "--preset", "tiny", "--out", str(trained)],
                                       "--preset smoke, not tiny"),
        "missing checkpoint": (["sample", "--checkpoint", str(tmp_path / "nope.npz")], "does not exist"),
        "corrupt checkpoint": (["sample", "--checkpoint", str(corrupt)], "corrupt"),
        "not a training checkpoint": (["sample", "--checkpoint", str(other)], "not a tinyddpm training checkpoint"),
        "labels outside 0-9": (["sample", "--checkpoint", ckpt, "--labels", "3,12"], "0-9"),
        "labels not numbers": (["sample", "--checkpoint", ckpt, "--labels", "a,b"], "--labels"),
        "negative guidance": (["sample", "--checkpoint", ckpt, "--guidance", "-1"], "--guidance"),
        "zero images": (["sample", "--checkpoint", ckpt, "--n", "0"], "--n"),
        "unwritable out": (["sample", "--checkpoint", ckpt, "--out", "/proc/nope/grid.png"], "cannot write"),
        "unwritable out (root passes os.access)": (["sample", "--checkpoint", ckpt, "--out", "/proc/grid.png"],
                                                   "cannot write"),
        "unwritable npz": (["sample", "--checkpoint", ckpt, "--npz", "/proc/s.npz"], "cannot write"),
        "npz not named .npz": (["sample", "--checkpoint", ckpt, "--npz", str(tmp_path / "s.png")], ".npz"),
        "out is a directory": (["sample", "--checkpoint", ckpt, "--out", str(tmp_path)], "cannot write"),
        "unwritable trajectory": (["trajectory", "--checkpoint", ckpt, "--out", "/proc/t.png"], "cannot write"),
        "eta above 1": (["sample", "--checkpoint", ckpt, "--eta", "2"], "--eta"),
        "interval not two numbers": (["sample", "--checkpoint", ckpt, "--guidance-interval", "0.5"], "LO,HI"),
        "interval upside down": (["eval", "--checkpoint", ckpt, "--guidance-interval", "5,1"], "LO <= HI"),
        "interval below 0": (["trajectory", "--checkpoint", ckpt, "--guidance-interval=-1,2"], "0 <= LO"),
        "unknown guidance space": (["sample", "--checkpoint", ckpt, "--guidance-space", "v"], "--guidance-space"),
        "unknown guidance schedule": (["sample", "--checkpoint", ckpt, "--guidance-schedule", "cosine"], "cosine"),
        "zero terminal SNR with eps": (["train", *FAST, "--zero-terminal-snr"], "--prediction v"),
        "width the group norm cannot split": (["train", *FAST, "--channels", "10"], "num_groups"),
        "channel-mult not numbers": (["train", *FAST, "--channel-mult", "1,x"], "--channel-mult"),
        "channel-mult zero": (["train", *FAST, "--channel-mult", "1,0"], "at least 1"),
        "too many levels for 28 pixels": (["train", *FAST, "--channel-mult", "1,1,1,1"], "divisible"),
        "sigma_rel too wide": (["train", *FAST, "--ema-sigma-rel", "0.5"], "--ema-sigma-rel"),
        "both power EMA spellings": (["train", *FAST, "--ema-power", "3", "--ema-sigma-rel", "0.1"], "not allowed"),
        "cuda without a GPU": (["sample", "--checkpoint", ckpt, "--device", "cuda"], "cuda"),
        "no command": ([], "command"),
    }


def test_bad_inputs_give_one_line_and_exit_2(trained, tmp_path, capsys):
    for name, (argv, needle) in bad_inputs(trained, tmp_path).items():
        code = cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1 and err.startswith("tinyddpm: error:"), f"{name}: {err!r}"
        assert needle in err, f"{name}: {err!r}"


# ---- nothing a user made is lost ---------------------------------------------------------------
def run_files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_second_train_into_a_used_directory_stops_and_leaves_the_first_run_alone(trained, capsys, monkeypatch):
    before = run_files(trained)
    monkeypatch.setattr(train.Trainer, "train_step", lambda self: pytest.fail("a step ran"))
    for extra in ([], ["--steps", "8"]):
        assert cli.main(["train", *FAST, *extra, "--out", str(trained)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(trained) in err and "--resume" in err and "--out" in err
    assert run_files(trained) == before


def test_overwrite_keeps_the_old_checkpoint_until_the_new_run_finishes(tmp_path, monkeypatch):
    args = [*FAST, "--sample-every", "1000", "--ckpt-every", "1000", "--out", str(tmp_path)]
    assert cli.main(["train", *args, "--steps", "2"]) == 0
    old = (tmp_path / "checkpoint.npz").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "train_step", interrupting(at=1))
        assert cli.main(["train", *args, "--steps", "3", "--overwrite"]) == 130
    assert (tmp_path / "checkpoint.prev.npz").read_bytes() == old  # the replaced run survives a Ctrl-C
    assert cli.main(["train", *args, "--steps", "3", "--overwrite"]) == 0
    assert not (tmp_path / "checkpoint.prev.npz").exists()
    assert int(checkpoint.load(tmp_path / "checkpoint.npz")["step"]) == 3


@pytest.mark.parametrize("flag, path", [("--out", "/proc/grid.png"), ("--npz", "/proc/s.npz"),
                                        ("--out", "/nonexistent/dir/grid.png")])
def test_unwritable_output_fails_before_any_sampling_step(trained, monkeypatch, capsys, flag, path):
    monkeypatch.setattr(diffusion.GaussianDiffusion, "sample", lambda *a, **k: pytest.fail("a sampling step ran"))
    assert cli.main(["sample", "--checkpoint", str(trained / "checkpoint.npz"), "--n", "2", flag, path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write" in err and path in err


def test_ctrl_c_during_sample_writes_the_finished_batches(trained, tmp_path):
    grid, npz = tmp_path / "g.png", tmp_path / "part.npz"
    argv = [sys.executable, "-m", "tinyddpm", "sample", "--checkpoint", str(trained / "checkpoint.npz"),
            "--n", "1000", "--batch-size", "2", "--steps", "20", "--out", str(grid), "--npz", str(npz)]
    # A shell without job control starts `cmd &` with SIGINT ignored, and Python keeps an ignored SIGINT
    # (no KeyboardInterrupt): a suite launched that way hung here. Give the child the default, as a terminal would.
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:
        if "sampling images 5-6 " in line:  # batches 1-2 are finished
            proc.send_signal(signal.SIGINT)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    last = err.strip().splitlines()[-1]
    with np.load(npz, allow_pickle=False) as f:
        images, labels = f["images"], f["labels"]
    n = len(images)
    assert 4 <= n < 1000 and n % 2 == 0 and f"interrupted: {n} of 1000 images" in last and str(npz) in last
    np.testing.assert_array_equal(labels, np.resize(np.arange(10), n))
    assert images.dtype == np.uint8 and Image.open(grid).mode == "L"


def test_resume_with_a_lower_lr_changes_the_learning_rate_from_that_step(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "train_step", interrupting(at=2))
        assert cli.main(["train", *FAST, "--steps", "4", "--out", str(tmp_path)]) == 130
    used = []
    real_adam_step = optim.Adam.step
    monkeypatch.setattr(optim.Adam, "step", lambda self: (used.append(self.lr), real_adam_step(self)))
    # the command the divergence guard suggests: every setting but --lr is the run's
    assert cli.main(["train", "--resume", "--out", str(tmp_path), "--lr", "1e-4"]) == 0
    config = train.TrainConfig.from_json(checkpoint.load(tmp_path / "checkpoint.npz")["config"])
    assert (config.preset, config.batch_size, config.timesteps, config.lr) == ("smoke", 8, 50, 1e-4)
    # the warmup (and the cosine decay after it) keep their place: only the base rate is new
    assert used == [optim.learning_rate(s, 1e-4, config.warmup_steps, 4, "cosine") for s in (2, 3)]
    assert "learning rate 0.0001 from here (was 0.004)" in capsys.readouterr().err


# ---- the divergence guard --------------------------------------------------------------------------
def test_the_divergence_rule_passes_a_noisy_normal_run_and_stops_a_spike_or_a_nan():
    # a loss falling from 1 to 0.05 with per-step noise wider than a batch-1 run's (see train.py)
    rng = np.random.default_rng(0)
    steps = np.arange(5000)
    normal = (0.05 + 0.95 * np.exp(-steps / 200)) * rng.lognormal(0.0, 1.0, steps.size)
    history = []
    for loss in normal:
        assert train.divergence(float(loss), history) is None, len(history)
        history.append(float(loss))
    level = np.median(history[-train.DIVERGED_WINDOW:])
    assert train.divergence(0.9 * train.DIVERGED_FACTOR * level, history) is None
    assert f"over {train.DIVERGED_FACTOR:g}× the median" in train.divergence(1.1 * train.DIVERGED_FACTOR * level,
                                                                           history)
    for bad in (float("nan"), float("inf")):
        assert train.divergence(bad, history) and train.divergence(bad, [])  # from the first step on
    assert train.divergence(1e6, history[:train.DIVERGED_AFTER - 1]) is None  # too short a history to judge
    # the first losses of `tinyddpm train --lr 1 --preset smoke`: stopped at the sixth
    lr_1 = [0.914, 14.84, 27.81, 1.599e4, 4.699e3, 6.825e6]
    assert [train.divergence(loss, lr_1[:i]) is not None for i, loss in enumerate(lr_1)] == [False] * 5 + [True]


def spiking(at, loss):
    """Trainer.train_step as it is, except that step `at` reports `loss`."""
    real_step = train.Trainer.train_step

    def step(self):
        real = real_step(self)
        return loss if self.step == at else real
    return step


def divergence_line(err):
    """The guard's line: the last on stderr, the only one of tinyddpm's, no traceback."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("tinyddpm:")] == lines[-1:], lines
    return lines[-1]


def test_a_diverged_run_stops_with_exit_3_and_leaves_the_run_as_it_was(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"  # not tmp_path itself: the offline fixture puts HOME there
    args = [*FAST, "--lr-decay", "constant", "--sample-every", "3", "--sample-steps", "1", "--ckpt-every", "3",
            "--out", str(out)]
    assert cli.main(["train", *args, "--steps", "3"]) == 0
    before = run_files(out)
    capsys.readouterr()
    # step 6 makes a checkpoint and a grid; they wait for step 7's loss, the first of step 6's weights
    monkeypatch.setattr(train.Trainer, "train_step", spiking(at=7, loss=1e12))  # finite, as the issue's was
    assert cli.main(["train", *args, "--steps", "10", "--resume"]) == 3
    line = divergence_line(capsys.readouterr().err)
    assert line.startswith("tinyddpm: training diverged at step 7: ")
    assert f"{out / 'checkpoint.npz'} (step 3) is as it was" in line
    assert line.endswith(f"tinyddpm train --resume --out {out} --lr 0.0004")
    assert run_files(out) == before  # checkpoint, grid, loss curve: byte for byte


def test_a_run_that_diverges_before_its_first_checkpoint_says_to_start_afresh(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"  # not tmp_path itself: the offline fixture puts HOME there
    monkeypatch.setattr(train.Trainer, "train_step", spiking(at=2, loss=float("nan")))
    assert cli.main(["train", *FAST, "--lr", "0.05", "--steps", "10", "--out", str(out)]) == 3
    line = divergence_line(capsys.readouterr().err)
    assert "the loss is nan" in line and "no checkpoint was written yet" in line
    assert line.endswith("start afresh with --overwrite and a lower --lr, e.g. --lr 0.004 (the preset's)")
    assert list(out.iterdir()) == []


def test_the_issues_learning_rate_of_1_is_stopped_within_a_few_steps(tmp_path, capsys):
    out = tmp_path / "run"
    # `tinyddpm train --lr 1 --preset smoke` ran to the end with the loss at 1e12 and said `done:`
    assert cli.main(["train", *FAST, "--lr", "1", "--out", str(out)]) == 3
    line = divergence_line(capsys.readouterr().err)
    assert int(line.split("diverged at step ")[1].split(":")[0]) <= 2 * train.DIVERGED_AFTER
    assert list(out.iterdir()) == []


# ---- help that tells ---------------------------------------------------------------------------------
def subcommands():
    [sub] = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


@pytest.mark.parametrize("name", ["train", "sample", "trajectory", "eval"])
def test_every_option_has_a_help_line_with_its_default_and_the_help_ends_with_two_examples(name):
    parser = subcommands()[name]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action)
        assert "default" in text or "required" in text, f"{name} {action.option_strings or action.dest}: {text!r}"
    help_text = parser.format_help()
    examples = help_text.split("\nexamples:\n")[1].strip().splitlines()
    assert len(examples) == 2
    for example in examples:
        words = shlex.split(example, comments=True)
        assert words[:2] == ["tinyddpm", name]
        parser.parse_args(words[2:])  # each example is a valid command


@pytest.mark.parametrize("name", ["sample", "trajectory", "eval"])
def test_sampling_guides_as_measured_by_default_and_0_inf_guides_at_every_noise_level(name):
    """The default is the frontier's operating point: DPM-Solver++(2M) 20 steps, guidance.DEFAULT."""
    parser = subcommands()[name]
    default = parser.parse_args(["--checkpoint", "c.npz"])
    assert (default.sampler, cli._sampler_steps(default)) == ("dpmpp2m", 20)
    assert cli._guidance(default) == guidance.DEFAULT
    steps = {sampler: cli._sampler_steps(parser.parse_args(["--checkpoint", "c.npz", "--sampler", sampler]))
             for sampler in ("ddim", "ddpm")}
    assert steps == {"ddim": 50, "ddpm": None}  # DDPM runs all T steps
    assert cli._sampler_steps(parser.parse_args(["--checkpoint", "c.npz", "--sampler", "ddim", "--steps", "7"])) == 7
    plain = cli._guidance(parser.parse_args(["--checkpoint", "c.npz", "--guidance", "1",
                                             "--guidance-interval", "0,inf"]))
    assert plain == guidance.Guidance(1.0)  # what a plain number w means (guidance.as_guidance)


def test_a_default_that_comes_from_the_preset_names_each_presets_value():
    for field in ("steps", "timesteps", "lr"):
        text = cli._from_preset(field)
        assert text.startswith("default: from the preset (")
        groups = dict(part.split(": ") for part in text[len("default: from the preset ("):-1].split("; "))
        shown = {name: value for names, value in groups.items() for name in names.split(", ")}
        assert shown == {name: f"{getattr(train.TrainConfig.for_preset(name), field):g}" for name in train.PRESETS}
    [steps] = [a for a in subcommands()["train"]._actions if "--steps" in a.option_strings]
    assert steps.help.endswith(cli._from_preset("steps"))
