"""Validate and measure a GPU machine in one command, and write one Markdown report.

    python benchmarks/gpu_check.py --out DIR [--device cuda|cudasim]

Sections, in the order that teaches most: environment facts (GPU, driver, CUDA, CuPy, numba; that
numba and CuPy share one context and stream), the `cuda` test marker, a launch-overhead table, every
kernel version (bench_kernels), the training step at three batch sizes (bench_train),
`tinyddpm train` → `--resume` → `sample` with the resumed weights checked bit for bit against an
uninterrupted run, and the data-parallel gradient all-reduce through NCCL in a world of one. A failing section is reported and the next one runs. The report is
DIR/gpu_report.md. `--device cudasim` runs every section in numba's CUDA simulator on tiny shapes (no
GPU needed; CI runs it, so this script cannot rot while no GPU is around).
"""
import argparse
import datetime
import os
import subprocess
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# What each section runs, per device: the simulator gets tiny shapes so the whole check takes minutes.
PLAN = {
    "cuda": dict(tests=["-m", "cuda"], kernels=["--device", "cuda"],
                 train_bench=["--device", "cuda", "--preset", "tiny", "--batch-size", "16", "64", "256",
                              "--rounds", "3"],
                 preset="smoke", steps=20, sample=["--n", "10", "--steps", "50"], launches=1000,
                 allreduce_presets=("tiny", "base"), mpi_run=True),
    # the simulator runs a CUDA thread as a Python thread: ~20 s per `sim` training step on one core
    "cudasim": dict(tests=["-m", "cuda", "--collect-only"], kernels=["--sim"],
                    train_bench=["--device", "cudasim", "--preset", "sim", "--batch-size", "1", "--rounds", "1",
                                 "--steps", "1", "--ddim-steps", "1"],
                    preset="sim", steps=2, sample=["--n", "1", "--steps", "1"], launches=20,
                    allreduce_presets=("sim",), mpi_run=False),  # mpi_run: two more runs, ~80 s simulated
}


# A section's command that runs this long has hung: stop it and report. Generous, because the simulator
# on a loaded CI machine is slow; on an H100 the whole check takes a few minutes.
TIMEOUT_S = 1800


def run(argv, env=None, timeout=TIMEOUT_S):
    """Run a command from the repository root; return its output, raising on a non-zero exit."""
    done = subprocess.run(argv, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    output = (done.stdout + done.stderr).strip()
    if done.returncode:
        raise RuntimeError(f"`{' '.join(argv)}` exited with {done.returncode}:\n{output[-4000:]}")
    return output


def block(text):
    return f"```\n{text}\n```"


# ---- the sections: each returns Markdown ---------------------------------------------------------------
def environment(device, plan):
    from importlib.metadata import version

    import numba
    lines = ["| fact | value |", "|---|---|", f"| Python | {sys.version.split()[0]} |",
             f"| NumPy | {np.__version__} |", f"| numba / numba-cuda | {numba.__version__} / {version('numba-cuda')} |"]
    if device == "cudasim":
        lines.append("| GPU | none: numba's CUDA simulator runs the kernels on NumPy arrays |")
        return "\n".join(lines)
    import cupy
    from numba import cuda
    props = cupy.cuda.runtime.getDeviceProperties(0)
    driver, runtime = cupy.cuda.runtime.driverGetVersion(), cupy.cuda.runtime.runtimeGetVersion()
    lines += [f"| GPU | {props['name'].decode()} (compute capability {props['major']}.{props['minor']}, "
              f"{props['multiProcessorCount']} SMs, {props['totalGlobalMem'] / 2**30:.0f} GiB) |",
              f"| driver CUDA / runtime CUDA | {driver // 1000}.{driver % 1000 // 10} / "
              f"{runtime // 1000}.{runtime % 1000 // 10} |",
              f"| CuPy | {cupy.__version__} |"]
    same_context = int(cuda.current_context().handle.value) == int(cupy.cuda.driver.ctxGetCurrent())
    lines.append(f"| numba and CuPy share one CUDA context | {'yes' if same_context else 'NO'} |")
    lines.append(f"| stream ordering numba → CuPy without a sync | {stream_order_check()} |")
    return "\n".join(lines)


def stream_order_check():
    """A numba kernel writes a CuPy array and CuPy reads it at once: both on the default stream, the read
    must see the write (our kernels and CuPy's operations rely on that ordering)."""
    import cupy
    from numba import cuda

    @cuda.jit
    def fill(a, value):
        i = cuda.grid(1)
        if i < a.size:
            a[i] = value

    a = cupy.zeros(1 << 24, dtype=cupy.float32)
    for value in (1.0, 2.0, 3.0):
        fill[(a.size + 255) // 256, 256](a, value)
        total = float(a.sum())
        if total != value * a.size:
            return f"NO: read {total} after writing {value}·{a.size}"
    return "yes (3 write → read rounds)"


def tests(device, plan):
    env = {"TINYDDPM_TEST_DEVICE": "cuda"} if device == "cuda" else {}
    out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plan["tests"]], env)
    return block("\n".join(out.splitlines()[-15:]))


def launch_overhead(device, plan):
    from _common import launch_overhead_table
    return launch_overhead_table(device, plan["launches"])


def kernels(device, plan):
    return run([sys.executable, os.path.join(HERE, "bench_kernels.py"), *plan["kernels"]])


def train_step(device, plan):
    return run([sys.executable, os.path.join(HERE, "bench_train.py"), *plan["train_bench"]])


def train_resume_sample(device, plan, out):
    """Train N steps; train N/2, then --resume to N; the two checkpoints must be equal bit for bit; sample."""
    from tinyddpm import checkpoint
    cli = [sys.executable, "-m", "tinyddpm"]
    # the first half is a run of N/2 steps extended to N: a cosine decay is planned over --steps, so constant
    recipe = ["--lr-decay", "constant"]
    common = ["--preset", plan["preset"], "--device", device, "--sample-every", "1000000", "--overwrite", *recipe]
    a, b = os.path.join(out, "run_whole"), os.path.join(out, "run_resumed")
    timings = {}
    for label, argv in [("train (uninterrupted)", ["train", *common, "--steps", str(plan["steps"]), "--out", a]),
                        ("train (first half)", ["train", *common, "--steps", str(plan["steps"] // 2), "--out", b]),
                        ("train --resume", ["train", "--preset", plan["preset"], "--device", device, "--sample-every",
                                            "1000000", *recipe, "--steps", str(plan["steps"]), "--resume", "--out", b]),
                        ("sample", ["sample", "--checkpoint", os.path.join(a, "checkpoint.npz"), "--device", device,
                                    *plan["sample"], "--out", os.path.join(out, "samples.png")])]:
        t0 = time.perf_counter()
        run(cli + argv, {"TINYDDPM_OFFLINE": "1"})
        timings[label] = time.perf_counter() - t0
    whole, resumed = (checkpoint.load(os.path.join(d, "checkpoint.npz")) for d in (a, b))
    differing = [f"{part}/{key}" for part in ("model", "ema", "optim") for key in whole[part]
                 if not np.array_equal(whole[part][key], resumed[part][key])]
    rows = ["| command | seconds |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    verdict = ("resumed run == uninterrupted run, bit for bit (model, EMA, optimiser)" if not differing else
               f"RESUME DIFFERS in {len(differing)} arrays, e.g. {differing[:3]}")
    if differing:
        raise RuntimeError(verdict + "\n" + "\n".join(rows))
    return "\n".join(rows) + f"\n\n{verdict}; samples in samples.png"


def data_parallel(device, plan, out):
    """The gradient all-reduce of data parallelism (tinyddpm.distributed) in a world of one, the path N
    ranks take: on a GPU NCCL averages the flat gradient buffer device to device, and the result must
    be the rank's own gradient bit for bit with no device→host transfer; timed on the presets'
    buffers. Then `mpiexec -n 1 tinyddpm train` (the all-reduce in every step) must equal the plain
    run bit for bit. The simulator has no NCCL: there the MPI host path is checked the same way."""
    from _common import time_launches

    from tinyddpm import checkpoint, distributed, instrument, optim, train
    from tinyddpm import device as _dev
    from tinyddpm.unet import UNet
    on_gpu = device == "cuda"
    if on_gpu:
        averager, path = distributed.NcclAverager(distributed.World()), "NCCL (cupy.cuda.nccl), device to device"
    else:
        from mpi4py import MPI
        averager, path = distributed.HostAverager(distributed.World(MPI.COMM_SELF)), "MPI on host buffers"
    rows = [f"world of one, {path}", "", "| preset | flat gradient buffer | all-reduce | result |", "|---|---:|---:|---|"]
    for preset in plan["allreduce_presets"]:
        model = UNet(train.TrainConfig.for_preset(preset).unet_config())
        flats = optim.flatten(model.parameters())
        rng = np.random.default_rng(0)
        for p in model.parameters():
            p.grad = _dev.to_device(rng.standard_normal(p.shape).astype(np.float32))
        before = [_dev.to_numpy(flat.gather_grads()).copy() for flat in flats]
        with instrument.count() as counts:
            averager.average(flats)
        same = all(np.array_equal(_dev.to_numpy(flat.grad), b) for flat, b in zip(flats, before))
        if not same or counts.transfers:
            raise RuntimeError(f"{preset}: the world-of-one average changed the gradient ({not same}) or read it "
                               f"back to the host ({counts.transfers} transfers)")
        seconds = time_launches(lambda: averager.average(flats), 20, on_gpu)
        nbytes = sum(flat.grad.nbytes for flat in flats)
        rows.append(f"| {preset} | {nbytes:,} bytes | {seconds * 1e3:.3f} ms | own gradient bit for bit, "
                    f"0 transfers |")
    mpiexec = distributed.mpiexec_path()
    if not plan["mpi_run"] or mpiexec is None:
        reason = "no mpiexec here" if mpiexec is None else "skipped in the simulator (two more simulated runs)"
        return "\n".join(rows) + f"\n\n`mpiexec -n 1 tinyddpm train`: {reason}"
    common = ["-m", "tinyddpm", "train", "--preset", plan["preset"], "--device", device, "--steps", str(plan["steps"]),
              "--sample-every", "1000000", "--overwrite"]
    plain, ranked = os.path.join(out, "run_plain"), os.path.join(out, "run_mpi1")
    run([sys.executable, *common, "--out", plain], {"TINYDDPM_OFFLINE": "1"})
    run([mpiexec, "-n", "1", sys.executable, *common, "--out", ranked], {"TINYDDPM_OFFLINE": "1"})
    a, b = (checkpoint.load(os.path.join(d, "checkpoint.npz")) for d in (plain, ranked))
    differing = [f"{part}/{key}" for part in ("model", "ema", "optim") for key in a[part]
                 if not np.array_equal(a[part][key], b[part][key])]
    if differing:
        raise RuntimeError(f"mpiexec -n 1 differs from the plain run in {len(differing)} arrays, e.g. {differing[:3]}")
    return "\n".join(rows) + (f"\n\n`mpiexec -n 1 tinyddpm train --device {device}` ({plan['steps']} steps, the "
                              f"all-reduce in each) == the plain run, bit for bit (model, EMA, optimiser)")


SECTIONS = [("Environment", environment), ("GPU tests (marker `cuda`)", tests), ("Launch overhead", launch_overhead),
            ("Kernels (bench_kernels)", kernels), ("Training step (bench_train)", train_step),
            ("train → --resume → sample", train_resume_sample), ("Data-parallel all-reduce", data_parallel)]


def commit():
    try:
        return run(["git", "rev-parse", "--short", "HEAD"], timeout=10)
    except (RuntimeError, OSError):
        return "unknown (not a git checkout)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for gpu_report.md and the runs it makes")
    p.add_argument("--device", choices=("cuda", "cudasim"), default="cuda")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.device == "cudasim":
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before anything imports numba.cuda
    import tinyddpm
    tinyddpm.set_device(args.device)
    plan, report, failed = PLAN[args.device], [], []
    header = (f"# GPU check ({args.device})\n\n{datetime.date.today().isoformat()}, commit {commit()}, "
              f"`python benchmarks/gpu_check.py --device {args.device} --out DIR`\n")
    started = time.perf_counter()
    for title, section in SECTIONS:
        t0 = time.perf_counter()
        print(f"== {title}", file=sys.stderr, flush=True)
        try:
            extra = (args.out,) if section in (train_resume_sample, data_parallel) else ()
            body = section(args.device, plan, *extra)
        except Exception:  # report it and go on: one broken section must not hide the others
            failed.append(title)
            body = "**FAILED**\n\n" + block(traceback.format_exc()[-6000:])
        report.append(f"## {title} ({time.perf_counter() - t0:.0f} s)\n\n{body}\n")
    summary = (f"{len(SECTIONS) - len(failed)} of {len(SECTIONS)} sections passed"
               + (f"; failed: {', '.join(failed)}" if failed else "") + f"; {time.perf_counter() - started:.0f} s in all")
    path = os.path.join(args.out, "gpu_report.md")
    with open(path, "w") as f:
        f.write(header + f"\n{summary}\n\n" + "\n".join(report))
    print(f"{summary}; wrote {path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
