"""benchmarks/bench_quality.py: one recipe trained, then its accuracy/cFID frontier sampled and scored through
the tinyddpm commands; the kept rows re-ranked and plotted without sampling."""
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import bench_quality  # noqa: E402

SMOKE = ["--preset", "smoke", "--steps", "2", "--n", "4"]


def table(out, header):
    """The rows of the Markdown table whose header starts with ``header``, as lists of stripped cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.split("|")[1:-1]])
    return rows


def test_a_recipe_frontier_with_scores_times_the_real_data_floor_and_its_figure(offline, capsys):
    bench_quality.main(SMOKE + ["--samplers", "ddim:2", "--guidance-grid", "0,1", "--lr-decay", "cosine",
                                "--ema-warmup", "--min-snr-gamma", "5"])
    out = capsys.readouterr().out
    grid = table(out, "| recipe | sampler |")
    assert [row[3] for row in grid] == ["0", "1"]
    name, sampler, guidance, _, fid, accuracy, confidence, entropy, sample_s = grid[-1]
    assert name == "--min-snr-gamma 5.0 --lr-decay cosine --ema-warmup" and sampler == "ddim 2" and guidance == "w"
    assert float(fid) > 0 and accuracy.endswith("%") and 0 < float(confidence) <= 1 and float(sample_s) >= 0
    assert "from 4 MNIST training images" in out
    (summary,) = table(out, "| recipe · sampler · guidance |")
    assert summary[0] == f"{name} · ddim 2" and summary[1] == "4"
    floor = float(out.split("floor ")[1].split()[0])
    assert float(summary[6]) == pytest.approx(floor, abs=0.01) and float(fid) > floor >= 0


def test_a_kept_run_samples_only_the_rows_it_lacks_and_refuses_another_recipe(offline, capsys, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    bench_quality.main(SMOKE + ["--samplers", "ddim:2", "--guidance-grid", "0,1", "--out", run])
    first = table(capsys.readouterr().out, "| recipe | sampler |")
    evals = []
    real = bench_quality.capture_json

    def counting(argv):
        evals.append(argv)
        return real(argv)
    monkeypatch.setattr(bench_quality, "capture_json", counting)
    bench_quality.main(SMOKE + ["--samplers", "ddim:2,dpmpp2m:2", "--guidance-grid", "0,0.5,1", "--out", run,
                                "--name", "smoke run"])
    captured = capsys.readouterr()
    assert "reusing the run" in captured.err
    # the floor, then only the rows not kept: ddim w = 0.5 and dpmpp2m at every w
    sampled = [(argv[argv.index("--sampler") + 1], argv[argv.index("--guidance") + 1]) for argv in evals[1:]]
    assert sampled == [("ddim", "0.5"), ("dpmpp2m", "0.0"), ("dpmpp2m", "0.5"), ("dpmpp2m", "1.0")]
    again = table(captured.out, "| recipe | sampler |")
    assert [r[0] for r in again] == ["smoke run"] * 6
    assert [again[0][4:6], again[2][4:6]] == [first[0][4:6], first[1][4:6]]  # kept rows: the same scores
    # guidance in an interval is another frontier of the same model: its rows are sampled anew
    del evals[:]
    bench_quality.main(SMOKE + ["--samplers", "ddim:2", "--guidance-grid", "1", "--out", run,
                                "--guidance-interval", "0.5,inf"])
    interval_row, = table(capsys.readouterr().out, "| recipe | sampler |")
    assert interval_row[2] == "σ in [0.5,inf]" and len(evals) == 2
    assert evals[1][evals[1].index("--guidance-interval") + 1] == "0.5,inf"
    record = json.loads((tmp_path / "run" / bench_quality.RECORD).read_text())
    assert len(record["rows"]) == 7 and record["rows"][-1]["interval"] == "0.5,inf"
    with pytest.raises(SystemExit, match="another recipe"):
        bench_quality.main(SMOKE + ["--samplers", "ddim:2", "--out", run, "--min-snr-gamma", "3"])


def test_a_kept_run_names_the_presets_network_and_lr_and_one_trained_under_another_table_is_refused(tmp_path):
    args = bench_quality.parse_args(SMOKE)  # smoke: 16 channels × (1, 2), one block a level, lr 4e-3
    flags, _ = bench_quality.recipe(args)
    assert bench_quality.preset_flags("smoke", flags) == ["--channels", "16", "--channel-mult", "1,2",
                                                          "--num-res-blocks", "1", "--lr", "0.004"]
    given, _ = bench_quality.recipe(bench_quality.parse_args(SMOKE + ["--channels", "8", "--num-res-blocks", "2",
                                                                      "--lr", "0.001"]))
    assert bench_quality.preset_flags("smoke", given) == ["--channel-mult", "1,2"]  # the recipe's own stay
    out = str(tmp_path)
    argv_then = ["train", "--preset", "smoke", "--steps", "2", "--seed", "0", "--sample-every", "20", "--ckpt-every",
                 "2"]  # what the record held before the network was spelled out
    network_only = argv_then + ["--channels", "16", "--channel-mult", "1,2", "--num-res-blocks", "1"]  # before the lr
    for argv in (argv_then, network_only):
        bench_quality.write_record(out, {"train_argv": argv, "train_seconds": 1.0, "rows": []})
        with pytest.raises(SystemExit, match="another recipe"):
            bench_quality.train_once(args, flags, out)


def test_rows_sampled_in_parallel_processes_score_as_in_one(offline, capsys, tmp_path, monkeypatch):
    serial, parallel = str(tmp_path / "serial"), str(tmp_path / "parallel")
    argv = SMOKE + ["--samplers", "ddim:2", "--guidance-grid", "0,1,2"]
    bench_quality.main(argv + ["--out", serial])
    capsys.readouterr()
    in_process = bench_quality.capture_json

    def floor_only(argv):  # the real-data floor is scored here; rows are sampled in the children
        assert "--checkpoint" not in argv, "a row sampled in this process"
        return in_process(argv)
    monkeypatch.setattr(bench_quality, "capture_json", floor_only)
    children = []
    real = bench_quality.capture_json_in_child

    def counting(argv, threads):
        children.append(threads)
        return real(argv, threads)
    monkeypatch.setattr(bench_quality, "capture_json_in_child", counting)
    monkeypatch.setenv("TINYDDPM_NUM_THREADS", "4")
    bench_quality.main(argv + ["--out", parallel, "--jobs", "2"])
    assert children == [2, 2, 2]  # cores / jobs threads each
    rows = {}
    for run in (serial, parallel):
        record = json.loads(open(os.path.join(run, bench_quality.RECORD)).read())
        rows[run] = sorted((r["guidance"], r["fid"], r["accuracy"]) for r in record["rows"])
    assert rows[parallel] == rows[serial]  # the same images whatever the thread count: the same scores
    # kept rows are not sampled again
    capsys.readouterr()
    del children[:]
    bench_quality.main(argv + ["--out", parallel, "--jobs", "2"])
    assert children == [] and len(table(capsys.readouterr().out, "| recipe | sampler |")) == 3


def test_two_commands_sampling_from_one_run_keep_each_others_rows(tmp_path):
    out = str(tmp_path)
    bench_quality.write_record(out, {"train_argv": ["train"], "train_seconds": 1.0, "rows": []})
    first, second = bench_quality.read_record(out), bench_quality.read_record(out)  # both started before a row
    bench_quality.write_record(out, first, {"guidance": 1.0})
    bench_quality.write_record(out, second, {"guidance": 2.0})
    second["name"] = "renamed"
    bench_quality.write_record(out, second)
    on_disk = bench_quality.read_record(out)
    assert on_disk["rows"] == [{"guidance": 1.0}, {"guidance": 2.0}] and on_disk["name"] == "renamed"


def hand_made_run(directory, name, rows, train_seconds=100.0, n=5000):
    os.makedirs(directory)
    base = {"sampler": "dpmpp2m", "steps": 20, "interval": None, "space": "eps", "schedule": "constant", "n": n,
            "seed": 0, "confidence": 0.99, "class_entropy": 2.3, "sample_seconds": 1.0, "floor": 1.03}
    record = {"train_argv": ["train"], "train_seconds": train_seconds, "name": name,
              "rows": [{**base, "guidance": w, "fid": fid, "accuracy": accuracy} for w, fid, accuracy in rows]}
    with open(os.path.join(directory, bench_quality.RECORD), "w") as f:
        json.dump(record, f)
    return str(directory)


def test_rank_orders_kept_runs_by_the_interpolated_figure_and_plots_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_quality, "capture_json", lambda argv: pytest.fail("--rank sampled"))
    # a: crosses 99% 4/5 of the way from w = 0.5 to 1: w* = 0.9, cFID 10 + 0.8·(30 − 10) = 26; on the grid 30 at 1
    a = hand_made_run(tmp_path / "a", "a", [(1.0, 30.0, 0.995), (0.0, 14.0, 0.90), (0.5, 10.0, 0.97),
                                            (1.5, 50.0, 0.999)])
    b = hand_made_run(tmp_path / "b", "b", [(0.0, 8.0, 0.991), (1.0, 20.0, 1.0)])  # w = 0 is enough already
    c = hand_made_run(tmp_path / "c", "c", [(0.0, 5.0, 0.5), (1.0, 9.0, 0.9)])     # never reaches 99%
    plot = tmp_path / "frontier.png"
    bench_quality.main(["--rank", a, b, c, "--plot", str(plot)])
    rows = table(capsys.readouterr().out, "| recipe · sampler · guidance |")
    assert [row[0] for row in rows] == ["b · dpmpp2m 20", "a · dpmpp2m 20", "c · dpmpp2m 20"]
    assert rows[0][2:6] == ["8.00", "0 (grid)", "8.00", "0 (grid)"]
    assert rows[1][2:6] == ["26.00", "0.9", "30.00", "1 (grid)"]
    assert rows[2][2:6] == ["none", "-", "none", "-"]
    assert rows[1][6:] == ["1.03", "100"]
    picture = Image.open(plot)
    assert picture.format == "PNG" and picture.size[0] > 500 and np.asarray(picture).std() > 0
    with pytest.raises(SystemExit, match="no bench_quality.json"):
        bench_quality.main(["--rank", str(tmp_path)])


def test_rank_compares_rows_of_one_n_only(tmp_path, capsys):
    """cFID shrinks as n grows: a frontier of 1,000 images is left out of a ranking at 5,000, and ranked alone."""
    big = hand_made_run(tmp_path / "big", "big", [(0.0, 8.0, 0.991)])
    small = hand_made_run(tmp_path / "small", "small", [(0.0, 30.0, 0.995)], n=1000)
    bench_quality.main(["--rank", big, small])
    ranked = table(capsys.readouterr().out, "| recipe · sampler · guidance |")
    assert [row[0] for row in ranked] == ["big · dpmpp2m 20"]
    bench_quality.main(["--rank", big, small, "--n", "1000"])
    rows = table(capsys.readouterr().out, "| recipe · sampler · guidance |")
    assert [(row[0], row[1]) for row in rows] == [("small · dpmpp2m 20", "1000")]
    with pytest.raises(SystemExit, match="no rows of --n 2000"):
        bench_quality.main(["--rank", big, small, "--n", "2000"])


def test_rank_only_keeps_the_frontiers_whose_label_contains_the_text(tmp_path, capsys):
    a = hand_made_run(tmp_path / "a", "a", [(0.0, 8.0, 0.991)])
    b = hand_made_run(tmp_path / "b", "b", [(0.0, 9.0, 0.992)])
    record = json.loads((tmp_path / "b" / bench_quality.RECORD).read_text())
    record["rows"].append({**record["rows"][0], "interval": "0.3,5", "fid": 7.0})  # a second frontier of b
    (tmp_path / "b" / bench_quality.RECORD).write_text(json.dumps(record))
    bench_quality.main(["--rank", a, b])
    assert len(table(capsys.readouterr().out, "| recipe · sampler · guidance |")) == 3
    bench_quality.main(["--rank", a, b, "--only", "σ in [0.3,5]"])
    (row,) = table(capsys.readouterr().out, "| recipe · sampler · guidance |")
    assert row[0] == "b · dpmpp2m 20 · σ in [0.3,5]" and row[2] == "7.00"
    with pytest.raises(SystemExit, match="labelled with 'ddim'"):
        bench_quality.main(["--rank", a, b, "--only", "ddim"])


def test_recipe_names_the_defaults_and_spells_every_flag():
    assert bench_quality.recipe(bench_quality.parse_args([])) == ([], "tiny defaults")
    off = bench_quality.parse_args(["--min-snr-gamma", "0", "--lr-decay", "constant", "--no-ema-warmup"])
    assert bench_quality.recipe(off)[0] == ["--min-snr-gamma", "0.0", "--lr-decay", "constant", "--no-ema-warmup"]
    levers = bench_quality.parse_args(["--prediction", "v", "--schedule", "cosine", "--zero-terminal-snr",
                                       "--channels", "48", "--channel-mult", "1,2", "--num-res-blocks", "2",
                                       "--ema-decay", "0.999", "--ema-sigma-rel", "0.1", "--lr", "0.004",
                                       "--batch-size", "32", "--p-uncond", "0.2"])
    assert bench_quality.recipe(levers)[0] == ["--prediction", "v", "--schedule", "cosine", "--zero-terminal-snr",
                                               "--channels", "48", "--channel-mult", "1,2", "--num-res-blocks", "2",
                                               "--ema-decay", "0.999", "--ema-sigma-rel", "0.1", "--lr", "0.004",
                                               "--batch-size", "32", "--p-uncond", "0.2"]
    assert bench_quality.parse_args([]).guidance_grid == [0.0, 0.25, 0.5, 0.75, 1.0, 1.5]
    with pytest.raises(SystemExit):
        bench_quality.parse_args(["--lr-decay", "linear"])


@pytest.mark.parametrize("argv", [["--samplers", "ddim"], ["--samplers", "ddim:x"], ["--samplers", "euler:20"],
                                  ["--samplers", "ddim:0"], ["--guidance-grid", "0,x"], ["--guidance-grid", "-1"],
                                  ["--guidance-interval", "5,1"], ["--guidance-space", "v"]])
def test_bad_options_are_refused_before_any_training(argv):
    with pytest.raises(SystemExit):
        bench_quality.parse_args(argv)
