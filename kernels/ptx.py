"""Compile every CUDA kernel to PTX (numba-cuda ``compile_ptx``) and report its resources.

    python -m tinyddpm.kernels.ptx [--cc 80 90] [--resources]

Needs no GPU, but must run without ``NUMBA_ENABLE_CUDASIM`` (the simulator has no compiler), and
needs CUDA's compiler libraries (NVVM, NVRTC: the ``ptx`` extra, or a GPU extra); without them it
stops with one line naming the extra. Registers, spills and static shared memory per kernel come
from ``ptxas -v`` assembling the PTX for the same architecture (the ptxas of the nvidia-cuda-nvcc
wheel in the ``ptx`` extra, or one on PATH that accepts the PTX version).
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from tinyddpm.extras import PTX, MissingExtraError, exit_code

from . import OPS, load_bench


def compile_all(ccs=((8, 0), (9, 0))):
    """[(kernel name, cc, ptx text)] for every registered kernel and compute capability."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        raise RuntimeError("compile_ptx needs the real numba.cuda: unset NUMBA_ENABLE_CUDASIM")
    from numba.cuda import compile_ptx

    from ._cuda import PTX_KERNELS
    for op in OPS:
        load_bench(op)  # importing an op's module registers its kernels
    from cuda.pathfinder import BitcodeLibNotFoundError, DynamicLibNotFoundError  # numba-cuda's library finder
    try:
        return [(name, cc, compile_ptx(fn, signature, cc=cc)[0])
                for name, fn, signature in PTX_KERNELS for cc in ccs]
    except (DynamicLibNotFoundError, BitcodeLibNotFoundError) as e:  # e.g. 'Failure finding "libnvrtc.so.13": ...'
        missing = re.search(r'Failure finding "?([^":\s]+)', str(e))
        raise MissingExtraError(f"compiling the kernels to PTX needs CUDA's compiler libraries, and "
                                f"{missing.group(1) if missing else 'NVVM or NVRTC'} is not found here: {PTX}") from e


def _ptxas_candidates():
    try:
        import nvidia
        for root in nvidia.__path__:
            yield from sorted(glob.glob(os.path.join(root, "cu*", "bin", "ptxas")), reverse=True)
    except ImportError:
        pass
    if shutil.which("ptxas"):
        yield shutil.which("ptxas")


def resources(ptx, cc):
    """{'registers', 'shared_bytes', 'spill_bytes'} from ``ptxas -v``, or None without a usable ptxas."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for ptxas in _ptxas_candidates():
            run = subprocess.run([ptxas, "-v", f"-arch=sm_{cc[0]}{cc[1]}", src, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                info = run.stderr
                regs = re.search(r"Used (\d+) registers", info)
                smem = re.search(r"(\d+) bytes smem", info)
                spills = re.search(r"(\d+) bytes spill stores", info)
                return {"registers": int(regs.group(1)) if regs else 0,
                        "shared_bytes": int(smem.group(1)) if smem else 0,
                        "spill_bytes": int(spills.group(1)) if spills else 0}
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", nargs="+", default=["80", "90"], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--resources", action="store_true", help="also run ptxas -v for registers/smem")
    args = parser.parse_args(argv)
    ccs = [(int(c[:-1]), int(c[-1])) for c in args.cc]
    results = compile_all(ccs)
    print(f"{'kernel':44s} {'arch':6s} {'PTX lines':>9s}" + (f" {'regs':>5s} {'smem B':>7s} {'spill B':>7s}" if args.resources else ""))
    for name, cc, ptx in results:
        line = f"{name:44s} sm_{cc[0]}{cc[1]:<3d} {ptx.count(chr(10)):9d}"
        if args.resources:
            r = resources(ptx, cc)
            line += "   (no ptxas accepts this PTX)" if r is None else \
                f" {r['registers']:5d} {r['shared_bytes']:7d} {r['spill_bytes']:7d}"
        print(line)
    print(f"compiled {len(results)} kernel/arch pairs to PTX")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main))
