"""Training on MNIST (Algorithm 1 of DDPM) with Adam, EMA, gradient clipping, LR warmup,
periodic sample grids, a loss curve and atomic, exactly-resumable checkpoints."""
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from . import checkpoint, data, distributed, optim, pictures
from . import device as _dev
from . import random as _random
from .diffusion import GaussianDiffusion
from .schedules import get_betas
from .tensor import Tensor, no_grad
from .unet import UNet, UNetConfig


# The 2020 recipe (Ho et al.): what a checkpoint written before these options existed was trained with.
RECIPE_OFF = dict(min_snr_gamma=0.0, lr_decay="constant", ema_warmup=False)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. The defaults are the `tiny` preset's; PRESETS says what the
    other presets change."""
    preset: str = "tiny"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    grad_clip: float = 1.0
    schedule: str = "linear"
    timesteps: int = 1000
    prediction: str = "eps"
    conditional: bool = True
    p_uncond: float = 0.1
    ema_decay: float = 0.995
    # the recipe: the combination won README's ablation at a fixed budget (RECIPE_OFF is the 2020 one)
    ema_warmup: bool = True         # decay min(ema_decay, (1 + step)/(10 + step))
    lr_decay: str = "cosine"        # after warmup: "constant" or "cosine" (to 0 at `steps`)
    min_snr_gamma: float = 5.0      # Min-SNR-γ loss weighting (Hang et al. 2023); 0: off
    seed: int = 0
    sample_every: int = 500
    ckpt_every: int = 250
    sample_steps: int = 25          # DDIM steps for the periodic sample grids (and the evaluations)
    eval_every: int = 0             # cFID and accuracy of the EMA model every N steps (0: off) ...
    eval_n: int = 200               # ... on this many samples, balanced over the digits

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
        return dataclasses.replace(PRESETS[self.preset].unet, num_classes=10 if self.conditional else 0)


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
    # the CPU default: recognisable digits after ~30 minutes on 2 cores
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
    diffusion = GaussianDiffusion(get_betas(config.schedule, config.timesteps), prediction=config.prediction)
    return model, ema_model, diffusion


class RunExistsError(ValueError):
    """The output directory already holds a run that starting afresh would overwrite."""


def holds_run(out_dir):
    """Whether ``out_dir`` has anything ``train`` writes (a checkpoint, sample grids, the loss curve)."""
    return os.path.isdir(out_dir) and any(
        name in ("checkpoint.npz", "loss.png") or (name.startswith("samples_") and name.endswith(".png"))
        for name in os.listdir(out_dir))


class Trainer:
    """One training run in ``out_dir``. A directory that already holds a run is never written over
    silently: ``resume=True`` continues it; ``overwrite=True`` starts afresh but keeps the old
    checkpoint as ``checkpoint.prev.npz`` until the new run has finished; otherwise RunExistsError,
    raised before any work.

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
        if resume and not os.path.isfile(self.checkpoint_path):
            raise checkpoint.CheckpointError(f"--resume: there is no checkpoint.npz in {out_dir!r} to continue")
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
        """Write the checkpoint. Under MPI every rank calls this: the ranks first check that they
        hold the same parameters and send rank 0 their dropout streams, and rank 0 writes."""
        self._check_ranks_agree()
        streams = self.world.gather({"init": _random.get_state(), "device": _random.get_device_state()},
                                    "gathering the ranks' random streams")
        if not self.world.is_root:
            return
        ranks = {} if self.world.size == 1 else {"world_size": self.world.size, "peer_rngs": json.dumps(streams[1:])}
        checkpoint.save(self.checkpoint_path, {
            "format": "tinyddpm-checkpoint-v1",
            "config": json.dumps(dataclasses.asdict(self.config)),
            "unet_config": json.dumps(self.config.unet_config().to_dict()),
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optim": self.opt.state_dict(),
            "step": self.step, "losses": np.asarray(self.losses, dtype=np.float64),
            "evals": np.asarray(self.evals, dtype=np.float64).reshape(-1, 3),
            "rng": json.dumps(self.rng.bit_generator.state), "init_rng": json.dumps(_random.get_state()),
            "device_rng": json.dumps(_random.get_device_state()), **ranks,
        })

    def _check_resumable(self, state):
        saved = TrainConfig.from_json(state["config"])
        changed = [f.name for f in dataclasses.fields(TrainConfig)
                   if f.name not in ("steps", "sample_every", "ckpt_every", "sample_steps", "eval_every", "eval_n")
                   and getattr(saved, f.name) != getattr(self.config, f.name)]
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
        self.evals = [tuple(row) for row in state.get("evals", ())]  # checkpoints from before --eval-every: none
        self.rng.bit_generator.state = json.loads(state["rng"])
        self._resume_dropout_streams(state)
        self.log(f"resumed from {self.checkpoint_path} at step {self.step}")

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
        self.ema.update(self.model, optim.ema_decay_at(self.step, cfg.ema_decay, cfg.ema_warmup))
        self.step += 1
        if self.step % distributed.CHECK_EVERY == 0:
            self._check_ranks_agree()
        return world.mean(loss.item())  # the whole batch's loss: the mean of the ranks' equal shards

    def evaluate_ema(self):
        """cFID and accuracy (tinyddpm.evaluation) of eval_n samples of the EMA model, balanced over the
        digits, drawn as the grids are (DDIM, guidance 1, noise seeded by the step), in batches of the
        training batch size: the curve's second panel. It reads no training RNG, so a run with
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
                                          steps=cfg.sample_steps, guidance=1.0 if cfg.conditional else 0.0,
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

    def sample_grid(self, path, n_per_class=8):
        """Samples (DDIM, guidance 1) of the EMA model (left) and of the raw model (right) from the same
        noise, one row per digit when conditional: what the average buys is there to see. Under MPI
        every rank draws the grid (the others would only wait for rank 0) and rank 0 writes it."""
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
                                              guidance=1.0 if cfg.conditional else 0.0, progress=False,
                                              rng=np.random.default_rng(cfg.seed + self.step))
                grids.append(pictures.grid(data.from_model_range(_dev.to_numpy(x.data))[:, 0], ncols=n_per_class))
        finally:
            self.model.train()
        if self.world.is_root:
            pictures.save(pictures.side_by_side(*grids), path)

    def run(self):
        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not self.world.is_root)
        t0, step0 = time.perf_counter(), self.step
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                self.losses.append(loss)
                bar.update(1)
                rate = (self.step - step0) * cfg.batch_size / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")
                if self.step % cfg.ckpt_every == 0:
                    self.save()
                if self.step % cfg.sample_every == 0:
                    self.sample_grid(os.path.join(self.out_dir, f"samples_{self.step:06d}.png"))
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate_ema()
        except KeyboardInterrupt:
            bar.close()
            self.save()
            self.log(f"interrupted: checkpoint saved at step {self.step} to {self.checkpoint_path}")
            raise
        bar.close()
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
    diffusion = GaussianDiffusion(get_betas(config.schedule, config.timesteps), prediction=config.prediction)
    return model.eval(), diffusion, config
