"""Training-step and DDIM-sampling throughput of a preset's U-Net, side by side with PyTorch CPU.

    python benchmarks/bench_train.py [--preset tiny] [--batch-size 64] [--steps 5] [--ddim-steps 10]

When PyTorch is installed, a twin of the same U-Net (benchmarks/torch_twins.py) gets the same weights;
its outputs and every parameter gradient must agree with tinyddpm's (relative 1e-4) before anything
is timed. Each framework is then timed in its own process, so peak memory (max RSS) is its own.
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


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=("smoke", "tiny", "base"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed training steps (median reported)")
    p.add_argument("--ddim-steps", type=int, default=10, help="DDIM steps of the timed sampling run")
    return p.parse_args()


def make_model_and_batch(preset, batch_size):
    import tinyddpm as td
    from tinyddpm.unet import PRESETS, UNet
    td.random.manual_seed(0)
    model = UNet(PRESETS[preset])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size, 1, 28, 28)).astype(np.float32)
    t = rng.integers(0, 1000, batch_size)
    y = rng.integers(0, 10, batch_size)
    upstream = rng.standard_normal(x.shape).astype(np.float32)
    return model, x, t, y, upstream


def median_time(fn, repeats):
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def run_framework(framework, args, queue):
    """Child process: (train img/s, sampling img/s, peak RSS MiB) for one framework."""
    import tinyddpm as td
    td.device.retain_freed_memory()  # as `tinyddpm train` does; the same malloc setting for both
    from tinyddpm import optim
    from tinyddpm.diffusion import GaussianDiffusion
    from tinyddpm.schedules import get_betas
    model, x, t, y, _ = make_model_and_batch(args.preset, args.batch_size)
    target = np.zeros_like(x)
    if framework == "tinyddpm":
        opt = optim.Adam(model.parameters(), lr=1e-4)
        xt = td.Tensor(x)

        def step():
            loss = td.functional.mse_loss(model(xt, t, y), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sampler_model = model
    else:
        import torch
        import torch_twins
        twin = torch_twins.UNet(model)
        opt = torch.optim.Adam(twin.parameters(), lr=1e-4)
        xt, target_t = torch.from_numpy(x), torch.from_numpy(target)

        def step():
            loss = torch.nn.functional.mse_loss(twin(xt, t, y), target_t)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sampler_model = TorchAsTinyddpm(twin)
    step_time = median_time(step, args.steps)
    diffusion = GaussianDiffusion(get_betas("linear", 1000))

    def sample():
        with td.no_grad():
            diffusion.sample(sampler_model, x.shape, y=y, sampler="ddim", steps=args.ddim_steps, progress=False,
                             rng=np.random.default_rng(0))
    sample_time = median_time(sample, 2)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((args.batch_size / step_time, args.batch_size * args.ddim_steps / sample_time, peak_mib))


class TorchAsTinyddpm:
    """The model protocol of tinyddpm.diffusion over a PyTorch twin (NumPy in, Tensor out)."""

    def __init__(self, twin):
        self.twin, self.num_classes = twin, twin.num_classes

    def __call__(self, x, t, y=None):
        import torch

        import tinyddpm as td
        with torch.no_grad():
            return td.Tensor(self.twin(torch.from_numpy(x.data), t, y).numpy())


def check_twin_agrees(args):
    """Outputs and every parameter gradient of the PyTorch twin equal tinyddpm's (relative 1e-4)."""
    import torch
    import torch_twins

    import tinyddpm as td
    model, x, t, y, upstream = make_model_and_batch(args.preset, min(args.batch_size, 8))
    twin = torch_twins.UNet(model)
    ours = model(td.Tensor(x), t, y)
    (ours * upstream[: len(x)]).sum().backward()
    theirs = twin(torch.from_numpy(x), t, y)
    (theirs * torch.from_numpy(upstream[: len(x)])).sum().backward()

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


def main():
    args = parse_args()
    try:
        import torch
        frameworks = ["tinyddpm", "pytorch"]
    except ImportError:
        frameworks = ["tinyddpm"]
    print(f"preset {args.preset}, batch {args.batch_size}, {os.cpu_count()} CPU cores"
          + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if len(frameworks) > 1 else
             " (PyTorch not installed: no side-by-side)"))
    if len(frameworks) > 1:
        print(f"PyTorch twin agrees: outputs and all gradients within relative {check_twin_agrees(args):.1e}")
    ctx = mp.get_context("spawn")
    results = {}
    for name in frameworks:
        queue = ctx.Queue()
        proc = ctx.Process(target=run_framework, args=(name, args, queue))
        proc.start()
        results[name] = queue.get()
        proc.join()
    print("\n| framework | train img/s | DDIM sampling img·steps/s | peak RSS MiB |")
    print("|---|---|---|---|")
    for name, (train, sample, peak) in results.items():
        print(f"| {name} | {train:.1f} | {sample:.1f} | {peak:.0f} |")
    if len(results) > 1:
        (a, b, _), (c, d, _) = results["tinyddpm"], results["pytorch"]
        print(f"\ntinyddpm / PyTorch: training {a / c:.2f}x, sampling {b / d:.2f}x (1.00x = parity)")


if __name__ == "__main__":
    main()
