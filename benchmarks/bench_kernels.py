"""Validate every version of every kernel against its NumPy reference, then time it (llm.c dev/cuda style).

    python benchmarks/bench_kernels.py [conv2d|group_norm|attention] [--device cpu|cuda] [--sim] [--compile-only]

--device cpu   the NumPy reference vs the CPU implementations (+ PyTorch CPU when installed)
--device cuda  every CUDA version on CuPy arrays, timed with CUDA events, with % of the GPU's peak
--sim          only validate, every version, in numba's CUDA simulator on tiny shapes (no GPU needed)
--compile-only only compile every kernel to PTX and print registers / shared memory
Shapes default to the `tiny` U-Net preset at batch 64 (each kernel module's BENCH.shapes).
"""
import argparse
import os
import statistics
import sys
import time

OPS = ("conv2d", "group_norm", "attention")


def parse_args():
    p = argparse.ArgumentParser(description="tinyddpm kernel harness")
    p.add_argument("ops", nargs="*", metavar="op", help=f"any of {', '.join(OPS)} (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sim", action="store_true", help="validate in the CUDA simulator only")
    p.add_argument("--compile-only", action="store_true", help="only compile every kernel to PTX")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats (median reported)")
    args = p.parse_args()
    unknown = set(args.ops) - set(OPS)
    if unknown:
        p.error(f"unknown op {sorted(unknown)[0]!r}: choose from {', '.join(OPS)}")
    args.ops = args.ops or list(OPS)
    return args


def _to_numpy(a):
    return a.get() if hasattr(a, "get") else a


def validate(bench, version, case):
    """Raise AssertionError unless ``version`` matches the reference on ``case``."""
    import numpy as np
    want = bench.reference(case, version.direction)
    got = version.run(case)
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None and w is None:
            continue
        np.testing.assert_allclose(_to_numpy(g), w, rtol=bench.rtol, atol=bench.atol,
                                   err_msg=f"{bench.name} {version.name} {version.direction} output {i}")


def time_cpu(fn, repeats):
    fn()  # warm-up (and numba compilation, if any)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def time_cuda(fn, repeats):
    import cupy
    fn()
    cupy.cuda.Device().synchronize()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    samples = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return statistics.median(samples)


def gpu_peak():
    """(FP32 FLOP/s, DRAM bytes/s) of the current GPU from its attributes: SMs × clock × 128 FP32
    lanes × 2 (FMA), and 2 × memory clock × bus width (DDR)."""
    import cupy
    attr = cupy.cuda.runtime.deviceGetAttribute
    dev = cupy.cuda.Device().id
    sms, clock_khz = attr(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, dev), attr(13, dev)
    mem_khz, bus_bits = attr(36, dev), attr(37, dev)  # cudaDevAttrMemoryClockRate, GlobalMemoryBusWidth
    return sms * clock_khz * 1e3 * 128 * 2, 2 * mem_khz * 1e3 * bus_bits / 8


def shape_label(shape):
    return ",".join(f"{k}{v}" if k not in ("stride", "padding") else f"{k[0]}{v}" for k, v in shape.items())


def op_benches(name):
    """The module's BENCH and the extra ones it describes (e.g. the fused group norm + SiLU)."""
    import importlib
    bench = importlib.import_module(f"tinyddpm.kernels.{name}").BENCH
    return [bench] + list(bench.extra.values())


def run_bench(bench, args):
    import numpy as np
    name = bench.name
    if args.sim:
        for shape in bench.sim_shapes:
            case = bench.make_case(shape, np, 0)
            for v in bench.versions:
                validate(bench, v, case)
                print(f"{name:11s} {v.name:12s} {v.direction:8s} {shape_label(shape):32s} ok (simulator)")
        return

    on_gpu = args.device == "cuda"
    if on_gpu:
        import cupy as xp
        peak_flops, peak_bw = gpu_peak()
    else:
        xp = np
    timer = time_cuda if on_gpu else time_cpu
    backends = ("cuda",) if on_gpu else ("cpu",)
    torch_twin = _torch_twin(name, on_gpu)
    print(f"\n## {name} ({'GPU' if on_gpu else 'CPU'}), median of {args.repeats}")
    cols = "| version | pass | shape | ms | GFLOP/s | GB/s | vs reference |" + (" % peak |" if on_gpu else "")
    print(cols)
    print("|" + "---|" * (cols.count("|") - 1))
    for shape in bench.shapes:
        case = bench.make_case(shape, xp, 0)
        host_case = {k: _to_numpy(v) for k, v in case.items()}  # the reference always runs on the host
        for direction in ("forward", "backward"):
            flops, nbytes = bench.flops(shape, direction), bench.bytes(shape, direction)
            ref_time = time_cpu(lambda: bench.reference(host_case, direction), max(1, args.repeats // 3))
            rows = [("numpy reference", ref_time, "")]
            for v in bench.versions:
                if v.direction != direction or v.backend not in backends or v.name == "reference":
                    continue
                validate(bench, v, case)  # never time a version that gives wrong answers
                rows.append((v.name, timer(lambda: v.run(case), args.repeats), v.idea))
            if torch_twin is not None:
                rows.append(("pytorch", torch_twin(case, direction, timer, args.repeats), ""))
            for label, seconds, _ in rows:
                line = (f"| {label} | {direction} | {shape_label(shape)} | {seconds * 1e3:.3f} | "
                        f"{flops / seconds / 1e9:.1f} | {nbytes / seconds / 1e9:.1f} | {ref_time / seconds:.1f}x |")
                if on_gpu:
                    pct = max(flops / seconds / peak_flops, nbytes / seconds / peak_bw) * 100
                    line += f" {pct:.1f} |" if label != "numpy reference" else " - |"
                print(line)


def _torch_twin(name, on_gpu):
    """time(case, direction, timer, repeats) for the same op in PyTorch, or None without torch."""
    # idle OpenMP threads of PyTorch must sleep, not spin, or they starve NumPy's BLAS threads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        return None
    import torch_twins  # benchmarks/torch_twins.py: PyTorch is never a dependency of the library
    return torch_twins.op_timer(name, torch, on_gpu)


def main():
    args = parse_args()
    if args.sim:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba.cuda is imported
    if args.compile_only:
        from tinyddpm.kernels import ptx
        return ptx.main(["--resources"])
    for name in args.ops:
        for bench in op_benches(name):
            run_bench(bench, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
