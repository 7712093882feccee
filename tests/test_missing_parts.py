"""An optional part that is not installed (the `ptx` extra, CuPy, PyTorch) ends in one line naming what
to install and exit code 2, never a traceback. Everything is installed here, so each test makes the
part go missing the way it does on a user's machine: the library finder or the import fails with the
exception it really raises."""
import os
import runpy
import subprocess
import sys

import pytest

from tinyddpm import cli, device

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def one_line(err):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# cuda.pathfinder (through which numba-cuda and cuda.bindings load NVRTC and NVVM) fails as it does
# without the `ptx` extra; then the script runs as `python benchmarks/bench_kernels.py --compile-only`.
WITHOUT_NVRTC = """
import os, runpy, sys
import cuda.pathfinder as finder
found = finder.load_nvidia_dynamic_lib
def load(name):
    if name == "nvrtc":
        raise finder.DynamicLibNotFoundError('Failure finding "libnvrtc.so.13": No such file\\nattempts: ...')
    return found(name)
finder.load_nvidia_dynamic_lib = load
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_compile_only_without_the_ptx_extra_names_the_extra():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}  # the simulator has no compiler
    run = subprocess.run([sys.executable, "-c", WITHOUT_NVRTC, os.path.join(BENCHMARKS, "bench_kernels.py"),
                          "--compile-only"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 2, run.stderr[-3000:]
    line = one_line(run.stderr)
    assert line.startswith("bench_kernels.py: error: ") and "libnvrtc.so.13" in line
    assert line.endswith('pip install -e ".[ptx]"')


@pytest.fixture
def without_cupy(monkeypatch):
    """`import cupy` fails as it does with no GPU extra installed (ModuleNotFoundError), and numba.cuda
    is as if not yet imported, without the simulator the test suite runs in."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setattr(device, "_numba_cuda_mode", lambda: None)


@pytest.mark.parametrize("version, extra", [((12, 4), '".[cuda12]"'), ((13, 0), '".[cuda13]"'),
                                            (None, "no NVIDIA driver")])
def test_device_cuda_without_cupy_names_the_extra_for_the_driver(without_cupy, monkeypatch, capsys, version, extra):
    monkeypatch.setattr(device, "driver_cuda_version", lambda: version)
    assert cli.main(["train", "--device", "cuda"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("tinyddpm: error: device 'cuda' needs CuPy, which is not installed: ") and extra in line
    if version:
        assert line.endswith(f'pip install -e {extra} (nvidia-smi reports CUDA {version[0]}.{version[1]})')


def test_the_driver_cuda_version_is_read_from_nvidia_smi(monkeypatch):
    header = "| NVIDIA-SMI 570.86.15    Driver Version: 570.86.15    CUDA Version: 12.8     |\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, header, ""))
    assert device.driver_cuda_version() == (12, 8)

    def no_nvidia_smi(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "nvidia-smi")
    monkeypatch.setattr(subprocess, "run", no_nvidia_smi)
    assert device.driver_cuda_version() is None


def run_script(name, *args):
    """(exit code, stderr) of `python benchmarks/<name> args...`, run in this process."""
    sys.argv = [os.path.join(BENCHMARKS, name), *args]
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(sys.argv[0], run_name="__main__")
    return stop.value.code


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # run_script sets it; restored afterwards
    monkeypatch.delitem(sys.modules, "torch_twins", raising=False)


def test_bench_kernels_on_cuda_without_cupy_names_the_extra(without_cupy, benchmarks_on_path, monkeypatch, capsys):
    monkeypatch.setattr(device, "driver_cuda_version", lambda: (13, 1))
    assert run_script("bench_kernels.py", "conv2d", "--device", "cuda") == 2
    assert one_line(capsys.readouterr().err).endswith('pip install -e ".[cuda13]" (nvidia-smi reports CUDA 13.1)')


def test_bench_train_asked_for_pytorch_without_it_says_pip_install_torch(benchmarks_on_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as it does without PyTorch
    assert run_script("bench_train.py", "--preset", "smoke", "--torch") == 2
    assert one_line(capsys.readouterr().err) == ("bench_train.py: error: the side-by-side with PyTorch needs "
                                                 "PyTorch: pip install torch")


def test_the_pytorch_rows_of_bench_kernels_are_left_out_in_one_line_without_pytorch(benchmarks_on_path, monkeypatch,
                                                                                      capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    import bench_kernels
    assert bench_kernels._torch_twins(on_gpu=False) is None
    assert capsys.readouterr().out == ("no pytorch rows: the PyTorch twin (benchmarks/torch_twins.py) needs PyTorch: "
                                       "pip install torch\n")
