"""Data-parallel training throughput over MPI: images/s for 1 and N ranks, and the all-reduce's share.

    python benchmarks/bench_mpi.py [--preset tiny] [--batch-size 64] [--ranks 2] [--steps 8] [--warmup 2]
                                   [--rounds 3] [--data-dir DIR]

Each row is `Trainer.train_step` (forward, backward, the gradient all-reduce, clipping, Adam, EMA)
with the global batch --batch-size, timed in a process of its own:
- 1 process with every core's thread (TINYDDPM_NUM_THREADS = cores), and with 1 thread: what one
  process gets from the cores, and the single-core rate the ranks are measured against;
- `mpiexec -n N` with TINYDDPM_NUM_THREADS=1 per rank (N ranks on N cores), each rank on its
  batch-size/N images, its gradients averaged by one MPI all-reduce per step.
The rows run in --rounds rounds, in alternating order (A B C, C B A, ...) so that background load
hits them alike. Per row: the median over the rounds of each round's median step time over --steps
steps (after --warmup untimed ones), images/s (global batch / step), and for N ranks the time inside the all-reduce (which includes waiting for the
slower rank) and its share of the step. Then the all-reduce alone, timed back to back with the ranks
in step: bytes of the flat buffer, seconds, and the bandwidth it reaches (algorithm bandwidth
bytes/time, and the "bus bandwidth" 2(N − 1)/N · bytes/time that nccl-tests report for a ring).
Without --data-dir the embedded MNIST subset is used (TINYDDPM_OFFLINE=1): the data do not change
the step's cost.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLREDUCE_REPEATS = 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=("smoke", "tiny", "base"))
    p.add_argument("--batch-size", type=int, default=64, help="the global batch (divided over the ranks)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2], help="world sizes to run with mpiexec")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per row (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernel compilation, allocator)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every row, in alternating order")
    p.add_argument("--data-dir", help="MNIST IDX directory (default: the embedded subset)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one row, in its own process(es)
    return p.parse_args(argv)


# ---- one row, in the timed process(es) ---------------------------------------------------------------
def worker(args):
    """Train and time on every rank; rank 0 prints one JSON line."""
    from tinyddpm import distributed, train
    world = distributed.world()
    config = train.TrainConfig.for_preset(args.preset, batch_size=args.batch_size, sample_every=10 ** 9,
                                          steps=args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as out:
        trainer = train.Trainer(config, out, data_dir=args.data_dir, log=lambda message: None)
        in_allreduce = [0.0]
        if trainer.averager is not None:
            average = trainer.averager.average

            def timed_average(flats):
                t0 = time.perf_counter()
                average(flats)
                in_allreduce[0] += time.perf_counter() - t0
            trainer.averager.average = timed_average
        steps, allreduce = [], []
        for i in range(args.warmup + args.steps):
            in_allreduce[0], t0 = 0.0, time.perf_counter()
            trainer.train_step()
            if i >= args.warmup:
                steps.append(time.perf_counter() - t0)
                allreduce.append(in_allreduce[0])
        flats = trainer.opt.flats
        alone = None
        if trainer.averager is not None:
            world.allgather(None, "lining the ranks up")  # start the back-to-back all-reduces together
            t0 = time.perf_counter()
            for _ in range(ALLREDUCE_REPEATS):
                average(flats)
            alone = (time.perf_counter() - t0) / ALLREDUCE_REPEATS
    if world.is_root:
        print(json.dumps({"step_s": statistics.median(steps), "allreduce_s": statistics.median(allreduce),
                          "alone_s": alone, "bytes": int(sum(f.grad.nbytes for f in flats))}))


# ---- the parent: one process per row ---------------------------------------------------------------------
def measure(args, threads, ranks=None):
    """The worker's JSON for one row: a plain process (ranks None) or `mpiexec -n ranks`."""
    from tinyddpm import distributed
    argv = [sys.executable, os.path.abspath(__file__), "--worker", "--preset", args.preset, "--batch-size",
            str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    argv += ["--data-dir", args.data_dir] if args.data_dir else []
    if ranks is not None:
        argv = [distributed.mpiexec_path() or sys.exit("bench_mpi: no mpiexec found: pip install -e '.[mpi]'"),
                "-n", str(ranks), *argv]
    env = {**os.environ, "TINYDDPM_NUM_THREADS": str(threads)}
    if not args.data_dir:
        env["TINYDDPM_OFFLINE"] = "1"
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_mpi: `{' '.join(argv)}` exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_row(measured):
    """The round whose step time is the median one (its all-reduce times belong to that round)."""
    return sorted(measured, key=lambda r: r["step_s"])[(len(measured) - 1) // 2]


def processor():
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown processor"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"preset {args.preset}, global batch {args.batch_size}, median of {args.steps} steps after {args.warmup}, "
          f"median of {args.rounds} rounds; {processor()}, {cores} cores available")
    plan = [(f"1 process, {cores} threads", 1, cores, None)] + ([("1 process, 1 thread", 1, 1, None)] if cores > 1 else [])
    plan += [(f"mpiexec -n {n}, 1 thread per rank", n, 1, n) for n in args.ranks]
    results = {name: [] for name, *_ in plan}
    for r in range(args.rounds):
        for name, _, threads, ranks in plan if r % 2 == 0 else plan[::-1]:
            results[name].append(measure(args, threads, ranks))
    rows = [(name, ranks, threads, median_row(results[name])) for name, ranks, threads, _ in plan]
    print("\n| run | ranks × threads | img/s | step (s) | all-reduce in the step (s) | its share |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ranks, threads, r in rows:
        share = (f"{r['allreduce_s']:.4f} | {100 * r['allreduce_s'] / r['step_s']:.1f}%" if r["alone_s"] is not None
                 else "- | -")
        print(f"| {name} | {ranks} × {threads} | {args.batch_size / r['step_s']:.1f} | {r['step_s']:.3f} | {share} |")
    for name, ranks, _, r in rows:
        if r["alone_s"] is not None:
            algbw = r["bytes"] / r["alone_s"]
            print(f"\nall-reduce alone ({name}): {r['bytes'] / 1e6:.2f} MB flat gradient buffer in "
                  f"{r['alone_s'] * 1e3:.2f} ms: {algbw / 1e9:.2f} GB/s algorithm bandwidth, "
                  f"{2 * (ranks - 1) / ranks * algbw / 1e9:.2f} GB/s bus bandwidth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
