"""Sample-quality evaluation: the Fréchet distance against closed forms, the shipped judge on real
digits, and `tinyddpm eval` (samples files, sampling from a checkpoint, --bpd, --ref-data, --json,
and every bad input: one line on stderr, exit code 2)."""
import dataclasses
import json
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyddpm import checkpoint, cli, data, evaluation
from tinyddpm.evaluation import FeatureStatistics, feature_statistics, frechet_distance

SEEDS = st.integers(0, 2**32 - 1)


pytestmark = pytest.mark.usefixtures("offline")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits():
    """The first 300 images and labels of the embedded subset (training images: a smoke check)."""
    subset = data._load_embedded()
    return subset.images[:300], subset.labels[:300]


@pytest.fixture(scope="module")
def shipped():
    return evaluation.load_judge()


def random_spd(rng, dim):
    a = rng.standard_normal((dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


# ---- the Fréchet distance ----------------------------------------------------------------------
@given(SEEDS)
def test_frechet_distance_of_diagonal_gaussians_is_closed_form(seed):
    # Commuting covariances: d² = |μ₁ − μ₂|² + Σ_i (√a_i − √b_i)².
    rng = np.random.default_rng(seed)
    dim = int(rng.integers(1, 9))
    m1, m2 = rng.normal(3.0, 2.0, dim), rng.normal(-1.0, 2.0, dim)   # offset means
    a, b = rng.uniform(0.01, 5.0, dim), rng.uniform(0.01, 5.0, dim)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(FeatureStatistics(m1, np.diag(a), 2), FeatureStatistics(m2, np.diag(b), 2))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


@given(SEEDS)
def test_frechet_distance_of_2d_gaussians_with_non_commuting_covariances(seed):
    # For 2×2 PSD M, tr √M = √(tr M + 2√det M); Σ₁^½Σ₂Σ₁^½ has the eigenvalues of Σ₁Σ₂, so
    # tr((Σ₁^½Σ₂Σ₁^½)^½) = √(tr(Σ₁Σ₂) + 2√(det Σ₁ det Σ₂)).
    rng = np.random.default_rng(seed)
    s1, s2 = random_spd(rng, 2), random_spd(rng, 2)
    m1, m2 = rng.normal(size=2) + 10, rng.normal(size=2)
    cross = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    got = frechet_distance(FeatureStatistics(m1, s1, 2), FeatureStatistics(m2, s2, 2))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


@given(SEEDS)
def test_frechet_distance_is_symmetric_zero_on_itself_and_shift_invariant(seed):
    rng = np.random.default_rng(seed)
    dim = int(rng.integers(2, 20))
    x = rng.standard_normal((int(rng.integers(2, 60)), dim)) @ rng.standard_normal((dim, dim))
    y = rng.standard_normal((int(rng.integers(2, 60)), dim)) * 2 + 1
    sx, sy = feature_statistics(x), feature_statistics(y)
    d = frechet_distance(sx, sy)
    # n < dim makes Σ singular, and √ is steep at 0: a round-off ε in a zero eigenvalue becomes √ε.
    assert d == pytest.approx(frechet_distance(sy, sx), rel=1e-6)
    assert frechet_distance(sx, sx) == pytest.approx(0, abs=1e-6 * np.trace(sx.cov))
    # features far from the origin: the two-pass covariance keeps every digit of the distance
    shifted = frechet_distance(feature_statistics(x + 1e4), feature_statistics(y + 1e4))
    assert shifted == pytest.approx(d, rel=1e-6)


@given(SEEDS)
def test_feature_statistics_are_the_sample_mean_and_unbiased_covariance(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((int(rng.integers(2, 30)), int(rng.integers(1, 7)))).astype(np.float32) + 100
    stats = feature_statistics(x)
    assert stats.mean.dtype == stats.cov.dtype == np.float64 and stats.n == len(x)
    np.testing.assert_allclose(stats.mean, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x.astype(np.float64), rowvar=False).reshape(stats.cov.shape),
                               rtol=1e-9, atol=1e-12)


def test_class_entropy_is_ln_10_when_balanced_and_0_for_one_class():
    assert evaluation.class_entropy(np.arange(50) % 10) == pytest.approx(np.log(10))
    assert evaluation.class_entropy(np.full(7, 3)) == 0.0


# ---- the shipped judge -------------------------------------------------------------------------
def test_shipped_judge_file_is_small_pickle_free_and_holds_float64_reference(shipped):
    assert os.path.getsize(evaluation.JUDGE_PATH) <= 2 * 1024 * 1024
    with np.load(evaluation.JUDGE_PATH, allow_pickle=False) as f:
        assert "model/fc1.weight" in f.files and f["model/fc1.weight"].dtype == np.float32
    _, reference = shipped
    dim = evaluation.Judge.feature_dim
    assert reference.n == evaluation.HELD_OUT_SIZE
    assert reference.mean.shape == (dim,) and reference.cov.shape == (dim, dim)
    assert reference.mean.dtype == reference.cov.dtype == np.float64
    np.testing.assert_array_equal(reference.cov, reference.cov.T)
    assert np.linalg.eigvalsh(reference.cov).min() > -1e-9


def test_shipped_judge_classifies_real_digits(shipped, digits):
    images, labels = digits
    result = evaluation.evaluate(images, labels, *shipped)
    assert result.n == len(images) and result.accuracy >= 0.97
    assert result.confidence > 0.9 and result.class_entropy > 2.1
    _, probs = evaluation.judge_outputs(shipped[0], images[:1])  # batch 1
    assert probs.argmax() == labels[0] and probs.sum() == pytest.approx(1)


def test_fid_of_images_against_their_own_statistics_is_zero_and_order_free(shipped, digits):
    judge, _ = shipped
    images, labels = digits
    own = evaluation.reference_statistics(judge, images)
    assert evaluation.evaluate(images, labels, judge, own).fid == pytest.approx(0, abs=1e-6)
    order = np.random.default_rng(0).permutation(150)
    a = evaluation.evaluate(images[:150], labels[:150], *shipped)
    b = evaluation.evaluate(images[order], labels[order], *shipped)
    # float32 features of a permuted batch: BLAS may sum in another order (blocking, threads, load)
    assert dataclasses.astuple(a) == pytest.approx(dataclasses.astuple(b), rel=1e-5)


# ---- tinyddpm eval -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def samples_file(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("samples") / "samples.npz"
    checkpoint.save(path, {"images": digits[0][:40], "labels": digits[1][:40]})
    return path


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    """A smoke-preset checkpoint after one training step: enough to exercise sampling and bits/dim."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))  # not inside the run: tools cache there
        mp.setenv("TINYDDPM_OFFLINE", "1")
        assert cli.main(["train", "--preset", "smoke", "--steps", "1", "--batch-size", "2", "--timesteps", "21",
                         "--sample-every", "1000", "--ckpt-every", "1000", "--out", str(out)]) == 0
    return str(out / "checkpoint.npz")


def test_eval_of_a_samples_file_prints_every_score(samples_file, capsys):
    assert cli.main(["eval", str(samples_file)]) == 0
    out = capsys.readouterr().out
    for name in ("n", "classifier FID", "accuracy", "confidence", "class entropy"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "ln 10" in out


def test_eval_json_parses(samples_file, capsys):
    assert cli.main(["eval", str(samples_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 40 and result["accuracy"] >= 0.9 and result["bits_per_dim"] is None
    assert result["fid"] > 0 and 0 < result["confidence"] <= 1 and 0 < result["class_entropy"] <= np.log(10) + 1e-9


def test_eval_treats_unconditional_labels_as_absent(tmp_path, digits, capsys):
    path = tmp_path / "uncond.npz"
    np.savez(path, images=digits[0][:5], labels=np.full(5, -1, np.int64))
    assert cli.main(["eval", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] is None


def test_eval_samples_from_a_checkpoint_and_reports_bits_per_dim(untrained_checkpoint, monkeypatch, capsys):
    # The MNIST test split is not available offline: the embedded images stand in for it.
    monkeypatch.setattr(data, "load_mnist", lambda split="train", root=None: data._load_embedded())
    assert cli.main(["eval", "--checkpoint", untrained_checkpoint, "--n", "3", "--batch-size", "2",
                     "--steps", "2", "--labels", "3,7", "--bpd", "2", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["n"] == 3 and result["accuracy"] is not None and result["bits_per_dim"] > 0
    assert "sampling images 3-3 of 3" in captured.err


def test_eval_ref_data_recomputes_the_reference_from_held_out_images(samples_file, digits, monkeypatch, capsys):
    # A stand-in training set whose held-out rows (after the first 50,000) are the samples themselves.
    images, labels = digits[0][:40], digits[1][:40]
    fake = data.MNIST(np.concatenate([np.zeros((evaluation.TRAIN_SIZE, 28, 28), np.uint8), images]),
                      np.concatenate([np.zeros(evaluation.TRAIN_SIZE, np.int64), labels]), "fake")
    monkeypatch.setattr(data, "load_idx_dir", lambda directory, split="train": fake)
    assert cli.main(["eval", str(samples_file), "--ref-data", "somewhere", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fid"] == pytest.approx(0, abs=1e-6) and "40 held-out" in result["reference"]


def bad_inputs(tmp_path, untrained_checkpoint):
    def npz(name, **arrays):
        np.savez(tmp_path / name, **arrays)
        return str(tmp_path / name)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an archive")
    ok = np.zeros((3, 28, 28), np.uint8)
    return {
        "no images array": (["eval", npz("x.npz", pictures=ok)], "no 'images'"),
        "wrong shape": (["eval", npz("s.npz", images=np.zeros((3, 28, 27), np.uint8))], "shape"),
        "channel axis": (["eval", npz("c.npz", images=np.zeros((3, 1, 28, 28), np.uint8))], "shape"),
        "values out of range": (["eval", npz("r.npz", images=np.full((3, 28, 28), 256, np.int16))], "0-255"),
        "negative values": (["eval", npz("n.npz", images=np.full((3, 28, 28), -1, np.int64))], "0-255"),
        "float images": (["eval", npz("f.npz", images=ok.astype(np.float32))], "float32"),
        "one image": (["eval", npz("o.npz", images=ok[:1])], "at least 2"),
        "labels outside 0-9": (["eval", npz("l.npz", images=ok, labels=np.array([1, 2, 10]))], "0-9"),
        "labels of the wrong length": (["eval", npz("w.npz", images=ok, labels=np.array([1, 2]))], "labels"),
        "unreadable file": (["eval", str(garbage)], "not an .npz"),
        "missing file": (["eval", str(tmp_path / "nope.npz")], "No such file"),
        "single .npy array": (["eval", str(tmp_path / "a.npy")], "single .npy"),
        "no source": (["eval"], "required"),
        "file and checkpoint": (["eval", str(garbage), "--checkpoint", untrained_checkpoint], "not allowed"),
        "bpd without checkpoint": (["eval", str(garbage), "--bpd", "2"], "--checkpoint"),
        "sweep without checkpoint": (["eval", str(garbage), "--sweep-guidance", "0,1"], "--checkpoint"),
        "sweep not a list": (["eval", "--checkpoint", untrained_checkpoint, "--sweep-guidance", "0,x"], "list"),
        "one sample": (["eval", "--checkpoint", untrained_checkpoint, "--n", "1"], "--n"),
        "ref-data without files": (["eval", npz("g.npz", images=ok), "--ref-data", str(tmp_path)], "no train-images"),
        "bpd without test data": (["eval", "--checkpoint", untrained_checkpoint, "--n", "2", "--steps", "1",
                                   "--bpd", "2"], "test"),
    }


def test_eval_bad_inputs_give_one_line_and_exit_2(tmp_path, untrained_checkpoint, capsys):
    np.save(tmp_path / "a.npy", np.zeros((3, 28, 28), np.uint8))
    for name, (argv, needle) in bad_inputs(tmp_path, untrained_checkpoint).items():
        code = cli.main(argv)
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1 and err.startswith("tinyddpm: error:"), f"{name}: {err!r}"
        assert needle in err and captured.out == "", f"{name}: {err!r}"


def test_choose_guidance_takes_the_best_fid_with_enough_accuracy():
    def result(fid, accuracy):
        return evaluation.Evaluation(n=10, fid=fid, accuracy=accuracy, confidence=0.9, class_entropy=2.3)
    sweep = [(0.0, result(20.0, 0.95)), (0.5, result(25.0, 0.99)), (1.0, result(30.0, 0.995)), (2.0, result(60.0, 1.0))]
    assert evaluation.choose_guidance(sweep) == 0.5  # w = 0 has the best FID but too little accuracy
    assert evaluation.choose_guidance(sweep[:1]) is None


def test_best_fid_at_accuracy_on_the_grid_and_interpolated_against_a_hand_computed_table():
    def result(fid, accuracy):
        return evaluation.Evaluation(n=10, fid=fid, accuracy=accuracy, confidence=0.9, class_entropy=2.3)
    # accuracy crosses 99% between w = 0.5 (97%) and 1 (99.5%): 4/5 of the way, w* = 0.9, cFID 10 + 0.8·20 = 26
    sweep = [(1.0, result(30.0, 0.995)), (0.0, result(14.0, 0.90)), (0.5, result(10.0, 0.97)),
             (1.5, result(50.0, 0.999))]
    grid = evaluation.best_fid_at_accuracy(sweep, interpolate=False)
    assert grid == evaluation.OperatingPoint(guidance=1.0, fid=30.0, accuracy=0.995, interpolated=False)
    between = evaluation.best_fid_at_accuracy(sweep)
    assert between.interpolated and between.accuracy == 0.99
    assert between.guidance == pytest.approx(0.9) and between.fid == pytest.approx(26.0)
    # a w measured at exactly the threshold is on the grid, not a crossing
    exact = [(0.5, result(12.0, 0.99)), (0.0, result(9.0, 0.95))]
    assert evaluation.best_fid_at_accuracy(exact) == evaluation.OperatingPoint(0.5, 12.0, 0.99, False)
    # an accuracy that dips back below the threshold crosses it twice: the better crossing wins
    dip = [(0.0, result(5.0, 0.98)), (1.0, result(15.0, 1.0)), (2.0, result(25.0, 0.98)), (3.0, result(40.0, 1.0))]
    assert evaluation.best_fid_at_accuracy(dip).fid == pytest.approx(10.0)
    assert evaluation.best_fid_at_accuracy(dip).guidance == pytest.approx(0.5)
    assert evaluation.best_fid_at_accuracy([(0.0, result(5.0, 0.5)), (1.0, result(9.0, 0.9))]) is None
    assert evaluation.choose_guidance(sweep) == 1.0


def test_eval_sweeps_guidance_from_a_checkpoint(untrained_checkpoint, capsys):
    assert cli.main(["eval", "--checkpoint", untrained_checkpoint, "--n", "2", "--steps", "2", "--labels", "3,7",
                     "--sweep-guidance", "0,1.5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["guidance"] for row in result["sweep"]] == [0.0, 1.5]
    assert all(row["n"] == 2 and row["seconds"] > 0 for row in result["sweep"]) and "chosen" in result
    assert "interpolated" in result
    assert cli.main(["eval", "--checkpoint", untrained_checkpoint, "--n", "2", "--steps", "1",
                     "--sweep-guidance", "0,1"]) == 0
    table = capsys.readouterr().out
    assert "| guidance w |" in table and "| 0 |" in table and "| 1 |" in table and "chosen:" in table
