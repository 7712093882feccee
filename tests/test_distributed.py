"""Data parallelism over MPI (tinyddpm.distributed): the tests start `mpiexec -n 2` themselves.

2 ranks × half the batch train the model 1 process trains with the whole batch (to float32
rounding), the two ranks hold the same parameters bit for bit, a rank killed with SIGKILL stops the
other, its last checkpoint resumes on 2 ranks to the uninterrupted run bit for bit, and sampling and
eval on 2 ranks give exactly one process's images and scores. Every run is the smoke preset for a
few steps, one thread per rank."""
import json
import os
import signal
import subprocess
import sys
import time
import types
import uuid

import numpy as np
import pytest

from tinyddpm import checkpoint, cli, diffusion, distributed, train
from tinyddpm.schedules import linear_betas

try:
    import mpi4py  # noqa: F401
    HAVE_MPI = True
except ImportError:
    HAVE_MPI = False
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="the `mpi` extra is not installed: pip install -e '.[mpi]'")

STEPS = 12
FAST = ["--preset", "smoke", "--batch-size", "8", "--timesteps", "50", "--sample-every", "1000"]
TRAIN = ["train", *FAST, "--steps", str(STEPS)]
RUN_TIMEOUT_S = 300  # a hung run fails the test instead of hanging it (an idle run takes ~10 s)


def mpiexec():
    return distributed.mpiexec_path() or pytest.fail("mpi4py is installed but no mpiexec was found")


def child_env(home, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "TINYDDPM_DATA")}
    return {**env, "HOME": str(home), "TINYDDPM_OFFLINE": "1", "TINYDDPM_NUM_THREADS": "1", **extra}


def launch(ranks, argv, home, **env):
    """`mpiexec -n ranks python -m tinyddpm argv…`, started (a Popen)."""
    command = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "tinyddpm", *argv]
    return subprocess.Popen(command, env=child_env(home, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def run(ranks, argv, home, **env):
    """(exit code, stdout, stderr) of a finished launch."""
    proc = launch(ranks, argv, home, **env)
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    return proc.returncode, out, err


def assert_same_state(a, b):
    for part in ("model", "ema", "optim"):
        for key in a[part]:
            np.testing.assert_array_equal(a[part][key], b[part][key], err_msg=f"{part}/{key}")
    np.testing.assert_array_equal(a["losses"], b["losses"])


# The 2-rank reference run goes through Trainer directly, so that each rank can also save its own
# parameters (bit-identity of the ranks) and show that the checksum catches a rank that differs.
RANKS_SCRIPT = """
import sys
import numpy as np
from tinyddpm import distributed, train
out = sys.argv[1]
config = train.TrainConfig.for_preset("smoke", batch_size=8, timesteps=50, sample_every=1000, steps={steps})
trainer = train.Trainer(config, out, log=lambda message: None)
while trainer.step < config.steps:
    trainer.losses.append(trainer.train_step())
trainer.save()
rank = distributed.world().rank
np.save(f"{{out}}/rank{{rank}}.npy", np.concatenate([f.data for f in trainer.opt.flats] + trainer.ema.buffers))
if rank == 1:
    trainer.opt.flats[0].data[0] += 1e-3  # as a corrupted rank would
try:
    trainer._check_ranks_agree()
except distributed.DistributedError as e:
    print(f"caught: {{e}}")
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same smoke run of STEPS steps: by 1 process (the CLI, in this process) and by 2 ranks."""
    home = tmp_path_factory.mktemp("home")
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("TINYDDPM_OFFLINE", "1")
        assert cli.main([*TRAIN, "--out", str(one), "--overwrite"]) == 0
    command = [mpiexec(), "-n", "2", sys.executable, "-c", RANKS_SCRIPT.format(steps=STEPS), str(two)]
    done = subprocess.run(command, env=child_env(home), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return home, one, two, done.stdout


@needs_mpi
def test_two_ranks_with_half_batches_train_the_model_one_process_trains(runs):
    _, one, two, _ = runs
    a, b = (checkpoint.load(d / "checkpoint.npz") for d in (one, two))
    assert int(b["world_size"]) == 2 and int(b["step"]) == STEPS
    # the same batches, noise and timesteps; only the order of float sums differs
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5)
    # atol: the attention's key biases have a gradient that is 0 in exact arithmetic (softmax ignores a
    # shift), so Adam steps them by rounding noise, by about lr·noise/eps a step: the bound scales with the
    # learning rate (2e-5 at 1e-3 held for many runs; 2.0e-5 was seen at 2e-3). All else agrees to ~1e-7
    atol = 0.03 * train.TrainConfig.from_json(a["config"]).lr
    for part in ("model", "ema"):
        for key in a[part]:
            np.testing.assert_allclose(b[part][key], a[part][key], rtol=1e-4, atol=atol, err_msg=f"{part}/{key}")


@needs_mpi
def test_the_ranks_hold_the_same_parameters_bit_for_bit_and_a_differing_rank_is_caught(runs):
    _, _, two, stdout = runs
    np.testing.assert_array_equal(np.load(two / "rank0.npy"), np.load(two / "rank1.npy"))
    assert f"caught: the ranks' parameters after step {STEPS} differ" in stdout


@needs_mpi
def test_a_killed_rank_stops_the_other_and_the_checkpoint_resumes_to_the_uninterrupted_run(runs, tmp_path):
    home, _, two, _ = runs
    out, marker = tmp_path / "run", uuid.uuid4().hex
    proc = launch(2, [*TRAIN, "--ckpt-every", "2", "--out", str(out)], home, TINYDDPM_TEST_RUN=marker)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (out / "checkpoint.npz").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.01)
        os.kill(rank_pid(marker, 1), signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=60)  # bounded: hangs fail here
    finally:
        proc.kill()
    assert proc.returncode != 0 and time.monotonic() - killed < 60
    saved = train.load_checkpoint(str(out / "checkpoint.npz"))
    assert 2 <= int(saved["step"]) < STEPS and int(saved["step"]) % 2 == 0
    code, _, err = run(2, [*TRAIN, "--ckpt-every", "2", "--out", str(out), "--resume"], home)
    assert code == 0, err[-3000:]
    assert_same_state(checkpoint.load(out / "checkpoint.npz"), checkpoint.load(two / "checkpoint.npz"))


def rank_pid(marker, rank):
    """The pid of the process of MPI rank ``rank`` whose environment holds TINYDDPM_TEST_RUN=marker."""
    wanted = {f"TINYDDPM_TEST_RUN={marker}".encode(), f"PMI_RANK={rank}".encode()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if wanted <= set(f.read().split(b"\0")):
                    return int(pid)
        except OSError:
            continue  # gone, or not ours
    pytest.fail(f"no process of rank {rank} found")


@needs_mpi
def test_sampling_and_eval_on_two_ranks_give_one_process_images_bit_for_bit(runs, tmp_path, offline, capsys):
    home, one, _, _ = runs
    # 5 images in batches of 2: rank 0 draws batches 0 and 2, rank 1 batch 1, and rank 0 puts them in order
    args = ["--checkpoint", str(one / "checkpoint.npz"), "--n", "5", "--batch-size", "2", "--steps", "2"]
    assert cli.main(["sample", *args, "--out", str(tmp_path / "a.png"), "--npz", str(tmp_path / "a.npz")]) == 0
    code, _, err = run(2, ["sample", *args, "--out", str(tmp_path / "b.png"), "--npz", str(tmp_path / "b.npz")], home)
    assert code == 0, err[-3000:]
    assert "rank 1: sampling images 3-4 of 5" in err
    for name in ("images", "labels"):
        np.testing.assert_array_equal(np.load(tmp_path / "b.npz")[name], np.load(tmp_path / "a.npz")[name])
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    code, scores, err = run(2, ["eval", *args, "--json"], home)
    assert code == 0, err[-3000:]
    capsys.readouterr()
    assert cli.main(["eval", *args, "--json"]) == 0
    assert json.loads(scores) == json.loads(capsys.readouterr().out)  # printed once, by rank 0


@needs_mpi
@pytest.mark.parametrize("case", ["batch", "existing run"])
def test_a_bad_start_stops_both_ranks_with_one_line(runs, tmp_path, case):
    home, one, _, _ = runs
    out = one if case == "existing run" else tmp_path / "run"
    argv = [*TRAIN, "--out", str(out)] + (["--batch-size", "5"] if case == "batch" else [])
    code, _, err = run(2, argv, home)
    assert code == 2
    expected = "must divide over the 2 ranks" if case == "batch" else "already holds a run"
    assert err.count("\n") == 1 and err.startswith("tinyddpm: error: ") and expected in err, err


HANG_SCRIPT = """
import sys, time
from tinyddpm import cli, distributed
world = distributed.world()
if world.rank == 1:
    time.sleep(120)  # a rank that hangs (or is stopped) without dying: no launcher notices
try:
    world.broadcast("hello", "testing")
except distributed.DistributedError as e:
    sys.exit(cli._stop(e, f"tinyddpm: error: {e}", 1))
"""


@needs_mpi
def test_a_rank_that_stops_answering_ends_the_run_after_the_timeout(runs):
    home = runs[0]
    started = time.monotonic()
    done = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-c", HANG_SCRIPT], capture_output=True, text=True,
                          env=child_env(home, TINYDDPM_MPI_TIMEOUT="1"), timeout=RUN_TIMEOUT_S)
    assert done.returncode != 0 and time.monotonic() - started < 60  # not the 120 s rank 1 sleeps
    assert "tinyddpm: error: rank 0: no answer from the other ranks for 1 s while testing" in done.stderr


# ---- without MPI ------------------------------------------------------------------------------------------
def test_a_plain_run_is_a_world_of_one():
    assert distributed.launched_by_mpi() is None  # pytest was not started by mpiexec
    world = distributed.world()
    assert (world.rank, world.size, world.comm) == (0, 1, None)
    assert world.shard(8) == slice(0, 8) and list(world.my_batches(3)) == [0, 1, 2]
    assert world.broadcast("x") == "x" and world.gather_in_order({1: "b", 0: "a"}) == ["a", "b"]


class Recorder:
    """A conditional "model" that records the x_t, t and labels training_loss gives it."""
    num_classes = 10

    def __init__(self):
        self.seen = []

    def __call__(self, xt, t, y):
        self.seen.append((np.asarray(xt.data), np.asarray(t), np.asarray(y)))
        return xt * 0.0


def test_shards_draw_the_whole_batch_and_keep_their_rows():
    # what makes N ranks equal one process: shard i of 3 sees rows 2i, 2i+1 of the whole batch's draws
    d = diffusion.GaussianDiffusion(linear_betas(50))
    x0 = np.random.default_rng(0).standard_normal((6, 1, 2, 2)).astype(np.float32)
    y = np.arange(6)
    whole, parts = Recorder(), Recorder()
    d.training_loss(whole, x0, y, p_uncond=0.5, rng=np.random.default_rng(1))
    for i in range(3):
        d.training_loss(parts, x0[2 * i:2 * i + 2], y[2 * i:2 * i + 2], p_uncond=0.5, rng=np.random.default_rng(1),
                        shard=(i, 3))
    for k in range(3):  # x_t (so the noise and timesteps), t, the labels after the null-class swap
        np.testing.assert_array_equal(np.concatenate([seen[k] for seen in parts.seen]), whole.seen[0][k])


def test_a_wait_that_never_ends_is_an_error_after_the_timeout():
    called = []
    with pytest.raises(distributed.DistributedError, match="no answer from the other ranks for 0.05 s while testing"):
        distributed.World(timeout=0.05).wait(lambda: False, "testing", on_timeout=lambda: called.append(1))
    assert called == [1]


@pytest.mark.parametrize("text", ["0", "-1", "soon"])
def test_a_bad_timeout_setting_is_refused(monkeypatch, text):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, text)
    with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
        distributed._timeout_from_env()


def test_the_checksum_sees_one_changed_word():
    a = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    b = a.copy()
    b[500] = np.nextafter(b[500], np.float32(np.inf))
    assert distributed.checksum([a]) == distributed.checksum([a.copy()]) != distributed.checksum([b])


def test_sampling_batches_have_streams_of_their_own():
    # batch 0 keeps the stream one batch always had (so `sample --n` ≤ --batch-size is unchanged)
    assert cli.batch_rng(7, 0).random() == np.random.default_rng(7).random()
    draws = {cli.batch_rng(7, i).random() for i in range(4)}
    assert len(draws) == 4


@pytest.mark.parametrize("visible, chosen", [(None, "1"), ("4,5,6", "5"), ("3", "3")])
def test_each_rank_on_a_machine_takes_its_own_gpu(monkeypatch, visible, chosen):
    # local rank 1 of 2: the second visible GPU; a single visible GPU is the scheduler's choice, kept
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    distributed.select_local_gpu(types.SimpleNamespace(local_rank=1, local_size=2))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == chosen


def test_more_ranks_than_gpus_on_a_machine_is_refused(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match="3 ranks on this machine but CUDA_VISIBLE_DEVICES names 2 GPUs"):
        distributed.select_local_gpu(types.SimpleNamespace(local_rank=2, local_size=3))
