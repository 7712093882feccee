"""benchmarks/bench_quality.py: one recipe trained, sampled and scored through the tinyddpm commands."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import bench_quality  # noqa: E402


def test_a_recipe_row_with_scores_times_and_the_real_data_floor(offline, capsys):
    bench_quality.main(["--preset", "smoke", "--steps", "2", "--n", "4", "--sample-steps", "2", "--lr-decay", "cosine",
                        "--ema-warmup", "--min-snr-gamma", "5"])
    out = capsys.readouterr().out
    row = out.strip().splitlines()[-1].split("|")[1:-1]
    assert row[0].strip() == "--min-snr-gamma 5.0 --lr-decay cosine --ema-warmup"
    fid, accuracy, confidence, entropy, train_s, sample_s, floor = row[1:]
    assert float(fid) > float(floor) >= 0 and accuracy.strip().endswith("%") and 0 < float(confidence) <= 1
    assert "4 MNIST training images" in out


def test_recipe_names_the_baseline():
    assert bench_quality.recipe(bench_quality.parse_args([])) == ([], "baseline")
    with pytest.raises(SystemExit):
        bench_quality.parse_args(["--lr-decay", "linear"])
