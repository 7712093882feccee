"""The ``tinyddpm`` command: train, sample, trajectory, eval.

Every mistake a user can make (bad numbers, missing or corrupt files, unwritable paths, no GPU)
ends in one line on stderr naming the problem and exit code 2, never a traceback. Started by
``mpirun -n N``, the commands run data-parallel (tinyddpm.distributed): a mistake every rank
meets is printed once, by rank 0, and a failure of one rank alone stops them all (MPI_Abort).
A training run that diverges (tinyddpm.train.divergence) ends in one line saying how to continue,
exit code 3.
"""
import argparse
import dataclasses
import os
import sys
import textwrap

import numpy as np

from . import distributed, guidance
from .checkpoint import CheckpointError
from .data import DataError
from .device import DeviceError
from .diffusion import SAMPLERS
from .guidance import GUIDANCE_SCHEDULES, GUIDANCE_SPACES, Guidance
from .optim import LR_DECAYS, MAX_SIGMA_REL, sigma_rel_to_gamma
from .nn import StateDictError
from .train import (DIVERGED_AFTER, DIVERGED_FACTOR, DIVERGED_WINDOW, PRESETS, UNET_FIELDS, TrainConfig,
                    TrainingDiverged)


class UsageError(Exception):
    """A bad command-line value (printed as one line, exit code 2)."""


# Library validation errors are ValueErrors with a message written for the user (DataError,
# CheckpointError and StateDictError among them); TINYDDPM_DEBUG=1 shows the traceback instead.
EXPECTED_ERRORS = (UsageError, ValueError, DataError, CheckpointError, StateDictError, DeviceError, OSError,
                   distributed.DistributedError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends in its default (unless it names it already); the description (wrapped
    by ``_subcommand``) and the examples of the epilog keep their lines."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: {'off' if action.default is False else '%(default)s'})"


def _subcommand(sub, name, summary, description, examples):
    """A subcommand whose --help shows each option's default and ends with example commands."""
    return sub.add_parser(name, help=summary, formatter_class=_HelpFormatter,
                          description=textwrap.fill(description, 88),
                          epilog="examples:\n" + "\n".join(f"  {command}" for command in examples))


def _from_preset(field):
    """'default: from the preset (sim: 2; smoke: 60; tiny: 2000; base: 40000)', read from PRESETS;
    presets that agree share one entry."""
    by_value = {}
    for name in PRESETS:
        config = TrainConfig.for_preset(name)
        value = getattr(config.unet_config() if field in UNET_FIELDS else config, field)
        value = ",".join(map(str, value)) if isinstance(value, tuple) else value
        shown = ("on" if value else "off") if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) \
            else str(value)
        by_value.setdefault(shown, []).append(name)
    if len(by_value) == 1:
        return f"default: from the preset (all: {next(iter(by_value))})"
    return "default: from the preset (" + "; ".join(f"{', '.join(names)}: {v}" for v, names in by_value.items()) + ")"


def _int_at_least(lo):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value
    return parse


def _float_in(lo, hi, lo_open=False):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (lo < value if lo_open else lo <= value) or value > hi or value != value:
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {text}")
        return value
    return parse


def parse_interval(text):
    """'0.3,5' -> (0.3, 5.0): noise levels 0 <= σ_lo <= σ_hi ('inf' for no upper end)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two numbers LO,HI (like 0.3,5 or 1,inf)") from None
    if not 0 <= lo <= hi:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r}: the noise levels must satisfy 0 <= LO <= HI")
    return lo, hi


def _positive_int_list(text):
    """'1,2,2' -> (1, 2, 2), each at least 1."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers like 1,2,2") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"every multiplier must be at least 1, got {text}")
    return values


def parse_labels(text):
    """'0-9' (a range), '3,3,7' (a list) → int64 array of digits."""
    try:
        if "-" in text:
            lo, hi = (int(p) for p in text.split("-"))
            labels = np.arange(lo, hi + 1)
        else:
            labels = np.array([int(p) for p in text.split(",")])
    except ValueError:
        raise UsageError(f"--labels {text!r}: use a range like 0-9 or a list like 3,3,7") from None
    if labels.size == 0 or labels.min() < 0 or labels.max() > 9:
        raise UsageError(f"--labels {text!r}: digits must be within 0-9")
    return labels.astype(np.int64)


class SamplingInterrupted(Exception):
    """Ctrl-C while sampling, carrying the images of the batches that had finished."""

    def __init__(self, images, labels):
        super().__init__(f"interrupted after {len(images)} images")
        self.images, self.labels = images, labels


def _writable_file(path, suffix):
    """Fail now, before any slow work, if ``path`` could not be written afterwards."""
    from .checkpoint import check_writable
    if not path.lower().endswith(suffix):
        raise UsageError(f"cannot write {path!r}: the file name must end in {suffix}")
    try:
        check_writable(path)
    except OSError as e:
        raise UsageError(f"cannot write {path!r}: {e.strerror}") from None


# Each sampler's steps unless --steps says otherwise. DPM-Solver++(2M) 20, the default sampler, is where
# the default guidance was measured (docs/quality.md's frontier), in 20 network calls against DDIM's 50.
DEFAULT_STEPS = {"dpmpp2m": 20, "ddim": 50}


def _sampler_steps(args):
    """--steps, else the sampler's default; None for DDPM, which runs all T steps."""
    return None if args.sampler == "ddpm" else args.steps or DEFAULT_STEPS[args.sampler]


def _add_sampling_args(p, checkpoint=None):
    """The sampler options shared by sample, trajectory and eval (eval's --checkpoint is optional
    and lives in a group, so it passes its own)."""
    (checkpoint or p).add_argument("--checkpoint", required=checkpoint is None,
                                   help="a checkpoint.npz written by `tinyddpm train`" +
                                   (" (required)" if checkpoint is None else " (required unless samples are given)"))
    p.add_argument("--sampler", choices=SAMPLERS, default="dpmpp2m",
                   help="ddpm: all T ancestral steps; ddim: Song et al. 2021; dpmpp2m: DPM-Solver++(2M), "
                        "Lu et al. 2022 (default: dpmpp2m)")
    p.add_argument("--steps", type=_int_at_least(1), default=None,
                   help="DPM-Solver++ / DDIM steps (default: " +
                        ", ".join(f"{n} for {name}" for name, n in DEFAULT_STEPS.items()) + "; DDPM uses all T)")
    p.add_argument("--eta", type=_float_in(0, 1), default=0.0, help="DDIM stochasticity η (0: deterministic)")
    p.add_argument("--guidance", type=_float_in(0, 100), default=guidance.DEFAULT.weight,
                   help="classifier-free guidance w ≥ 0 (0: none; ignored by an unconditional model) "
                        f"(default: {guidance.DEFAULT.weight:g})")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise: the same seed gives the same images")
    _add_guidance_args(p)
    _add_device_arg(p)


def _add_device_arg(p):
    p.add_argument("--device", choices=("cpu", "cuda", "cudasim"), default="cpu",
                   help="cpu: NumPy; cuda: CuPy and the CUDA kernels; cudasim: the CUDA kernels in numba's simulator")


def _add_guidance_args(p):
    """Where and how --guidance acts (tinyddpm/guidance.py); the defaults are guidance.DEFAULT's."""
    lo, hi = guidance.DEFAULT.interval
    p.add_argument("--guidance-interval", type=parse_interval, default=guidance.DEFAULT.interval, metavar="LO,HI",
                   help="guide only at noise levels σ_t = √((1 − ᾱ_t)/ᾱ_t) in [LO, HI], the "
                        "conditional model elsewhere (Kynkäänniemi et al. 2024); HI may be inf, and 0,inf "
                        f"guides at every noise level (default: {lo:g},{hi:g})")
    p.add_argument("--guidance-space", choices=GUIDANCE_SPACES, default="eps",
                   help="combine the network outputs (eps) or the two clipped x0 estimates (x0; the same as eps "
                        "without clipping) (default: eps)")
    p.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, default="constant",
                   help="w over t = 0…T−1, mean w: constant; rising 2w·t/(T−1) (grows with the noise level); "
                        "falling 2w·(1 − t/(T−1)) (Wang et al. 2024) (default: constant)")


def _guidance(args):
    """The Guidance the sampling options describe."""
    return Guidance(args.guidance, args.guidance_interval, args.guidance_space,
                    args.guidance_schedule)


def _add_batch_size_arg(p):
    # 64 (128 model inputs with guidance) measured fastest per image on 2 CPU cores: at 512 inputs the
    # U-Net's activations fall out of cache and each image costs 1.8x as much.
    p.add_argument("--batch-size", type=_int_at_least(1), default=64,
                   help="images per batch (bounds memory; guidance doubles the model's batch)")


def build_parser():
    parser = _Parser(prog="tinyddpm", description="Train and sample a tiny DDPM on MNIST.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = _subcommand(sub, "train", "train a U-Net on MNIST (Algorithm 1)",
                    "Train a U-Net on MNIST (Algorithm 1 of Ho et al. 2020). An option whose default comes from the "
                    "preset takes the preset's value; with --resume, every option not given keeps the run's value. "
                    f"A loss that is not finite, or over {DIVERGED_FACTOR:g}× the median of the last "
                    f"{DIVERGED_WINDOW} losses (checked once {DIVERGED_AFTER} are recorded), stops the run with exit "
                    "code 3 and the last checkpoint untouched.",
                    ["tinyddpm train --preset smoke --out runs/smoke",
                     "tinyddpm train --resume --out runs/smoke --lr 0.0001   # continue a stopped run, at a lower "
                     "learning rate"])
    t.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a row of tinyddpm/train.py's PRESETS table (default: tiny, the CPU run; with --resume: "
                        "the run's)")
    t.add_argument("--data-dir", help="directory with the MNIST IDX files (default: the cache, else a download, "
                                      "else the embedded subset)")
    t.add_argument("--out", default=None, help="run directory (default: runs/<preset>)")
    t.add_argument("--steps", type=_int_at_least(1), help=f"training steps; {_from_preset('steps')}")
    t.add_argument("--batch-size", type=_int_at_least(1), help=f"images per step; {_from_preset('batch_size')}")
    t.add_argument("--lr", type=_float_in(0, 1, lo_open=True),
                   help="Adam's peak learning rate, after a linear warmup; with --resume it changes the learning "
                        f"rate from the resumed step on (warmup and decay keep their place); {_from_preset('lr')}")
    t.add_argument("--schedule", choices=("linear", "cosine", "quadratic", "sigmoid"),
                   help=f"the noise schedule β_t; {_from_preset('schedule')}")
    t.add_argument("--timesteps", type=_int_at_least(2), help=f"diffusion steps T; {_from_preset('timesteps')}")
    t.add_argument("--prediction", choices=("eps", "x0", "v"),
                   help=f"what the network predicts: the noise ε, x_0, or v; {_from_preset('prediction')}")
    cond = t.add_mutually_exclusive_group()
    cond.add_argument("--cond", dest="conditional", action="store_true", default=None,
                      help=f"class-conditional (for guidance); {_from_preset('conditional')}")
    cond.add_argument("--uncond", dest="conditional", action="store_false",
                      help="unconditional: no labels (default: --cond)")
    t.add_argument("--p-uncond", type=_float_in(0, 1),
                   help=f"probability of training on the null class, for guidance; {_from_preset('p_uncond')}")
    t.add_argument("--ema-decay", type=_float_in(0, 1),
                   help=f"decay of the weights' exponential moving average; {_from_preset('ema_decay')}")
    t.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="EMA decay min(ema-decay, (1 + step)/(10 + step)); --no-ema-warmup: constant; "
                        f"{_from_preset('ema_warmup')}")
    t.add_argument("--lr-decay", choices=LR_DECAYS,
                   help=f"after warmup: cosine to 0 at --steps, or constant; {_from_preset('lr_decay')}")
    t.add_argument("--min-snr-gamma", type=_float_in(0, 1e6),
                   help=f"Min-SNR-γ loss weighting (0: off); {_from_preset('min_snr_gamma')}")
    _add_recipe_lever_args(t)
    _add_device_arg(t)
    t.add_argument("--seed", type=int, help=f"seed of the initial weights, batches and noise; {_from_preset('seed')}")
    t.add_argument("--sample-every", type=_int_at_least(1), metavar="N",
                   help=f"every N steps, a grid of samples_<step>.png; {_from_preset('sample_every')}")
    t.add_argument("--ckpt-every", type=_int_at_least(1), metavar="N",
                   help=f"every N steps, checkpoint.npz; {_from_preset('ckpt_every')}")
    t.add_argument("--sample-steps", type=_int_at_least(1),
                   help=f"DDIM steps of the sample grids and --eval-every; {_from_preset('sample_steps')}")
    t.add_argument("--eval-every", type=_int_at_least(1), metavar="N",
                   help="every N steps, classifier-FID and accuracy of the EMA model: printed, kept in the "
                        "checkpoint and drawn under the loss curve (default: off)")
    t.add_argument("--eval-n", type=_int_at_least(2),
                   help=f"samples per --eval-every evaluation; {_from_preset('eval_n')}")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its checkpoint.npz, exactly where it stopped")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out (its checkpoint is kept as checkpoint.prev.npz until "
                            "the new run finishes)")

    s = _subcommand(sub, "sample", "sample a grid of digits from a checkpoint",
                    "Sample digits from a checkpoint into a grid (and --npz); Ctrl-C writes the batches finished "
                    "so far.",
                    ["tinyddpm sample --checkpoint runs/tiny/checkpoint.npz --out grid.png",
                     "tinyddpm sample --checkpoint runs/tiny/checkpoint.npz --labels 3,3,7 --n 30 --sampler ddim "
                     "--steps 100 --npz samples.npz"])
    _add_sampling_args(s)
    s.add_argument("--n", type=_int_at_least(1), default=64, help="how many images")
    s.add_argument("--labels", default="0-9", help="digits to draw, cycled: a range 0-9 or a list 3,3,7")
    s.add_argument("--out", default="grid.png", help="the grid, a .png")
    s.add_argument("--npz", default=None,
                   help="also write images (N,28,28) uint8 and labels (N,) int64 to this .npz (default: none)")
    _add_batch_size_arg(s)

    tr = _subcommand(sub, "trajectory", "a strip of one digit emerging from noise (x_T … x_0)",
                     "One digit emerging from noise: --frames images from x_T to x_0, as one strip.",
                     ["tinyddpm trajectory --checkpoint runs/tiny/checkpoint.npz --label 7",
                      "tinyddpm trajectory --checkpoint runs/tiny/checkpoint.npz --sampler ddpm --frames 12 "
                      "--out ddpm.png"])
    _add_sampling_args(tr)
    tr.add_argument("--label", type=int, choices=range(10), default=None, metavar="{0-9}",
                    help="the digit (default: one drawn from --seed)")
    tr.add_argument("--frames", type=_int_at_least(2), default=10, help="frames from x_T to x_0")
    tr.add_argument("--out", default="trajectory.png", help="the strip, a .png")

    e = _subcommand(sub, "eval", "score samples with the MNIST judge: classifier-FID, accuracy, confidence",
                    "Score a samples .npz, or samples drawn now from --checkpoint, with the shipped MNIST judge: "
                    "classifier-FID, accuracy, confidence, class entropy.",
                    ["tinyddpm eval samples.npz",
                     "tinyddpm eval --checkpoint runs/tiny/checkpoint.npz --n 1000 --sweep-guidance 0,0.5,1,2"])
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("samples", nargs="?",
                        help="a .npz written by `tinyddpm sample --npz` (required unless --checkpoint is given)")
    _add_sampling_args(e, checkpoint=source)
    e.add_argument("--n", type=_int_at_least(2), default=1000, help="how many images to sample")
    e.add_argument("--labels", default="0-9", help="digits to sample, cycled: a range 0-9 or a list 3,3,7")
    _add_batch_size_arg(e)
    e.add_argument("--bpd", type=_int_at_least(1), metavar="N",
                   help="also the checkpoint's bits/dim on N real MNIST test images, the variational bound "
                        "(default: off)")
    e.add_argument("--ref-data", metavar="DIR", help="MNIST IDX directory: recompute the reference statistics "
                   "from its held-out training images and read --bpd's test images there first (default: the "
                   "shipped statistics)")
    e.add_argument("--sweep-guidance", type=_guidance_list, metavar="W,W,...",
                   help="with --checkpoint: sample and score once per guidance w (same seed each time) and name the "
                   "w with the best classifier-FID among those with accuracy >= 99%% (default: off)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _add_recipe_lever_args(t):
    """The U-Net's shape, a zero terminal SNR and the power EMA (tinyddpm/train.py's TrainConfig)."""
    t.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=None,
                   help="rescale the schedule so that ᾱ_{T−1} = 0 (Lin et al. 2024); needs --prediction v "
                        "or x0 (default: off)")
    t.add_argument("--channels", type=_int_at_least(1), metavar="N",
                   help=f"the U-Net's base width; {_from_preset('base_channels')}")
    t.add_argument("--channel-mult", type=_positive_int_list, metavar="M,M,...",
                   help=f"width multiplier per resolution level, one halving each; {_from_preset('channel_mults')}")
    t.add_argument("--num-res-blocks", type=_int_at_least(1), metavar="N",
                   help=f"ResNet blocks per level; {_from_preset('blocks_per_level')}")
    ema = t.add_mutually_exclusive_group()
    ema.add_argument("--ema-power", type=_float_in(0, 1e6), metavar="GAMMA",
                     help="power-function EMA: decay (1 − 1/t)^(GAMMA+1) at update t (Karras et al. 2024), in "
                          "place of --ema-decay and --ema-warmup (default: off)")
    ema.add_argument("--ema-sigma-rel", type=_float_in(0, MAX_SIGMA_REL, lo_open=True), metavar="S",
                     help="the power EMA by its relative width σ_rel (0.05: GAMMA 16.97; 0.10: 6.94) (default: off)")


def _recipe_lever_overrides(args):
    """The TrainConfig fields _add_recipe_lever_args's options set (the ones given)."""
    power = sigma_rel_to_gamma(args.ema_sigma_rel) if args.ema_sigma_rel is not None else args.ema_power
    return {k: v for k, v in {"zero_terminal_snr": args.zero_terminal_snr, "base_channels": args.channels,
                              "channel_mults": args.channel_mult, "blocks_per_level": args.num_res_blocks,
                              "ema_power": power}.items() if v is not None}


def _guidance_list(text):
    """'0,0.5,1,2' -> [0.0, 0.5, 1.0, 2.0], each a guidance w in [0, 100]."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(0 <= v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"every guidance w must be in [0, 100], got {text}")
    return values


def cmd_train(args):
    from . import train
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out pointing at the run to continue")
    overrides = {k: v for k, v in {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "schedule": args.schedule, "timesteps": args.timesteps, "prediction": args.prediction,
        "conditional": args.conditional, "p_uncond": args.p_uncond, "ema_decay": args.ema_decay,
        "seed": args.seed, "sample_every": args.sample_every, "ckpt_every": args.ckpt_every,
        "ema_warmup": args.ema_warmup, "lr_decay": args.lr_decay, "min_snr_gamma": args.min_snr_gamma,
        "eval_every": args.eval_every, "eval_n": args.eval_n, "sample_steps": args.sample_steps}.items()
        if v is not None}
    overrides.update(_recipe_lever_overrides(args))
    if args.resume:
        config = train.resumed_config(args.out, args.preset, **overrides)
    else:
        config = train.TrainConfig.for_preset(args.preset or "tiny", **overrides)
    out = args.out or os.path.join("runs", config.preset)
    trainer = train.Trainer(config, out, data_dir=args.data_dir, log=lambda m: print(m, file=sys.stderr),
                            resume=args.resume, overwrite=args.overwrite)
    try:
        trainer.run()
    except KeyboardInterrupt:
        return 130
    except TrainingDiverged as stop:
        if os.environ.get("TINYDDPM_DEBUG"):
            raise
        if distributed.world().is_root:  # every rank stops at the same step: their losses are the mean's
            print(f"tinyddpm: {stop}", file=sys.stderr)
        return 3
    return 0


def _load_for_sampling(args, prepare=None):
    """(model, diffusion, config, prepared) of --checkpoint, ``prepared`` being what ``prepare()`` (the
    checks and reads of the other inputs and outputs, run first) returned. Under MPI rank 0 alone
    prepares (the others get None) and reads the checkpoint, and shares it: a failure of either
    stops every rank at once."""
    from . import train
    world = distributed.world()

    def read():
        prepared = prepare() if prepare is not None else None
        state = train.load_checkpoint(args.checkpoint)
        return state, train.model_from_checkpoint(state, args.checkpoint), prepared

    read_on_root = world.on_root(read)
    if world.is_root:
        state, (model, diffusion, config), prepared = read_on_root
        world.broadcast(state, "sharing the checkpoint")
    else:
        state, prepared = world.broadcast(None, "sharing the checkpoint"), None
        model, diffusion, config = train.model_from_checkpoint(state, args.checkpoint)
    if not config.conditional and args.guidance:
        args.guidance = 0.0  # an unconditional model has nothing to guide towards
    return model, diffusion, config, prepared


def cmd_sample(args):
    """Sample --n images into a grid (and --npz). Ctrl-C writes the batches finished so far to both
    (in a single process). Under MPI the ranks share the batches and rank 0 writes."""

    def check_outputs():
        _writable_file(args.out, ".png")
        if args.npz:
            _writable_file(args.npz, ".npz")

    model, diffusion, config, _ = _load_for_sampling(args, check_outputs)
    try:
        images, labels = _sample_images(args, model, diffusion, config)
    except SamplingInterrupted as stop:
        written = _write_samples(args, stop.images, stop.labels) if len(stop.images) else "nothing"
        print(f"interrupted: {len(stop.images)} of {args.n} images were finished; wrote {written}", file=sys.stderr)
        return 130
    if distributed.world().is_root:
        print(f"wrote {_write_samples(args, images, labels)}", file=sys.stderr)
    return 0


def _write_samples(args, images, labels):
    """Write the grid to --out (and images + labels to --npz); return what was written, for the log."""
    from . import checkpoint, pictures
    n = len(images)
    ncols = 10 if labels is not None and n % 10 == 0 else int(np.ceil(np.sqrt(n)))
    pictures.save(pictures.grid(images, ncols), args.out)
    if not args.npz:
        return args.out
    out_labels = labels if labels is not None else np.full(n, -1, dtype=np.int64)
    checkpoint.save(args.npz, {"images": images, "labels": out_labels.astype(np.int64)})
    return f"{args.out} and {args.npz}"


def cmd_trajectory(args):
    from . import data, pictures
    from . import device as _dev
    from .tensor import no_grad
    if not distributed.world().is_root:
        return 0  # one image: rank 0's work alone
    _writable_file(args.out, ".png")
    model, diffusion, config, _ = _load_for_sampling(args)
    rng = np.random.default_rng(args.seed)
    label = args.label if args.label is not None else int(rng.integers(10))
    y = np.array([label]) if config.conditional else None
    with no_grad():
        _, frames = diffusion.sample(model, model.config.image_shape(1), y=y, guidance=_guidance(args),
                                     sampler=args.sampler, steps=_sampler_steps(args),
                                     eta=args.eta, rng=rng, return_trajectory=args.frames)
    images = np.stack([data.from_model_range(_dev.to_numpy(f.data))[0, 0] for f in frames])
    pictures.save(pictures.grid(images, ncols=len(images), scale=3), args.out)
    print(f"wrote {args.out}: {len(images)} frames from x_T to x_0", file=sys.stderr)
    return 0


def batch_rng(seed, index):
    """The generator of sampling batch ``index``: ``default_rng(seed)`` for the first batch (the
    stream every batch shared before), ``default_rng([seed, index])`` for the others. A batch's
    noise depends on (seed, index) alone, so the batches can be drawn in any order and on any
    rank, and N ranks give the images one process gives."""
    return np.random.default_rng(seed if index == 0 else [seed, index])


def _sample_images(args, model, diffusion, config):
    """uint8 images (n, H, W) and their labels (None when unconditional), in batches of --batch-size,
    batch i drawn from batch_rng(--seed, i). Under MPI the ranks take the batches in turn and rank 0
    gathers them (the other ranks get (None, labels)). Ctrl-C raises SamplingInterrupted with the
    batches finished so far (in a single process)."""
    from . import data
    from . import device as _dev
    from .tensor import no_grad
    world = distributed.world()
    labels = np.resize(parse_labels(args.labels), args.n) if config.conditional else None
    starts = range(0, args.n, args.batch_size)
    images, done = {}, 0
    who = f"rank {world.rank}: " if world.size > 1 else ""
    try:
        for index in world.my_batches(len(starts)):
            rows = slice(starts[index], min(starts[index] + args.batch_size, args.n))
            print(f"{who}sampling images {rows.start + 1}-{rows.stop} of {args.n}", file=sys.stderr)
            with no_grad():
                x = diffusion.sample(model, model.config.image_shape(rows.stop - rows.start),
                                     y=None if labels is None else labels[rows], guidance=_guidance(args),
                                     sampler=args.sampler, steps=_sampler_steps(args),
                                     eta=args.eta, rng=batch_rng(args.seed, index))
            images[index] = data.from_model_range(_dev.to_numpy(x.data))[:, 0]
            done = rows.stop
    except KeyboardInterrupt:
        if world.size > 1:
            raise  # the ranks' finished batches are no prefix of the n images: nothing is written
        size = model.config.image_size
        finished = np.concatenate([np.empty((0, size, size), np.uint8), *images.values()])
        raise SamplingInterrupted(finished, None if labels is None else labels[:done]) from None
    batches = world.gather_in_order(images, "gathering the samples")
    return (None if batches is None else np.concatenate(batches)), labels


def _bits_per_dim(args, model, diffusion, config, test_split):
    """Mean bits/dim of the checkpoint on the first --bpd MNIST test images (never trained on), in
    batches of --batch-size."""
    from . import data
    from . import device as _dev
    rng = np.random.default_rng(args.seed)
    bits = []
    for start in range(0, args.bpd, args.batch_size):
        rows = slice(start, min(start + args.batch_size, args.bpd))
        x0 = _dev.to_device(data.to_model_range(test_split.images[rows]))
        y = _dev.to_device(test_split.labels[rows]) if config.conditional else None
        bits.append(diffusion.bits_per_dim(model, x0, y, rng=rng, progress=True))
    return float(np.concatenate(bits).mean())


def _judge_and_reference(args):
    """The shipped judge, its reference statistics (recomputed from --ref-data when given) and a
    line saying where they come from."""
    from . import data, evaluation
    judge, reference = evaluation.load_judge()
    if not args.ref_data:
        return judge, reference, f"shipped: {reference.n:,} held-out MNIST training images"
    images, _ = evaluation.held_out(data.load_idx_dir(args.ref_data, "train"))
    reference = evaluation.reference_statistics(judge, images)
    return judge, reference, f"{reference.n:,} held-out MNIST training images from {args.ref_data}"


def cmd_eval(args):
    import json

    from . import data, evaluation
    if args.bpd and not args.checkpoint:
        raise UsageError("--bpd needs --checkpoint (bits/dim is a property of a model, not of samples)")
    if args.sweep_guidance and (not args.checkpoint or args.bpd):
        raise UsageError("--sweep-guidance needs --checkpoint (it samples once per w), without --bpd")
    world = distributed.world()
    if not args.checkpoint and not world.is_root:
        return 0  # scoring a file: rank 0's work alone
    # Every input is read and checked before the slow part (sampling, bits/dim) starts (on rank 0 under
    # MPI; the ranks share the sampling, and rank 0 alone scores and computes bits/dim).
    bits_per_dim = None
    if args.checkpoint:
        def prepare():
            test_split = data.load_mnist("test", root=args.ref_data) if args.bpd else None
            if args.bpd and args.bpd > len(test_split.images):
                raise UsageError(f"--bpd {args.bpd}: the MNIST test set has only {len(test_split.images)} images")
            return test_split, _judge_and_reference(args)

        model, diffusion, config, prepared = _load_for_sampling(args, prepare)
        if args.sweep_guidance:
            return _sweep_guidance(args, model, diffusion, config, prepared)
        images, labels = _sample_images(args, model, diffusion, config)
        if not world.is_root:
            return 0
        test_split, (judge, reference, reference_source) = prepared
        if args.bpd:
            bits_per_dim = _bits_per_dim(args, model, diffusion, config, test_split)
    else:
        images, labels = evaluation.load_samples(args.samples)
        judge, reference, reference_source = _judge_and_reference(args)
    result = evaluation.evaluate(images, labels, judge, reference)
    if args.json:
        print(json.dumps({**dataclasses.asdict(result), "bits_per_dim": bits_per_dim, "reference": reference_source}))
        return 0
    rows = [("n", f"{result.n}", ""),
            ("classifier FID", f"{result.fid:.3f}", f"vs {reference_source}"),
            ("accuracy", "-" if result.accuracy is None else f"{result.accuracy:.2%}",
             "the judge names the requested digit" if result.accuracy is not None else "no labels"),
            ("confidence", f"{result.confidence:.4f}", "mean max-softmax"),
            ("class entropy", f"{result.class_entropy:.4f}", f"ln 10 = {evaluation.MAX_ENTROPY:.4f} is balanced")]
    if bits_per_dim is not None:
        rows.append(("bits/dim", f"{bits_per_dim:.4f}", f"on {args.bpd} MNIST test images"))
    for name, value, note in rows:
        print(f"{name:<15} {value:>10}   {note}".rstrip())
    return 0


def _sweep_guidance(args, model, diffusion, config, prepared):
    """One sampling run and evaluation per guidance w, then the table and the chosen w. Under MPI the
    ranks share each sampling run and rank 0 (which alone has ``prepared``, the judge) scores it."""
    import json
    import time

    from . import evaluation
    if not config.conditional:
        raise UsageError("--sweep-guidance needs a class-conditional checkpoint (guidance steers towards a label)")
    sweep, seconds = [], []
    for w in args.sweep_guidance:
        args.guidance, t0 = w, time.perf_counter()
        images, labels = _sample_images(args, model, diffusion, config)
        if distributed.world().is_root:
            _, (judge, reference, reference_source) = prepared
            sweep.append((w, evaluation.evaluate(images, labels, judge, reference)))
        seconds.append(time.perf_counter() - t0)
    if not distributed.world().is_root:
        return 0
    chosen = evaluation.choose_guidance(sweep)
    interpolated = evaluation.best_fid_at_accuracy(sweep)
    if args.json:
        print(json.dumps({"reference": reference_source, "chosen": chosen,
                          "interpolated": interpolated and dataclasses.asdict(interpolated), "sweep": [
            {"guidance": w, **dataclasses.asdict(r), "seconds": s} for (w, r), s in zip(sweep, seconds)]}))
        return 0
    where = f"σ_t in [{args.guidance_interval[0]:g}, {args.guidance_interval[1]:g}]"
    print(f"n = {args.n} per w, {args.sampler} {_sampler_steps(args) or 'all'} steps, seed {args.seed}, guided at "
          f"{where} ({args.guidance_space} space, {args.guidance_schedule} w); classifier FID vs {reference_source}")
    print("| guidance w | classifier FID | accuracy | confidence | class entropy | sampling s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for (w, r), s in zip(sweep, seconds):
        print(f"| {w:g} | {r.fid:.2f} | {r.accuracy:.2%} | {r.confidence:.4f} | {r.class_entropy:.4f} | {s:.1f} |")
    print(f"chosen: w = {chosen:g} (the best classifier FID with accuracy >= 99%)" if chosen is not None else
          "chosen: none (no w reached accuracy >= 99%)")
    if interpolated is not None and interpolated.interpolated:
        print(f"interpolated: classifier FID {interpolated.fid:.2f} at w = {interpolated.guidance:.3f}, where the "
              "accuracy crosses 99% between two w of the grid")
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "trajectory": cmd_trajectory, "eval": cmd_eval}


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        if args.device == "cuda":
            distributed.select_local_gpu(distributed.world())  # before anything starts CUDA
        if args.device != "cpu":
            from .device import set_device
            from .kernels import compile_all
            set_device(args.device)
            count, seconds = compile_all()
            if count:
                print(f"compiled {count} CUDA kernels in {seconds:.1f} s (kept in numba's cache for the next run)",
                      file=sys.stderr)
        return COMMANDS[args.command](args)
    except (KeyboardInterrupt, SamplingInterrupted):
        print("tinyddpm: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as e:
        if os.environ.get("TINYDDPM_DEBUG"):
            raise
        message = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename!r}"
        failed_run = isinstance(e, distributed.DistributedError) and not isinstance(e, distributed.StoppedOnRoot)
        return _stop(e, f"tinyddpm: error: {message}", 1 if failed_run else 2)
    except Exception as e:  # a bug: its traceback, and under MPI no rank left waiting for this one
        world = _world_if_any()
        if world is not None and world.size > 1 and not getattr(e, "every_rank", False):
            import traceback
            traceback.print_exc()
            world.abort(1)
        raise


def _world_if_any():
    """The MPI world, or None where making it failed (a launcher without mpi4py)."""
    try:
        return distributed.world()
    except ValueError:
        return None


def _stop(error, line, code):
    """Print an expected error's one line and return the exit code. Under MPI an error every rank
    raised (bad arguments, rank 0's refusal to start) is printed by rank 0 alone and every rank
    exits; an error of this rank alone is printed with its rank and ends every rank (MPI_Abort), as
    the others would otherwise wait for it."""
    world = _world_if_any()
    if world is None or world.size == 1:
        print(line, file=sys.stderr)
        return code
    if isinstance(error, UsageError) or getattr(error, "every_rank", False):
        if world.is_root:
            print(line, file=sys.stderr)
        return code
    print(line.replace("error: ", f"error: rank {world.rank}: ", 1), file=sys.stderr)
    world.abort(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
