"""`tinyddpm train / sample / trajectory` end to end on the smoke preset, exact resume, Ctrl-C,
nothing a user made is lost, and every bad input a new user might try: one line on stderr, exit code 2."""
import dataclasses
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tinyddpm import checkpoint, cli, diffusion, optim, train

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


def test_ctrl_c_saves_a_checkpoint(tmp_path, monkeypatch):
    real_step = train.Trainer.train_step

    def interrupted(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self)
    monkeypatch.setattr(train.Trainer, "train_step", interrupted)
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
    real_step = train.Trainer.train_step

    def interrupted(self):
        if self.step == 1:
            raise KeyboardInterrupt
        return real_step(self)
    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "train_step", interrupted)
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
