"""What the benchmark scripts share."""
import functools
import glob
import os
import platform
import statistics
import time

# The vector instruction sets that decide how fast a kernel can be, as /proc/cpuinfo names them (x86
# `flags`, then Arm `Features`): a table measured with AVX-512 or AMX says so.
VECTOR_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                    "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
                    "asimd", "sve", "sve2", "sme")


def machine_description(cpuinfo="/proc/cpuinfo", cache_dir="/sys/devices/system/cpu/cpu0/cache"):
    """One line naming the processor, its vector ISA and caches, for the header of every benchmark:
    'processor AMD EPYC (family 25, model 1), 2 CPUs; vector ISA avx avx2 fma; caches L1d 32K per core,
    L2 512K per core, L3 32768K shared by 2 CPUs'. Read from Linux's /proc/cpuinfo and sysfs; where
    those are missing, the part says 'unknown'."""
    fields = _first_processor(cpuinfo)
    name = fields.get("model name") or fields.get("Hardware") or platform.processor() or platform.machine() or "unknown"
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    isa = " ".join(f for f in VECTOR_ISA_FLAGS if f in flags) or "unknown"
    return f"processor {name}, {os.cpu_count()} CPUs; vector ISA {isa}; caches {_caches(cache_dir) or 'unknown'}"


def _first_processor(cpuinfo):
    """The `key: value` fields of the first processor in /proc/cpuinfo ({} without the file)."""
    try:
        with open(cpuinfo) as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}


def _caches(cache_dir):
    """'L1d 32K per core, L2 512K per core, L3 32768K shared by 2 CPUs' from sysfs (data and unified
    caches of CPU 0; '' without sysfs)."""
    parts = []
    for index in sorted(glob.glob(os.path.join(cache_dir, "index*"))):
        try:
            level, kind, size, shared = (_read(index, name) for name in ("level", "type", "size", "shared_cpu_list"))
        except OSError:
            continue
        if kind == "Instruction":
            continue
        sharing = _count_cpus(shared)
        parts.append(f"L{level}{'d' if kind == 'Data' else ''} {size} "
                     + ("per core" if sharing == 1 else f"shared by {sharing} CPUs"))
    return ", ".join(parts)


def _read(directory, name):
    with open(os.path.join(directory, name)) as f:
        return f.read().strip()


def _count_cpus(cpu_list):
    """How many CPUs a sysfs list such as '0-3,8-11' or '5' names."""
    total = 0
    for part in cpu_list.split(","):
        first, _, last = part.partition("-")
        total += int(last or first) - int(first) + 1
    return total


def median_time(fn, repeats):
    """Median wall-clock seconds of `repeats` calls of fn, after one untimed warm-up call (numba
    compilation, allocator and cache warm-up)."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


# ---- GPU timing: what is kernel and what is dispatch ------------------------------------------------
def time_launches(fn, launches, on_gpu):
    """Seconds per call of `launches` back-to-back calls of fn, after one warm-up call: between two CUDA
    events on a GPU (so host launch gaps overlap the GPU's work instead of adding to it, and a kernel
    shorter than its launch shows as dispatch-bound), by the wall clock elsewhere."""
    fn()
    if not on_gpu:
        t0 = time.perf_counter()
        for _ in range(launches):
            fn()
        return (time.perf_counter() - t0) / launches
    import cupy
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    cupy.cuda.get_current_stream().synchronize()
    start.record()
    for _ in range(launches):
        fn()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / launches


_EMPTY_KERNELS = {}


def empty_kernel(n_args):
    """A numba.cuda kernel with n_args array arguments that does nothing: its launch time is the
    dispatch cost a real kernel with as many arguments pays before any work."""
    if n_args not in _EMPTY_KERNELS:
        from numba import cuda
        names = ", ".join(f"a{i}" for i in range(n_args))
        scope = {}
        exec(f"def empty({names}):\n    pass", scope)  # one signature per argument count
        _EMPTY_KERNELS[n_args] = cuda.jit(scope["empty"])
    return _EMPTY_KERNELS[n_args]


def launch_overhead_table(device, launches):
    """Markdown: µs per launch of empty numba kernels (1–16 array arguments) and of one small CuPy
    operation, each timed over `launches` back-to-back launches."""
    on_gpu = device == "cuda"
    if on_gpu:
        import cupy as xp
    else:
        import numpy as xp
    a = xp.zeros(32, dtype=xp.float32)
    rows = []
    for n_args in (1, 4, 8, 16):
        kernel = empty_kernel(n_args)
        rows.append((f"numba kernel, {n_args} array argument{'s' if n_args > 1 else ''}",
                     time_launches(lambda: kernel[1, 32](*[a] * n_args), launches, on_gpu)))
    if on_gpu:
        rows.append(("CuPy elementwise a + 1 (32 floats)", time_launches(lambda: a + 1, launches, on_gpu)))
    lines = [f"{launches} back-to-back launches each ({'CUDA events' if on_gpu else 'wall clock, simulator'})",
             "", "| launch | µs per launch |", "|---|---:|"]
    return "\n".join(lines + [f"| {name} | {seconds * 1e6:.1f} |" for name, seconds in rows])


@functools.cache
def measured_peak():
    """(FLOP/s, bytes/s) this GPU reaches: an 8192³ float32 CuPy matmul and a 1 GiB device copy (read +
    write counted), measured now, so '% of peak' is against what the machine really does."""
    import cupy
    a = cupy.ones((8192, 8192), dtype=cupy.float32)
    flops = 2 * 8192 ** 3 / time_launches(lambda: a @ a, 5, True)
    src = cupy.ones(2 ** 28, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    bandwidth = 2 * src.nbytes / time_launches(lambda: dst.__setitem__(Ellipsis, src), 10, True)
    return flops, bandwidth
