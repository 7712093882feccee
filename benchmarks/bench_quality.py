"""Sample quality of one training recipe at a fixed budget: its accuracy/cFID frontier over a guidance grid.

    python benchmarks/bench_quality.py [--preset tiny] [--steps 4120] [--data-dir DIR] [--n 5000] [recipe flags]
                                       [--device cpu|cuda]
                                       [--name NAME] [--samplers ddim:50,dpmpp2m:20]
                                       [--guidance-grid 0,0.25,0.5,0.75,1,1.5] [--guidance-interval LO,HI]
                                       [--guidance-space eps|x0] [--guidance-schedule constant|rising|falling]
                                       [--seed 0] [--jobs 1] [--out DIR] [--plot PATH]
    python benchmarks/bench_quality.py --rank DIR [DIR ...] [--n 5000] [--only TEXT] [--plot PATH]

It drives the `tinyddpm` commands themselves (`train`, then `eval --checkpoint --json` once per sampler
and guidance w), so a row measures exactly what a user runs; an ablation is one command per recipe flag.
Labels are balanced (0-9 cycled). Guidance trades diversity (cFID) for class fidelity (accuracy), so a
recipe or sampler is judged by its frontier, and summed up by one figure: the best cFID among the w
whose accuracy is at least 99% (tinyddpm.evaluation.best_fid_at_accuracy), both among the measured w
("on the grid") and where the accuracy crosses 99% between two of them ("interpolated"). Beside it
stands the metric's own floor: the classifier-FID of n real images at the same n (held-out MNIST
training images with --data-dir; without it, images of the embedded subset, which the judge saw in
training, so that floor is a little optimistic).

With --jobs J the rows are sampled J at a time, each `tinyddpm eval` in its own process on cores/J threads:
processes that share nothing keep the cores busier than one process whose threads meet at every op (on 2
cores, two single-threaded MPI ranks trained 1.18x as fast as one process on two threads:
docs/distributed.md), and a row's scores do not depend on the thread count.

With --out the run is kept: <out>/bench_quality.json holds the training command, its seconds and every
row measured, so a later command with the same recipe and --out samples only the rows it lacks, and
--rank re-ranks (and --plot draws) the rows of several runs without sampling anything, those of one n at a
time (cFID shrinks as n grows).
"""
import argparse
import contextlib
import fcntl
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

from tinyddpm import cli, data, evaluation
from tinyddpm.diffusion import SAMPLERS
from tinyddpm.guidance import GUIDANCE_SCHEDULES, GUIDANCE_SPACES
from tinyddpm.kernels import cpu_threads
from tinyddpm.train import PRESETS, TrainConfig

RECIPE_FLAGS = (("min_snr_gamma", "--min-snr-gamma"), ("lr_decay", "--lr-decay"), ("ema_warmup", "--ema-warmup"),
                ("prediction", "--prediction"), ("schedule", "--schedule"),
                ("zero_terminal_snr", "--zero-terminal-snr"), ("channels", "--channels"),
                ("channel_mult", "--channel-mult"), ("num_res_blocks", "--num-res-blocks"),
                ("ema_decay", "--ema-decay"), ("ema_power", "--ema-power"), ("ema_sigma_rel", "--ema-sigma-rel"),
                ("lr", "--lr"), ("batch_size", "--batch-size"), ("p_uncond", "--p-uncond"))
RECORD = "bench_quality.json"  # in --out: the training command, its seconds and the rows measured
DEFAULT_GRID = "0,0.25,0.5,0.75,1,1.5"
MIN_ACCURACY = 0.99
SCORES = ("fid", "accuracy", "confidence", "class_entropy")


def sampler_list(text):
    """'ddim:100,dpmpp2m:20' -> [('ddim', 100), ('dpmpp2m', 20)]."""
    try:
        pairs = [(name, int(steps)) for name, steps in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like ddim:50,dpmpp2m:20") from None
    for name, steps in pairs:
        if name not in SAMPLERS or steps < 1:
            raise argparse.ArgumentTypeError(f"{name}:{steps}: the sampler is one of {', '.join(SAMPLERS)}, "
                                             "with at least 1 step")
    return pairs


def interval_text(text):
    """A --guidance-interval checked now, before any training, and kept as typed (it is part of a row's key)."""
    cli.parse_interval(text)
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=("smoke", "tiny", "base"))
    p.add_argument("--steps", type=int, default=4120,
                   help="training steps (default 4120: the `tiny` U-Net's in the time 3,000 of the 32-channel one "
                        "took, the budget of docs/quality.md's frontier)")
    p.add_argument("--data-dir", help="MNIST IDX directory (the full training set); default: cache or embedded subset")
    p.add_argument("--n", type=int, default=5000, help="images sampled and scored per row (default 5000)")
    recipe_flags = p.add_argument_group("recipe", "passed to `tinyddpm train` as given (its defaults otherwise)")
    recipe_flags.add_argument("--min-snr-gamma", type=float)
    recipe_flags.add_argument("--lr-decay", choices=("constant", "cosine"))
    recipe_flags.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction)
    recipe_flags.add_argument("--prediction", choices=("eps", "x0", "v"))
    recipe_flags.add_argument("--schedule", choices=("linear", "cosine", "quadratic", "sigmoid"))
    recipe_flags.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction)
    for flag in ("--channels", "--channel-mult", "--num-res-blocks", "--ema-decay", "--ema-power", "--ema-sigma-rel",
                 "--lr", "--batch-size", "--p-uncond"):
        recipe_flags.add_argument(flag)
    p.add_argument("--name", help="the recipe's name in the tables and the plot (default: its flags)")
    p.add_argument("--samplers", type=sampler_list, default=[("dpmpp2m", 20)], metavar="NAME:STEPS,...",
                   help="one frontier per sampler, all from the same trained model (default dpmpp2m:20)")
    p.add_argument("--guidance-grid", type=cli._guidance_list, default=cli._guidance_list(DEFAULT_GRID),
                   metavar="W,W,...", help=f"the guidance w of each frontier (default {DEFAULT_GRID})")
    p.add_argument("--guidance-interval", type=interval_text, metavar="LO,HI",
                   help="passed to `tinyddpm eval` (default: every noise level)")
    p.add_argument("--guidance-space", choices=GUIDANCE_SPACES, default="eps", help="passed to `tinyddpm eval` "
                   "(default eps)")
    p.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, default="constant",
                   help="passed to `tinyddpm eval` (default constant)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=cli._int_at_least(1), default=1,
                   help="rows sampled at a time, each in its own process on cores/jobs threads (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where `tinyddpm train` and `eval` run (default cpu; cuda for --preset base on a GPU)")
    p.add_argument("--out", help="run directory, kept and reused by the same recipe (default: a temporary one)")
    p.add_argument("--plot", metavar="PATH", help="also draw the frontiers (cFID against accuracy) into a PNG")
    p.add_argument("--rank", nargs="+", metavar="DIR", help="no training or sampling: rank the rows of --n images "
                   "kept in these --out directories by the best cFID with accuracy >= 99%%")
    p.add_argument("--only", metavar="TEXT", help="with --rank: only the frontiers whose label (the tables' first "
                   "column) contains TEXT, e.g. 'dpmpp2m 20 · σ in [0.3,5]'")
    return p.parse_args(argv)


def recipe(args):
    """The recipe's `tinyddpm train` flags (the preset's defaults where none is given) and its name."""
    flags = []
    for field, flag in RECIPE_FLAGS:
        value = getattr(args, field)
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags, args.name or (" ".join(flags) or f"{args.preset} defaults")


def run(argv):
    """Seconds `tinyddpm argv` took; raises if it failed."""
    t0 = time.perf_counter()
    if cli.main(argv) != 0:
        raise SystemExit(f"`tinyddpm {' '.join(argv)}` failed")
    return time.perf_counter() - t0


def capture_json(argv):
    """(the JSON object `tinyddpm argv` prints, seconds it took)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        seconds = run(argv)
    return json.loads(buffer.getvalue()), seconds


def real_images(args):
    """n real digits at the same n: held-out training images with --data-dir, else the embedded subset's."""
    if args.data_dir:
        images, labels = evaluation.held_out(data.load_idx_dir(args.data_dir, "train"))
        source = "held-out MNIST training images"
    else:
        subset = data.load_mnist("train")
        images, labels, source = subset.images, subset.labels, f"MNIST training images ({subset.source})"
    if args.n > len(images):
        raise SystemExit(f"--n {args.n}: only {len(images)} real images for the floor")
    return images[:args.n], labels[:args.n], source


# ---- the run's record: what trained it and every row measured from it ----------------------------------
def read_record(out):
    path = os.path.join(out, RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {"rows": [], **json.load(f)}  # records from before the frontier hold no rows


def write_record(out, record, row=None):
    """Write the record atomically (a row measured in an hour must not be lost to a half-written file), with
    the rows on disk plus `row`: other commands may be sampling other rows of the same run at the same time,
    so the file is read again under a lock and their rows are kept too."""
    with open(os.path.join(out, RECORD + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = read_record(out)
        record["rows"] = (on_disk or record)["rows"] + ([row] if row else [])
        tmp = os.path.join(out, RECORD + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, os.path.join(out, RECORD))


def device_flag(args):
    """--device for a GPU; nothing on the CPU, so runs kept before the option existed are still this recipe's."""
    return [] if args.device == "cpu" else ["--device", args.device]


def preset_flags(preset, flags):
    """The preset defaults that have changed since runs were kept, spelled out where the recipe's `flags`
    leave them to the preset: the U-Net's width and depth (the `tiny` U-Net had 32 channels before it had
    24) and the learning rate (10⁻³, then 2·10⁻³, before 4·10⁻³). A kept run then names what it trained,
    and one trained under another PRESETS table is never reused for today's."""
    unet, lr = PRESETS[preset].unet, TrainConfig.for_preset(preset).lr
    spelled = {"--channels": str(unet.base_channels), "--channel-mult": ",".join(map(str, unet.channel_mults)),
               "--num-res-blocks": str(unet.blocks_per_level), "--lr": f"{lr:g}"}
    return [item for flag, value in spelled.items() if flag not in flags for item in (flag, value)]


def train_once(args, flags, out):
    """The run's record: trained now, or read back from a finished run in `out` trained by the same
    command (the run directory itself may be spelled differently)."""
    train_argv = ["train", "--preset", args.preset, "--steps", str(args.steps), "--seed", str(args.seed),
                  "--sample-every", str(10 * args.steps), "--ckpt-every", str(args.steps), *flags,
                  *preset_flags(args.preset, flags)]
    if args.data_dir:
        train_argv += ["--data-dir", args.data_dir]
    train_argv += device_flag(args)
    record = read_record(out)
    if record is not None:
        if record["train_argv"] != train_argv:
            raise SystemExit(f"--out {out} holds another recipe's run: tinyddpm {' '.join(record['train_argv'])}")
        print(f"reusing the run in {out} (trained in {record['train_seconds']:.0f} s)", file=sys.stderr)
        return record
    seconds = run(train_argv + ["--out", out])
    record = {"train_argv": train_argv, "train_seconds": seconds, "rows": []}
    write_record(out, record)
    return record


# ---- rows and frontiers ------------------------------------------------------------------------------
def guidance_variant(args):
    """How the guidance acts, beyond its weight: part of every row's key."""
    return {"interval": args.guidance_interval, "space": args.guidance_space, "schedule": args.guidance_schedule}


def curve_key(row):
    """The rows of one frontier share everything but the guidance weight."""
    return (row["sampler"], row["steps"], row["interval"], row["space"], row["schedule"], row["n"], row["seed"])


def row_key(args, sampler, steps, w):
    """What a row measured: the sampler, its steps, w, this command's guidance variant, n and seed."""
    return {"sampler": sampler, "steps": steps, "guidance": w, **guidance_variant(args), "n": args.n,
            "seed": args.seed}


def kept_row(record, key):
    return next((kept for kept in record["rows"] if {k: kept[k] for k in key} == key), None)


def eval_argv(args, out, key):
    """The `tinyddpm eval` that samples and scores the row `key`, every guidance option spelled out (a row
    must not change with the CLI's defaults; no interval means every noise level)."""
    return ["eval", "--checkpoint", os.path.join(out, "checkpoint.npz"), "--n", str(args.n), "--sampler",
            key["sampler"], "--steps", str(key["steps"]), "--guidance", str(key["guidance"]), "--guidance-space",
            args.guidance_space, "--guidance-schedule", args.guidance_schedule, "--seed", str(args.seed), "--json",
            "--guidance-interval", args.guidance_interval or "0,inf", *device_flag(args)]


def capture_json_in_child(argv, threads):
    """(the JSON object `tinyddpm argv` prints, seconds it took), run in a process of its own on `threads`
    threads; raises SystemExit with its last error line if it failed."""
    env = {**os.environ, "TINYDDPM_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tinyddpm", *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"`tinyddpm {' '.join(argv)}` failed: {last}")
    return json.loads(done.stdout), time.perf_counter() - t0


def measure(args, out, record, keys, floor):
    """Yield the row of every key (row_key): the kept one, else sampled and scored now and kept at once.
    With one job in the order of `keys`; with --jobs J the kept rows first, then the others as they finish."""
    def keep(key, score, seconds):
        row = {**key, **{k: score[k] for k in SCORES}, "sample_seconds": seconds, "floor": floor}
        write_record(out, record, row)
        return row

    if args.jobs == 1:
        for key in keys:
            yield kept_row(record, key) or keep(key, *capture_json(eval_argv(args, out, key)))
        return
    todo = [key for key in keys if kept_row(record, key) is None]
    yield from (kept_row(record, key) for key in keys if key not in todo)
    threads = max(1, cpu_threads.num_threads() // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(capture_json_in_child, eval_argv(args, out, key), threads): key for key in todo}
        for future in as_completed(futures):
            yield keep(futures[future], *future.result())


def frontier_points(rows, min_accuracy=MIN_ACCURACY):
    """(the best cFID with accuracy >= min_accuracy interpolated, and on the grid) of one curve's rows."""
    sweep = [(row["guidance"], evaluation.Evaluation(row["n"], **{k: row[k] for k in SCORES})) for row in rows]
    return (evaluation.best_fid_at_accuracy(sweep, min_accuracy),
            evaluation.best_fid_at_accuracy(sweep, min_accuracy, interpolate=False))


def describe_guidance(key):
    """'w' for plain guidance, else what differs from it (the interval, the space, the schedule)."""
    _, _, interval, space, schedule, _, _ = key
    parts = [f"σ in [{interval}]" if interval else "", "x̂_0 space" if space == "x0" else "",
             schedule if schedule != "constant" else ""]
    return ", ".join(p for p in parts if p) or "w"


def curves(records):
    """[(label, key, rows sorted by w, train seconds)] of every frontier in [(name, record), ...]."""
    found = []
    for name, record in records:
        by_key = {}
        for row in record["rows"]:
            by_key.setdefault(curve_key(row), []).append(row)
        for key, rows in by_key.items():
            sampler, steps = key[:2]
            guidance = describe_guidance(key)
            label = f"{name} · {sampler} {steps}" + ("" if guidance == "w" else f" · {guidance}")
            found.append((label, key, sorted(rows, key=lambda r: r["guidance"]), record["train_seconds"]))
    return found


def _point(point):
    if point is None:
        return "none", "-"
    return f"{point.fid:.2f}", f"{point.guidance:.3g}" if point.interpolated else f"{point.guidance:g} (grid)"


def ranking_table(found, min_accuracy=MIN_ACCURACY):
    """Markdown: one line per frontier, best first by the interpolated figure (a frontier that never reaches
    min_accuracy last)."""
    scored = [(frontier_points(rows, min_accuracy), label, rows, train_s) for label, _, rows, train_s in found]
    scored.sort(key=lambda s: (s[0][0] is None, s[0][0].fid if s[0][0] else 0.0))
    percent = f"{min_accuracy:.0%}"
    lines = [f"| recipe · sampler · guidance | n | best cFID, acc ≥ {percent} (interpolated) | at w | best cFID, "
             f"acc ≥ {percent} (on the grid) | at w | real-data FID | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (interpolated, on_grid), label, rows, train_s in scored:
        fid_i, w_i = _point(interpolated)
        fid_g, w_g = _point(on_grid)
        lines.append(f"| {label} | {rows[0]['n']} | {fid_i} | {w_i} | {fid_g} | {w_g} | {rows[0]['floor']:.2f} | "
                     f"{train_s:.0f} |")
    return "\n".join(lines)


def plot_frontier(found, path, min_accuracy=MIN_ACCURACY):
    """The frontiers as a PNG: classifier-FID (log scale) against accuracy, one line per recipe/sampler/guidance,
    each point labelled by its w, the best cFID with accuracy >= min_accuracy as a cross, and the accuracy
    threshold as a dashed line (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    try:
        for label, _, rows, _ in found:
            accuracy = [100 * r["accuracy"] for r in rows]
            fid = [r["fid"] for r in rows]
            (line,) = ax.plot(accuracy, fid, marker="o", markersize=4, linewidth=1.4, label=label)
            for r, x, y in zip(rows, accuracy, fid):
                ax.annotate(f"{r['guidance']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())
            best, _ = frontier_points(rows, min_accuracy)
            if best is not None:
                ax.plot(100 * best.accuracy, best.fid, marker="x", markersize=9, color=line.get_color())
        ax.axvline(100 * min_accuracy, color="0.4", linestyle="--", linewidth=1, label=f"accuracy {min_accuracy:.0%}")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("accuracy (%): the judge names the requested digit")
        ax.set_ylabel("classifier FID (lower: closer to real digits)")
        ax.set_title(f"guidance frontier (points labelled by w; ×: best cFID with accuracy ≥ {min_accuracy:.0%})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def rank(directories, n, plot=None, only=None):
    """Print the ranking of the rows of n images kept in several --out directories (and plot them), of the
    frontiers whose label contains `only` where given: no sampling. Only one n at a time: classifier-FID
    shrinks as n grows, so rows of two n don't compare."""
    records = []
    for directory in directories:
        record = read_record(directory)
        if record is None:
            raise SystemExit(f"{directory}: no {RECORD} (a bench_quality.py run kept with --out)")
        rows = [row for row in record["rows"] if row["n"] == n]
        records.append((record.get("name", directory), {**record, "rows": rows}))
    found = [curve for curve in curves(records) if only is None or only in curve[0]]
    if not found:
        raise SystemExit(f"no rows of --n {n} images kept in {', '.join(directories)}"
                         + ("" if only is None else f" on a frontier labelled with {only!r}"))
    print(ranking_table(found))
    if plot:
        plot_frontier(found, plot)


def main(argv=None):
    args = parse_args(argv)
    if args.rank:
        return rank(args.rank, args.n, args.plot, args.only)
    flags, name = recipe(args)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or os.path.join(scratch, "run")
        record = train_once(args, flags, out)
        record["name"] = name  # for --rank; the latest --name wins
        write_record(out, record)
        images, labels, source = real_images(args)
        real_path = os.path.join(scratch, "real.npz")
        np.savez(real_path, images=images, labels=labels)
        floor = capture_json(["eval", real_path, "--json"])[0]["fid"]
        print(f"preset {args.preset}, {args.steps} steps, seed {args.seed}; {args.n} samples per row; floor "
              f"{floor:.2f} from {args.n} {source}")
        print("| recipe | sampler | guidance | w | classifier FID | accuracy | confidence | class entropy | sample s |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
        keys = [row_key(args, sampler, steps, w) for sampler, steps in args.samplers for w in args.guidance_grid]
        measured = []
        for row in measure(args, out, record, keys, floor):  # each row as soon as it is measured
            measured.append(row)
            print(f"| {name} | {row['sampler']} {row['steps']} | {describe_guidance(curve_key(row))} | "
                  f"{row['guidance']:g} | {row['fid']:.2f} | {row['accuracy']:.2%} | {row['confidence']:.4f} | "
                  f"{row['class_entropy']:.4f} | {row['sample_seconds']:.0f} |", flush=True)
        found = curves([(name, {**record, "rows": measured})])
        print()
        print(ranking_table(found))
        if args.plot:
            plot_frontier(found, args.plot)


if __name__ == "__main__":
    sys.exit(main())
