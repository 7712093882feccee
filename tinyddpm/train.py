"""Training on MNIST (Algorithm 1 of DDPM) with Adam, EMA, gradient clipping, LR warmup,
periodic sample grids, a loss curve, atomic, exactly-resumable checkpoints and a divergence guard."""
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from . import checkpoint, data, distributed, guidance, optim, pictures
from . import device as _dev
from . import random as _random
from .diffusion import GaussianDiffusion
from .schedules import get_betas, rescale_zero_terminal_snr
from .tensor import Tensor, no_grad
from .unet import UNet, UNetConfig


# The 2020 recipe (Ho et al.): what a checkpoint written before these options existed was trained with.
RECIPE_OFF = dict(min_snr_gamma=0.0, lr_decay="constant", ema_warmup=False, ema_power=None, zero_terminal_snr=False,
                  base_channels=None, channel_mults=None, blocks_per_level=None)
UNET_FIELDS = ("base_channels", "channel_mults", "blocks_per_level")  # None: the preset's U-Net


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. The defaults are the `tiny` preset's; PRESETS says what the
    other presets change."""
    preset: str = "tiny"
    steps: int = 2750
    batch_size: int = 64
    lr: float = 4e-3                # docs/quality.md's frontier: beats 1e-3 and 2e-3; 6e-3 ties, 8e-3 loses
    warmup_steps: int = 200
    grad_clip: float = 1.0
    schedule: str = "linear"
    timesteps: int = 1000
    prediction: str = "eps"
    conditional: bool = True
    p_uncond: float = 0.1
    ema_decay: float = 0.995
    # the recipe: the combination won docs/quality.md's ablation at a fixed budget (RECIPE_OFF: 2020's)
    ema_warmup: bool = True         # decay min(ema_decay, (1 + step)/(10 + step))
    lr_decay: str = "cosine"        # after warmup: "constant" or "cosine" (to 0 at `steps`)
    min_snr_gamma: float = 5.0      # Min-SNR-γ loss weighting (Hang et al. 2023); 0: off
    ema_power: float | None = None  # γ of a power-function EMA (Karras et al. 2024) in place of the two above
    zero_terminal_snr: bool = False  # the schedule rescaled so that ᾱ_{T−1} = 0 (Lin et al. 2024): v or x0 only
    base_channels: int | None = None     # the U-Net's width and depth (UNetConfig's fields of these names);
    channel_mults: tuple | None = None   # None: the preset's
    blocks_per_level: int | None = None
    seed: int = 0
    sample_every: int = 550         # five grids, the last of the finished model
    ckpt_every: int = 250
    sample_steps: int = 25          # DDIM steps for the periodic sample grids (and the evaluations)
    eval_every: int = 0             # cFID and accuracy of the EMA model every N steps (0: off) ...
    eval_n: int = 200               # ... on this many samples, balanced over the digits

    def __post_init__(self):
        """Refuse what cannot train, before any data is read (the messages name the command-line flags)."""
        if self.channel_mults is not None:
            object.__setattr__(self, "channel_mults", tuple(self.channel_mults))  # JSON gives a list
        if self.zero_terminal_snr and self.prediction == "eps":
            raise ValueError("--zero-terminal-snr needs --prediction v (or x0): at SNR 0 the noise says "
                             "nothing about the image")
        if self.ema_power is not None and self.ema_power < 0:
            raise ValueError(f"--ema-power is a gamma >= 0, got {self.ema_power}")
        self.unet_config()  # a width the group norm cannot split, or too many levels for the image size

    @classmethod
    def from_json(cls, text):
        """The config a checkpoint stored. A field it lacks was added later: its value then is the one
        the code had before the field existed, not today's default (RECIPE_OFF)."""
        return cls(**{**RECIPE_OFF, **json.loads(text)})

    @classmethod
    def for_preset(cls, name, **overrides):
        """The preset's settings, then the caller's (e.g. the command line's) on top."""
        return cls(preset=name, **{**PRESETS[name].train, **overrides})

    def unet_config(self):
        """The preset's U-Net with this run's width and depth where given, 10 classes when conditional."""
        shape = {name: getattr(self, name) for name in UNET_FIELDS if getattr(self, name) is not None}
        return dataclasses.replace(PRESETS[self.preset].unet, num_classes=10 if self.conditional else 0, **shape)


EVAL_IMAGE_SIZE = 28  # --eval-every: the image size the judge reads


@dataclass(frozen=True)
class Preset:
    unet: UNetConfig
    train: dict   # the TrainConfig fields that differ from its defaults


# Every preset in one table: its U-Net and its training settings.
PRESETS = {
    # checks the GPU path's plumbing in numba's CUDA simulator (MNIST mean-pooled to 4×4): no model to
    # keep. The simulator runs each CUDA thread as a Python thread, so every size is the least that still
    # has every block kind: one step (forward and backward, batch 1) takes ~20 s on one core.
    "sim": Preset(UNetConfig(image_size=4, base_channels=4, channel_mults=(1,), attention_resolutions=(4,),
                             num_groups=1, num_heads=1),
                  dict(steps=2, batch_size=1, timesteps=50, warmup_steps=1, sample_every=1000, ckpt_every=1,
                       sample_steps=1)),
    # proves the pipeline: trains and samples in well under 2 minutes on 2 cores
    "smoke": Preset(UNetConfig(base_channels=16, channel_mults=(1, 2), attention_resolutions=(14,), num_groups=4),
                    dict(steps=60, batch_size=32, timesteps=200, sample_every=60, ckpt_every=60, warmup_steps=20,
                         sample_steps=20)),
    # the CPU default: recognisable digits after 12-20 minutes on 2 cores. 24 channels trained 2,750 steps, not 32
    # trained 2,000 in about the same time: on docs/quality.md's frontier, narrower and longer won on the mean
    # of three seeds
    "tiny": Preset(UNetConfig(), {}),
    # larger, meant for a GPU
    "base": Preset(UNetConfig(base_channels=64, channel_mults=(1, 2, 2), blocks_per_level=2,
                              attention_resolutions=(14, 7), dropout=0.1),
                   dict(steps=40000, batch_size=128, lr=2e-4, ema_decay=0.9995, sample_every=2000, ckpt_every=2000,
                        sample_steps=50)),
}


def build(config):
    """(model, ema model, diffusion) for a TrainConfig."""
    unet_cfg = config.unet_config()
    model = UNet(unet_cfg)
    ema_model = UNet(unet_cfg).eval()  # eval: sampling must not draw dropout masks from the training RNG
    return model, ema_model, make_diffusion(config)


def make_diffusion(config):
    """The GaussianDiffusion a TrainConfig trains and samples: its schedule (rescaled to a zero terminal SNR
    when asked) and its prediction."""
    betas = get_betas(config.schedule, config.timesteps)
    if config.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return GaussianDiffusion(betas, prediction=config.prediction)


class RunExistsError(ValueError):
    """The output directory already holds a run that starting afresh would overwrite."""


def run_checkpoint(out_dir):
    """The checkpoint.npz of the run in ``out_dir``, which --resume continues (CheckpointError if none)."""
    path = os.path.join(out_dir, "checkpoint.npz")
    if not os.path.isfile(path):
        raise checkpoint.CheckpointError(f"--resume: there is no checkpoint.npz in {out_dir!r} to continue")
    return path


def resumed_config(out_dir, preset=None, **overrides):
    """What ``train --resume`` continues with: the config stored in ``out_dir``'s checkpoint, with the
    options given on the command line (``overrides``) on top; an option not given keeps the run's value."""
    saved = TrainConfig.from_json(load_checkpoint(run_checkpoint(out_dir))["config"])
    if preset not in (None, saved.preset):
        raise ValueError(f"--resume: the run in {out_dir!r} was trained with --preset {saved.preset}, not {preset}")
    return dataclasses.replace(saved, **overrides)


# Settings a resumed run may change: they decide what is written and when, or (lr) the size of the
# steps from the resumed step on (the warmup and decay keep their place: lr(step) = new base lr × the
# same factor); every other setting would make the resumed run a different one.
CHANGEABLE_ON_RESUME = ("lr", "steps", "sample_every", "ckpt_every", "sample_steps", "eval_every", "eval_n")


# ---- the divergence guard ----------------------------------------------------------------------
# A step's loss says training diverged when it is not finite, or when it is more than
# DIVERGED_FACTOR times the median of the last DIVERGED_WINDOW losses (of all of them while fewer were
# recorded), once DIVERGED_AFTER losses exist. Why these numbers, from runs of the smoke preset on the
# full MNIST (the per-step losses of Trainer.train_step, each over the median of the 50 before it):
# - Normal runs stay far below 1000×. With the default recipe (Min-SNR-5, warmup, cosine decay), from
#   the sixth step on: batch 32, 1000 steps: at most 1.8×; batch 8: 2.4× (3.3× without Min-SNR, 2.4×
#   predicting x0 or v). Batch 1 is the noisiest a run can be (one image, one t a step: the loss of a
#   t near 0, where ε is hard to see, against the median of all t): 16.7× in 1500 steps, and 67×
#   without Min-SNR (a loss of 0.74 over a median of 0.011; the median keeps falling as training
#   goes on, so this ratio grows), so 10× or 100× would stop batch-1 runs. In the warmup the loss
#   falls: over steps 6-50 no loss is above 2.6× the median before it.
# - Diverged runs pass 1000× within a few steps of leaving. `--lr 1`: 0.91, 14.8, 27.8, 1.6e4, 4.7e3,
#   6.8e6, ..., 1e12 by step 15 and near it for a hundred steps: by step 51 the median of the last 50
#   is itself 1e12, so a guard that waited for 50 losses would never fire; after 5 it stops the run at
#   step 6 (245000× the median); the tiny preset at `--lr 1` at step 10 (6.4e5). `--lr 0.1` climbs
#   from 42 at step 15 to 6.3e3 at step 27 (stopped there) and 1e4 by step 31; `--lr 0.03` trains.
DIVERGED_FACTOR, DIVERGED_WINDOW, DIVERGED_AFTER = 1000.0, 50, 5


def divergence(loss, history):
    """Why ``loss`` (this step's) says training diverged, given the losses of the steps before it; None
    when it does not. The median of the recent losses is the level: a few outliers in the window do not
    move it, and while training goes well the loss only falls below it."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if len(history) < DIVERGED_AFTER:
        return None
    recent = history[-DIVERGED_WINDOW:]
    level = float(np.median(recent))
    if loss > DIVERGED_FACTOR * level:
        return f"the loss {loss:.3g} is over {DIVERGED_FACTOR:g}× the median {level:.3g} of the last {len(recent)}"
    return None


class TrainingDiverged(Exception):
    """The divergence guard stopped a run; the message is one line saying how to continue."""

    def __init__(self, step, reason, out_dir, saved_step, config):
        self.step, self.saved_step = step, saved_step
        preset_lr = TrainConfig.for_preset(config.preset).lr
        # the preset's rate when the run's was above it, else a tenth: low enough not to blow up the same way
        lower, which = ((preset_lr, "the preset's") if config.lr > preset_lr else
                        (config.lr / 10, "a tenth of this run's"))
        if saved_step is None:
            advice = (f"no checkpoint was written yet: start afresh with --overwrite and a lower --lr, e.g. "
                      f"--lr {lower:g} ({which})")
        else:
            advice = (f"{os.path.join(out_dir, 'checkpoint.npz')} (step {saved_step}) is as it was: continue from it "
                      f"with a lower --lr ({which}): tinyddpm train --resume --out {out_dir} --lr {lower:g}")
        super().__init__(f"training diverged at step {step}: {reason}; nothing of the diverged run was saved; "
                         f"{advice}")


def holds_run(out_dir):
    """Whether ``out_dir`` has anything ``train`` writes (a checkpoint, sample grids, the loss curve)."""
    return os.path.isdir(out_dir) and any(
        name in ("checkpoint.npz", "loss.png") or (name.startswith("samples_") and name.endswith(".png"))
        for name in os.listdir(out_dir))


class Trainer:
    """One training run in ``out_dir``. A directory that already holds a run is never written over
    silently: ``resume=True`` continues it; ``overwrite=True`` starts afresh but keeps the old
    checkpoint as ``checkpoint.prev.npz`` until the new run has finished; otherwise RunExistsError,
    raised before any work. A diverged run (``divergence``) stops with TrainingDiverged and writes
    nothing more: the checkpoint on disk stays the last one whose weights gave a sound loss.

    Under MPI (``world``, default tinyddpm.distributed.world()) every rank makes a Trainer: rank 0
    alone checks the output directory, reads the data and the checkpoint (and shares them), logs and
    writes files; each rank trains on its shard of every batch."""

    def __init__(self, config, out_dir, data_dir=None, log=print, resume=False, overwrite=False, world=None):
        self.config, self.out_dir = config, out_dir
        self.world = distributed.world() if world is None else world
        self.log = log if self.world.is_root else _quiet
        mnist, state = self.world.broadcast(self.world.on_root(self._prepare, data_dir, resume, overwrite),
                                            "sharing the data and the checkpoint")
        _dev.retain_freed_memory()
        size = config.unet_config().image_size
        self.images = data.mean_pool(data.to_model_range(mnist.images), size)  # float32 (N, 1, size, size), [-1, 1]
        self.labels = mnist.labels
        _random.manual_seed(config.seed)                   # parameter init and dropout
        self.rng = np.random.default_rng(config.seed)      # batches, timesteps and noise: the same on every rank
        self.model, self.ema_model, self.diffusion = build(config)
        _random.use_rank_stream(self.world.rank)           # dropout: each rank its own masks, after one shared init
        # the EMA puts the parameters into one flat buffer; Adam, over the same list, shares it
        self.ema = optim.EMA(self.model, config.ema_decay)
        self.opt = optim.Adam(self.model.parameters(), lr=config.lr)
        self.averager = distributed.gradient_averager(self.world, self.opt.flats)  # None in a plain run
        self.step, self.losses = 0, []
        self.saved_step = None  # the step of the checkpoint on disk that this run wrote or resumed from
        self.evals, self._judge = [], None  # [(step, cFID, accuracy)] of --eval-every; the judge, loaded once
        if state is not None:
            self.resume(state)

    def _prepare(self, data_dir, resume, overwrite):
        """Every check of the settings, the output directory and the inputs, before any work (on rank
        0 under MPI): (MNIST, the checkpoint to resume or None)."""
        config, out_dir = self.config, self.out_dir
        self.world.shard(config.batch_size)  # the global batch must divide over the ranks
        if config.eval_every and config.unet_config().image_size != EVAL_IMAGE_SIZE:
            raise ValueError(f"--eval-every needs {EVAL_IMAGE_SIZE}×{EVAL_IMAGE_SIZE} images for the judge; "
                             f"preset {config.preset!r} makes {config.unet_config().image_size}×"
                             f"{config.unet_config().image_size}")
        if resume:
            run_checkpoint(out_dir)
        if not resume and not overwrite and holds_run(out_dir):
            raise RunExistsError(f"{out_dir!r} already holds a run: continue it with --resume --out {out_dir}, "
                                 f"or train into a new --out (--overwrite replaces it)")
        os.makedirs(out_dir, exist_ok=True)
        checkpoint.check_writable(self.checkpoint_path)
        state = None
        if resume:
            state = load_checkpoint(self.checkpoint_path)
            self._check_resumable(state)
        if overwrite and not resume and os.path.isfile(self.checkpoint_path):
            os.replace(self.checkpoint_path, self.previous_checkpoint_path)
        mnist = data.load_mnist("train", root=data_dir)
        self.log(f"data: {len(mnist.images)} images from {mnist.source}")
        return mnist, state

    @property
    def checkpoint_path(self):
        return os.path.join(self.out_dir, "checkpoint.npz")

    @property
    def previous_checkpoint_path(self):
        """Where --overwrite keeps the replaced run's checkpoint until the new run finishes."""
        return os.path.join(self.out_dir, "checkpoint.prev.npz")

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self):
        self.write(self.state())

    def write(self, state):
        """Write a ``state()`` to the checkpoint file (rank 0; the other ranks' ``state()`` is None)."""
        if state is not None:
            checkpoint.save(self.checkpoint_path, state)
            self.saved_step = int(state["step"])

    def state(self):
        """Everything a checkpoint holds, as host copies: the run can go on while it waits to be written.
        Under MPI every rank calls this: the ranks first check that they hold the same parameters and
        send rank 0 their dropout streams; rank 0 gets the state, the others None."""
        self._check_ranks_agree()
        streams = self.world.gather({"init": _random.get_state(), "device": _random.get_device_state()},
                                    "gathering the ranks' random streams")
        if not self.world.is_root:
            return None
        ranks = {} if self.world.size == 1 else {"world_size": self.world.size, "peer_rngs": json.dumps(streams[1:])}
        return {
            "format": "tinyddpm-checkpoint-v1",
            "config": json.dumps(dataclasses.asdict(self.config)),
            "unet_config": json.dumps(self.config.unet_config().to_dict()),
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optim": self.opt.state_dict(),
            "step": self.step, "losses": np.asarray(self.losses, dtype=np.float64),
            "evals": np.asarray(self.evals, dtype=np.float64).reshape(-1, 3),
            "rng": json.dumps(self.rng.bit_generator.state), "init_rng": json.dumps(_random.get_state()),
            "device_rng": json.dumps(_random.get_device_state()), **ranks,
        }

    def _check_resumable(self, state):
        saved = TrainConfig.from_json(state["config"])
        changed = [f.name for f in dataclasses.fields(TrainConfig)
                   if f.name not in (*CHANGEABLE_ON_RESUME, *UNET_FIELDS)
                   and getattr(saved, f.name) != getattr(self.config, f.name)]
        if UNetConfig(**json.loads(state["unet_config"])) != self.config.unet_config():  # the net, however spelled
            changed.append("the U-Net (--channels, --channel-mult, --num-res-blocks)")
        if self.config.lr_decay == "cosine" and saved.steps != self.config.steps:
            changed.append("steps (the cosine decay is planned over the run's --steps)")
        if changed:
            raise ValueError(f"--resume with settings that differ from the checkpoint's: {', '.join(changed)}")

    def resume(self, state):
        """Continue from a checkpoint's state (checked by _check_resumable)."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optim"])
        self.step, self.losses = int(state["step"]), list(state["losses"])
        self.saved_step = self.step
        self.evals = [tuple(row) for row in state.get("evals", ())]  # checkpoints from before --eval-every: none
        self.rng.bit_generator.state = json.loads(state["rng"])
        self._resume_dropout_streams(state)
        saved = TrainConfig.from_json(state["config"])
        lr = "" if saved.lr == self.config.lr else f"; learning rate {self.config.lr:g} from here (was {saved.lr:g})"
        self.log(f"resumed from {self.checkpoint_path} at step {self.step}{lr}")

    def _resume_dropout_streams(self, state):
        """Rank 0's streams are ``init_rng``/``device_rng``, rank r's the r-th of ``peer_rngs``. A rank
        the checkpoint has none for (it was written by fewer ranks) derives one from rank 0's, as a
        fresh run does: the run goes on, but is not then bit for bit an uninterrupted one."""
        peers = json.loads(state.get("peer_rngs", "[]"))
        mine = peers[self.world.rank - 1] if 0 < self.world.rank <= len(peers) else None
        _random.set_state(mine["init"] if mine else json.loads(state["init_rng"]))
        if mine:
            _random.set_device_state(mine["device"])
        elif "device_rng" in state:  # checkpoints from before dropout drew on the device have none
            _random.set_device_state(json.loads(state["device_rng"]))
        if self.world.rank and not mine:
            _random.use_rank_stream(self.world.rank)
        saved_size = int(state.get("world_size", 1))
        if saved_size != self.world.size:
            self.log(f"resuming with {self.world.size} ranks a run written by {saved_size}: the same model and "
                     f"batches, but other dropout masks and float sums than an uninterrupted run")

    def _check_ranks_agree(self):
        """The ranks apply the same updates to the same averaged gradients, so their parameters and EMA
        must be equal bit for bit: compare checksums (one number per rank), stop if they differ."""
        if self.world.size > 1:
            buffers = [flat.data for flat in self.opt.flats] + self.ema.buffers
            self.world.check_same(distributed.checksum(buffers), f"parameters after step {self.step}")

    # ---- one step of Algorithm 1 -----------------------------------------------------------------
    def train_step(self):
        """One step; its only device→host read is the loss it returns (clipping, Adam and EMA are
        fused whole-buffer updates on the device), and under MPI every CHECK_EVERY steps a checksum.

        Under MPI every rank draws the whole global batch's indices (and training_loss its noise,
        timesteps and null labels) from the shared ``rng`` and keeps its own shard; after the
        backward pass one all-reduce averages the gradients, so each rank holds the whole batch's
        gradient and takes the step one process with the whole batch would."""
        cfg, world = self.config, self.world
        idx = self.rng.integers(0, len(self.images), size=cfg.batch_size)[world.shard(cfg.batch_size)]
        x0 = Tensor(_dev.to_device(self.images[idx]))
        # labels stay on the host: training_loss swaps in the null class there (host RNG) and moves them once
        y = self.labels[idx] if cfg.conditional else None
        loss = self.diffusion.training_loss(self.model, x0, y, p_uncond=cfg.p_uncond, min_snr_gamma=cfg.min_snr_gamma,
                                            rng=self.rng, shard=(world.rank, world.size))
        self.opt.zero_grad()
        loss.backward()
        if self.averager is not None:
            self.averager.average(self.opt.flats)
        optim.clip_grad_norm(self.opt.params, cfg.grad_clip)
        self.opt.lr = optim.learning_rate(self.step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_decay)
        self.opt.step()
        self.ema.update(self.model, optim.ema_decay_at(self.step, cfg.ema_decay, cfg.ema_warmup, cfg.ema_power))
        self.step += 1
        if self.step % distributed.CHECK_EVERY == 0:
            self._check_ranks_agree()
        return world.mean(loss.item())  # the whole batch's loss: the mean of the ranks' equal shards

    def evaluate_ema(self):
        """cFID and accuracy (tinyddpm.evaluation) of eval_n samples of the EMA model, balanced over the
        digits, drawn as the grids are (DDIM, the CLI's default guidance, noise seeded by the step), in batches
        of the training batch size: the curve's second panel. It reads no training RNG, so a run with
        evaluations trains exactly as one without. Under MPI the ranks share the batches (each
        batch's noise depends on its start alone) and rank 0 scores them."""
        from . import evaluation
        self.ema.copy_to(self.ema_model)
        cfg = self.config
        labels = np.arange(cfg.eval_n) % 10 if cfg.conditional else None
        starts = range(0, cfg.eval_n, cfg.batch_size)  # in training-sized batches: memory stays bounded
        batches = {}
        for start in (starts[i] for i in self.world.my_batches(len(starts))):
            count = min(cfg.batch_size, cfg.eval_n - start)
            with no_grad():
                x = self.diffusion.sample(self.ema_model, self.ema_model.config.image_shape(count),
                                          y=None if labels is None else labels[start:start + count], sampler="ddim",
                                          steps=cfg.sample_steps, guidance=self.grid_guidance(),
                                          progress=False, rng=np.random.default_rng([cfg.seed, self.step, start]))
            batches[start] = data.from_model_range(_dev.to_numpy(x.data))[:, 0]
        batches = self.world.gather_in_order(batches, "gathering the evaluation's samples")
        if not self.world.is_root:
            return
        if self._judge is None:
            self._judge = evaluation.load_judge()
        result = evaluation.evaluate(np.concatenate(batches), labels, *self._judge)
        accuracy = np.nan if result.accuracy is None else result.accuracy
        self.evals.append((self.step, result.fid, accuracy))
        shown = "no labels" if result.accuracy is None else f"accuracy {100 * accuracy:.1f}%"
        self.log(f"step {self.step}: EMA model cFID {result.fid:.1f}, {shown} (n = {cfg.eval_n})")

    def grid_guidance(self):
        """The guidance of the grids and evaluations: what `tinyddpm sample` uses by default (none when the
        model is unconditional)."""
        return guidance.DEFAULT if self.config.conditional else 0.0

    def sample_grid(self, n_per_class=8):
        """Samples (DDIM, the CLI's default guidance) of the EMA model (left) and of the raw model (right) from
        the same noise, one row per digit when conditional, as one image: what the average buys is there to see.
        Under MPI every rank draws the grid (the others would only wait for rank 0); rank 0 writes it."""
        self.ema.copy_to(self.ema_model)
        cfg = self.config
        labels = np.repeat(np.arange(10), n_per_class) if cfg.conditional else None
        shape = self.ema_model.config.image_shape(10 * n_per_class)
        grids = []
        self.model.eval()  # no dropout while sampling (and no draws from the training RNG)
        try:
            for model in (self.ema_model, self.model):
                with no_grad():
                    x = self.diffusion.sample(model, shape, y=labels, sampler="ddim", steps=cfg.sample_steps,
                                              guidance=self.grid_guidance(), progress=False,
                                              rng=np.random.default_rng(cfg.seed + self.step))
                grids.append(pictures.grid(data.from_model_range(_dev.to_numpy(x.data))[:, 0], ncols=n_per_class))
        finally:
            self.model.train()
        return pictures.side_by_side(*grids)

    def write_waiting(self, state, grid):
        """Write what a step left waiting for the guard: its checkpoint ``state()`` and its sample grid
        (image, path); None where it left nothing. Rank 0 alone writes."""
        if state is not None:
            self.write(state)
        if grid is not None and self.world.is_root:
            pictures.save(*grid)

    def run(self):
        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not self.world.is_root)
        t0, step0 = time.perf_counter(), self.step
        # The loss of step k + 1 is the first look at the weights of step k, so what step k writes (its
        # checkpoint, its sample grid) waits until that loss has passed the guard: a diverged run leaves
        # the last checkpoint whose weights gave a sound loss, a resume from it does not start on weights
        # that gave a diverged one, and no grid shows a diverged model.
        state_waiting, grid_waiting = None, None
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                reason = divergence(loss, self.losses)
                if reason:
                    bar.close()
                    raise TrainingDiverged(self.step, reason, self.out_dir, self.saved_step, cfg)
                self.write_waiting(state_waiting, grid_waiting)
                state_waiting, grid_waiting = None, None
                self.losses.append(loss)
                bar.update(1)
                rate = (self.step - step0) * cfg.batch_size / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")
                if self.step % cfg.ckpt_every == 0:
                    state_waiting = self.state()
                if self.step % cfg.sample_every == 0:
                    grid_waiting = (self.sample_grid(), os.path.join(self.out_dir, f"samples_{self.step:06d}.png"))
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate_ema()
        except KeyboardInterrupt:
            bar.close()
            self.write_waiting(None, grid_waiting)  # the checkpoint: the step reached, not the waiting one
            self.save()
            self.log(f"interrupted: checkpoint saved at step {self.step} to {self.checkpoint_path}")
            raise
        bar.close()
        self.write_waiting(None, grid_waiting)  # no loss comes after the last step; its checkpoint:
        self.save()
        if self.world.is_root:
            pictures.save(pictures.loss_curve(self.losses, self.evals), os.path.join(self.out_dir, "loss.png"))
            if os.path.isfile(self.previous_checkpoint_path):
                os.remove(self.previous_checkpoint_path)  # the new run is complete: the replaced one can go
        elapsed = time.perf_counter() - t0
        self.log(f"done: {self.step} steps in {elapsed:.0f} s, final loss (mean of last 100) "
                 f"{np.mean(self.losses[-100:]):.4f}; wrote {self.checkpoint_path}, loss.png and sample grids")


def _quiet(message):
    """The log of ranks other than 0 (rank 0 speaks for the run)."""


def load_checkpoint(path):
    """A training checkpoint, checked to be one (a clear CheckpointError otherwise)."""
    state = checkpoint.load(path)
    if not isinstance(state, dict) or state.get("format") != "tinyddpm-checkpoint-v1":
        raise checkpoint.CheckpointError(f"{path!r} is not a tinyddpm training checkpoint")
    return state


def model_from_checkpoint(state, path, use_ema=True):
    """(model, diffusion, TrainConfig) from the state ``load_checkpoint(path)`` read, with the EMA
    weights by default (``path`` names the file in errors)."""
    config = TrainConfig.from_json(state["config"])
    model = UNet(UNetConfig(**json.loads(state["unet_config"])))
    try:
        model.load_state_dict(state["ema" if use_ema else "model"])
    except ValueError as e:
        raise checkpoint.CheckpointError(f"checkpoint {path!r}: {e}") from None
    return model.eval(), make_diffusion(config), config


def load_model(path, use_ema=True):
    """(model, diffusion, TrainConfig) of the checkpoint at ``path``, with the EMA weights by default."""
    return model_from_checkpoint(load_checkpoint(path), path, use_ema)
