"""Sample quality of one training recipe at a fixed budget: train, sample, score; Markdown table rows.

    python benchmarks/bench_quality.py [--preset tiny] [--steps 3000] [--data-dir DIR] [--n 5000]
                                       [--min-snr-gamma G] [--lr-decay cosine|constant] [--[no-]ema-warmup]
                                       [--name NAME]
                                       [--samplers ddim:50,dpmpp2m:20] [--guidance 2] [--seed 0] [--out DIR]

It drives the `tinyddpm` commands themselves (`train`, then `eval --checkpoint --json` once per sampler),
so a row measures exactly what a user runs; an ablation is one command per recipe flag, a sampler
comparison one command with several --samplers. Labels are balanced (0-9 cycled). The last column is
the metric's own floor: the classifier-FID of n real images at the same n (held-out MNIST training
images with --data-dir; without it, images of the embedded subset, which the judge saw in training, so
that floor is a little optimistic). With --out the trained run is kept, and a later command with the
same recipe and --out samples from it again instead of retraining (its train s is the first run's).
"""
import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

from tinyddpm import cli, data, evaluation
from tinyddpm.diffusion import SAMPLERS

RECIPE_FLAGS = (("min_snr_gamma", "--min-snr-gamma"), ("lr_decay", "--lr-decay"), ("ema_warmup", "--ema-warmup"))
RECORD = "bench_quality.json"  # in --out: the training command and its seconds, so the run can be reused


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=("smoke", "tiny", "base"))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--data-dir", help="MNIST IDX directory (the full training set); default: cache or embedded subset")
    p.add_argument("--n", type=int, default=5000, help="images sampled and scored")
    p.add_argument("--min-snr-gamma", type=float)
    p.add_argument("--lr-decay", choices=("constant", "cosine"))
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction)
    p.add_argument("--name", help="the recipe's name in the table (default: its flags)")
    p.add_argument("--samplers", type=sampler_list, default=[("ddim", 50)], metavar="NAME:STEPS,...",
                   help="one row per sampler, all from the same trained model (default ddim:50)")
    p.add_argument("--guidance", type=float, default=2.0,
                   help="default 2: the ablation and sampler tables of docs/quality.md, so later rows stay comparable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run directory, kept and reused by the same recipe (default: a temporary one)")
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


def train_once(args, flags, out):
    """Seconds the recipe's `tinyddpm train` took: run now, or read back from a finished run in `out`
    trained by the same command (the run directory itself may be spelled differently)."""
    train_argv = ["train", "--preset", args.preset, "--steps", str(args.steps), "--seed", str(args.seed),
                  "--sample-every", str(10 * args.steps), "--ckpt-every", str(args.steps), *flags]
    if args.data_dir:
        train_argv += ["--data-dir", args.data_dir]
    record = os.path.join(out, RECORD)
    if os.path.exists(record):
        with open(record) as f:
            done = json.load(f)
        if done["train_argv"] != train_argv:
            raise SystemExit(f"--out {out} holds another recipe's run: tinyddpm {' '.join(done['train_argv'])}")
        print(f"reusing the run in {out} (trained in {done['train_seconds']:.0f} s)", file=sys.stderr)
        return done["train_seconds"]
    seconds = run(train_argv + ["--out", out])
    with open(record, "w") as f:
        json.dump({"train_argv": train_argv, "train_seconds": seconds}, f)
    return seconds


def main(argv=None):
    args = parse_args(argv)
    flags, name = recipe(args)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or os.path.join(scratch, "run")
        train_s = train_once(args, flags, out)
        images, labels, source = real_images(args)
        real_path = os.path.join(scratch, "real.npz")
        np.savez(real_path, images=images, labels=labels)
        floor, _ = capture_json(["eval", real_path, "--json"])
        print(f"preset {args.preset}, {args.steps} steps, seed {args.seed}; {args.n} samples per row (guidance "
              f"{args.guidance:g}); floor from {args.n} {source}")
        print("| recipe | sampler | classifier FID | accuracy | confidence | class entropy | train s | sample s | "
              "real-data FID |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
        for sampler, steps in args.samplers:  # each row as soon as it is measured
            score, sample_s = capture_json(["eval", "--checkpoint", os.path.join(out, "checkpoint.npz"),
                                            "--n", str(args.n), "--sampler", sampler, "--steps", str(steps),
                                            "--guidance", str(args.guidance), "--seed", str(args.seed), "--json"])
            print(f"| {name} | {sampler} {steps} | {score['fid']:.2f} | {score['accuracy']:.2%} | "
                  f"{score['confidence']:.4f} | {score['class_entropy']:.4f} | {train_s:.0f} | {sample_s:.0f} | "
                  f"{floor['fid']:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
