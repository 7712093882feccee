"""Training-step and DDIM-sampling throughput of a preset's U-Net, side by side with PyTorch.

    python benchmarks/bench_train.py [--preset tiny] [--device cpu|cuda|cudasim] [--batch-size 16 64 256]
                                     [--rounds 5] [--steps 2] [--ddim-steps 10] [--torch | --no-torch]

With PyTorch installed (or with --torch, which insists on it), a twin of the same U-Net
(benchmarks/torch_twins.py) gets the same weights;
its outputs and every parameter gradient must agree with tinyddpm's (relative 1e-4) before anything
is timed. Each framework runs in a worker process of its own (so peak memory is its own), and the
parent alternates them round by round (A B, B A, ...) so that background load hits both alike; each
row is the median over the rounds. A training step is Trainer.train_step's: forward, backward, clipping,
Adam, EMA, and the loss read back. The first step (kernel compilation, allocator warm-up) is reported
apart from the steady state, every timed region ends with a device synchronisation, and the machine's
sgemm rate is measured in the same run so each framework's GFLOP/s can be read as a % of it.
tinyddpm's host costs of a step (numba launches, array-module calls, device→host transfers) are
counted by tinyddpm.instrument and printed below the table.
"""
import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_description, median_time  # noqa: E402  (benchmarks/_common.py, via the line above)

from tinyddpm.device import require_gpu  # noqa: E402
from tinyddpm.extras import MissingExtraError, exit_code, import_torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=("sim", "smoke", "tiny", "base"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "cudasim"))
    p.add_argument("--batch-size", type=int, nargs="+", default=[64], help="one table row per batch size")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per batch size (median reported)")
    p.add_argument("--steps", type=int, default=2, help="training steps timed per round")
    p.add_argument("--ddim-steps", type=int, default=10, help="DDIM steps of each timed sampling run")
    twin = p.add_mutually_exclusive_group()
    twin.add_argument("--torch", action="store_true", help="the side-by-side with PyTorch, or an error without it")
    twin.add_argument("--no-torch", action="store_true", help="time tinyddpm alone even if PyTorch is installed")
    args = p.parse_args(argv)
    if args.torch and args.device == "cudasim":
        p.error("--torch: PyTorch has no CUDA simulator; compare on --device cpu or cuda")
    return args


# ---- the device ----------------------------------------------------------------------------------------
def synchronize(device):
    """Wait for the GPU to finish queued work, so a timed region ends when its work does."""
    if device == "cuda":
        import cupy
        cupy.cuda.get_current_stream().synchronize()
        if "torch" in sys.modules:
            sys.modules["torch"].cuda.synchronize()


def timed(fn, device):
    """Seconds one call of fn takes, synchronised at both ends."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def sgemm_gflops(device, n=2048):
    """The machine's float32 matmul rate (GFLOP/s) on an n×n×n product: the roof the U-Net is read against."""
    if device == "cuda":
        import cupy as xp
    else:
        xp = np
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    from threadpoolctl import threadpool_limits
    with threadpool_limits(os.cpu_count(), user_api="blas"):  # every core (tinyddpm keeps BLAS at one thread)
        seconds = median_time(lambda: timed(lambda: a @ a, device), 5)
    return 2 * n ** 3 / seconds / 1e9


def thread_settings():
    """What decides CPU parallelism: the environment, tinyddpm's pool (kernels/cpu_threads.py), BLAS, numba."""
    import numba
    from threadpoolctl import threadpool_info

    from tinyddpm.kernels import cpu_threads
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                       "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "TINYDDPM_NUM_THREADS")
           if k in os.environ}
    parts = [f"env {env or 'unset'}", f"tinyddpm {cpu_threads.num_threads()} threads (the caller and {cpu_threads.num_threads() - 1} helper(s))",
             f"numba {numba.config.NUMBA_NUM_THREADS} threads (layer {numba.config.THREADING_LAYER}, unused: no prange)"]
    parts += [f"{p['internal_api']} {p['num_threads']} threads" for p in threadpool_info()]
    return "; ".join(parts)


# ---- one framework in its own process ----------------------------------------------------------------
def make_model_and_batch(preset, batch_size):
    import tinyddpm as td
    from tinyddpm.train import PRESETS
    from tinyddpm.unet import UNet
    td.random.manual_seed(0)
    model = UNet(PRESETS[preset].unet)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(model.config.image_shape(batch_size)).astype(np.float32)
    t = rng.integers(0, 1000, batch_size)
    y = rng.integers(0, 10, batch_size)
    upstream = rng.standard_normal(x.shape).astype(np.float32)
    return model, x, t, y, upstream


def tinyddpm_step(model, x, t, y):
    """One tinyddpm training step as Trainer.train_step runs it, as a function of no arguments: loss,
    backward, clipping, Adam, EMA, the loss read back (towards a zero target: the cost is the same)."""
    import tinyddpm as td
    from tinyddpm import optim
    ema, opt = optim.EMA(model, 0.995), optim.Adam(model.parameters(), lr=1e-4)
    xt, target = td.Tensor(td.device.to_device(x)), td.device.to_device(np.zeros_like(x))

    def step():
        loss = td.functional.mse_loss(model(xt, t, y), target)
        opt.zero_grad()
        loss.backward()
        optim.clip_grad_norm(opt.params, 1.0)
        opt.step()
        ema.update(model)
        return loss.item()
    return step


def forward_flops(model, x, t, y):
    """Multiply-adds ×2 of one forward pass: every conv2d, linear and attention product (the work a
    training step does ≈ 3× this: forward, backward-data, backward-weight)."""
    import tinyddpm as td
    from tinyddpm import functional as F
    total, originals = [0], {name: getattr(F, name) for name in ("conv2d", "linear", "scaled_dot_product_attention")}

    def conv2d(x, w, b=None, stride=1, padding=0):
        y = originals["conv2d"](x, w, b, stride, padding)
        total[0] += 2 * y.data.size * int(np.prod(w.shape[1:]))
        return y

    def linear(x, w, b=None):
        total[0] += 2 * (x.data.size // x.shape[-1]) * w.shape[0] * w.shape[1]
        return originals["linear"](x, w, b)

    def attention(q, k, v, *args, **kwargs):
        total[0] += 4 * q.data.size * k.shape[-2]  # QKᵀ and PV
        return originals["scaled_dot_product_attention"](q, k, v, *args, **kwargs)
    F.conv2d, F.linear, F.scaled_dot_product_attention = conv2d, linear, attention
    try:
        with td.no_grad():
            model(td.Tensor(td.device.to_device(x)), t, y)
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)
    return total[0]


class Worker:
    """Builds one framework's model for a batch size and times its steps on request."""

    def __init__(self, framework, args):
        import tinyddpm as td
        self.framework, self.args = framework, args
        self.compile_seconds = 0.0
        if args.device != "cpu" and framework == "tinyddpm":
            td.set_device(args.device)
            from tinyddpm.kernels import compile_all
            _, self.compile_seconds = compile_all()  # reported apart from the first step
        td.device.retain_freed_memory()  # as `tinyddpm train` does; the same malloc setting for both

    def setup(self, batch_size):
        """Build the model and batch; return (first training step s, first sampling run s, forward FLOPs,
        and for tinyddpm the step's (numba launches, array-module calls, device→host transfers))."""
        import tinyddpm as td
        from tinyddpm.diffusion import GaussianDiffusion
        from tinyddpm.schedules import get_betas
        args, device = self.args, self.args.device
        model, x, t, y, _ = make_model_and_batch(args.preset, batch_size)
        flops = forward_flops(model, x, t, y)
        # one step of training as Trainer.train_step runs it: loss, backward, clipping, Adam, EMA, the loss read back
        if self.framework == "tinyddpm":  # tinyddpm_step; the PyTorch twin's below does the same
            step = tinyddpm_step(model, x, t, y)
            sampler_model = model
        else:
            import torch
            import torch_twins
            twin = torch_twins.UNet(model).to("cuda" if device == "cuda" else "cpu")
            params = list(twin.parameters())
            opt, ema = torch.optim.Adam(params, lr=1e-4), [p.detach().clone() for p in params]
            xt = torch.from_numpy(x).to(params[0].device)
            target = torch.zeros_like(xt)

            def step():
                loss = torch.nn.functional.mse_loss(twin(xt, t, y), target)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                with torch.no_grad():
                    torch._foreach_lerp_(ema, params, 1 - 0.995)  # s ← 0.995·s + 0.005·p, fused over all tensors
                return loss.item()
            sampler_model = TorchAsTinyddpm(twin)
        diffusion = GaussianDiffusion(get_betas("linear", 1000))

        def sample():
            with td.no_grad():
                diffusion.sample(sampler_model, x.shape, y=y, sampler="ddim", steps=args.ddim_steps, progress=False,
                                 rng=np.random.default_rng(0))
        self.step, self.sample = step, sample
        host_costs = None
        if self.framework == "tinyddpm":  # counted on the first step, whose time already holds compilation
            from tinyddpm import instrument
            with instrument.count() as counts:
                first_step = timed(step, device)
            host_costs = counts.launches, counts.array_ops, counts.transfers
        else:
            first_step = timed(step, device)
        return first_step, timed(sample, device), flops, host_costs

    def train(self):
        """Median seconds of --steps training steps."""
        return statistics.median(timed(self.step, self.args.device) for _ in range(self.args.steps))

    def sampling(self):
        return timed(self.sample, self.args.device)

    def info(self):
        """(peak RSS MiB, this process's threads and kernel compile time)."""
        threads = thread_settings()
        if self.framework == "pytorch":
            import torch
            threads = f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads"
        if self.compile_seconds:
            threads += f"; compiling the CUDA kernels took {self.compile_seconds:.1f} s"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, threads


def serve(framework, args, conn):
    """Worker process: answer (method, argument) requests until told to stop."""
    worker = Worker(framework, args)
    while (request := conn.recv()) is not None:
        method, argument = request
        conn.send(getattr(worker, method)(*argument))


class TorchAsTinyddpm:
    """The model protocol of tinyddpm.diffusion over a PyTorch twin (arrays in, Tensor out)."""

    def __init__(self, twin):
        self.twin, self.num_classes = twin, twin.num_classes
        self.device = next(twin.parameters()).device

    def __call__(self, x, t, y=None):
        import torch

        import tinyddpm as td
        with torch.no_grad():
            out = self.twin(torch.as_tensor(x.data, device=self.device), t, y)
        return td.Tensor(out.cpu().numpy())  # the sampler's arithmetic runs in NumPy in this process


def check_twin_agrees(args):
    """Outputs and every parameter gradient of the PyTorch twin equal tinyddpm's (relative 1e-4), on the CPU."""
    import torch
    import torch_twins

    import tinyddpm as td
    model, x, t, y, upstream = make_model_and_batch(args.preset, min(args.batch_size[0], 8))
    twin = torch_twins.UNet(model)
    ours = model(td.Tensor(x), t, y)
    (ours * upstream).sum().backward()
    theirs = twin(torch.from_numpy(x), t, y)
    (theirs * torch.from_numpy(upstream)).sum().backward()

    def rel(a, b):
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
    worst = rel(ours.data, theirs.detach().numpy())
    assert worst < 1e-4, f"outputs differ: relative {worst:.2e}"
    grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        err = rel(p.grad, grads[name].grad.numpy())
        assert err < 1e-4, f"gradient of {name} differs: relative {err:.2e}"
        worst = max(worst, err)
    return worst


# ---- the parent: alternate, then tabulate ---------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda":
        require_gpu()
    frameworks = ["tinyddpm"]
    if not args.no_torch and args.device != "cudasim":
        try:
            import_torch("the side-by-side with PyTorch")
            frameworks.append("pytorch")
        except MissingExtraError as e:
            if args.torch:
                raise
            print(f"tinyddpm alone: {e}")
    print(f"preset {args.preset}, device {args.device}, batch sizes {args.batch_size}, {os.cpu_count()} CPU cores; "
          f"{args.rounds} alternating rounds of {args.steps} steps and one {args.ddim_steps}-step DDIM run each")
    print(machine_description())
    print(f"parent threads: {thread_settings()}")
    if "pytorch" in frameworks:
        print(f"PyTorch twin agrees: outputs and all gradients within relative {check_twin_agrees(args):.1e}")
    peak = sgemm_gflops(args.device)
    ctx = mp.get_context("spawn")
    pipes, procs = {}, []
    for name in frameworks:
        parent_end, child_end = ctx.Pipe()
        procs.append(ctx.Process(target=serve, args=(name, args, child_end)))
        procs[-1].start()
        pipes[name] = parent_end

    def ask(name, method, *argument):
        pipes[name].send((method, argument))
        return pipes[name].recv()

    rows, costs = [], []
    for batch in args.batch_size:
        first = {name: ask(name, "setup", batch) for name in frameworks}
        train, sample = {n: [] for n in frameworks}, {n: [] for n in frameworks}
        for r in range(args.rounds):
            order = frameworks if r % 2 == 0 else frameworks[::-1]
            for name in order:
                train[name].append(ask(name, "train"))
            for name in order:
                sample[name].append(ask(name, "sampling"))
        for name in frameworks:
            step_s, sample_s = statistics.median(train[name]), statistics.median(sample[name])
            first_step, first_sample, flops, host_costs = first[name]
            rows.append((name, batch, first_step, first_sample, batch / step_s, batch * args.ddim_steps / sample_s,
                         3 * flops / step_s / 1e9, args.ddim_steps * flops / sample_s / 1e9))
            if host_costs:
                costs.append((batch, *host_costs))
    infos = {name: ask(name, "info") for name in frameworks}
    for name in frameworks:
        pipes[name].send(None)
    for proc in procs:
        proc.join()
    peak = max(peak, sgemm_gflops(args.device))  # the better of two readings, one before and one after

    print(f"\nsgemm 2048³ on {args.device}: {peak:.0f} GFLOP/s (the roof below)")
    for name, (rss, threads) in infos.items():
        print(f"{name}: peak RSS {rss:.0f} MiB; {threads}")
    print("\n| framework | batch | first step s | first sampling s | train img/s | DDIM img·steps/s "
          "| train GFLOP/s (% sgemm) | sampling GFLOP/s (% sgemm) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, batch, s1, d1, img_s, samp, gf_train, gf_samp in rows:
        print(f"| {name} | {batch} | {s1:.2f} | {d1:.2f} | {img_s:.1f} | {samp:.1f} | {gf_train:.1f} "
              f"({100 * gf_train / peak:.0f}%) | {gf_samp:.1f} ({100 * gf_samp / peak:.0f}%) |")
    print("\ntinyddpm's host costs per training step (tinyddpm.instrument; array-module calls are xp.f(...) "
          "calls, on a GPU about one launch each; operators like a + b are not counted):")
    print("\n| batch | numba kernel launches | array-module calls | device→host transfers |\n|---:|---:|---:|---:|")
    for batch, launches, array_ops, transfers in costs:
        print(f"| {batch} | {launches} | {array_ops} | {transfers} |")
    if len(frameworks) > 1:
        by = {(name, batch): (img_s, samp) for name, batch, _, _, img_s, samp, _, _ in rows}
        for batch in args.batch_size:
            (a, b), (c, d) = by["tinyddpm", batch], by["pytorch", batch]
            print(f"batch {batch}: tinyddpm / PyTorch: training {a / c:.2f}x, sampling {b / d:.2f}x (1.00x = parity)")


if __name__ == "__main__":
    sys.exit(exit_code(main))
