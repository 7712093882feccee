"""benchmarks/bench_kernels.py: --list prints every version with the command that runs it alone,
--version runs that one version (here in the simulator), a CPU run names the machine first, gives
every row its time over PyTorch's and ends on the worst of them; and benchmarks/_common.py's
machine_description, the header of every benchmark."""
import dataclasses
import os
import subprocess
import sys

import pytest

from tinyddpm.kernels import OPS, load_bench

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_kernels.py")
sys.path.insert(0, os.path.dirname(SCRIPT))
import _common  # noqa: E402  (benchmarks/, found through the line above)
import bench_kernels as harness  # noqa: E402


def bench_kernels(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)


def test_list_prints_every_version_and_its_command():
    run = bench_kernels("--list")
    assert run.returncode == 0, run.stderr
    for op in OPS:
        for version in load_bench(op).versions:
            assert version.idea in run.stdout and version.command(op) in run.stdout


def test_version_runs_only_that_version():
    run = bench_kernels("conv2d", "--version", "cuda_v1", "--sim")
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines()]
    shapes = len(load_bench("conv2d").sim_shapes)
    assert sorted(row[1:3] + [row[-1]] for row in rows) == [["cuda_v1", "backward", "(simulator)"]] * shapes + \
        [["cuda_v1", "forward", "(simulator)"]] * shapes


@pytest.mark.parametrize("args, message", [
    (("conv2d", "--version", "cuda_v9", "--sim"), "no version 'cuda_v9'"),
    (("conv2d", "--version", "cuda_v1"), "runs on --device cuda"),   # the default device is cpu
    (("conv3d",), "unknown op"),
])
def test_bad_arguments_are_refused(args, message):
    run = bench_kernels(*args)
    assert run.returncode == 2 and message in run.stderr


def test_machine_description_names_the_processor_its_vector_isa_and_caches(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\ncpu family\t: 6\n"
                       "model\t\t: 143\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw amx_tile amx_bf16\n\n"
                       "processor\t: 1\nmodel name\t: another\n")
    caches = [(1, "Data", "48K", "0"), (1, "Instruction", "32K", "0"), (2, "Unified", "2048K", "0"),
              (3, "Unified", "107520K", "0-7,16-23")]
    for index, (level, kind, size, shared) in enumerate(caches):
        directory = tmp_path / "cache" / f"index{index}"
        directory.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
            (directory / name).write_text(f"{value}\n")
    line = _common.machine_description(str(cpuinfo), str(tmp_path / "cache"))
    assert line.startswith("processor Intel(R) Xeon(R) Platinum 8480+ (family 6, model 143), ")
    assert "; vector ISA sse4_2 avx avx2 fma avx512f avx512bw amx_tile amx_bf16; " in line
    assert line.endswith("; caches L1d 48K per core, L2 2048K per core, L3 107520K shared by 16 CPUs")


def test_machine_description_says_unknown_without_proc_and_sysfs(tmp_path):
    line = _common.machine_description(str(tmp_path / "none"), str(tmp_path / "none"))
    assert "vector ISA unknown" in line and line.endswith("caches unknown")


def test_worst_row_is_the_engines_path_furthest_behind_pytorch():
    ratios = [("conv2d", "numpy reference", "N1", "forward", 30.0), ("conv2d", "cpu", "N1", "forward", 1.1),
              ("conv2d", "cpu_im2col", "N1", "forward", 4.0), ("conv2d", "pytorch", "N1", "forward", 1.0),
              ("attention", "cpu", "L49", "backward", 1.25), ("attention", "cpu", "L49", "forward", 0.9)]
    assert harness.worst_row(ratios) == "worst cpu / pytorch: attention L49 backward 1.25x (cpu)"
    assert harness.worst_row([r for r in ratios if r[1] != "cpu"]) == \
        "worst cpu / pytorch: conv2d N1 forward 4.00x (cpu_im2col)"  # --version cpu_im2col: that row
    assert harness.worst_row([]) is None


def test_cpu_run_names_the_machine_and_ends_on_its_worst_row(monkeypatch, capsys):
    pytest.importorskip("torch", reason="the cpu / pytorch column needs PyTorch (an optional benchmark extra)")
    tiny = dataclasses.replace(load_bench("attention"), shapes=load_bench("attention").sim_shapes)
    monkeypatch.setattr(harness, "load_bench", lambda op: tiny)
    assert harness.main(["attention", "--device", "cpu", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == _common.machine_description()
    header = next(line for line in lines if line.startswith("| version"))
    assert header.endswith("| cpu / pytorch |")
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines
            if line.startswith("| ") and line != header]
    cpu_versions = [v.name for v in tiny.versions if v.backend == "cpu" and v.name != "reference"]
    assert len(rows) == len(tiny.shapes) * 2 * (len(cpu_versions) + 2)  # + the reference and pytorch rows
    assert all(len(row) == len(header.split("|")) - 2 and row[-1].endswith("x") for row in rows)
    assert all(row[-1] == "1.00x" for row in rows if row[0] == "pytorch")
    cpu_rows = [row for row in rows if row[0] == "cpu"]
    most = max(float(row[-1][:-1]) for row in cpu_rows)  # rows that print alike may tie: any of them
    assert lines[-1] in {f"worst cpu / pytorch: attention {row[2]} {row[1]} {row[-1]} (cpu)"
                         for row in cpu_rows if float(row[-1][:-1]) == most}
