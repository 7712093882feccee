"""benchmarks/bench_quality.py: one recipe trained, sampled and scored through the tinyddpm commands."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import bench_quality  # noqa: E402

SMOKE = ["--preset", "smoke", "--steps", "2", "--n", "4"]


def rows(out):
    """The table's rows, as lists of stripped cells."""
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.strip().splitlines()[-2:]]


def test_a_recipe_row_with_scores_times_and_the_real_data_floor(offline, capsys):
    bench_quality.main(SMOKE + ["--samplers", "ddim:2", "--lr-decay", "cosine", "--ema-warmup", "--min-snr-gamma", "5"])
    out = capsys.readouterr().out
    name, sampler, fid, accuracy, confidence, entropy, train_s, sample_s, floor = rows(out)[-1]
    assert name == "--min-snr-gamma 5.0 --lr-decay cosine --ema-warmup" and sampler == "ddim 2"
    assert float(fid) > float(floor) >= 0 and accuracy.endswith("%") and 0 < float(confidence) <= 1
    assert "4 MNIST training images" in out


def test_a_kept_run_is_sampled_again_by_several_samplers_without_retraining(offline, capsys, tmp_path):
    run = str(tmp_path / "run")
    bench_quality.main(SMOKE + ["--samplers", "ddim:2", "--out", run])
    first = rows(capsys.readouterr().out)[-1]
    bench_quality.main(SMOKE + ["--samplers", "ddim:2,dpmpp2m:2", "--out", run])
    captured = capsys.readouterr()
    again, dpmpp = rows(captured.out)
    assert "reusing the run" in captured.err
    assert again[1] == "ddim 2" and dpmpp[1] == "dpmpp2m 2"
    assert again[2:4] == first[2:4] and again[6] == first[6]  # same model, same seed: same scores; train s kept
    with pytest.raises(SystemExit, match="another recipe"):
        bench_quality.main(SMOKE + ["--samplers", "ddim:2", "--out", run, "--min-snr-gamma", "3"])


def test_recipe_names_the_defaults_and_spells_every_flag():
    assert bench_quality.recipe(bench_quality.parse_args([])) == ([], "tiny defaults")
    off = bench_quality.parse_args(["--min-snr-gamma", "0", "--lr-decay", "constant", "--no-ema-warmup"])
    assert bench_quality.recipe(off)[0] == ["--min-snr-gamma", "0.0", "--lr-decay", "constant", "--no-ema-warmup"]
    with pytest.raises(SystemExit):
        bench_quality.parse_args(["--lr-decay", "linear"])


@pytest.mark.parametrize("text", ["ddim", "ddim:x", "euler:20", "ddim:0"])
def test_a_bad_sampler_list_is_refused(text):
    with pytest.raises(SystemExit):
        bench_quality.parse_args(["--samplers", text])
