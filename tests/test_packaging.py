"""kernels/ is importable as tinyddpm.kernels, from the editable install and from a regular one."""
import os
import subprocess
import sys

import tinyddpm.kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_editable_install_maps_kernels_into_the_package():
    assert os.path.samefile(os.path.dirname(tinyddpm.kernels.__file__), os.path.join(ROOT, "kernels"))


def test_regular_install_ships_kernels_and_assets(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), ROOT],
                   check=True, timeout=600)
    files = {os.path.relpath(os.path.join(d, f), target) for d, _, fs in os.walk(target) for f in fs}
    assert "tinyddpm/kernels/conv2d.py" in files and "tinyddpm/kernels/_cuda.py" in files
    assert "tinyddpm/assets/mnist_subset.npz" in files
    assert not any(f.startswith("kernels/") for f in files), "a bare top-level `kernels` package was installed"
    code = "import tinyddpm.kernels.group_norm as g; print(g.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
                         check=True, capture_output=True, text=True).stdout
    assert out.strip().startswith(str(target))
