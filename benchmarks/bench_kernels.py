"""Validate every version of every kernel against its NumPy reference, then time it (llm.c dev/cuda style).

    python benchmarks/bench_kernels.py [op ...] [--version NAME] [--device cpu|cuda] [--sim] [--compile-only] [--list]

op             any of tinyddpm.kernels.OPS (default: all)
--version NAME only this row of each op's version table (reference, cpu, cuda_v1, cuda_v2, ...)
--device cpu   the NumPy reference vs the CPU versions, and with PyTorch installed the same op in PyTorch:
               each row's `cpu / pytorch` time ratio (above 1: slower than PyTorch) and, last, the worst
               ratio of the engine's path (the `cpu` rows) over every table
--device cuda  every CUDA version on CuPy arrays: --repeats back-to-back launches between two CUDA events,
               per-launch time, a launch-overhead row (an empty kernel with as many array arguments),
               and % of the peak measured in the same run (CuPy matmul FLOP/s, device-copy bandwidth)
--sim          only validate, in numba's CUDA simulator on tiny shapes (no GPU needed)
--compile-only only compile every kernel to PTX and print registers / shared memory (the `ptx` extra)
--list         print each op's version table: the idea of each version and the command that runs it
Shapes default to the `tiny` U-Net preset at batch 64 (each kernel module's BENCH.shapes). The first
line names the processor, its vector ISA and caches.
"""
import argparse
import os
import sys

from _common import empty_kernel, machine_description, measured_peak, median_time, time_launches

from tinyddpm.device import require_gpu
from tinyddpm.extras import MissingExtraError, exit_code
from tinyddpm.kernels import OPS, load_bench
from tinyddpm.kernels.cpu_threads import num_threads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="tinyddpm kernel harness")
    p.add_argument("ops", nargs="*", metavar="op", help=f"any of {', '.join(OPS)} (default: all)")
    p.add_argument("--version", help="only this version (a name from --list)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sim", action="store_true", help="validate in the CUDA simulator only")
    p.add_argument("--compile-only", action="store_true", help="only compile every kernel to PTX")
    p.add_argument("--list", action="store_true", help="print every version and how to run it")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats (median reported)")
    args = p.parse_args(argv)
    unknown = set(args.ops) - set(OPS)
    if unknown:
        p.error(f"unknown op {sorted(unknown)[0]!r}: choose from {', '.join(OPS)}")
    if args.compile_only and args.sim:
        p.error("--compile-only needs numba's real compiler, which the simulator (--sim) replaces")
    args.ops = args.ops or list(OPS)
    return args, p.error


def shape_label(shape):
    return ",".join(f"{k}{v}" if k not in ("stride", "padding") else f"{k[0]}{v}" for k, v in shape.items())


def print_versions(bench, versions):
    print(bench.name)
    for v in versions:
        print(f"  {v.name:10s} {v.idea}\n  {'':10s} {v.command(bench.name)}")


def validate_in_simulator(bench, versions):
    import numpy as np

    from tinyddpm.kernels._bench import validate
    for shape in bench.sim_shapes:
        case = bench.make_case(shape, np, 0)
        for v in versions:
            for direction in v.directions:
                validate(bench, v, direction, case)
                print(f"{bench.name:15s} {v.name:10s} {direction:8s} {shape_label(shape):32s} ok (simulator)")


def run_bench(bench, versions, args, twins):
    """Validate, time and print one op's table; returns its (op, version, shape, pass, time / PyTorch's)
    rows (none without PyTorch, or on the GPU)."""
    import numpy as np

    from tinyddpm.kernels._bench import DIRECTIONS, to_host, validate
    on_gpu = args.device == "cuda"
    if on_gpu:
        import cupy as xp
        peak_flops, peak_bw = measured_peak()
        print(f"measured peak: {peak_flops / 1e12:.1f} TFLOP/s (CuPy sgemm 8192³), {peak_bw / 1e9:.0f} GB/s (device copy)")

        def timer(fn, repeats):  # per launch, over `repeats` back-to-back launches between two events
            return time_launches(fn, repeats, on_gpu=True)
    else:
        xp, timer = np, median_time
    torch_twin = twins.op_timer(bench.name, on_gpu) if twins else None
    how = f"per launch over {args.repeats} back-to-back launches" if on_gpu else f"median of {args.repeats}"
    if not on_gpu:
        how += f", {num_threads()} threads" + (" (PyTorch too)" if torch_twin is not None else "")
    print(f"\n## {bench.name} ({'GPU' if on_gpu else 'CPU'}), {how}")
    with_ratio = torch_twin is not None and not on_gpu
    cols = ("| version | pass | shape | ms | GFLOP/s | GB/s | vs reference |" + (" % peak |" if on_gpu else "")
            + (" cpu / pytorch |" if with_ratio else ""))
    print(cols)
    print("|" + "---|" * (cols.count("|") - 1))
    ratios = []
    for shape in bench.shapes:
        case = bench.make_case(shape, xp, 0)
        host_case = {k: to_host(v) for k, v in case.items()}  # the reference always runs on the host
        for direction in DIRECTIONS:
            flops, nbytes = bench.flops(shape, direction), bench.bytes(shape, direction)
            ref_time = median_time(lambda: bench.reference(host_case, direction), max(1, args.repeats // 3))
            rows = [("numpy reference", ref_time)]
            for v in versions:
                if direction not in v.directions or v.backend != args.device or v.name == "reference":
                    continue
                validate(bench, v, direction, case, bench.atol_at(shape))  # never time a wrong version
                rows.append((v.name, timer(lambda: v.run(direction, case), args.repeats)))
            if torch_twin is not None:
                rows.append(("pytorch", torch_twin(case, direction, timer, args.repeats)))
            if on_gpu:  # what any kernel with as many array arguments pays before doing work
                arrays = [a for a in case.values() if hasattr(a, "shape")]
                empty = empty_kernel(len(arrays))
                rows.append(("empty kernel (launch overhead)", timer(lambda: empty[1, 32](*arrays), args.repeats)))
            torch_seconds = dict(rows).get("pytorch")
            for label, seconds in rows:
                if label.startswith("empty kernel"):
                    print(f"| {label} | {direction} | {shape_label(shape)} | {seconds * 1e3:.3f} | - | - | - | - |")
                    continue
                line = (f"| {label} | {direction} | {shape_label(shape)} | {seconds * 1e3:.3f} | "
                        f"{flops / seconds / 1e9:.1f} | {nbytes / seconds / 1e9:.1f} | {ref_time / seconds:.1f}x |")
                if on_gpu:
                    pct = max(flops / seconds / peak_flops, nbytes / seconds / peak_bw) * 100
                    line += f" {pct:.1f} |" if label != "numpy reference" else " - |"
                if with_ratio:
                    ratio = seconds / torch_seconds
                    line += f" {ratio:.2f}x |"
                    ratios.append((bench.name, label, shape_label(shape), direction, ratio))
                print(line)
    return ratios


def worst_row(ratios):
    """The line ending the CPU run: the row of the engine's path (version `cpu`, else any timed
    version) furthest behind PyTorch, as (op, version, shape, pass, time / PyTorch's) rows give it."""
    timed = [r for r in ratios if r[1] not in ("numpy reference", "pytorch")]
    engine = [r for r in timed if r[1] == "cpu"] or timed
    if not engine:
        return None
    op, version, shape, direction, ratio = max(engine, key=lambda r: r[4])
    return f"worst cpu / pytorch: {op} {shape} {direction} {ratio:.2f}x ({version})"


def _torch_twins(on_gpu):
    """benchmarks/torch_twins.py for the pytorch rows, or None (said in one line) without PyTorch."""
    # idle OpenMP threads of PyTorch must sleep, not spin, or they starve NumPy's BLAS threads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch_twins  # imports torch: PyTorch is never a dependency of the library
    except MissingExtraError as e:
        print(f"no pytorch rows: {e}")
        return None
    if not on_gpu:  # as many threads as tinyddpm's pool: the cpu / pytorch ratio compares like with like
        import torch
        torch.set_num_threads(num_threads())
    return torch_twins


def main(argv=None):
    args, error = parse_args(argv)
    if args.sim:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before load_bench imports numba.cuda
    if args.compile_only:
        from tinyddpm.kernels import ptx
        return ptx.main(["--resources"])
    selected = []  # (bench, its versions to run)
    for bench in map(load_bench, args.ops):
        versions = [v for v in bench.versions if args.version in (None, v.name)]
        if versions:
            selected.append((bench, versions))
        else:
            print(f"{bench.name}: no version {args.version}, skipped")
    if not selected:
        error(f"no version {args.version!r} in {', '.join(args.ops)}: see --list")
    backend = selected[0][1][0].backend
    if args.version and not (args.sim or args.list) and backend != args.device:
        error(f"version {args.version} runs on --device {backend}" + (" (or --sim)" if backend == "cuda" else ""))
    timed = not (args.list or args.sim)
    if timed:
        print(machine_description())
        if args.device == "cuda":
            require_gpu()
    twins = _torch_twins(args.device == "cuda") if timed else None
    ratios = []
    for bench, versions in selected:
        if args.list:
            print_versions(bench, versions)
        elif args.sim:
            validate_in_simulator(bench, versions)
        else:
            ratios += run_bench(bench, versions, args, twins)
    if timed and args.device == "cpu":
        print("\n" + (worst_row(ratios) or "no cpu / pytorch ratios: PyTorch is not installed"))
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main))
