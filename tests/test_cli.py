"""`tinyddpm train / sample / trajectory` end to end on the smoke preset, exact resume, Ctrl-C,
and every bad input a new user might try: one line on stderr, exit code 2."""
import numpy as np
import pytest
from PIL import Image

from tinyddpm import checkpoint, cli, train

FAST = ["--preset", "smoke", "--batch-size", "8", "--timesteps", "50"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no real cache
    monkeypatch.setenv("TINYDDPM_OFFLINE", "1")          # the embedded subset, never the network
    monkeypatch.delenv("TINYDDPM_DATA", raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke run of 4 steps with a sample grid at step 2 (shared by the sampling tests)."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(out / "home"))
        mp.setenv("TINYDDPM_OFFLINE", "1")
        assert cli.main(["train", *FAST, "--steps", "4", "--sample-every", "2", "--ckpt-every", "2",
                         "--out", str(out)]) == 0
    return out


def test_train_writes_checkpoint_samples_and_loss_curve(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"checkpoint.npz", "samples_000002.png", "samples_000004.png", "loss.png"} <= names
    state = checkpoint.load(trained / "checkpoint.npz")
    assert int(state["step"]) == 4 and len(state["losses"]) == 4 and np.isfinite(state["losses"]).all()
    assert Image.open(trained / "samples_000004.png").size[0] > 8 * 28


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
    assert cli.main(["trajectory", "--checkpoint", ckpt, "--steps", "5", "--frames", "4",
                     "--out", str(tmp_path / "t.png")]) == 0
    w, h = Image.open(tmp_path / "t.png").size
    assert w > 3 * h  # a strip of 4 frames


def test_resume_continues_exactly(tmp_path):
    args = [*FAST, "--sample-every", "1000", "--ckpt-every", "1000"]
    assert cli.main(["train", *args, "--steps", "4", "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["train", *args, "--steps", "2", "--out", str(tmp_path / "b")]) == 0
    assert cli.main(["train", *args, "--steps", "4", "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = checkpoint.load(tmp_path / "a" / "checkpoint.npz"), checkpoint.load(tmp_path / "b" / "checkpoint.npz")
    for part in ("model", "ema", "optim"):
        for key in a[part]:
            np.testing.assert_array_equal(a[part][key], b[part][key], err_msg=f"{part}/{key}")
    np.testing.assert_array_equal(a["losses"], b["losses"])


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
        "resume with nothing there": (["train", *FAST, "--resume", "--out", str(tmp_path / "empty")], "does not exist"),
        "missing checkpoint": (["sample", "--checkpoint", str(tmp_path / "nope.npz")], "does not exist"),
        "corrupt checkpoint": (["sample", "--checkpoint", str(corrupt)], "corrupt"),
        "not a training checkpoint": (["sample", "--checkpoint", str(other)], "not a tinyddpm training checkpoint"),
        "labels outside 0-9": (["sample", "--checkpoint", ckpt, "--labels", "3,12"], "0-9"),
        "labels not numbers": (["sample", "--checkpoint", ckpt, "--labels", "a,b"], "--labels"),
        "negative guidance": (["sample", "--checkpoint", ckpt, "--guidance", "-1"], "--guidance"),
        "zero images": (["sample", "--checkpoint", ckpt, "--n", "0"], "--n"),
        "unwritable out": (["sample", "--checkpoint", ckpt, "--out", "/proc/nope/grid.png"], "cannot write"),
        "eta above 1": (["sample", "--checkpoint", ckpt, "--eta", "2"], "--eta"),
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
