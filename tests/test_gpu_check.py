"""benchmarks/gpu_check.py in the CUDA simulator: every section runs and passes and the report has
them all, so the script a GPU session depends on cannot rot while no GPU is around."""
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "gpu_check.py")


def test_gpu_check_runs_every_section_in_the_simulator(tmp_path):
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        from gpu_check import SECTIONS
    finally:
        sys.path.pop(0)
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # no real cache touched
    run = subprocess.run([sys.executable, SCRIPT, "--device", "cudasim", "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=3600)  # hangs only; ~3 min on an idle 2-core machine
    report = (tmp_path / "gpu_report.md").read_text()
    assert run.returncode == 0, report
    assert f"{len(SECTIONS)} of {len(SECTIONS)} sections passed" in report
    for title, _ in SECTIONS:
        assert f"## {title} (" in report
    assert "bit for bit" in report and (tmp_path / "samples.png").is_file()
